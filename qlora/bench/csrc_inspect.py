"""Ahead-of-time inspection of the CUDA C++ kernels of csrc/: compile each .cu with nvcc for sm_80 /
sm_90 (``-O3``, as setup.py builds the extension), read registers, static shared memory and the
SASS from the cubin (``cuobjdump``; spills and MMA as in ``kernel_inspect``), and apply the speed
model to the bf16 instantiations of the NF4 kernels.

``CSRC_KERNELS`` says what one tile step of each kernel's main loop does. It restates constants of
the .cu files (threads per block, elements per thread); if they change, the main-loop finder stops
finding a whole number of tile steps and the inspector reports "no speed model" until this table
follows.
"""
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from qlora.bench import sass
from qlora.bench.kernel_inspect import ARCHS, InspectResult, apply_model, mma_kind
from qlora.bench.speed_model import (DENSE_BYTES_PER_WEIGHT, NF4_BYTES_PER_WEIGHT, NF4_FP32_ABSMAX_BYTES_PER_WEIGHT,
                                     Workload)

CSRC = Path(__file__).resolve().parents[2] / "csrc"


@dataclasses.dataclass(frozen=True)
class CsrcKernel:
    name: str  # the row's kernel name
    source: str  # .cu file in csrc/
    mangled: str  # regex on the mangled name; groups are the template arguments of the config
    labels: tuple  # names of those groups (a bool template argument reads 0 or 1)
    workload: object  # dict of template arguments -> Workload


def _gemv_workload(args) -> Workload:
    # nf4_gemv_lora.cu: each warp loops over K on its own; one pass reads one chunk of kChunk = 32
    # weights per lane and row, R rows of W x 32 lanes x 32 = R * 1024 weights, and does in fp32 FFMA
    # MT multiply-adds per weight (unscaled products) plus MT per chunk and row (the absmax applied
    # once per chunk): MT * R * 33 per lane. Without double quantization the absmax is fp32.
    mt, rows, lanes, chunk = args["MT"], args["R"], 32, 32
    nf4_bytes = NF4_BYTES_PER_WEIGHT if args["double_quant"] else NF4_FP32_ABSMAX_BYTES_PER_WEIGHT
    return Workload("gemv", "ffma", work=mt * rows * (chunk + 1) * lanes, weights=rows * lanes * chunk,
                    threads=lanes, tile={"rows": rows, "M": mt, "K": lanes * chunk},
                    hbm_bytes_per_weight=nf4_bytes, dense_bytes_per_weight=DENSE_BYTES_PER_WEIGHT)


def _dequant_workload(args) -> Workload:
    # nf4_dequantize.cu: kThreadsPerBlock = 256 threads x kChunk = 32 elements, no loop; bf16 out
    weights = 256 * 32
    return Workload("dequant", "store", work=2 * weights, weights=weights, threads=256, tile={"weights": weights},
                    hbm_bytes_per_weight=NF4_BYTES_PER_WEIGHT + DENSE_BYTES_PER_WEIGHT,
                    dense_bytes_per_weight=NF4_BYTES_PER_WEIGHT + DENSE_BYTES_PER_WEIGHT)


CSRC_KERNELS = (
    CsrcKernel("csrc_nf4_gemv_lora", "nf4_gemv_lora.cu",
               r"nf4_gemv_lora_kernelI13__nv_bfloat16Li(\d+)ELi(\d+)ELb([01])E", ("MT", "R", "double_quant"),
               _gemv_workload),
    CsrcKernel("csrc_nf4_dequantize", "nf4_dequantize.cu", r"nf4_dequantize_kernelI13__nv_bfloat16E", (),
               _dequant_workload),
)


def nvcc() -> str | None:
    return shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc")


def compile_cu(source: Path, arch: str) -> bytes:
    """The cubin of one .cu file for ``arch``."""
    if nvcc() is None:
        raise FileNotFoundError("nvcc not found on PATH or in /usr/local/cuda/bin")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "kernel.cubin")
        cmd = [nvcc(), f"-arch=sm_{ARCHS[arch]}", "-std=c++17", "-O3", "-cubin", f"-I{CSRC}",
               str(source), "-o", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
        with open(out, "rb") as f:
            return f.read()


def inspect_csrc(arch: str, kernels=None) -> list:
    """Compile every CSRC_KERNELS source for ``arch``; one row per bf16 instantiation of each kernel.
    Raises FileNotFoundError without nvcc."""
    results = []
    for kernel in CSRC_KERNELS:
        if kernels is not None and kernel.name not in kernels:
            continue
        try:
            functions = sass.disassemble(compile_cu(CSRC / kernel.source, arch))
        except RuntimeError as exc:
            results.append(InspectResult(kernel.name, kernel.source, arch, error=str(exc)))
            continue
        matched = [(f, re.search(kernel.mangled, f.name)) for f in functions]
        matched = sorted(((f, m) for f, m in matched if m), key=lambda fm: tuple(int(g) for g in fm[1].groups()))
        if not matched:
            results.append(InspectResult(kernel.name, kernel.source, arch,
                                         error=f"no function matching {kernel.mangled} in {kernel.source}"))
        for function, match in matched:
            args = {label: int(value) for label, value in zip(kernel.labels, match.groups())}
            label = ",".join(["bf16"] + [f"{k}={v}" for k, v in args.items()])
            result = InspectResult(kernel.name, label, arch, function.registers, function.spill_bytes,
                                   function.static_shared_bytes, mma_kind(function))
            results.append(apply_model(result, function, kernel.workload(args)))
    return results
