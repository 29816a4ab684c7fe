"""Training checkpoints: written atomically, the last K kept, read back for an exact resume.

A checkpoint is the directory ``<output_dir>/checkpoints/step-<N>/`` holding

    adapter/               the LoRA adapter in PEFT's format (adapter_config.json + safetensors)
    optimizer.pt           optimizer state dict          (read with torch.load(weights_only=True));
                           under FSDP the whole (gathered) one, keyed by parameter name
    scheduler.pt           lr scheduler state dict
    rng-rank<R>.pt         python, numpy, torch and CUDA RNG states of each process
    trainer_state.json     step, data position, tokens seen, non-finite steps in a row
    config.yaml            the run's resolved config
    adalora_*              with lora.type adalora: the unpruned adapter and the rank allocator
                           (see qlora.adalora.training)

It is written into a hidden temporary directory next to it, every file fsynced, then renamed
into place, so a crash leaves either the whole checkpoint or none of it. Only ``step-<N>``
directories count as checkpoints; a leftover temporary directory is ignored (and removed by
the next save).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from qlora.train.config import Config, config_to_dict, dump_config, read_yaml

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
# Keys that may differ between a checkpoint and the run resuming it: they change where and how
# often things are written, never the numbers trained.
RESUMABLE_CHANGES = {"train.output_dir", "train.eval_every", "train.max_bad_steps",
                     "checkpoint.every", "checkpoint.keep", "logging.progress_bar",
                     "logging.every", "logging.loss_plot", "logging.sample_prompt",
                     "logging.sample_max_new_tokens", "logging.exact_match_examples"}


@dataclass
class TrainerState:
    step: int = 0                # optimizer steps done
    data_position: int = 0       # global micro-batches consumed
    tokens_seen: int = 0         # input tokens of all processes
    bad_steps_in_a_row: int = 0
    world_size: int = 1


def checkpoints_root(output_dir: str) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's state as plain values and a tensor: torch.load(weights_only=True) reads those
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def new_temp_dir(output_dir: str, step: int) -> Path:
    """A fresh hidden directory to write checkpoint ``step`` into (stale ones are removed)."""
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{_TMP_PREFIX}step-{step}"
    tmp.mkdir()
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")


def write_checkpoint_files(tmp: Path, *, cfg: Config, state: TrainerState, optimizer_state: dict, scheduler,
                           save_adapter_fn) -> None:
    """Everything but the RNG files (each process writes its own with ``write_rng``)."""
    save_adapter_fn(tmp / "adapter")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")
    (tmp / "config.yaml").write_text(dump_config(cfg))


def publish(tmp: Path, step: int, keep: int) -> Path:
    """fsync ``tmp``, rename it to ``step-<step>``, then drop all but the newest ``keep``."""
    fsync_tree(tmp)
    final = tmp.parent / f"step-{step}"
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; refusing to overwrite it")
    os.replace(tmp, final)
    _fsync_dir(tmp.parent)
    for old in list_checkpoints(str(tmp.parent.parent))[:-keep]:
        shutil.rmtree(old)
    return final


def read_trainer_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def read_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: checkpoint value -> this run's value`` for every key outside RESUMABLE_CHANGES."""
    out = []
    for section, values in current.items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            before = saved.get(section, {}).get(key)
            if dotted not in RESUMABLE_CHANGES and before != value:
                out.append(f"{dotted}: {before!r} in the checkpoint, {value!r} in this run")
    return out


def check_compatible(path: Path, cfg: Config, world_size: int) -> None:
    """Refuse to resume from ``path`` if it was trained with a different config or world size."""
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint (no trainer_state.json)")
    diffs = config_differences(read_yaml(str(path / "config.yaml")), config_to_dict(cfg))
    saved_world = read_trainer_state(path).world_size
    if saved_world != world_size:
        diffs.append(f"number of processes: {saved_world} in the checkpoint, {world_size} in this run")
    if diffs:
        raise ValueError(f"cannot resume from {path}: it was written by an incompatible run: "
                         + "; ".join(diffs))

