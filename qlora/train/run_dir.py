"""A run directory (``train.output_dir``) belongs to one run.

* One run at a time: the main process holds an exclusive ``fcntl.flock`` on
  ``<output_dir>/.qlora.lock`` from before it reads anything there until the run ends. A second
  run is refused, naming the directory and the holder's pid. The kernel drops a flock when its
  holder's file is closed, which happens however the process ends (``kill -9`` included), so the
  lock file a dead run leaves behind never blocks the next one. The file itself stays: deleting
  it would let one process lock the old file while another creates and locks a new one.
* One run per directory: a new run refuses a directory that holds another run's outputs (a
  config, metrics, an adapter, checkpoints) unless ``--resume`` continues it or ``--overwrite``
  replaces it; ``--overwrite`` removes those outputs (listed in ``RUN_OUTPUTS``) and nothing else.
* One history: resuming from a checkpoint that is not the newest abandons the newer ones (the
  resumed run would write its own at those steps); they are removed at the start.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, TypeVar

from qlora.train.checkpoint import checkpoint_step, checkpoints_root, list_checkpoints

T = TypeVar("T")
LOCK_NAME = ".qlora.lock"
# What a run writes into its directory (qlora.train.loop, qlora.train.checkpoint, the AdaLoRA
# rank plot, the TensorBoard and wandb trackers of qlora.train.trackers), and the leftovers of an
# interrupted publish.
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "loss.png", "result.json", "adalora_ranks.png",
               "adapter", "checkpoints", "tensorboard", "wandb", ".tmp-adapter", ".old-adapter")


class RunDirectoryError(ValueError):
    """The output directory cannot be used by this run; the message says why and what to do."""


class RunLock:
    """The exclusive lock on a run directory, held until :meth:`release` (or process exit)."""

    def __init__(self, output_dir: Path):
        self.fd: Optional[int] = None
        self.path = output_dir / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirectoryError(f"train.output_dir {output_dir}: cannot lock {self.path} "
                                        f"({err.strerror})") from None
            who = f"pid {holder}" if holder.isdigit() else "pid unknown"
            raise RunDirectoryError(
                f"train.output_dir {output_dir} is in use by another run ({who}, lock "
                f"{self.path}): wait for it to end, or choose another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

    def __del__(self):
        self.release()


def lock_run_dir(output_dir: Path) -> RunLock:
    """Create ``output_dir`` if needed and lock it for this run (RunDirectoryError if another
    run holds it, or if it is a file)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirectoryError(f"train.output_dir {output_dir} is a file, not a directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirectoryError(f"train.output_dir {output_dir}: cannot create it "
                                f"({err.strerror}: {err.filename})") from None
    return RunLock(output_dir)


def run_outputs(output_dir: Path) -> list[str]:
    """The names of ``RUN_OUTPUTS`` present in ``output_dir``."""
    return [name for name in RUN_OUTPUTS if (output_dir / name).exists()]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def take_over(output_dir: Path, resume_from: Optional[Path], overwrite: bool,
              log: Callable[[str], None]) -> None:
    """Make the locked ``output_dir`` this run's: refuse another run's outputs (or remove them
    with ``overwrite``); when resuming from one of its own checkpoints, drop the newer ones."""
    own_checkpoint = resume_from is not None and \
        resume_from.resolve().parent == checkpoints_root(str(output_dir)).resolve()
    if own_checkpoint and overwrite:
        raise RunDirectoryError(f"--overwrite would remove {resume_from}, which --resume continues "
                                f"from: use one of them")
    if own_checkpoint:
        newer = [p for p in list_checkpoints(str(output_dir))
                 if checkpoint_step(p) > checkpoint_step(resume_from)]
        for path in newer:
            shutil.rmtree(path)
        if newer:
            log(f"removed {', '.join(p.name for p in newer)}: newer than {resume_from.name}, "
                f"which this run continues from")
        return
    found = run_outputs(output_dir)
    if not found:
        return
    if not overwrite:
        latest = list_checkpoints(str(output_dir))
        shown = [f"{name} up to {latest[-1].name}" if name == "checkpoints" and latest else name
                 for name in found]
        raise RunDirectoryError(
            f"train.output_dir {output_dir} already holds a run ({', '.join(shown)}): "
            f"continue it with --resume, replace it with --overwrite, or choose another "
            f"train.output_dir")
    for name in found:
        _remove(output_dir / name)
    log(f"--overwrite: removed the previous run's {', '.join(found)} from {output_dir}")


def decided_on_main(acc, work: Callable[[], T]) -> T:
    """``work()`` run by the main process only; its result, or its error, reaches every process
    of ``acc`` (the others wait for it), so that all go on together or all stop with the main
    process's message, instead of the others racing ahead into the directory or a collective."""
    result, error = None, None
    if acc.is_main_process:
        try:
            result = work()
        except Exception as err:  # every process must learn of it before any raises
            error = err
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = broadcast_object_list([result, None if error is None else str(error)])
        result, message = shared
        if message is not None and error is None:
            raise RunDirectoryError(message)
    if error is not None:
        raise error
    return result
