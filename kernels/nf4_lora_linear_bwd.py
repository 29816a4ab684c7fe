"""Fused input gradient of the QLoRA linear layer.

Math (notation of nf4_lora_linear.py; G = dY B_s [M, R] is formed by the caller with cuBLAS,
it is tiny next to the GEMMs):

    dX = dY W0 + sum_a keep_a / (1 - p_a) * (G[:, R_a] A_a)         [M, K]
    dA_a = G[:, R_a]^T X_d,a                                      [r_a, K]  (caller, cuBLAS)
    dB_a = s_a dY^T S[:, R_a]                                      [N, r_a]  (caller, cuBLAS)

where R_a is adapter a's column range of the concatenated rank axis. The kernel reads W0 in its
packed NF4 form along the other axis (tiles [BLOCK_N, BLOCK_K] consumed along N) so the backward
never materializes W0 in 16 bits, and regenerates each adapter's dropout mask from its seed.
"""
import torch
import triton
import triton.language as tl

from .lora_tile_ops import dropout_keep, mma, upcast_dot
from .configs import configs_within_k, kernel_configs, m_bucket
from .dequant import declare_code_table, nf4_kernel_args
from .nf4_tile import nf4_dequant_tile
from .nf4_lora_linear import _check_activation, lora_block_r


@triton.autotune(configs=kernel_configs("nf4_lora_linear_bwd_dx"), key=["M_BUCKET", "N", "K", "R"],
                  prune_configs_by={"early_config_prune": configs_within_k})
@triton.jit
def nf4_lora_linear_bwd_dx_kernel(
    dy_ptr,  # [M, N] output gradient, contiguous
    packed_ptr,  # uint8 [N*K/2] NF4 codes of W0
    absmax_ptr,  # uint8 (or fp32) [N*K/QBLOCK] absmax codes
    nested_absmax_ptr,  # fp32 second-level absmax scales
    nested_quant_map_ptr,  # fp32 [256]
    offset_ptr,  # fp32 [1]
    g_ptr,  # [M, R] G = dY B_s, contiguous (unused if not HAS_LORA)
    a_ptr,  # [R, K] concatenated A, contiguous (unused if not HAS_LORA)
    rank_start_ptr,  # int32 [n_adapters + 1] first rank column of each adapter, then R
    dropout_p_ptr,  # fp32 [n_adapters] dropout probability per adapter
    seed_ptr,  # int64 [n_adapters] dropout seed per adapter
    dx_ptr,  # [M, K] input gradient, contiguous
    M,
    N,
    K,
    R,
    n_adapters,
    M_BUCKET,  # autotune key only
    HAS_LORA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    QBLOCK: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dX tile [BLOCK_M, BLOCK_K] = sum_n dY[m, n] W0[n, k] + per-adapter masked G A; one store.

    Speed design: the same byte budget as the forward (0.5 B per weight, compute-bound at large
    M) and the same dequant (nf4_tile.nf4_dequant_tile, mask-free in the main loop). The W0 tile
    [BLOCK_N, BLOCK_K] is the MMA's right operand in its natural row-major orientation, so
    dequantizing along the other axis needs no transpose: the tile goes from registers to shared
    memory once per step and feeds wgmma/mma (sm_90, Triton 3.9, 2026-11-29: 7.7 SASS instructions
    per weight at 128 x 128, issue 96% of the MMA time; 12.1 at 256 x 64, where each W0 tile serves
    256 rows of dY: 75%). The LoRA part is R more reduction steps per adapter; an adapter's mask is
    applied to its partial sum only, which is what lets several adapters with different dropout
    share one kernel, at the price of a second accumulator that limits the tile to 256 x 64 or
    128 x 128 (configs.py).
    """
    # ---- tile coordinates (grouped ordering: GROUP_M row tiles share dY in L2) ---------
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_k = tl.cdiv(K, BLOCK_K)
    tiles_per_group = GROUP_M * tiles_k
    first_m = (pid // tiles_per_group) * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_size
    pid_k = (pid % tiles_per_group) // group_size

    # No load needs a mask (a mask costs predicate and select instructions per load and step):
    # rows of dY are wrapped into range (the masked store drops them); the last column tile is
    # shifted back to end at K (configs with BLOCK_K > K are pruned), so it recomputes a few
    # columns of its neighbour and stores the same values again; N is a multiple of QBLOCK, so
    # when BLOCK_N divides QBLOCK the N loop has no ragged tile either.
    m_out = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = m_out % M
    k_start = min(pid_k * BLOCK_K, K - BLOCK_K)
    rk = k_start + tl.arange(0, BLOCK_K)
    EVEN_N: tl.constexpr = QBLOCK % BLOCK_N == 0
    offset = tl.load(offset_ptr)
    declare_code_table(pid)

    # ---- LoRA: each adapter's G A, masked by that adapter's dropout --------------------
    # First, while the main loop's pipeline buffers are not live yet: that leaves registers for
    # the per-adapter partial sum and the dropout generator.
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_LORA:
        for adapter in range(n_adapters):
            r_lo = tl.load(rank_start_ptr + adapter)
            r_hi = tl.load(rank_start_ptr + adapter + 1)
            part = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for r0 in range(r_lo, r_hi, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                r_ok = rr < r_hi
                g = tl.load(g_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=r_ok[None, :], other=0.0)
                a = tl.load(a_ptr + rr.to(tl.int64)[:, None] * K + rk[None, :], mask=r_ok[:, None], other=0.0)
                part = mma(g, a, part, UPCAST_DOT)
            p = tl.load(dropout_p_ptr + adapter)
            if p > 0.0:
                keep = dropout_keep(tl.load(seed_ptr + adapter), p, rm, k_start, K, BLOCK_M, BLOCK_K)
                part = tl.where(keep, part / (1.0 - p), 0.0)
            acc += part

    # ---- main loop over N: dY tile . dequantized W0 tile -------------------------------
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        if EVEN_N:
            dy = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :])
        else:
            dy = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], mask=(rn < N)[None, :], other=0.0)
        w = nf4_dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, offset,
                             rn, k_start, N, K, BLOCK_N, BLOCK_K, QBLOCK, NESTED_BLOCK,
                             DOUBLE_QUANT, dy_ptr.dtype.element_ty, IN_BOUNDS=EVEN_N)
        acc = mma(dy, w, acc, UPCAST_DOT)

    tl.store(dx_ptr + m_out.to(tl.int64)[:, None] * K + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(m_out < M)[:, None])


def nf4_lora_linear_bwd_dx(dy: torch.Tensor, weight, g, a_cat, rank_start, dropout_p, seeds) -> torch.Tensor:
    """dX = dY W0 + sum_a keep_a/(1-p_a) * G[:, R_a] A_a  ->  [M, K].

    dy: [M, N] contiguous bf16/fp16; weight: NF4 [N, K]; g: [M, R] = dY B_s and a_cat: [R, K]
    (both contiguous, dtype of dy) or both None; rank_start: int32 [n+1], dropout_p: fp32 [n],
    seeds: int64 [n] device tensors describing the adapters along the rank axis.
    """
    tensors, consts = nf4_kernel_args(weight)
    n, k = weight.shape
    _check_activation(dy, n, "nf4_lora_linear_bwd_dx")
    if not dy.is_contiguous():
        raise ValueError("nf4_lora_linear_bwd_dx: dy must be contiguous")
    if dy.data_ptr() % 16:
        dy = dy.clone()  # vectorized dY loads need an aligned base (see nf4_lora_linear_fwd)
    m = dy.shape[0]
    if (g is None) != (a_cat is None):
        raise ValueError("nf4_lora_linear_bwd_dx: pass both G and A, or neither")
    r = 0
    n_adapters = 0
    if g is not None:
        r = g.shape[1]
        if g.shape != (m, r) or a_cat.shape != (r, k):
            raise ValueError(f"nf4_lora_linear_bwd_dx: G must be [M={m}, R] and A [R, K={k}], got "
                             f"{tuple(g.shape)} and {tuple(a_cat.shape)}")
        for name, t in (("G", g), ("A", a_cat)):
            if t.dtype != dy.dtype or not t.is_contiguous():
                raise ValueError(f"nf4_lora_linear_bwd_dx: {name} must be contiguous {dy.dtype}, got {t.dtype}")
        n_adapters = dropout_p.numel()
        if rank_start.numel() != n_adapters + 1 or seeds.numel() != n_adapters:
            raise ValueError(f"nf4_lora_linear_bwd_dx: rank_start needs {n_adapters + 1} entries and seeds "
                             f"{n_adapters}, got {rank_start.numel()} and {seeds.numel()}")
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    unused = tensors[-1]
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)
    nf4_lora_linear_bwd_dx_kernel[grid](
        dy, *tensors, g if r else dy, a_cat if r else dy,
        rank_start if r else unused, dropout_p if r else unused, seeds if r else unused, dx,
        m, n, k, r, n_adapters, m_bucket(m),
        HAS_LORA=r > 0, BLOCK_R=lora_block_r(max(r, 1)), UPCAST_DOT=upcast_dot(), **consts)
    return dx
