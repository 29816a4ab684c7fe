"""The run's data: several datasets mixed with weights, held-out examples split off each one
before weighting, and the data read and checked before the model is loaded."""
import json

import pytest

from qlora.data.tokenizer import ByteTokenizer
from qlora.train.config import BUILTIN_RUN, load_config
from qlora.train.dataset import build_data

TOK = ByteTokenizer()


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_datasets_mix_with_weights_and_hold_out_from_each(tmp_path):
    alpaca = _write(tmp_path / "a.jsonl", [{"instruction": f"alpaca {i}", "output": "A"} for i in range(20)])
    sharegpt = _write(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": f"sharegpt {i}"}, {"from": "gpt", "value": "S"}]} for i in range(10)])
    cfg = load_config(None, [f"data.datasets=[{{path: {alpaca}, weight: 0.5}}, "
                             f"{{path: {sharegpt}, format: sharegpt, weight: 2}}]",
                             "data.eval_fraction=0.1"])
    data = build_data(cfg, TOK)
    texts = [TOK.decode(row.input_ids) for row in data.train]
    alpaca_rows = [t for t in texts if "alpaca" in t]
    sharegpt_rows = [t for t in texts if "sharegpt" in t]
    # 20 alpaca: 2 held out, 18 x 0.5 = 9 distinct; 10 sharegpt: 1 held out, 9 x 2 = each twice
    assert len(alpaca_rows) == len(set(alpaca_rows)) == 9
    assert len(sharegpt_rows) == 18 and len(set(sharegpt_rows)) == 9
    held_out = [TOK.decode(e.input_ids) for e in data.eval]
    assert sum("alpaca" in t for t in held_out) == 2 and sum("sharegpt" in t for t in held_out) == 1
    assert not set(held_out) & set(texts)
    assert "x weight 0.5 = 9" in data.summary() and "x weight 2 = 18" in data.summary()
    # the same seed mixes the same way
    assert [r.input_ids for r in build_data(cfg, TOK).train] == [r.input_ids for r in data.train]


def test_data_is_read_and_checked_before_the_model_loads(tmp_path, monkeypatch):
    import qlora.train.loop as loop

    def no_model(*_, **__):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(loop, "build_model", no_model)
    bad = _write(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x"}])
    cfg = load_config(BUILTIN_RUN, [f"data.path={bad}", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing field 'output'"):
        loop.Trainer(cfg)
    # a misspelt path fails before even the tokenizer loads
    monkeypatch.setattr(loop, "load_tokenizer", no_model)
    cfg = load_config(BUILTIN_RUN, [f"data.path={tmp_path / 'dat.jsonl'}"])
    with pytest.raises(ValueError, match=r"dat\.jsonl: no such file or directory"):
        loop.Trainer(cfg)
