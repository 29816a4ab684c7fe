"""Time of each path of the QLoRA linear layer per GPU arch and shape: what ``fused.choose_path`` compares.

Paths: "gemv" (split-K GEMV, M <= 16, no gradients), "fused" (fused NF4 + LoRA forward and dX
kernels), "dense" (dequantize W0 into a buffer, cuBLAS, LoRA term through cuBLAS' beta = 1).
Measured times (``MEASURED_FILE``, the rows a GPU run of ``qlora bench kernels`` writes) override
the predictions for a shape where every candidate path was measured; elsewhere the static speed
model decides, from ``PREDICTED_FILE``, written by ``qlora kernels inspect --write-table`` (the
ops layer cannot import the inspector: this data file is the interface).

Predicted seconds of one launch, from its config's figures per main-loop tile step (speed model,
qlora/bench/speed_model.py; each resource at its rated clock):

    step    = max(issue cycles / clock, tensor cycles / tensor clock, HBM cycles / clock)
    launch  = step x max(steps / SMs, steps per CTA)      (all SMs busy, or one CTA's own loop)

the best config of the kernel (the autotuner's choice). cuBLAS GEMMs and the torch ops both paths
share are taken at the dense limit, max(FLOPs / rated bf16 peak, bytes / HBM bandwidth). Like the
model, this is a lower bound: latency, launch overhead and stalls come on top.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

from qlora.kernels.configs import GEMV_MAX_M

PREDICTED_FILE = Path(__file__).with_name("path_times_predicted.json")
MEASURED_FILE = Path(__file__).with_name("path_times_measured.json")
PATHS = ("gemv", "fused", "dense")
MODES = ("fwd", "bwd", "full")  # inference forward, backward alone, forward + backward


@lru_cache(maxsize=None)
def predicted_table(path: Path = PREDICTED_FILE) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=None)
def measured_table(path: Path = MEASURED_FILE) -> dict:
    """{(arch, m, n, k, r, mode, path): seconds} from a JSON list of rows with those keys; {} without the file."""
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    try:
        return {(row["arch"], row["m"], row["n"], row["k"], row["r"], row["mode"], row["path"]): row["seconds"]
                for row in rows}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: each row needs arch, m, n, k, r, mode, path, seconds ({exc!r})") from None


def _machine(arch: str, table: dict) -> dict:
    if arch not in table["archs"]:
        raise ValueError(f"no predicted times for arch {arch!r} in {PREDICTED_FILE.name}: has {sorted(table['archs'])}")
    return table["archs"][arch]["machine"]


def _launch_seconds(config: dict, dims: dict, machine: dict) -> float:
    """One launch of a kernel config (a table row: tile, loop dim, split, cycles per step) on ``dims``."""
    step = max(config["issue_cycles"] / machine["clock_hz"], config["tensor_cycles"] / machine["tensor_clock_hz"],
               config["memory_cycles"] / machine["clock_hz"])
    tiles = {d: math.ceil(dims[d] / size) for d, size in config["tile"].items()}
    steps = math.prod(tiles.values())
    loop = config["loop"]
    steps_per_cta = math.ceil(tiles[loop] / config["split"]) if loop else 1
    return step * max(steps / machine["sms"], steps_per_cta)


def _kernel_seconds(kernel: str, dims: dict, arch: str, table: dict) -> float:
    machine = _machine(arch, table)
    return min(_launch_seconds(c, dims, machine) for c in table["archs"][arch]["kernels"][kernel])


def _gemm_seconds(m: int, n: int, k: int, machine: dict, reads_c: bool = False) -> float:
    """A cuBLAS bf16 GEMM [m, k] x [k, n] at the dense limit; ``reads_c``: C += (beta = 1) reads C too."""
    moved = 2 * (m * k + n * k + m * n * (2 if reads_c else 1))
    return max(2 * m * n * k / machine["rated_dense_bf16_flop_per_s"], moved / machine["hbm_bytes_per_s"])


def predicted_seconds(arch: str, path: str, mode: str, m: int, n: int, k: int, r: int,
                      table: dict | None = None) -> float:
    """Predicted seconds of ``path`` for X [m, k], W0 [n, k], LoRA rank r (0: none), in ``mode``."""
    table = table or predicted_table()
    if path not in PATHS or mode not in MODES:
        raise ValueError(f"path {path!r} / mode {mode!r}: expected one of {PATHS} / {MODES}")
    if path == "gemv" and (mode != "fwd" or m > GEMV_MAX_M):
        raise ValueError(f"the gemv path serves the forward of M <= {GEMV_MAX_M} only, not {mode} at M = {m}")
    machine = _machine(arch, table)
    dims = {"M": m, "N": n, "K": k, "weights": n * k}
    fwd = bwd = 0.0
    if r:  # S = dropout(X) A^T: the same launch on every path
        fwd += _gemm_seconds(m, r, k, machine)
        # G = dY B_s, dB_s = dY^T S, dA = G^T X_d: torch GEMMs on every path
        bwd += _gemm_seconds(m, r, n, machine) + _gemm_seconds(n, r, m, machine) + _gemm_seconds(r, k, m, machine)
    if path == "gemv":
        fwd += _kernel_seconds("nf4_gemv_lora" if m == 1 else "nf4_gemv_lora_m16", dims, arch, table)
    elif path == "fused":
        # the LoRA term rides in each kernel's epilogue: 2 m n r (forward), 2 m k r (dX) more MMA work
        tensor_peak = machine["rated_dense_bf16_flop_per_s"]
        fwd += _kernel_seconds("nf4_lora_linear_fwd", dims, arch, table) + 2 * m * n * r / tensor_peak
        bwd += _kernel_seconds("nf4_lora_linear_bwd_dx", dims, arch, table) + 2 * m * k * r / tensor_peak
    else:
        dequant = _kernel_seconds("nf4_dequantize", dims, arch, table)
        # Y = S B_s^T written first, then the base GEMM accumulates into it (beta = 1): see fused.py
        fwd += dequant + (_gemm_seconds(m, n, r, machine) if r else 0.0) + _gemm_seconds(m, n, k, machine, reads_c=r > 0)
        # dX = G A_cat (masked per adapter) written first, then dY W0 accumulated into it
        bwd += dequant + (_gemm_seconds(m, k, r, machine) if r else 0.0) + _gemm_seconds(m, k, n, machine, reads_c=r > 0)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def candidates(m: int, training: bool) -> tuple:
    return ("fused", "dense") if training or m > GEMV_MAX_M else PATHS


def best_path(arch: str, m: int, n: int, k: int, r: int, training: bool) -> str:
    """The candidate path with the lowest time: measured when every candidate of this shape was
    measured on ``arch``, else predicted (a tie goes to the fused kernels: no dequant buffer)."""
    mode = "full" if training else "fwd"
    paths = candidates(m, training)
    measured = measured_table()
    times = [measured.get((arch, m, n, k, r, mode, p)) for p in paths]
    if any(t is None for t in times):
        times = [predicted_seconds(arch, p, mode, m, n, k, r) for p in paths]
    return min(zip(times, paths), key=lambda tp: (tp[0], tp[1] == "dense"))[1]
