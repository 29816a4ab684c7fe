"""`qlora sweep`: one run per value, a table and a plot, and a sweep started again continues:
finished runs are kept, an interrupted one resumes from its checkpoint."""
import csv
import json
import shutil

import pytest

from qlora.cli import main
from qlora.train.config import BUILTIN_RUN
from qlora.train.sweep import parse_sweep, split_values

FIXED = ["train.max_steps=2", "checkpoint.every=1", "logging.progress_bar=false", "data.max_seq_len=48",
         "logging.exact_match_examples=2", "logging.sample_max_new_tokens=2", "train.eval_every=0"]


def test_sweep_arguments():
    assert split_values("4,8, 16") == ["4", "8", "16"]
    assert split_values("[q_proj, v_proj],all-linear") == ["[q_proj, v_proj]", "all-linear"]
    spec = parse_sweep(["lora.r=4,8", "optim.lr=1e-3", "lora.target_modules=[q_proj, v_proj]"])
    assert (spec.key, spec.values, spec.fixed) == ("lora.r", ["4", "8"],
                                                   ["optim.lr=1e-3", "lora.target_modules=[q_proj, v_proj]"])
    with pytest.raises(ValueError, match="exactly one --set key=value1,value2"):
        parse_sweep(["lora.r=4"])
    with pytest.raises(ValueError, match="got lora.r, optim.lr"):
        parse_sweep(["lora.r=4,8", "optim.lr=1e-3,1e-4"])
    with pytest.raises(ValueError, match="must be distinct"):
        parse_sweep(["lora.r=4,4"])


def test_sweep_runs_tabulates_and_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs are child processes; xdist workers share the cores
    out = tmp_path / "sweep"
    args = ["sweep", BUILTIN_RUN, "--set", "lora.r=2,4", *FIXED, "--out", str(out)]
    assert main(args) == 0
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["value"] for r in rows] == ["2", "4"] and all(r["steps"] == 2 for r in rows)
    # LoRA adds L = r·(in + out) parameters per layer to B others, so the share L / (B + L) at r=4
    # over r=2 is 2 (B + L2) / (B + 2 L2) = 2 (100 - share4) / (100 - share2)
    assert rows[1]["trainable_percent"] / rows[0]["trainable_percent"] == pytest.approx(
        2 * (100 - rows[1]["trainable_percent"]) / (100 - rows[0]["trainable_percent"]), rel=1e-9)
    for row in rows:
        assert row["eval_loss"] > 0 and 0 <= row["exact_match_after"] <= 1
        assert row["peak_memory_mib"] > 0 and row["tokens_per_s"] > 0
    assert [r["value"] for r in csv.DictReader(open(out / "sweep.csv"))] == ["2", "4"]
    assert (out / "sweep.md").read_text().startswith("| lora.r | held-out loss |")
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    # the second run interrupted after its last checkpoint: started again, the sweep keeps the
    # first and resumes the second, which ends as it did
    run = out / "lora.r=4"
    (run / "result.json").unlink()
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "lora.r=2: done before, kept" in printed and "lora.r=4: resuming" in printed
    again = json.loads((out / "sweep.json").read_text())["runs"]
    assert again[0] == rows[0] and again[1]["eval_loss"] == rows[1]["eval_loss"]
    # the first run interrupted before its first checkpoint: what it wrote is its own, so the
    # sweep starts it again over that (a run directory refuses a new run without --overwrite)
    run = out / "lora.r=2"
    (run / "result.json").unlink()
    shutil.rmtree(run / "checkpoints")
    capsys.readouterr()
    assert main(args) == 0
    assert "lora.r=2: training" in capsys.readouterr().out
    assert json.loads((out / "sweep.json").read_text())["runs"][0]["eval_loss"] == rows[0]["eval_loss"]
    # a different config for the same directory is refused, not mixed in
    assert main([*args, "--set", "optim.lr=1e-4"]) == 2
    assert "holds a finished run with another config" in capsys.readouterr().err
