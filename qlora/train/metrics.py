"""Run metrics: the JSONL log, its view for the trackers (TensorBoard, wandb, ...), the memory reading of the progress bar, the
loss plot."""
from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch

from qlora.util.atomic import write_atomic


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def memory_used(device: torch.device) -> str:
    """:func:`peak_memory_mib` for the progress bar."""
    if device.type == "cuda":
        return f"{peak_memory_mib(device) / 2**10:.2f}GiB"
    return f"{peak_memory_mib(device):.0f}MiB"


class MetricsLog:
    """Appends one JSON object per line to ``path``. A resumed run keeps the first ``keep_lines``
    lines, those written before its checkpoint (``TrainerState.metrics_lines``): what was logged
    after it, such as a final evaluation, is logged again by the resumed run, and only once."""

    def __init__(self, path: Path, keep_lines: int):
        self.path = path
        # as written, unparsed: a line torn by a kill after the checkpoint is never read
        kept = path.read_bytes().splitlines(keepends=True)[:keep_lines] if path.is_file() else []
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: f.write(b"".join(kept)))  # a kill here keeps the old file
        self.lines = len(kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.lines += 1


def tracker_values(record: dict) -> dict:
    """A metrics record as the trackers' tags: numbers as scalars, the sample answer as text;
    held-out values under ``eval/``, the rest under ``train/``."""
    values = {}
    for key, value in record.items():
        if key == "sample":
            values["eval/sample"] = value
        elif key.startswith("eval_"):
            values[f"eval/{key.removeprefix('eval_')}"] = value
        elif key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            values[f"train/{key}"] = value
    return values


def hyperparameters(config: dict) -> dict:
    """The config as TensorBoard's flat hyperparameters: ``section.key`` -> a scalar or its text."""
    return {f"{section}.{key}": value if isinstance(value, (bool, int, float, str)) else str(value)
            for section, keys in config.items() for key, value in keys.items()}


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out_path: Path) -> None:
    """Training loss per step (and held-out loss where evaluated) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
