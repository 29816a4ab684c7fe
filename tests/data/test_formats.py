"""Record formats, response-only targets, truncation, and malformed lines (file:line errors)."""
import json

import pytest

from qlora.data.formats import IGNORE_INDEX, ReadStats, alpaca_prompt, load_examples
from qlora.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _load(path, fmt, **kw):
    args = dict(max_seq_len=256, train_on_prompt=False, skip_bad_lines=False)
    args.update(kw)
    return load_examples(path, fmt, TOK, **args)


def _trained_text(example):
    return TOK.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_alpaca_trains_only_the_response_and_eos(tmp_path):
    path = _write(tmp_path / "a.jsonl", [{"instruction": "Reverse: abc", "output": "cba"},
                                          {"instruction": "Add", "input": "2+2", "output": "4"}])
    first, second = _load(path, "alpaca")
    prompt = alpaca_prompt("Reverse: abc")
    tokens = [TOK.bos_id] + TOK.encode(prompt + "cba") + [TOK.eos_id]
    assert first.input_ids == tokens[:-1]
    # labels are shifted: labels[t] is the token after input_ids[t]; only "cba" + EOS trained
    expected = [IGNORE_INDEX] * len(prompt) + TOK.encode("cba") + [TOK.eos_id]
    assert first.labels == expected
    assert _trained_text(second) == "4" and "### Input:\n2+2" in TOK.decode(second.input_ids)


def test_train_on_prompt_trains_everything_after_bos(tmp_path):
    path = _write(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}])
    (example,) = _load(path, "alpaca", train_on_prompt=True)
    assert IGNORE_INDEX not in example.labels


def test_chat_and_completion(tmp_path):
    chat = _write(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"}]}])
    (example,) = _load(chat, "chat")
    # both assistant turns (with their end-of-turn newline) are trained, nothing else
    assert _trained_text(example) == "hello\nciao\n"
    assert TOK.decode(example.input_ids).startswith("<|system|>\nbe brief\n<|user|>\nhi\n")
    completion = _write(tmp_path / "t.jsonl", [{"text": "all of it"}])
    (example,) = _load(completion, "completion")
    assert _trained_text(example) == "all of it"


def test_json_array_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert [_trained_text(e) for e in _load(str(path), "completion")] == ["one", "two"]


def test_truncation_keeps_max_seq_len_and_drops_examples_without_targets(tmp_path):
    path = _write(tmp_path / "a.jsonl", [{"instruction": "i", "output": "a long answer"},
                                          {"instruction": "a very long instruction " * 5, "output": "z"}])
    stats = ReadStats()
    examples = _load(path, "alpaca", max_seq_len=40, stats=stats)
    assert len(examples) == 1 and len(examples[0]) == 40
    assert stats.truncated == 2 and stats.no_trained_tokens == 1
    assert _trained_text(examples[0]) == "a long answer"[:40 - len(alpaca_prompt("i"))]


@pytest.mark.parametrize("line, fmt, why", [
    ('{"instruction": "x", "output": ', "alpaca", "invalid JSON"),
    ('{"instruction": "x"}', "alpaca", "missing field 'output'"),
    ('{"instruction": "x", "output": 3}', "alpaca", "field 'output' must be a string, got int"),
    ('["a list"]', "completion", "expected a JSON object, got list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "chat", "messages[0].role is 'bot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "chat", "no assistant message"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, fmt, why):
    good = {"instruction": "a", "output": "b", "text": "t",
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = _write(tmp_path / "d.jsonl", [good, "", good, line, good])
    with pytest.raises(ValueError) as err:
        _load(path, fmt)
    assert str(err.value).startswith(f"{path}:4: ") and why in str(err.value)
    stats = ReadStats()
    assert len(_load(path, fmt, skip_bad_lines=True, stats=stats)) == 3
    assert len(stats.bad_lines) == 1 and stats.bad_lines[0].startswith(f"{path}:4: ")


def test_data_that_is_not_utf8_or_not_a_file_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    offset = path.read_bytes().index(b"\xe9")
    with pytest.raises(ValueError) as err:
        _load(str(path), "alpaca")
    assert str(err.value) == (f"{path}: line 2: not UTF-8 text (byte 0xe9 at offset {offset}); "
                              f"save the file as UTF-8")
    with pytest.raises(ValueError) as err:
        _load(str(tmp_path), "alpaca")
    assert str(err.value) == f"{tmp_path}: is a directory, expected a file"


def test_builtin_dataset_loads_and_is_what_make_tasks_writes():
    from importlib import resources

    from qlora.data.make_tasks import PER_KIND, make_records, render

    examples = _load("builtin:tasks", "alpaca", max_seq_len=64)
    assert len(examples) == 3 * PER_KIND and all(e.n_trained >= 2 for e in examples)
    shipped = resources.files("qlora.data").joinpath("tasks.jsonl").read_text(encoding="utf-8")
    assert shipped == render(make_records())


@pytest.mark.parametrize("template, prompt_text, trained_text", [
    # ChatML: the assistant header is the generation prompt, so it is prompt, not response
    ("chatml", "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
     "hello<|im_end|>\n</s>"),
    # Llama-2: the template renders BOS and EOS itself; neither is doubled
    ("llama-2", "<s>[INST] hi [/INST]", " hello </s>"),
])
def test_chat_uses_the_tokenizers_template(tmp_path, byte_bpe_tokenizer, template, prompt_text,
                                           trained_text):
    from qlora.data.tokenizer import HFTokenizer

    hf = byte_bpe_tokenizer(template)
    tok = HFTokenizer(hf)
    assert tok.pad_id == hf.eos_token_id  # no pad token: padding uses EOS (masked out of the loss)
    path = _write(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    (example,) = load_examples(path, "chat", tok, max_seq_len=64, train_on_prompt=False,
                               skip_bad_lines=False)
    tokens = example.input_ids + example.labels[-1:]
    n_prompt = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX) + 1
    assert hf.decode(tokens[:n_prompt]) == prompt_text
    assert hf.decode(tokens[n_prompt:]) == trained_text
    assert all(t != IGNORE_INDEX for t in example.labels[n_prompt - 1:])
    assert tokens.count(hf.bos_token_id) == 1 and tokens.count(hf.eos_token_id) == 1


def test_sharegpt_is_chat_with_sharegpt_speakers(tmp_path):
    turns = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
             {"from": "gpt", "value": "hello"}]
    sharegpt = _write(tmp_path / "s.jsonl", [{"conversations": turns}])
    chat = _write(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]}])
    assert _load(sharegpt, "sharegpt") == _load(chat, "chat")
    bad = _write(tmp_path / "b.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(ValueError, match=r"b\.jsonl:1: conversations\[0\]\.from is 'bot', expected one of "
                                         r"system, human, user, gpt, assistant"):
        _load(bad, "sharegpt")


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_prompt_and_answer_whatever_is_trained(tmp_path, train_on_prompt):
    """The held-out prompt and expected answer are the same whether or not the prompt is trained
    (with data.train_on_prompt the prompt was once empty and the whole text the "answer")."""
    from qlora.train.dataset import prompt_and_answer

    alpaca = _write(tmp_path / "a.jsonl", [{"instruction": "Reverse: abc", "output": "cba"}])
    (example,) = _load(alpaca, "alpaca", train_on_prompt=train_on_prompt)
    prompt, answer = prompt_and_answer(example)
    assert prompt == [TOK.bos_id] + TOK.encode(alpaca_prompt("Reverse: abc"))
    assert answer == TOK.encode("cba") + [TOK.eos_id]
    # a conversation: the first assistant turn is the answer, the next user turn is not part of it
    chat = _write(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}])
    (example,) = _load(chat, "chat", train_on_prompt=train_on_prompt)
    prompt, answer = prompt_and_answer(example)
    assert TOK.decode(prompt) == "<|user|>\nhi\n<|assistant|>\n" and TOK.decode(answer) == "hello\n"
    # truncation inside the answer keeps what is left of it
    (example,) = _load(alpaca, "alpaca", train_on_prompt=train_on_prompt,
                       max_seq_len=len(alpaca_prompt("Reverse: abc")) + 2)
    assert TOK.decode(prompt_and_answer(example)[1]) == "cb"
