"""Fused forward of the QLoRA linear layer: NF4 dequant + GEMM + LoRA in one pass.

Math, X [M, K] (bf16/fp16), W0 NF4 [N, K], adapters a = 1..n with A_a [r_a, K], B_a [N, r_a],
scaling s_a and dropout p_a:

    X_d,a = X * keep_a / (1 - p_a)            keep_a = seeded Philox mask (lora_tile_ops.dropout_keep)
    S     = [X_d,1 A_1^T | ... | X_d,n A_n^T]  [M, R],  R = sum_a r_a     (lora_a_kernel)
    B_s   = [s_1 B_1 | ... | s_n B_n]          [N, R]                      (built by the caller)
    Y     = X W0^T + S B_s^T (+ bias)          [M, N]                      (nf4_lora_linear_fwd_kernel)

Concatenating the adapters along the rank axis turns "sum of LoRA terms" into one more
reduction of length R in the same accumulator. S is returned so that backward can form dB
without recomputing it; the dropout masks are never stored (backward regenerates them).
"""
import torch
import triton
import triton.language as tl

from .lora_tile_ops import dropout_keep, mma, upcast_dot
from .configs import kernel_configs, m_bucket
from .dequant import declare_code_table, nf4_kernel_args
from .nf4_tile import nf4_dequant_tile

MAX_RANK = 256  # largest total rank R the kernels are tested for


def lora_block_r(r: int) -> int:
    """Rank tile: a power of two >= 16 (tl.dot's minimum) and <= 64 (register budget)."""
    return min(max(triton.next_power_of_2(r), 16), 64)


@triton.autotune(configs=kernel_configs("nf4_lora_linear_fwd"), key=["M_BUCKET", "N", "K", "R"])
@triton.jit
def nf4_lora_linear_fwd_kernel(
    x_ptr,  # [M, K] activations, row stride stride_xm, unit column stride
    packed_ptr,  # uint8 [N*K/2] NF4 codes of W0 (bitsandbytes layout)
    absmax_ptr,  # uint8 [N*K/QBLOCK] double-quantized absmax codes (fp32 absmax if not DOUBLE_QUANT)
    nested_absmax_ptr,  # fp32 second-level absmax scales
    nested_quant_map_ptr,  # fp32 [256] code book of the absmax codes
    offset_ptr,  # fp32 [1] mean subtracted from absmax before its quantization
    s_ptr,  # [M, R] S = X_d A^T, row stride R (unused if not HAS_LORA)
    b_ptr,  # [N, R] scaled, concatenated B, row stride R (unused if not HAS_LORA)
    bias_ptr,  # [N] bias (unused if not HAS_BIAS)
    y_ptr,  # [M, N] output, row stride N
    M,
    N,
    K,
    R,
    stride_xm,
    M_BUCKET,  # autotune key only: power-of-two bucket of M
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    QBLOCK: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """Y^T[n, m] tile = sum_k W0[n, k] X[m, k] + sum_j B_s[n, j] S[m, j] (+ bias[n]); Y written once.

    Speed design (target: predicted <= 1.10x a dense bf16 GEMM of the same shape; the figures
    below are SASS counts of the main loop, sm_90, Triton 3.9, 2026-11-29, see the README):
    - The budget: one SM issues 4 warp-instructions per clock and its tensor cores do 4096 bf16
      FLOP per clock, and each weight of a k-step meets BLOCK_M rows of X, so the main loop may
      spend about BLOCK_M / 16 SASS instructions per weight (8 at BLOCK_M = 128, 16 at 256)
      before instruction issue, not the MMA, sets the pace.
    - Swap-AB: the tile computed is Y^T = W0 . X^T, so the dequantized W0 tile is the MMA's LEFT
      operand, which wgmma (sm_90) and mma.sync (sm_80) take from registers; X (the right operand)
      is a plain bf16 tile that the software pipeline (num_stages) prefetches into shared memory.
      The dequantized registers still pass through shared memory once (Triton's convert_layout):
      the layout in which a thread loads whole 32-bit words of codes is not the MMA fragment's.
    - Dequant: one warp shuffle per weight for the code book, one multiply by the block's absmax
      in fp32 and half a conversion (nf4_tile.nf4_dequant_tile); no load in the loop carries a
      mask. About 8.2 instructions per weight in all, amortized over BLOCK_M = 128-256 rows of X:
      at BLOCK_M = 256 (two warpgroups of 64 x 256 each) issue takes half the MMA time.
    - Bytes: W0 costs 0.5 B + 1/64 B per weight instead of 2 B, so at large M the kernel is
      compute-bound exactly like the dense GEMM.
    - The absmax of a block is dequantized once per tile row and block, straight from the uint8
      code, the nested scale and the offset: no separate absmax pass.
    - LoRA is one more MMA step of length R into the same fp32 accumulator, and the bias is added
      in the epilogue, so Y is stored once (the unfused path writes and re-reads Y twice).
    - GROUP_N tiles of W0 walk the M tiles together so their 4-bit tiles stay in L2.
    """
    # ---- tile coordinates (grouped ordering for L2 reuse) ------------------------------
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_per_group = GROUP_N * tiles_m
    first_n = (pid // tiles_per_group) * GROUP_N
    group_size = min(tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % tiles_per_group) % group_size
    pid_m = (pid % tiles_per_group) // group_size

    # Rows of W0 and X are wrapped into range, so that no load in the main loop needs a mask
    # (the wrapped rows compute values that the masked store discards); K is a multiple of QBLOCK,
    # so when BLOCK_K divides QBLOCK the K loop has no ragged tile either.
    n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_out = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = n_out % N
    rm = m_out % M
    rk = tl.arange(0, BLOCK_K)
    EVEN_K: tl.constexpr = QBLOCK % BLOCK_K == 0
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    offset = tl.load(offset_ptr)
    declare_code_table(pid)

    # ---- main loop: dequantize a W0 tile, multiply by the X tile -----------------------
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = nf4_dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, offset,
                             rn, k0, N, K, BLOCK_N, BLOCK_K, QBLOCK, NESTED_BLOCK,
                             DOUBLE_QUANT, x_ptr.dtype.element_ty, IN_BOUNDS=EVEN_K)
        if EVEN_K:
            x = tl.load(x_rows + (k0 + rk)[None, :])
        else:
            x = tl.load(x_rows + (k0 + rk)[None, :], mask=((k0 + rk) < K)[None, :], other=0.0)
        acc = mma(w, tl.trans(x), acc, UPCAST_DOT)

    # ---- LoRA: one more reduction of length R into the same accumulator ----------------
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < R
            b = tl.load(b_ptr + rn.to(tl.int64)[:, None] * R + rr[None, :], mask=r_ok[None, :], other=0.0)
            s = tl.load(s_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=r_ok[None, :], other=0.0)
            acc = mma(b, tl.trans(s), acc, UPCAST_DOT)

    # ---- epilogue: bias, one rounding, store Y (transposed tile) -----------------------
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[:, None]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + m_out.to(tl.int64)[None, :] * N + n_out[:, None], y,
             mask=(n_out < N)[:, None] & (m_out < M)[None, :])


@triton.autotune(configs=kernel_configs("lora_a"), key=["M_BUCKET", "K", "R"])
@triton.jit
def lora_a_kernel(
    x_ptr,  # [M, K] activations, row stride stride_xm
    a_ptr,  # [R, K] LoRA A of one adapter, contiguous
    s_ptr,  # [M, R] output slice of S, row stride stride_sm
    seed_ptr,  # int64 [1] dropout seed of this adapter (a device tensor: no host sync to draw it)
    p,  # dropout probability (0 disables the mask)
    keep_scale,  # 1 / (1 - p)
    M,
    K,
    R,
    stride_xm,
    stride_sm,
    M_BUCKET,  # autotune key only
    APPLY_DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """S[m, j] = sum_k X_d[m, k] A[j, k], X_d = X * keep / (1 - p) regenerated from the seed.

    Memory-bound on X: grid (M tiles, R tiles) with BLOCK_R covering r <= 64 in one tile, so X is
    read once for the usual ranks; its cost is M*K*2 bytes, the same read the fused kernel does.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    r_ok = rr < R

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + rk
        k_ok = cols < K
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + cols[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if APPLY_DROPOUT:
            keep = dropout_keep(tl.load(seed_ptr), p, rm, k0, K, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(x_ptr.dtype.element_ty)
        a = tl.load(a_ptr + rr.to(tl.int64)[:, None] * K + cols[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        acc = mma(x, tl.trans(a), acc, UPCAST_DOT)
    tl.store(s_ptr + rm.to(tl.int64)[:, None] * stride_sm + rr[None, :], acc.to(s_ptr.dtype.element_ty),
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def lora_dropout_kernel(
    x_ptr,  # [M, K] activations, row stride stride_xm
    out_ptr,  # [M, K] X_d, contiguous
    seed_ptr,  # int64 [1] dropout seed
    p,
    keep_scale,  # 1 / (1 - p)
    M,
    K,
    stride_xm,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """X_d = X * keep / (1 - p): the mask that lora_a_kernel and the backward regenerate."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rm < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    keep = dropout_keep(tl.load(seed_ptr), p, rm, tl.program_id(1) * BLOCK_K, K, BLOCK_M, BLOCK_K)
    x_d = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * K + cols[None, :], x_d, mask=mask)


def _check_activation(x: torch.Tensor, k: int, where: str):
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{where}: x must be [M, K={k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{where}: x must be bf16 or fp16, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError(f"{where}: x must have unit column stride, got strides {x.stride()}")
    if x.shape[0] < 1:
        raise ValueError(f"{where}: x has no rows")
    if k % 4:
        raise ValueError(f"{where}: K={k} must be a multiple of 4 (the dropout generator's group)")


def lora_dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """X_d = dropout(X) with the seeded mask of the kernels; seed: int64 [1] on x's device.

    Also applies the same mask to any [M, K] tensor (the backward masks G A with it)."""
    _check_activation(x, x.shape[-1], "lora_dropout")
    m, k = x.shape
    out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, 32), triton.cdiv(k, 64))
    lora_dropout_kernel[grid](x, out, seed, p, 1.0 / (1.0 - p), m, k, x.stride(0), BLOCK_M=32, BLOCK_K=64)
    return out


def lora_a(x: torch.Tensor, a: torch.Tensor, p: float, seed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write S = dropout(X) A^T into ``out`` [M, r] (typically a column slice of the concatenated S).

    seed: int64 [1] tensor on x's device (read by the kernel, so drawing it never syncs)."""
    _check_activation(x, a.shape[1], "lora_a")
    m, k = x.shape
    r = a.shape[0]
    if not 0.0 <= p < 1.0:
        raise ValueError(f"lora_a: dropout p must be in [0, 1), got {p}")
    if a.dtype != x.dtype or not a.is_contiguous():
        raise ValueError(f"lora_a: A must be contiguous {x.dtype}, got {a.dtype} (contiguous={a.is_contiguous()})")
    if out.shape != (m, r) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"lora_a: out must be [{m}, {r}] {x.dtype} with unit column stride, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    block_r = min(max(triton.next_power_of_2(r), 16), 128)  # one R tile (X read once) up to r = 128
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r))
    lora_a_kernel[grid](x, a, out, seed, p, 1.0 / (1.0 - p), m, k, r, x.stride(0), out.stride(0), m_bucket(m),
                        APPLY_DROPOUT=p > 0.0, BLOCK_R=block_r, UPCAST_DOT=upcast_dot())
    return out


def check_lora_operands(s, b_scaled, m: int, n: int, dtype, where: str):
    """Validate S [M, R] and B_s [N, R] (both contiguous, same dtype as X, 1 <= R <= MAX_RANK)."""
    if (s is None) != (b_scaled is None):
        raise ValueError(f"{where}: pass both S and B_s, or neither")
    if s is None:
        return 0
    r = s.shape[1]
    if s.shape != (m, r) or b_scaled.shape != (n, r):
        raise ValueError(f"{where}: S must be [M={m}, R] and B_s [N={n}, R], got {tuple(s.shape)} and "
                         f"{tuple(b_scaled.shape)}")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"{where}: total LoRA rank R={r} outside [1, {MAX_RANK}]")
    for name, t in (("S", s), ("B_s", b_scaled)):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{where}: {name} must be contiguous {dtype}, got {t.dtype} "
                             f"(contiguous={t.is_contiguous()})")
    return r


def nf4_lora_linear_fwd(x: torch.Tensor, weight, bias, s, b_scaled) -> torch.Tensor:
    """Y = X W0^T + S B_s^T (+ bias): [M, K] -> [M, N] with the fused kernel.

    x: [M, K] bf16/fp16; weight: NF4 [N, K] (fields of qlora.quant.nf4.NF4Tensor); bias: [N] or None;
    s: [M, R] from ``lora_a`` and b_scaled: [N, R] = concatenated s_a * B_a, or both None.
    """
    tensors, consts = nf4_kernel_args(weight)
    n, k = weight.shape
    _check_activation(x, k, "nf4_lora_linear_fwd")
    m = x.shape[0]
    r = check_lora_operands(s, b_scaled, m, n, x.dtype, "nf4_lora_linear_fwd")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"nf4_lora_linear_fwd: bias must be [{n}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if x.stride(0) % 16 or x.data_ptr() % 16:
        # The X loads vectorize, and the widest tiles fit in registers, only when Triton sees a row
        # stride divisible by 16 and an aligned base, as a fresh contiguous X has (K is a multiple
        # of the blocksize >= 32): copy the rare view that has neither.
        x = x.clone(memory_format=torch.contiguous_format)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]),)
    nf4_lora_linear_fwd_kernel[grid](
        x, *tensors, s if r else x, b_scaled if r else x, bias if bias is not None else x, y,
        m, n, k, r, x.stride(0), m_bucket(m),
        HAS_LORA=r > 0, HAS_BIAS=bias is not None, BLOCK_R=lora_block_r(max(r, 1)),
        UPCAST_DOT=upcast_dot(), **consts)
    return y
