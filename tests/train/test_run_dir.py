"""A run directory belongs to one run: a new run refuses a directory holding another run (unless
--resume or --overwrite), a second run is refused while the first holds the lock, the lock of a
killed run blocks nobody, and what the first run wrote is never touched by a refused one."""
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qlora.cli import main
from qlora.cli.train import resolve_config
from qlora.train.config import BUILTIN_RUN
from qlora.train.checkpoint import list_checkpoints
from qlora.train.loop import Trainer, train
from qlora.train.metrics import read_metrics
from qlora.train.run_dir import LOCK_NAME, RunDirectoryError, lock_run_dir
from qlora.util.files import load_torch

SMALL = ["logging.progress_bar=false", "logging.sample_max_new_tokens=2", "train.micro_batch_size=4",
         "data.max_seq_len=48", "logging.exact_match_examples=4"]


def _cfg(out, *overrides):
    return resolve_config(BUILTIN_RUN, [f"train.output_dir={out}", *SMALL, *overrides])


def _files(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def test_a_new_run_never_destroys_the_run_in_its_directory(tmp_path, capsys):
    # the reproduction: a 60-step run, then a different one into the same directory
    train(_cfg(tmp_path, "train.max_steps=4", "checkpoint.every=2"))
    (tmp_path / "notes.txt").write_text("the user's own file")
    before = _files(tmp_path)
    second = ["lora.r=8", "train.max_steps=2", "checkpoint.every=1", "checkpoint.keep=2"]
    message = (f"train.output_dir {tmp_path} already holds a run (config.yaml, metrics.jsonl, "
               f"loss.png, result.json, adapter, checkpoints up to step-4): continue it with --resume, "
               f"replace it with --overwrite, or choose another train.output_dir")
    with pytest.raises(RunDirectoryError, match=f"^{re.escape(message)}$"):
        train(_cfg(tmp_path, *second))
    capsys.readouterr()
    args = ["train", BUILTIN_RUN, *[a for o in [f"train.output_dir={tmp_path}", *SMALL, *second]
                                    for a in ("--set", o)]]
    assert main(args) == 2
    assert capsys.readouterr().err == f"qlora train: error: {message}\n"
    assert _files(tmp_path) == before

    # --overwrite replaces the run's outputs and nothing else
    assert main([*args, "--overwrite"]) == 0
    assert "--overwrite: removed the previous run's config.yaml, metrics.jsonl, loss.png, result.json, " \
           "adapter, checkpoints" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(str(tmp_path))] == ["step-1", "step-2"]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"
    # --overwrite cannot remove the checkpoint --resume continues from (through the CLI, which
    # decides the "auto" memory options as the run in the directory did)
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert re.search("--overwrite would remove .*step-2, which --resume", capsys.readouterr().err)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from qlora.train.run_dir import lock_run_dir

lock = lock_run_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_is_refused_while_the_first_holds_the_directory(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        # the holder's checkpoint being written; the old loop's save removed every .tmp-*
        in_progress = tmp_path / "checkpoints" / ".tmp-step-3"
        in_progress.mkdir(parents=True)
        message = (f"train.output_dir {tmp_path} is in use by another run (pid {holder.pid}, lock "
                   f"{tmp_path / LOCK_NAME}): wait for it to end, or choose another train.output_dir")
        with pytest.raises(RunDirectoryError, match=f"^{re.escape(message)}$"):
            Trainer(_cfg(tmp_path, "train.max_steps=2", "checkpoint.every=1"))
        assert in_progress.is_dir()
    finally:
        holder.kill()  # SIGKILL: nothing of the holder's runs on the way out
        holder.wait()
    # the dead run's lock file is still there, with its pid, and blocks nobody
    assert (tmp_path / LOCK_NAME).read_text() == f"{holder.pid}\n"
    lock = lock_run_dir(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    # in one process as across processes: a second lock on the directory is refused
    with pytest.raises(RunDirectoryError, match="is in use by another run"):
        lock_run_dir(tmp_path)
    lock.release()
    lock_run_dir(tmp_path).release()


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    file = tmp_path / "run"
    file.write_text("")
    with pytest.raises(RunDirectoryError, match=f"^train.output_dir {file} is a file, not a directory$"):
        lock_run_dir(file)
    with pytest.raises(RunDirectoryError, match=f"^train.output_dir {file / 'sub'}: cannot create it "
                                                r"\(Not a directory"):
        lock_run_dir(file / "sub")


def test_a_resume_from_an_older_checkpoint_replaces_the_newer_ones_damaged_or_not(tmp_path):
    overrides = ["train.max_steps=3", "checkpoint.every=1", "checkpoint.keep=3"]
    first = train(_cfg(tmp_path, *overrides))
    want = load_file(str(first.adapter_dir / "adapter_model.safetensors"))
    root = tmp_path / "checkpoints"
    optimizer_at_3 = load_torch(root / "step-3" / "optimizer.pt")
    # the newer checkpoints are damaged (a full disk, a bad copy): the old loop kept them, since
    # it never rewrote an existing step, and so the resumed run ended on the damaged step-3
    (root / "step-3" / "optimizer.pt").write_bytes(b"")
    (root / "step-2" / "trainer_state.json").write_text("")
    out = io.StringIO()
    again = train(_cfg(tmp_path, *overrides), resume=str(root / "step-1"), out=out)
    assert "removed step-2, step-3: newer than step-1, which this run continues from" in out.getvalue()
    got = load_file(str(again.adapter_dir / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want)
    assert [p.name for p in list_checkpoints(str(tmp_path))] == ["step-1", "step-2", "step-3"]
    assert json.loads((root / "step-2" / "trainer_state.json").read_text())["step"] == 2
    rewritten = load_torch(root / "step-3" / "optimizer.pt")
    for key, state in optimizer_at_3["state"].items():
        assert all(state[k].equal(rewritten["state"][key][k]) for k in state), key
