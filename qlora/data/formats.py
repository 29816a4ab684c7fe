"""Reading training files and turning records into token ids with per-token targets.

Files: JSONL (one JSON object per line) or JSON (one array of objects). Record formats:

    alpaca      {"instruction": str, "input": str (optional), "output": str}
    chat        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    completion  {"text": str}

An :class:`Example` holds ``input_ids`` and ``labels`` of equal length, already shifted:
``labels[t]`` is the token that should follow ``input_ids[:t+1]``, or -100 where nothing is
trained (the prompt, unless ``train_on_prompt``). Shifting here, per example, means packed
sequences can never train one example's first token from the previous example's last one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterator, Optional

from qlora.util.files import read_text as read_file_text

IGNORE_INDEX = -100
BUILTIN_DATA_FILE = "tasks.jsonl"
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class ReadStats:
    """What reading a file kept and dropped."""

    records: int = 0
    bad_lines: list[str] = field(default_factory=list)  # "file:line: reason", when skipped
    truncated: int = 0
    no_trained_tokens: int = 0  # dropped: truncation left no response token


class BadRecord(ValueError):
    pass


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def _string_field(record: dict, key: str, required: bool = True) -> str:
    if key not in record:
        if required:
            raise BadRecord(f"missing field {key!r} (has {sorted(record)})")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def record_parts(record, fmt: str, tokenizer) -> list[tuple[str, bool]]:
    """The record as ``[(text, is_response), ...]`` in order, or BadRecord saying what is wrong."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        prompt = alpaca_prompt(_string_field(record, "instruction"),
                               _string_field(record, "input", required=False))
        return [(prompt, False), (_string_field(record, "output"), True)]
    if fmt == "completion":
        return [(_string_field(record, "text"), True)]
    if fmt == "chat":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRecord("field 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise BadRecord(f"messages[{i}] must be an object with a string 'content'")
            if message.get("role") not in CHAT_ROLES:
                raise BadRecord(f"messages[{i}].role is {message.get('role')!r}, "
                                f"expected one of {', '.join(CHAT_ROLES)}")
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord("no assistant message to train on")
        return tokenizer.render_chat(messages)
    raise ValueError(f"unknown data format {fmt!r}; expected alpaca, chat or completion")


def prompt_ids(tokenizer, text: str, fmt: str) -> list[int]:
    """Token ids that ask for an answer to ``text`` as a model trained on ``fmt`` data expects:
    ``alpaca`` wraps it in the alpaca prompt, ``chat`` renders it as a user turn followed by the
    assistant's header (the tokenizer's chat template or the built-in one), ``completion`` sends
    it as it is. Starts with BOS once, whether or not a chat template renders it."""
    if fmt == "alpaca":
        text = alpaca_prompt(text)
    elif fmt == "chat":
        text = tokenizer.chat_generation_prompt([{"role": "user", "content": text}])
    elif fmt != "completion":
        raise ValueError(f"unknown data format {fmt!r}; expected alpaca, chat or completion")
    ids = tokenizer.encode(text)
    if tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids.insert(0, tokenizer.bos_id)
    return ids


def tokenize_parts(parts, tokenizer, max_seq_len: int, train_on_prompt: bool) -> tuple[Example, bool]:
    """(example, truncated). Tokens are BOS + parts + EOS; EOS is trained with the response.
    BOS or EOS that the parts already hold (a chat template may render them) is not repeated."""
    tokens, trained = [], []
    for text, is_response in parts:
        ids = tokenizer.encode(text)
        tokens += ids
        trained += [is_response or train_on_prompt] * len(ids)
    if tokenizer.bos_id is not None and tokens[:1] != [tokenizer.bos_id]:
        tokens.insert(0, tokenizer.bos_id)
        trained.insert(0, False)
    if tokenizer.eos_id is not None and tokens[-1:] != [tokenizer.eos_id]:
        tokens.append(tokenizer.eos_id)
        trained.append(True)
    truncated = len(tokens) > max_seq_len + 1
    tokens, trained = tokens[:max_seq_len + 1], trained[:max_seq_len + 1]
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(tokens[1:], trained[1:])]
    return Example(tokens[:-1], labels), truncated


def _records(path: str, text: str) -> Iterator[tuple[str, object]]:
    """(location, parsed record or BadRecord) per record of a JSON or JSONL file's text."""
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            yield f"{path}:{err.lineno}", BadRecord(f"invalid JSON: {err.msg}")
            return
        if not isinstance(data, list):
            yield f"{path}:1", BadRecord("a .json data file must hold one array of records")
            return
        for i, record in enumerate(data):
            yield f"{path}: record {i}", record
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            yield f"{path}:{lineno}", BadRecord(f"invalid JSON: {err.msg} (column {err.colno})")


def read_text(path: str) -> str:
    if path.startswith("builtin:"):
        return resources.files("qlora.data").joinpath(BUILTIN_DATA_FILE).read_text(encoding="utf-8")
    if path.endswith(".parquet"):
        raise ValueError(f"{path}: Parquet is not supported (no Parquet reader is a dependency); "
                         f"convert it to JSONL")
    return read_file_text(path)  # errors name the file (and the line of a byte not in UTF-8)


def read_records(path: str, skip_bad_lines: bool,
                 stats: Optional[ReadStats] = None) -> list[tuple[str, dict]]:
    """(location, record) of every well-formed JSON record of ``path``.

    Lines that are not JSON raise ``ValueError("file:line: ...")`` unless ``skip_bad_lines``,
    which records them in ``stats.bad_lines`` instead.
    """
    stats = stats if stats is not None else ReadStats()
    out = []
    for where, record in _records(path, read_text(path)):
        if isinstance(record, BadRecord):
            if not skip_bad_lines:
                raise ValueError(f"{where}: {record} (set data.skip_bad_lines: true to skip such lines)")
            stats.bad_lines.append(f"{where}: {record}")
            continue
        out.append((where, record))
    return out


def load_examples(path: str, fmt: str, tokenizer, *, max_seq_len: int, train_on_prompt: bool,
                  skip_bad_lines: bool, stats: Optional[ReadStats] = None) -> list[Example]:
    """Every record of ``path`` as an :class:`Example`; bad records fail with ``file:line: why``
    (or are skipped and counted in ``stats.bad_lines`` with ``skip_bad_lines``)."""
    stats = stats if stats is not None else ReadStats()
    examples = []
    for where, record in read_records(path, skip_bad_lines, stats):
        try:
            parts = record_parts(record, fmt, tokenizer)
        except BadRecord as err:
            if not skip_bad_lines:
                raise ValueError(f"{where}: {err} (format {fmt!r}; set data.skip_bad_lines: true "
                                 f"to skip such lines)") from None
            stats.bad_lines.append(f"{where}: {err}")
            continue
        example, truncated = tokenize_parts(parts, tokenizer, max_seq_len, train_on_prompt)
        stats.records += 1
        stats.truncated += truncated
        if example.n_trained == 0:
            stats.no_trained_tokens += 1
            continue
        examples.append(example)
    return examples
