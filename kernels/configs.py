"""Autotune configurations of the NF4 + LoRA kernels, per GPU architecture.

Every config list exists for ``sm_80`` (A100) and ``sm_90`` (H100/H200); ``kernel_configs(name)``
returns the list for the GPU this process runs on (or one small config under
``TRITON_INTERPRET=1``, where autotuning would only multiply the interpreter's run time). The kernel
inspector compiles every entry of ``CONFIGS`` for both architectures.

Autotune keys are (M_BUCKET, N, K, R): M is bucketed to a power of two so that a training run with
varying sequence lengths tunes a handful of times, not once per batch shape.

Tile naming follows the swap-AB layout of the forward kernels: the dequantized W0 tile is the MMA's
left operand (BLOCK_N rows of W0), the activation tile the right operand (BLOCK_M rows of X).
"""
import os

import torch
import triton

# Largest M served by the split-K GEMV kernel (decode / evaluation).
GEMV_MAX_M = 16


def m_bucket(m: int) -> int:
    """Power-of-two bucket of M used as an autotune key (16 ... 8192)."""
    return min(max(triton.next_power_of_2(m), 16), 8192)


def _cfg(num_warps, num_stages, **block):
    return triton.Config(block, num_warps=num_warps, num_stages=num_stages)


# Fused forward: Y^T tile [BLOCK_N, BLOCK_M] = W0 tile . X^T tile, K loop, then the LoRA step.
# Every entry compiles without register spills as a large launch compiles it (ints divisible by 16
# specialized, spills read as local stores in the launched cubin's SASS: the speed-model branch's
# inspector, Triton 3.9 and 3.6). Today's `qlora kernels inspect` compiles without that
# specialization, reruns ptxas on its own and reports spills for some 256-row and 4-warp entries,
# so each list starts with a 128-row entry, the one its test compiles; the autotuner times them all.
# BLOCK_M is the activation rows each dequantized weight is used for: the dequant costs the same
# per step whatever BLOCK_M is, so the widest tile halves it per FLOP. sm_90: 8 warps = two
# warpgroups, each a 64 x BLOCK_M wgmma (64 x 256 at the widest, 128 fp32 accumulator registers
# per thread). sm_80: mma.sync issues 8x more MMA instructions, and at 128 x 128 x 64 ptxas puts
# about 270 register moves per thread around a step's 64 HMMA (8 per weight); at BLOCK_K = 32 the
# 128 x 256 and 256 x 128 tiles fit in registers without them and keep instruction issue under the
# MMA time (sm_80 SASS, Triton 3.9, 2026-11-29; figures in the README).
_FWD = {
    "sm_90": [
        _cfg(8, 4, BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, GROUP_N=8),
        _cfg(8, 3, BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, GROUP_N=8),
        _cfg(8, 3, BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, GROUP_N=8),
        _cfg(4, 4, BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, GROUP_N=8),
        _cfg(8, 4, BLOCK_N=128, BLOCK_M=64, BLOCK_K=64, GROUP_N=8),
        _cfg(4, 4, BLOCK_N=64, BLOCK_M=64, BLOCK_K=64, GROUP_N=8),
    ],
    "sm_80": [
        _cfg(8, 4, BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, GROUP_N=8),
        _cfg(8, 3, BLOCK_N=128, BLOCK_M=256, BLOCK_K=32, GROUP_N=8),
        _cfg(8, 3, BLOCK_N=256, BLOCK_M=128, BLOCK_K=32, GROUP_N=8),
        _cfg(4, 4, BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, GROUP_N=8),
        _cfg(8, 3, BLOCK_N=128, BLOCK_M=64, BLOCK_K=64, GROUP_N=8),
        _cfg(4, 4, BLOCK_N=64, BLOCK_M=64, BLOCK_K=64, GROUP_N=8),
    ],
}

# Backward dX tile [BLOCK_M, BLOCK_K] = dY tile . W0 tile, loop over N (BLOCK_N per step). The
# LoRA part keeps a second [BLOCK_M, BLOCK_K] fp32 accumulator (an adapter's partial sum before its
# dropout mask), so the widest tiles that do not spill are 256 x 64 (two warpgroups of
# 128 x 64: the dequant of a W0 tile serves 256 rows of dY) and 128 x 128; 256 x 128 spills (268
# bytes on sm_90, Triton 3.9). The BLOCK_K = 32 entry is for K < 64 (configs_within_k).
_BWD_DX = {
    "sm_90": [
        _cfg(8, 4, BLOCK_M=128, BLOCK_K=128, BLOCK_N=64, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=256, BLOCK_K=64, BLOCK_N=64, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_K=128, BLOCK_N=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_K=128, BLOCK_N=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_K=32, BLOCK_N=64, GROUP_M=8),
    ],
    "sm_80": [
        _cfg(8, 4, BLOCK_M=128, BLOCK_K=128, BLOCK_N=64, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=256, BLOCK_K=64, BLOCK_N=64, GROUP_M=8),
        _cfg(8, 3, BLOCK_M=128, BLOCK_K=128, BLOCK_N=64, GROUP_M=8),
        _cfg(8, 4, BLOCK_M=128, BLOCK_K=64, BLOCK_N=64, GROUP_M=8),
        _cfg(4, 4, BLOCK_M=64, BLOCK_K=32, BLOCK_N=64, GROUP_M=8),
    ],
}

# Split-K GEMV for M <= 16: Y^T tile [BLOCK_N, M]; SPLIT_K programs share one output tile so that
# even N = 1024 puts several programs on every SM and the 4-bit stream saturates HBM. MMA_COLS: the
# MMA's column count (see nf4_gemv.py: spare columns carry absmax blocks). sm_90: 16, the smallest
# N for which both Triton 3.6 and 3.9 pick wgmma with the operand layout the kernel's k permutation
# assumes (at N = 8 Triton 3.6 falls back to mma.sync with a different one); sm_80: 8. 128 weights
# per thread per tile: at 256 Triton 3.9's ptxas spills (measured with the sm_90 inspector, 2026-11-29).
_GEMV = {
    "sm_90": [
        _cfg(4, 4, BLOCK_N=64, BLOCK_K=256, MMA_COLS=16, SPLIT_K=1),
        _cfg(4, 4, BLOCK_N=64, BLOCK_K=256, MMA_COLS=16, SPLIT_K=4),
        _cfg(4, 4, BLOCK_N=64, BLOCK_K=256, MMA_COLS=16, SPLIT_K=8),
        _cfg(4, 4, BLOCK_N=128, BLOCK_K=128, MMA_COLS=16, SPLIT_K=4),
    ],
    "sm_80": [
        _cfg(4, 4, BLOCK_N=64, BLOCK_K=256, MMA_COLS=8, SPLIT_K=1),
        _cfg(4, 4, BLOCK_N=64, BLOCK_K=256, MMA_COLS=8, SPLIT_K=4),
        _cfg(4, 4, BLOCK_N=64, BLOCK_K=256, MMA_COLS=8, SPLIT_K=8),
    ],
}

# LoRA down-projection S = X_d . A^T (memory-bound on X; one R tile covers r <= 128).
_LORA_A = {
    arch: [
        _cfg(4, 3, BLOCK_M=64, BLOCK_K=64),
        _cfg(4, 3, BLOCK_M=32, BLOCK_K=128),
    ]
    for arch in ("sm_80", "sm_90")
}

CONFIGS = {"nf4_lora_linear_fwd": _FWD, "nf4_lora_linear_bwd_dx": _BWD_DX, "nf4_gemv_lora": _GEMV,
           "lora_a": _LORA_A}

# Under the interpreter: the smallest tiles tl.dot accepts, so tests on small shapes stay fast.
_INTERPRET = {
    "nf4_lora_linear_fwd": [_cfg(4, 1, BLOCK_N=32, BLOCK_M=32, BLOCK_K=64, GROUP_N=4)],
    "nf4_lora_linear_bwd_dx": [_cfg(4, 1, BLOCK_M=32, BLOCK_K=32, BLOCK_N=32, GROUP_M=4)],
    "nf4_gemv_lora": [_cfg(4, 1, BLOCK_N=32, BLOCK_K=128, MMA_COLS=8, SPLIT_K=2)],
    "lora_a": [_cfg(4, 1, BLOCK_M=32, BLOCK_K=64)],
}


def configs_within_k(configs, named_args, **kwargs) -> list:
    """Autotune pruning of the dX kernel: only configs whose column tile fits in K (its last tile
    is shifted back to end at K instead of being masked). K is a multiple of the NF4 blocksize,
    so the BLOCK_K = 32 entry of every list always fits."""
    return [c for c in configs if c.kwargs["BLOCK_K"] <= named_args["K"]]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def current_arch() -> str:
    """'sm_90' on Hopper and newer, else 'sm_80' (Ampere/Ada tiles); 'sm_80' without a GPU."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        return "sm_90"
    return "sm_80"


def kernel_configs(name: str) -> list:
    """The autotune config list of kernel ``name`` for this process's device."""
    if interpreting():
        return _INTERPRET[name]
    return CONFIGS[name][current_arch()]
