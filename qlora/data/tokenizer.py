"""Tokenizers the trainer uses: the shipped byte-level one, and Hugging Face tokenizers.

Both expose the same small interface: ``encode(text) -> list[int]`` (no special tokens),
``decode(ids) -> str``, ``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size`` and
``render_chat(messages) -> list[(text, is_response)]``.
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


def builtin_chat_parts(messages: list[dict]) -> list[tuple[str, bool]]:
    """The built-in template: ``<|role|>\\ncontent\\n`` per message; assistant content is response."""
    parts = []
    for message in messages:
        parts.append((_ROLE_HEADER.format(role=message["role"]), False))
        parts.append((message["content"] + _END_OF_TURN, message["role"] == "assistant"))
    return parts


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
        """With the tokenizer's chat template, each assistant turn's text is the part the
        template adds when that turn is appended to the conversation before it."""
        if not getattr(self.tok, "chat_template", None):
            return builtin_chat_parts(messages)
        parts, rendered = [], ""
        for i, message in enumerate(messages):
            text = self.tok.apply_chat_template(messages[:i + 1], tokenize=False)
            if not text.startswith(rendered):
                raise ValueError("the tokenizer's chat template does not render a conversation as "
                                 "a prefix of its continuation; use data.format: completion")
            parts.append((text[len(rendered):], message["role"] == "assistant"))
            rendered = text
        return parts

