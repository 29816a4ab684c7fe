"""The speed model's predictions as the data table the ops-layer dispatcher reads
(``qlora.ops.path_times.PREDICTED_FILE``), written by ``qlora kernels inspect --write-table``.

Per arch: the machine the model assumes and, per NF4 kernel and autotune config, its tile (the
layer dims one main-loop step covers), the dim its CTAs loop over (and the split-K factor), and the
issue / tensor / HBM cycles of one step. ``qlora.ops.path_times`` turns that into a launch time for
any shape.
"""
import dataclasses

import triton

from qlora.bench.speed_model import DEFAULT_MACHINE, MACHINES

# per kernel: the dim of the layer (M, N, K of X [M, K] W0 [N, K]) a CTA's main loop walks
LOOP_DIM = {"nf4_lora_linear_fwd": "K", "nf4_lora_linear_bwd_dx": "N", "nf4_gemv_lora": "K",
            "nf4_gemv_lora_m16": "K", "nf4_dequantize": None}
MACHINE_FIELDS = ("name", "sms", "clock_hz", "tensor_clock_hz", "hbm_bytes_per_s", "rated_dense_bf16_flop_per_s")


def _config_row(result) -> dict:
    model = result.model
    tile = model["tile"]
    dims = {"weights": tile["weights"]} if LOOP_DIM[result.kernel] is None else {d: tile[d] for d in ("M", "N", "K")}
    return {"config": result.config, "tile": dims, "loop": LOOP_DIM[result.kernel], "split": tile.get("SPLIT_K", 1),
            "issue_cycles": model["issue_cycles"], "tensor_cycles": model["tensor_cycles"],
            "memory_cycles": model["memory_cycles"], "bound": model["bound"]}


def arch_entry(arch: str, results) -> dict:
    """The table's entry for ``arch`` from the inspector's results of every config of LOOP_DIM's kernels."""
    machine = dataclasses.asdict(MACHINES[DEFAULT_MACHINE[arch]])
    kernels = {name: [] for name in LOOP_DIM}
    for r in results:
        if r.arch == arch and r.kernel in kernels:
            if r.model is None:
                raise ValueError(f"{r.kernel} [{r.config}] {arch}: no prediction ({r.error or r.model_error})")
            kernels[r.kernel].append(_config_row(r))
    missing = [name for name, rows in kernels.items() if not rows]
    if missing:
        raise ValueError(f"{arch}: no inspected config of {', '.join(missing)}")
    return {"machine": {f: machine[f] for f in MACHINE_FIELDS}, "kernels": kernels}


def build(results, archs) -> dict:
    return {"generated_by": "qlora kernels inspect --write-table", "triton": triton.__version__,
            "archs": {arch: arch_entry(arch, results) for arch in archs}}
