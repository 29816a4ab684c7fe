"""Checkpoints: atomic and rotated, refused when incompatible, never rewritten on resume, a run
killed with SIGKILL resumes to a bit-identical adapter, a finished run continues to more steps,
damaged checkpoint files are named, and everything written is readable by others."""
import errno
import os
import pathlib
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.cli import main
from qlora.cli.train import resolve_config
from qlora.train import loop
from qlora.train.config import BUILTIN_RUN
from qlora.train.checkpoint import list_checkpoints
from qlora.train.loop import Trainer, train
from qlora.train.metrics import read_metrics

CHECKPOINT_FILES = {"adapter", "optimizer.pt", "scheduler.pt", "rng-rank0.pt", "trainer_state.json",
                    "config.yaml", "data_files.json"}
SMALL = ["logging.progress_bar=false", "logging.sample_max_new_tokens=2", "train.micro_batch_size=4",
         "data.max_seq_len=48", "logging.exact_match_examples=4"]


def _files(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_checkpoints_rotate_refuse_incompatible_and_are_never_rewritten(tmp_path):
    overrides = [f"train.output_dir={tmp_path}", "train.max_steps=4", "checkpoint.every=1",
                 "checkpoint.keep=2", *SMALL]
    result = train(resolve_config(BUILTIN_RUN, overrides))
    found = list_checkpoints(str(tmp_path))
    assert [p.name for p in found] == ["step-3", "step-4"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert {p.name for p in found[-1].iterdir()} == CHECKPOINT_FILES
    assert {p.name for p in result.adapter_dir.iterdir()} >= {"adapter_config.json",
                                                              "adapter_model.safetensors"}
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(ValueError, match=r"cannot resume from .*step-4.*lora\.r: 64 in the "
                                         r"checkpoint, 8 in this run"):
        train(resolve_config(BUILTIN_RUN, overrides + ["lora.r=8"]), resume="latest")

    before = _files(found[-1])
    again = train(resolve_config(BUILTIN_RUN, overrides + ["checkpoint.keep=1"]), resume=str(found[-1]))
    assert again.steps == 4 and _files(found[-1]) == before


def test_16_bit_adapters_resume_exactly_and_are_saved_from_their_fp32_masters(tmp_path):
    overrides = [f"train.output_dir={tmp_path}", "train.max_steps=4", "checkpoint.every=2",
                 "lora.dtype=bfloat16", *SMALL]
    first = train(resolve_config(BUILTIN_RUN, overrides))
    want = load_file(str(first.adapter_dir / "adapter_model.safetensors"))
    step2 = next(p for p in list_checkpoints(str(tmp_path)) if p.name == "step-2")
    again = train(resolve_config(BUILTIN_RUN, overrides), resume=str(step2))
    got = load_file(str(again.adapter_dir / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and want
    for key in want:
        assert want[key].dtype == torch.float32 and want[key].equal(got[key]), key
    # the fp32 masters, not their bf16 roundings (which is what the model computes with)
    trained = [t for k, t in want.items() if "lora_B" in k]
    assert any(not t.equal(t.to(torch.bfloat16).float()) for t in trained)


def _train_cmd(out_dir, *extra):
    return [sys.executable, "-m", "qlora", "train", BUILTIN_RUN, "--set", f"train.output_dir={out_dir}",
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
    first = train(resolve_config(BUILTIN_RUN, overrides))
    adapter = first.adapter_dir / "adapter_model.safetensors"
    want = load_file(str(adapter))
    # bitsandbytes' optimizer state (its quant-state dict included) is read back with
    # weights_only=True, and the run goes on exactly where the step-2 checkpoint left it
    step2 = next(p for p in list_checkpoints(str(tmp_path)) if p.name == "step-2")
    again = train(resolve_config(BUILTIN_RUN, overrides), resume=str(step2))
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
    cfg = resolve_config(BUILTIN_RUN, ["optim.name=bnb_paged_adamw", "optim.weight_decay=0.01"])
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, bnb.optim.PagedAdamW)
    reference = nn.Linear(64, 256)
    reference.load_state_dict(model.state_dict())
    initial = model.weight.detach().clone()
    cfg_torch = resolve_config(BUILTIN_RUN, ["optim.name=adamw", "optim.weight_decay=0.01"])
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


def _same_adapter(a: Path, b: Path) -> bool:
    want = load_file(str(a / "adapter_model.safetensors"))
    got = load_file(str(b / "adapter_model.safetensors"))
    return bool(want) and want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want)


def test_a_finished_run_continues_to_a_larger_max_steps(tmp_path):
    def cfg(out, steps):
        return resolve_config(BUILTIN_RUN, [f"train.output_dir={out}", f"train.max_steps={steps}", *SMALL])

    straight = train(cfg(tmp_path / "straight", 6))
    short = train(cfg(tmp_path / "run", 4))
    with pytest.raises(ValueError, match=r"step-4: it is at step 4, past train\.max_steps=3$"):
        train(cfg(tmp_path / "run", 3), resume="latest")
    longer = train(cfg(tmp_path / "run", 6), resume="latest")
    # warmup is ceil(3% of max_steps) = 1 step for both 4 and 6, and the schedule is constant:
    # steps 5 and 6 get the same lr, data and RNG state as in the straight run
    assert longer.steps == 6 and _same_adapter(straight.adapter_dir, short.adapter_dir)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # the 4-step run's final evaluation came after its last checkpoint: not part of the history
    assert [r["step"] for r in records if "eval_loss" in r] == [6]


def test_a_kill_while_publishing_the_adapter_logs_the_final_evaluation_once(tmp_path, monkeypatch):
    cfg = resolve_config(BUILTIN_RUN, [f"train.output_dir={tmp_path}", "train.max_steps=2", *SMALL])

    def killed(save_fn, target):
        raise KeyboardInterrupt  # as a kill at this point would leave the directory

    monkeypatch.setattr(loop, "_publish_adapter", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert not (tmp_path / "adapter").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_loss" in r] == [2]
    monkeypatch.undo()
    result = train(cfg, resume="latest")
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    records = read_metrics(tmp_path / "metrics.jsonl")
    # the old loop kept the line (its step is the checkpoint's) and wrote it again
    assert [r["step"] for r in records if "eval_loss" in r] == [2]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    train(resolve_config(BUILTIN_RUN, [f"train.output_dir={out}", "train.max_steps=2", *SMALL]))
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _touch(path):
    pathlib.Path(path).touch()


class _RunsCode:
    """Pickles to a call of ``_touch``: run on load, it would create the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (_touch, (self.path,))


@pytest.mark.parametrize("name, damage, message", [
    ("optimizer.pt", _truncate, "unreadable, truncated or corrupt (PytorchStreamReader"),
    ("rng-rank0.pt", _truncate, "unreadable, truncated or corrupt (PytorchStreamReader"),
    ("trainer_state.json", lambda p: p.write_text(""), "line 1: not valid JSON (Expecting value)"),
    ("trainer_state.json", lambda p: p.write_text('{"step": "2"}'), "step must be an integer >= 0"),
    ("scheduler.pt", lambda p: torch.save({"x": _RunsCode(p.with_name("ran"))}, p),
     "refused: it holds Python objects that a weights-only load does not create, which could run "
     "code (GLOBAL "),
])
def test_a_damaged_checkpoint_file_is_named(finished_run, tmp_path, name, damage, message):
    checkpoint = tmp_path / "step-2"
    shutil.copytree(finished_run / "checkpoints" / "step-2", checkpoint)
    damage(checkpoint / name)
    cfg = resolve_config(BUILTIN_RUN, [f"train.output_dir={tmp_path / 'out'}", "train.max_steps=2", *SMALL])
    with pytest.raises(ValueError, match=f"^{re.escape(f'{checkpoint / name}: {message}')}"):
        train(cfg, resume=str(checkpoint))
    assert not (checkpoint / "ran").exists()


def test_everything_a_run_writes_is_readable_by_others(tmp_path):
    from qlora import export_merged

    umask = os.umask(0o022)
    try:
        trainer = Trainer(resolve_config(BUILTIN_RUN, [f"train.output_dir={tmp_path / 'run'}",
                                                       "train.max_steps=2", "checkpoint.every=1", *SMALL]))
        trainer.run()
        export_merged(trainer.model, tmp_path / "merged")
    finally:
        os.umask(umask)
    written = sorted(tmp_path.rglob("*"))
    assert {"adapter_model.safetensors", "optimizer.pt", "model.safetensors"} <= {p.name for p in written}
    # mkstemp and mkdtemp made the adapter's and the export's files 0600 and its directory 0700
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert modes == {k: "0o755" if (tmp_path / k).is_dir() else "0o644" for k in modes}


def test_a_full_disk_while_checkpointing_is_named_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    real_save = torch.save
    failing = tmp_path / "checkpoints" / ".tmp-step-2" / "optimizer.pt"

    def save(obj, f, *args, **kwargs):
        if Path(f) == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    args = ["train", BUILTIN_RUN, *[a for o in [f"train.output_dir={tmp_path}", "train.max_steps=3",
                                                "checkpoint.every=1", "checkpoint.keep=2", *SMALL]
                                    for a in ("--set", o)]]
    assert main(args) == 2
    assert capsys.readouterr().err == (f"qlora train: error: [Errno 28] No space left on device: "
                                       f"'{failing}'\n")
    assert [p.name for p in list_checkpoints(str(tmp_path))] == ["step-1"]
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    # the partial .tmp-step-2 went with the next save
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
