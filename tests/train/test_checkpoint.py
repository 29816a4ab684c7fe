"""Checkpoints: atomic and rotated, refused when incompatible, never rewritten on resume, and a
run killed with SIGKILL resumes to a bit-identical adapter."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.cli.train import resolve_config
from qlora.train.checkpoint import list_checkpoints
from qlora.train.loop import train

CHECKPOINT_FILES = {"adapter", "optimizer.pt", "scheduler.pt", "rng-rank0.pt", "trainer_state.json",
                    "config.yaml"}
SMALL = ["logging.progress_bar=false", "logging.sample_max_new_tokens=2", "train.micro_batch_size=4",
         "data.max_seq_len=48", "logging.exact_match_examples=4"]


def _files(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_checkpoints_rotate_refuse_incompatible_and_are_never_rewritten(tmp_path):
    overrides = [f"train.output_dir={tmp_path}", "train.max_steps=4", "checkpoint.every=1",
                 "checkpoint.keep=2", *SMALL]
    result = train(resolve_config(None, overrides))
    found = list_checkpoints(str(tmp_path))
    assert [p.name for p in found] == ["step-3", "step-4"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert {p.name for p in found[-1].iterdir()} == CHECKPOINT_FILES
    assert {p.name for p in result.adapter_dir.iterdir()} >= {"adapter_config.json",
                                                              "adapter_model.safetensors"}
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(ValueError, match=r"cannot resume from .*step-4.*lora\.r: 64 in the "
                                         r"checkpoint, 8 in this run"):
        train(resolve_config(None, overrides + ["lora.r=8"]), resume="latest")

    before = _files(found[-1])
    again = train(resolve_config(None, overrides + ["checkpoint.keep=1"]), resume=str(found[-1]))
    assert again.steps == 4 and _files(found[-1]) == before


def _train_cmd(out_dir, *extra):
    return [sys.executable, "-m", "qlora", "train", "--set", f"train.output_dir={out_dir}",
            "--set", "train.max_steps=12", "--set", "checkpoint.every=3",
            *[a for o in SMALL for a in ("--set", o)], *extra]


def test_sigkill_after_checkpoint_then_resume_is_bit_identical(tmp_path):
    # one thread per child: under xdist every worker runs torch too, and oversubscribed cores
    # made these runs several times slower
    env = {**os.environ, "QLORA_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_train_cmd(tmp_path / "full"), capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert full.returncode == 0, full.stderr

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed_dir), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed_dir / "checkpoints" / "step-3").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed_dir / "adapter").exists()  # killed before the end

    resumed = subprocess.run(_train_cmd(killed_dir, "--resume"), capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    want = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(killed_dir / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and want
    for key in want:
        assert want[key].dtype == got[key].dtype and want[key].equal(got[key]), key


def test_bitsandbytes_paged_adamw_trains_and_resumes_exactly(tmp_path):
    overrides = [f"train.output_dir={tmp_path}", "train.max_steps=4", "checkpoint.every=2",
                 "optim.name=bnb_paged_adamw", *SMALL]
    first = train(resolve_config(None, overrides))
    adapter = first.adapter_dir / "adapter_model.safetensors"
    want = load_file(str(adapter))
    # bitsandbytes' optimizer state (its quant-state dict included) is read back with
    # weights_only=True, and the run goes on exactly where the step-2 checkpoint left it
    step2 = next(p for p in list_checkpoints(str(tmp_path)) if p.name == "step-2")
    again = train(resolve_config(None, overrides), resume=str(step2))
    got = load_file(str(again.adapter_dir / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and want
    for key in want:
        assert want[key].equal(got[key]), key
    assert any(not t.equal(torch.zeros_like(t)) for k, t in want.items() if "lora_B" in k)


def test_bitsandbytes_paged_adamw_is_adamw():
    import bitsandbytes as bnb
    import torch.nn as nn

    from qlora.train.optimizer import build_optimizer

    torch.manual_seed(0)
    model = nn.Linear(64, 256)
    cfg = resolve_config(None, ["optim.name=bnb_paged_adamw", "optim.weight_decay=0.01"])
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, bnb.optim.PagedAdamW)
    reference = nn.Linear(64, 256)
    reference.load_state_dict(model.state_dict())
    initial = model.weight.detach().clone()
    cfg_torch = resolve_config(None, ["optim.name=adamw", "optim.weight_decay=0.01"])
    reference_optimizer = build_optimizer(reference, cfg_torch)
    for scale in (1.0, 0.5, 2.0):
        grads = [torch.randn_like(p) * scale for p in model.parameters()]
        for params, opt in ((model.parameters(), optimizer),
                            (reference.parameters(), reference_optimizer)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for p, ref in zip(model.parameters(), reference.parameters()):
        # the same fp32 AdamW update, evaluated in another order: each of the 3 steps rounds
        # the parameter once (1 ulp, 2^-23 relative); the update itself (lr 2e-4 times a
        # ratio of order 1) carries only ~1e-10 of absolute error
        torch.testing.assert_close(p, ref, rtol=3 * 2**-23, atol=1e-9)
    assert not model.weight.equal(initial)
