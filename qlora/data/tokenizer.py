"""Tokenizers the trainer uses: the shipped byte-level one, and Hugging Face tokenizers.

Both expose the same small interface: ``encode(text) -> list[int]`` (no special tokens),
``decode(ids) -> str``, ``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``,
``render_chat(messages) -> list[(text, is_response)]``, ``chat_generation_prompt(messages)``
(the conversation followed by what opens the assistant's answer) and ``hf_tokenizer()`` (a
Hugging Face tokenizer giving the same ids, to ship with an export).
"""
from __future__ import annotations

from typing import Optional

# The built-in chat template: one block per message; the assistant's text (and the end-of-turn
# marker after it) is the response part.
_ROLE_HEADER = "<|{role}|>\n"
_END_OF_TURN = "\n"


class ByteTokenizer:
    """Token i < 256 is the byte i of the UTF-8 text; 256, 257, 258 are BOS, EOS and padding.

    Needs no vocabulary file: it is the tokenizer of the built-in tiny model, whose
    ``vocab_size`` (259) matches.
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict]) -> list[tuple[str, bool]]:
        return builtin_chat_parts(messages)

    def chat_generation_prompt(self, messages: list[dict]) -> str:
        return builtin_generation_prompt(messages)

    def hf_tokenizer(self):
        """This tokenizer as a Hugging Face fast tokenizer that gives the same ids (for exports):
        byte-level BPE without merges, so every byte is one token, numbered by its value, with
        BOS, EOS and padding after them and the built-in chat template."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {symbol: byte for byte, symbol in enumerate(byte_symbols())}
        specials = {"<s>": self.bos_id, "</s>": self.eos_id, "<pad>": self.pad_id}
        backend = Tokenizer(models.BPE(vocab={**vocab, **specials}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", chat_template=BUILTIN_CHAT_TEMPLATE)


def byte_symbols() -> list[str]:
    """The character byte-level BPE (GPT-2's scheme, tokenizers' ``ByteLevel``) writes for each byte
    0..255: a printable Latin-1 byte stands for itself, each of the other 68 for a code point from
    256 up, in byte order, so every token is printable text."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("\xa1"), ord("\xac") + 1)) \
        | set(range(ord("\xae"), ord("\xff") + 1))
    symbols, unprintable = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + unprintable))
            unprintable += 1
    return symbols


# The built-in chat template (builtin_chat_parts) in Jinja, as a Hugging Face tokenizer carries it.
BUILTIN_CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def builtin_chat_parts(messages: list[dict]) -> list[tuple[str, bool]]:
    """The built-in template: ``<|role|>\\ncontent\\n`` per message; assistant content is response."""
    parts = []
    for message in messages:
        parts.append((_ROLE_HEADER.format(role=message["role"]), False))
        parts.append((message["content"] + _END_OF_TURN, message["role"] == "assistant"))
    return parts


def builtin_generation_prompt(messages: list[dict]) -> str:
    """The built-in template's rendering of ``messages`` and the assistant header after them."""
    return "".join(text for text, _ in builtin_chat_parts(messages)) + \
        _ROLE_HEADER.format(role="assistant")


class HFTokenizer:
    """A Hugging Face tokenizer behind the trainer's interface."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos_id: Optional[int] = tokenizer.bos_token_id
        self.eos_id: Optional[int] = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """With the tokenizer's chat template, each turn's text is the part the template adds
        when that turn is appended to the conversation before it. Of an assistant turn, what
        the template's generation prompt adds (the assistant header, which generation is given)
        is prompt; the rest is the response."""
        if not getattr(self.tok, "chat_template", None):
            return builtin_chat_parts(messages)
        parts, rendered = [], ""
        for i, message in enumerate(messages):
            text = self._render(messages[:i + 1], add_generation_prompt=False)
            if message["role"] == "assistant":
                header = self._render(messages[:i], add_generation_prompt=True) if i else rendered
                if header.startswith(rendered) and text.startswith(header):
                    parts.append((header[len(rendered):], False))
                    rendered = header
            if not text.startswith(rendered):
                raise ValueError("the tokenizer's chat template does not render a conversation as "
                                 "a prefix of its continuation; use data.format: completion")
            parts.append((text[len(rendered):], message["role"] == "assistant"))
            rendered = text
        return [(text, is_response) for text, is_response in parts if text]

    def hf_tokenizer(self):
        return self.tok

    def chat_generation_prompt(self, messages: list[dict]) -> str:
        if not getattr(self.tok, "chat_template", None):
            return builtin_generation_prompt(messages)
        return self._render(messages, add_generation_prompt=True)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

