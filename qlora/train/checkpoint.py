"""Training checkpoints: written atomically, the last K kept, read back for an exact resume.

A checkpoint is the directory ``<output_dir>/checkpoints/step-<N>/`` holding

    adapter/               the LoRA adapter in PEFT's format (adapter_config.json + safetensors)
    optimizer.pt           optimizer state dict          (read with torch.load(weights_only=True));
                           under FSDP the whole (gathered) one, keyed by parameter name
    scheduler.pt           lr scheduler state dict
    rng-rank<R>.pt         python, numpy, torch and CUDA RNG states of each process
    trainer_state.json     step, data position, tokens seen, non-finite steps in a row, lines
                           of metrics.jsonl written before it
    config.yaml            the run's resolved config
    data_files.json        size, mtime and SHA-256 of each data file (qlora.train.fingerprint)
    adalora_*              with lora.type adalora: the unpruned adapter and the rank allocator
                           (see qlora.adalora.training)

It is written into a hidden temporary directory next to it, every file fsynced, then renamed
into place, so a crash leaves either the whole checkpoint or none of it. Only ``step-<N>``
directories count as checkpoints; a leftover temporary directory is ignored (and removed by
the next save). Publishing step N removes the checkpoints before N beyond the newest
``checkpoint.keep``; it never looks at later ones (see qlora.train.run_dir for how a resumed run
treats those).

Reading a checkpoint back, every damaged or refused file is named (qlora.util.files).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from qlora.train.config import Config, config_to_dict, dump_config, read_yaml
from qlora.util.atomic import fsync_dir
from qlora.util.files import load_torch, read_text

CHECKPOINT_DIR = "checkpoints"
DATA_FILES = "data_files.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
# Keys that may differ between a checkpoint and the run resuming it: they change where and how
# often things are written, never the numbers trained up to the checkpoint; and max_steps, so
# that a finished run can be continued (the lr schedule then follows the new max_steps).
RESUMABLE_CHANGES = {"train.output_dir", "train.max_steps", "train.eval_every", "train.max_bad_steps",
                     "checkpoint.every", "checkpoint.keep", "logging.progress_bar",
                     "logging.every", "logging.loss_plot", "logging.sample_prompt",
                     "logging.sample_max_new_tokens", "logging.exact_match_examples",
                     "train.gpu_memory_gb", "model.embedding_on_host",
                     "logging.report_to", "logging.project"}


@dataclass
class TrainerState:
    step: int = 0                # optimizer steps done
    data_position: int = 0       # global micro-batches consumed
    tokens_seen: int = 0         # input tokens of all processes
    bad_steps_in_a_row: int = 0
    world_size: int = 1
    metrics_lines: int = 0       # lines of metrics.jsonl written before the checkpoint


def checkpoints_root(output_dir: str) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def checkpoint_step(path: Path) -> int:
    """N of a checkpoint directory ``step-<N>``."""
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint directory (expected step-<N>)")
    return int(match.group(1))


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


def fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


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
                           save_adapter_fn, data_files: dict) -> None:
    """Everything but the RNG files (each process writes its own with ``write_rng``)."""
    save_adapter_fn(tmp / "adapter")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")
    (tmp / "config.yaml").write_text(dump_config(cfg))
    (tmp / DATA_FILES).write_text(json.dumps(data_files, indent=1) + "\n")


def publish(tmp: Path, step: int, keep: int) -> Path:
    """fsync ``tmp``, rename it to ``step-<step>``, then drop the checkpoints before it beyond
    the newest ``keep`` (this one included)."""
    fsync_tree(tmp)
    final = tmp.parent / f"step-{step}"
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; refusing to overwrite it")
    os.replace(tmp, final)
    fsync_dir(tmp.parent)
    older = [p for p in list_checkpoints(str(tmp.parent.parent)) if checkpoint_step(p) < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old)
    return final


def read_json(path: Path) -> dict:
    """The JSON object in checkpoint file ``path``; a missing, empty or damaged file is named."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg}); the checkpoint "
                         f"is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_trainer_state(path: Path) -> TrainerState:
    file = path / "trainer_state.json"
    values = read_json(file)
    known = {f.name for f in fields(TrainerState)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{file}: unknown key {unknown[0]!r}; the checkpoint is damaged or "
                         f"from another program")
    state = TrainerState(**values)
    for name in known:
        value = getattr(state, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{file}: {name} must be an integer >= 0, got {value!r}")
    return state


def read_torch(path: Path):
    return load_torch(path)


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
    """Refuse to resume from ``path`` if it was trained with a different config or world size,
    or is already past ``train.max_steps``."""
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint (no trainer_state.json)")
    saved = read_yaml(str(path / "config.yaml"))
    diffs = config_differences(saved, config_to_dict(cfg))
    state = read_trainer_state(path)
    if state.world_size != world_size:
        diffs.append(f"number of processes: {state.world_size} in the checkpoint, {world_size} in "
                     f"this run")
    saved_steps = saved.get("train", {}).get("max_steps")
    if cfg.lora.type == "adalora" and saved_steps != cfg.train.max_steps:
        diffs.append(f"train.max_steps: {saved_steps!r} in the checkpoint, {cfg.train.max_steps!r} "
                     f"in this run (AdaLoRA's rank schedule is fixed by it)")
    if diffs:
        raise ValueError(f"cannot resume from {path}: it was written by an incompatible run: "
                         + "; ".join(diffs))
    if state.step > cfg.train.max_steps:
        raise ValueError(f"cannot resume from {path}: it is at step {state.step}, past "
                         f"train.max_steps={cfg.train.max_steps}")

