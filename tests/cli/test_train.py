"""`qlora train builtin:tiny` (the built-in run, shortened) and `qlora generate` on its result."""
import json
import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from qlora.cli import main


def _qlora(args, cwd):
    # one thread per child: under xdist every worker runs torch too, and oversubscribed cores
    # made these runs several times slower
    env = {**os.environ, "QLORA_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qlora", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_builtin_run_learns_saves_and_generates(tmp_path):
    # the built-in run as shipped, only shorter (the full one is the README's first command)
    run = _qlora(["train", "builtin:tiny", "--set", "train.max_steps=40", "--set", "checkpoint.every=0",
                  "--set", "train.eval_every=20"], tmp_path)
    assert run.returncode == 0, run.stderr
    out_dir = tmp_path / "runs" / "tiny"
    for line in ("memory plan: llama, seq_len 64 x batch 16, rank 64, paged_adamw",
                 "CPU run: no device budget", "answer before:", "answer after:", "expected answer:",
                 "held-out exact match before: 0/60 (0%)", "held-out exact match after:",
                 "adapter (PEFT format): runs/tiny/adapter"):
        assert line in run.stdout, run.stdout
    # the periodic evaluation: loss, perplexity, exact match and the sample prompt's answer
    assert re.search(r"step 20: held-out loss [\d.]+, perplexity [\d.]+, exact match \d+/60 "
                     r"\(\d+%\), sample answer '", run.stdout), run.stdout
    for field in ("loss=", "lr=", "tok/s=", "mem="):
        assert field in run.stderr  # the progress bar
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "eval_exact_match" in r] == [20, 40]
    assert "sample" in next(r for r in records if r.get("step") == 20 and "eval_loss" in r)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    config = json.loads((out_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 64
    weights = load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and w.abs().max() > 0 for k, w in weights.items())
    assert (out_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"

    gen = _qlora(["generate", "--model", "builtin:tiny-llama", "--adapter", str(out_dir / "adapter"),
                  "--prompt", "Uppercase: abc", "--max-new-tokens", "8"], tmp_path)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.endswith("\n") and len(gen.stdout) <= 8 * 4 + 1

    # plain `qlora train` is the same built-in run: its directory now holds one, which it leaves
    again = _qlora(["train"], tmp_path)
    assert again.returncode == 2 and again.stderr.startswith(
        "qlora train: error: train.output_dir runs/tiny already holds a run (config.yaml, "), again.stderr
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == len(records)


def test_train_help_documents_the_run_directory_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--overwrite replace the run already in train.output_dir" in text
    assert "--allow-changed-data with --resume: continue even though a data file differs" in text
    assert "a larger train.max_steps continues a finished run" in text
