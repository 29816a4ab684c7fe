"""Reading training files and turning records into token ids with per-token targets.

Files: JSONL (one JSON object per line) or JSON (one array of objects). Record formats:

    alpaca      {"instruction": str, "input": str (optional), "output": str}
    chat        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    sharegpt    {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
    completion  {"text": str}

An :class:`Example` holds ``input_ids`` and ``labels`` of equal length, already shifted:
``labels[t]`` is the token that should follow ``input_ids[:t+1]``, or -100 where nothing is
trained (the prompt, unless ``train_on_prompt``). Shifting here, per example, means packed
sequences can never train one example's first token from the previous example's last one.
It also records where its prompt ends and how long its first answer is, whatever is trained,
so evaluation can ask the prompt and score the answer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterable, Iterator, Optional

from qlora.util.files import read_text as read_file_text

IGNORE_INDEX = -100
BUILTIN_DATA_FILE = "tasks.jsonl"
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CHAT_ROLES = ("system", "user", "assistant")
DATA_FORMATS = ("alpaca", "chat", "sharegpt", "completion")
# ShareGPT's speakers as chat roles; "user" and "assistant" appear in some ShareGPT files too
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


@dataclass
class Example:
    """``prompt_len``: the tokens before the first response token (at least 1: the first token
    is never a label); ``answer_len``: the tokens of the first response, its end-of-turn and EOS
    included, that follow the prompt (0 if truncation cut them all)."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    answer_len: int

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
    if key not in record or (record[key] is None and not required):  # CSV: an empty cell is None
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
    if fmt == "sharegpt":
        return _chat_parts(_sharegpt_messages(record), tokenizer)
    if fmt == "chat":
        return _chat_parts(record.get("messages"), tokenizer)
    raise ValueError(f"unknown data format {fmt!r}; expected {', '.join(DATA_FORMATS)}")


def _check_turns(turns, field: str, text: str, role: str, roles) -> None:
    """``turns`` (a record's ``field``) must be a non-empty list of objects, each with a string
    ``text`` and a ``role`` among ``roles``; an error names the turn."""
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"field '{field}' must be a non-empty list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(text), str):
            raise BadRecord(f"{field}[{i}] must be an object with a string '{text}'")
        if turn.get(role) not in roles:
            raise BadRecord(f"{field}[{i}].{role} is {turn.get(role)!r}, expected one of "
                            f"{', '.join(roles)}")


def _sharegpt_messages(record: dict) -> list[dict]:
    turns = record.get("conversations")
    _check_turns(turns, "conversations", "value", "from", SHAREGPT_ROLES)
    return [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]} for turn in turns]


def _chat_parts(messages, tokenizer) -> list[tuple[str, bool]]:
    _check_turns(messages, "messages", "content", "role", CHAT_ROLES)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant message to train on")
    return tokenizer.render_chat(messages)


def prompt_ids(tokenizer, text: str, fmt: str) -> list[int]:
    """Token ids that ask for an answer to ``text`` as a model trained on ``fmt`` data expects:
    ``alpaca`` wraps it in the alpaca prompt, ``chat`` and ``sharegpt`` render it as a user turn followed by the
    assistant's header (the tokenizer's chat template or the built-in one), ``completion`` sends
    it as it is. Starts with BOS once, whether or not a chat template renders it."""
    if fmt == "alpaca":
        text = alpaca_prompt(text)
    elif fmt in ("chat", "sharegpt"):
        text = tokenizer.chat_generation_prompt([{"role": "user", "content": text}])
    elif fmt != "completion":
        raise ValueError(f"unknown data format {fmt!r}; expected {', '.join(DATA_FORMATS)}")
    ids = tokenizer.encode(text)
    if tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids.insert(0, tokenizer.bos_id)
    return ids


def tokenize_parts(parts, tokenizer, max_seq_len: int, train_on_prompt: bool) -> tuple[Example, bool]:
    """(example, truncated). Tokens are BOS + parts + EOS; EOS is trained with the response.
    BOS or EOS that the parts already hold (a chat template may render them) is not repeated."""
    tokens, response = [], []
    for text, is_response in parts:
        ids = tokenizer.encode(text)
        tokens += ids
        response += [is_response] * len(ids)
    if tokenizer.bos_id is not None and tokens[:1] != [tokenizer.bos_id]:
        tokens.insert(0, tokenizer.bos_id)
        response.insert(0, False)
    if tokenizer.eos_id is not None and tokens[-1:] != [tokenizer.eos_id]:
        tokens.append(tokenizer.eos_id)
        response.append(True)
    truncated = len(tokens) > max_seq_len + 1
    tokens, response = tokens[:max_seq_len + 1], response[:max_seq_len + 1]
    labels = [tok if keep or train_on_prompt else IGNORE_INDEX
              for tok, keep in zip(tokens[1:], response[1:])]
    prompt_len = max(1, response.index(True) if True in response else len(tokens))
    answer_len = 0
    while prompt_len + answer_len < len(tokens) and response[prompt_len + answer_len]:
        answer_len += 1
    return Example(tokens[:-1], labels, prompt_len, answer_len), truncated


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


def tokenize_records(records: Iterable[tuple[str, object]], fmt: str, tokenizer, *, max_seq_len: int,
                     train_on_prompt: bool, skip_bad_lines: bool,
                     stats: Optional[ReadStats] = None) -> list[Example]:
    """Every ``(location, record)`` as an :class:`Example`; bad records fail with
    ``location: why`` (or are skipped and counted in ``stats.bad_lines`` with ``skip_bad_lines``)."""
    stats = stats if stats is not None else ReadStats()
    examples = []
    for where, record in records:
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


def load_examples(path: str, fmt: str, tokenizer, *, max_seq_len: int, train_on_prompt: bool,
                  skip_bad_lines: bool, stats: Optional[ReadStats] = None) -> list[Example]:
    """Every record of the JSON/JSONL file ``path`` as an :class:`Example`
    (:func:`tokenize_records` of :func:`read_records`)."""
    stats = stats if stats is not None else ReadStats()
    return tokenize_records(read_records(path, skip_bad_lines, stats), fmt, tokenizer,
                            max_seq_len=max_seq_len, train_on_prompt=train_on_prompt,
                            skip_bad_lines=skip_bad_lines, stats=stats)
