"""`qlora sweep`: one training run per value of one config key, the same data and seed, one after
another, then a table and a plot of what each value gave.

    qlora sweep CONFIG --set lora.r=4,8,16,32,64

Each run is an ordinary ``qlora train`` in its own process (so its peak memory is its own) with
``train.output_dir`` = ``SWEEP_DIR/<key>=<value>``. A run that finished (its result.json exists)
is not run again; one that was interrupted resumes from its latest checkpoint (or, stopped
before its first, starts again). So a sweep
stopped anywhere continues where it was when started again with the same arguments.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from qlora.train.checkpoint import latest_checkpoint
from qlora.train.config import Config, apply_override, dump_config, load_config

RESULT_FILE = "result.json"  # what qlora.train.loop writes at the end of a run
COLUMNS = [("held-out loss", "eval_loss"), ("exact match", "exact_match_after"),
           ("trainable %", "trainable_percent"), ("peak memory MiB", "peak_memory_mib"),
           ("tokens/s", "tokens_per_s")]


class RunFailed(RuntimeError):
    """A run of the sweep exited with an error (its own output says which)."""


@dataclass
class SweepSpec:
    key: str                  # section.key
    values: list[str]         # as written on the command line (YAML each)
    fixed: list[str]          # the other --set assignments


def split_values(text: str) -> list[str]:
    """``4,8,16`` -> ["4", "8", "16"]; commas inside [...] or {...} do not split (a list value)."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_sweep(overrides: list[str]) -> SweepSpec:
    """The one ``--set key=v1,v2,...`` with several values, and the fixed assignments."""
    swept, fixed = [], []
    for assignment in overrides:
        name, sep, text = assignment.partition("=")
        values = split_values(text) if sep else []
        (swept if len(values) > 1 else fixed).append((name.strip(), values, assignment))
    if len(swept) != 1:
        named = ", ".join(name for name, _, _ in swept) or "none"
        raise ValueError(f"qlora sweep needs exactly one --set key=value1,value2,... with several values "
                         f"(e.g. lora.r=4,8,16); got {named}")
    (key, values, _), = swept
    if "" in values or len(set(values)) != len(values):
        raise ValueError(f"--set {key}: the values {values} must be distinct and none empty")
    return SweepSpec(key, values, [assignment for _, _, assignment in fixed])


def run_configs(config_path: Optional[str], spec: SweepSpec, sweep_dir: Path) -> list[tuple[str, Config]]:
    """(value, config) per run, each checked as qlora train checks it, before anything runs."""
    runs = []
    for value in spec.values:
        cfg = load_config(config_path, spec.fixed)
        apply_override(cfg, f"{spec.key}={value}")
        cfg.train.output_dir = str(sweep_dir / f"{spec.key}={value.replace('/', '_')}")
        runs.append((value, cfg))
    return runs


def _run_one(cfg: Config, log: Callable[[str], None]) -> dict:
    """Train ``cfg`` in a child process unless its result is there; returns that result."""
    out = Path(cfg.train.output_dir)
    result_file, config_file = out / RESULT_FILE, out / "run.yaml"
    if result_file.is_file():
        if yaml.safe_load(config_file.read_text()) != yaml.safe_load(dump_config(cfg)):
            raise ValueError(f"{out} holds a finished run with another config; give the sweep a new --out")
        log(f"{out.name}: done before, kept")
        return json.loads(result_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(dump_config(cfg), encoding="utf-8")
    command = [sys.executable, "-m", "qlora", "train", str(config_file)]
    # the directory is this sweep's (named by it, its run.yaml written above): an interrupted run
    # resumes from its checkpoint, or starts again over what it wrote before its first one
    command.append("--resume" if latest_checkpoint(str(out)) is not None else "--overwrite")
    log(f"{out.name}: {'resuming' if '--resume' in command else 'training'} ({' '.join(command[2:])})")
    status = subprocess.run(command).returncode
    if status != 0 or not result_file.is_file():
        raise RunFailed(f"the run {out.name} failed (exit status {status}); fix it and start the "
                           f"sweep again: finished runs are kept, this one resumes from its checkpoint")
    return json.loads(result_file.read_text())


def _row(value: str, result: dict) -> dict:
    row = dict(value=value, **{key: result.get(key) for _, key in COLUMNS if key != "trainable_percent"})
    row["trainable_percent"] = 100.0 * result["trainable_parameters"] / result["parameters"]
    row["eval_ppl"] = None if result.get("eval_loss") is None else math.exp(min(result["eval_loss"], 50.0))
    row["steps"] = result["steps"]
    return row


def _format(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_table(key: str, rows: list[dict], sweep_dir: Path) -> str:
    """sweep.json, sweep.csv and sweep.md in ``sweep_dir``; returns the markdown table."""
    (sweep_dir / "sweep.json").write_text(json.dumps(dict(key=key, runs=rows), indent=2) + "\n")
    fields = ["value", "eval_loss", "eval_ppl", "exact_match_after", "trainable_percent",
              "peak_memory_mib", "tokens_per_s", "steps"]
    with open(sweep_dir / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: row[k] for k in fields} for row in rows)
    header = [key, "held-out loss", "perplexity", "exact match", "trainable %", "peak memory MiB",
              "tokens/s", "steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_format(row[k]) for k in fields) + " |" for row in rows]
    table = "\n".join(lines)
    (sweep_dir / "sweep.md").write_text(table + "\n")
    return table


def plot_sweep(key: str, rows: list[dict], path: Path) -> None:
    """One panel per column of COLUMNS against the swept value (as categories, in sweep order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.5))
    labels = [row["value"] for row in rows]
    for ax, (title, column) in zip(axes, COLUMNS):
        points = [(i, row[column]) for i, row in enumerate(rows) if row[column] is not None]
        if points:
            ax.plot(*zip(*points), "o-")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep(config_path: Optional[str], overrides: list[str], sweep_dir: Optional[str] = None,
          log: Callable[[str], None] = print) -> list[dict]:
    """Run the sweep ``overrides`` describe (see :func:`parse_sweep`) on ``config_path``; results
    go to ``sweep_dir`` (default: ``train.output_dir`` + ``-sweep-<key>``). Returns the rows."""
    spec = parse_sweep(overrides)
    base = load_config(config_path, spec.fixed)
    root = Path(sweep_dir or f"{base.train.output_dir}-sweep-{spec.key}")
    runs = run_configs(config_path, spec, root)
    root.mkdir(parents=True, exist_ok=True)
    log(f"sweep of {spec.key} over {', '.join(spec.values)}: {len(runs)} runs under {root}")
    rows = [_row(value, _run_one(cfg, log)) for value, cfg in runs]
    log(write_table(spec.key, rows, root))
    plot_sweep(spec.key, rows, root / "sweep.png")
    log(f"table: {root / 'sweep.md'} (and .csv, .json); plot: {root / 'sweep.png'}")
    return rows
