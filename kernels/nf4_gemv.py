"""Small-M (decode / evaluation, M <= 16) NF4 + LoRA linear: split-K, bandwidth-bound on W0.

Math (notation of nf4_lora_linear.py):  Y = X W0^T + S B_s^T (+ bias),  X [M <= 16, K].

At M <= 16 the layer is pure bandwidth: W0 costs 0.5 + 1/64 bytes per weight against 2 for bf16, a
3.9x ceiling over a dense GEMV, reached only if the SMs issue few enough instructions per weight
(about 3.3 on an H200: 4 warp-instructions per clock per SM against 4.8 TB/s). The kernel is built
around that budget; sm_90 SASS counts per weight are in the README.

* Lookup: one warp shuffle per code, no select tree (``nf4_code_values`` in dequant.py).
* No register shuffling before the MMA. A dot product does not depend on the order of k, so the
  tile's columns are taken in a permuted order k' = perm(k) for W0 and X alike: each thread of the
  MMA operand layout (16 x 16 operand fragments, two consecutive k per register) gets the codes of
  whole 32-bit words it loaded itself (CH consecutive words of a row, one 128-bit load for CH = 4).
  X is small and read from L2 with the same permutation.
* The absmax costs no multiply per weight. W0 is looked up unscaled (code value, rounded to the
  activation dtype) and the MMA's unused columns carry the scale blocks instead: X^T is placed
  block-diagonally, column (j, m) holding X[m] on the k of absmax block j of the tile and zero
  elsewhere, so one MMA chain gives every block's partial sum C[n, (j, m)], and the tile costs one
  multiply-add per accumulator element, acc += C * absmax[n, j]: at M = 1 a tile of BLOCK_K = 256
  holds 4 blocks of 64 (up to 16 would fit the columns; registers bound the tile). Y[n, m] =
  sum_j acc[n, (j, m)] at the end. When a tile is one block (M = 16, or QBLOCK >= BLOCK_K), the absmax
  is decoded per row and several tiles go per loop iteration.
  Rounding: each W0 value is code_value (rounded once to bf16/fp16) times the fp32 absmax, where the
  reference rounds code_value * absmax once; both are within one rounding of the exact product.
* Split-K: program (n, s) reduces its slice of K for BLOCK_N rows into fp32 partials [BLOCK_N, M_PAD].
  Slice 0 also adds the LoRA term and the bias. The partials of one output tile are summed by
  whichever program of that tile finishes last (it sees the tile's arrival counter at SPLIT_K - 1),
  always in slice order, so the result is deterministic and the layer is ONE kernel launch (no
  memset, no reduction kernel). That program resets the counter to 0 for the next launch.
"""
import torch
import triton
import triton.language as tl

from .configs import GEMV_MAX_M, kernel_configs
from .dequant import declare_code_table, nf4_kernel_args, nf4_word_values
from .lora_tile_ops import mma, upcast_dot
from .nf4_lora_linear import _check_activation, check_lora_operands, lora_block_r

_MAX_M_PAD = 16  # workspace rows per partial tile: M_PAD is at most 16


@triton.jit
def dequant_permuted(words_ptr, rows, k0, k_end, K, CH: tl.constexpr, MASK_K: tl.constexpr,
                     OUT_DTYPE: tl.constexpr):
    """Unscaled W0[rows, k0 + perm(k')] for k' < 32*CH as OUT_DTYPE [BLOCK_ROWS, 32*CH] (0 past k_end
    if MASK_K: a mask that varies along a thread's words would split its 128-bit load).

    Word w = t*CH + c of the tile (t < 4, c < CH) holds codes k = 8w .. 8w+7; code e of it goes to
    k' = 32c + 16*(e//4) + 8*(e//2 % 2) + 2t + e%2, the order in which an MMA operand fragment holds
    k' (pairs 2t, 2t+1 and 2t+8, 2t+9 of each 16 k' in lane t), so thread t's words are contiguous.
    """
    t = tl.arange(0, 4)
    c = tl.arange(0, CH)
    word = t[None, :, None] * CH + c[None, None, :]  # [1, 4, CH]
    # a row is K/8 words, written (K/32)*4 so that Triton sees 16-byte aligned rows (K % 32 == 0)
    word_ptrs = words_ptr + rows[:, None, None] * ((K // 32) * 4) + k0 // 8 + word
    if MASK_K:
        words = tl.load(word_ptrs, mask=k0 + 8 * word < k_end, other=0)
    else:
        words = tl.load(word_ptrs)
    values = nf4_word_values(tl.permute(words, (0, 2, 1))).to(OUT_DTYPE)  # [rows, CH, t, e//4, e//2%2, e%2]
    return tl.reshape(tl.permute(values, (0, 1, 3, 4, 2, 5)), (rows.shape[0], 32 * CH))


@triton.jit
def permuted_pairs(CH: tl.constexpr):
    """perm(k') for k' < 32*CH (see dequant_permuted), written so that Triton sees pairs (2i, 2i+1)
    as contiguous: returns (perm [32*CH], first k of each pair [32*CH], constant across a pair)."""
    kp = tl.arange(0, 32 * CH)
    half = kp // 2  # = 16c + 8*(e//4) + 4*(e//2 % 2) + t
    pair = 4 * ((half % 4) * CH + half // 16) + 2 * ((half // 8) % 2) + (half // 4) % 2
    return 2 * pair + kp % 2, 2 * pair


@triton.jit
def gemv_tile(acc, x_cols, in_group, pair_k, col_group, words_ptr, absmax_ptr, nested_absmax_ptr,
              nested_quant_map_ptr, offset, rows, k0, k_end, K, QBLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr,
              DOUBLE_QUANT: tl.constexpr, UPCAST_DOT: tl.constexpr, GROUP_K: tl.constexpr, N_GROUPS: tl.constexpr,
              CH: tl.constexpr, MASK_K: tl.constexpr):
    """acc + (W0 tile . block-diagonal X^T tile) * absmax, for the tile of 32*CH k at k0 (see module)."""
    w = dequant_permuted(words_ptr, rows, k0, k_end, K, CH, MASK_K, x_cols.dtype.element_ty)
    x_mask = in_group
    if MASK_K:
        x_mask = x_mask & (k0 + pair_k < k_end)[:, None]
    xt = tl.load(x_cols + k0, mask=x_mask, other=0.0)
    part = mma(w, xt, tl.zeros(acc.shape, dtype=tl.float32), UPCAST_DOT)  # [BLOCK_N, COLS]

    # ---- absmax[n, block of column group j]: one multiply-add per accumulator element ------------
    if N_GROUPS == 1:  # one block for the whole tile: decode per row, not per accumulator element
        block = rows[:, None] * (K // QBLOCK) + k0 // QBLOCK  # [BLOCK_N, 1]
        block_ok = True
    else:
        group_k = k0 + col_group * GROUP_K
        block = rows[:, None] * (K // QBLOCK) + (group_k // QBLOCK)[None, :]  # [BLOCK_N, COLS]
        block_ok = ((col_group < N_GROUPS) & (group_k < k_end))[None, :]
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + block, mask=block_ok, other=0)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCK, mask=block_ok, other=0.0)
        scale = tl.load(nested_quant_map_ptr + code) * nested + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=block_ok, other=0.0)
    return acc + part * scale


@triton.autotune(configs=kernel_configs("nf4_gemv_lora"), key=["M", "N", "K", "R"])
@triton.jit
def nf4_gemv_lora_kernel(
    x_ptr,  # [M, K] activations (M <= 16), row stride stride_xm
    packed_ptr,  # uint8 [N*K/2] NF4 codes of W0, read as int32 words (4-byte aligned)
    absmax_ptr,  # uint8 (or fp32) [N*K/QBLOCK] absmax codes
    nested_absmax_ptr,  # fp32 second-level absmax scales
    nested_quant_map_ptr,  # fp32 [256]
    offset_ptr,  # fp32 [1]
    s_ptr,  # [M, R] S = X_d A^T (unused if not HAS_LORA)
    b_ptr,  # [N, R] scaled, concatenated B (unused if not HAS_LORA)
    bias_ptr,  # [N] (unused if not HAS_BIAS)
    y_ptr,  # [M, N] output, contiguous
    partial_ptr,  # fp32 [tiles_n * SPLIT_K * BLOCK_N * 16] split-K partial sums
    counter_ptr,  # int32 [>= tiles_n] arrival counters, zero on entry and on exit
    M,
    N,
    K,
    R,
    stride_xm,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    QBLOCK: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    M_PAD: tl.constexpr,  # power of two >= M
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # most k per tile
    MMA_COLS: tl.constexpr,  # columns of the MMA (8 or 16): M_PAD rows of X per absmax block
    SPLIT_K: tl.constexpr,
):
    """Y^T[n-tile, :M] = sum over K slices of W0 . X^T, plus B_s S^T and bias on slice 0 (see module)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rows = tl.minimum(rn, N - 1)  # rows past N read row N-1 (never stored): no row mask; int32: N*K < 2^34
    words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    declare_code_table(pid_n)

    # ---- tile: N_GROUPS column groups of GROUP_K k (one absmax block each, or one tile) ------------
    COLS: tl.constexpr = max(MMA_COLS, M_PAD)
    GROUP_K: tl.constexpr = min(QBLOCK, BLOCK_K)
    N_GROUPS: tl.constexpr = min(COLS // M_PAD, BLOCK_K // GROUP_K)
    TILE_K: tl.constexpr = N_GROUPS * GROUP_K
    CH: tl.constexpr = TILE_K // 32
    col = tl.arange(0, COLS)
    col_m = col % M_PAD  # row of X in this column
    col_group = col // M_PAD  # absmax block of the tile in this column
    perm, pair_k = permuted_pairs(CH)
    x_cols = x_ptr + col_m[None, :] * stride_xm + perm[:, None]  # [TILE_K, COLS] at k0 = 0
    in_group = ((pair_k // GROUP_K)[:, None] == col_group[None, :]) & (col_m < M)[None, :]
    offset = tl.load(offset_ptr) if DOUBLE_QUANT else 0.0

    # ---- this program's slice of K: steps of TILES whole tiles, then tiles with masks -------------
    # (TILES > 1 when the tile is short, at large M: fewer loop iterations, more loads issued at once)
    TILES: tl.constexpr = max(BLOCK_K // TILE_K, 1)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), TILES * TILE_K) * (TILES * TILE_K)
    k_begin = pid_k * k_per_split
    k_end = min(k_begin + k_per_split, K)
    k_whole = k_begin + max(k_end - k_begin, 0) // (TILES * TILE_K) * (TILES * TILE_K)

    acc = tl.zeros((BLOCK_N, COLS), dtype=tl.float32)
    for k0 in range(k_begin, k_whole, TILES * TILE_K):
        for tile in tl.static_range(TILES):
            acc = gemv_tile(acc, x_cols, in_group, pair_k, col_group, words_ptr, absmax_ptr, nested_absmax_ptr,
                            nested_quant_map_ptr, offset, rows, k0 + tile * TILE_K, k_end, K, QBLOCK, NESTED_BLOCK,
                            DOUBLE_QUANT, UPCAST_DOT, GROUP_K, N_GROUPS, CH, MASK_K=False)
    if TILES == 1:  # an if, not a loop: a second loop makes Triton 3.9 pipeline the first one worse
        if k_whole < k_end:
            acc = gemv_tile(acc, x_cols, in_group, pair_k, col_group, words_ptr, absmax_ptr, nested_absmax_ptr,
                            nested_quant_map_ptr, offset, rows, k_whole, k_end, K, QBLOCK, NESTED_BLOCK,
                            DOUBLE_QUANT, UPCAST_DOT, GROUP_K, N_GROUPS, CH, MASK_K=True)
    else:
        for k0 in range(k_whole, k_end, TILE_K):
            acc = gemv_tile(acc, x_cols, in_group, pair_k, col_group, words_ptr, absmax_ptr, nested_absmax_ptr,
                            nested_quant_map_ptr, offset, rows, k0, k_end, K, QBLOCK, NESTED_BLOCK, DOUBLE_QUANT,
                            UPCAST_DOT, GROUP_K, N_GROUPS, CH, MASK_K=True)

    # ---- LoRA, added once (by slice 0) into column group 0 ------------------------------------------
    if HAS_LORA:
        if pid_k == 0:
            lora_col_ok = (col_group == 0) & (col_m < M)
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                r_ok = rr < R
                b = tl.load(b_ptr + rows[:, None] * R + rr[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
                st = tl.load(s_ptr + col_m[None, :] * R + rr[:, None], mask=r_ok[:, None] & lora_col_ok[None, :],
                             other=0.0)
                acc = mma(b, st, acc, UPCAST_DOT)

    # ---- Y^T tile [BLOCK_N, M_PAD] = sum over the column groups; bias -------------------------------
    y = tl.sum(tl.reshape(acc, (BLOCK_N, COLS // M_PAD, M_PAD)), axis=1)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]

    rm = tl.arange(0, M_PAD)
    y_ptrs = y_ptr + rm[None, :] * N + rn[:, None]
    y_mask = n_ok[:, None] & (rm < M)[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        # ---- split-K: publish the partial, the last arrival reduces in slice order ----------------
        tile = tl.arange(0, BLOCK_N)[:, None] * M_PAD + rm[None, :]
        tile_base = partial_ptr + pid_n.to(tl.int64) * (SPLIT_K * BLOCK_N * M_PAD)
        tl.store(tile_base + pid_k * (BLOCK_N * M_PAD) + tile, y)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
            for split in range(SPLIT_K):
                # .cg: bypass L1, which is not coherent with the other SMs' stores
                total += tl.load(tile_base + split * (BLOCK_N * M_PAD) + tile, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")


_counters = {}  # (device, stream) -> int32 arrival counters, kept zero by the kernel itself


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _counters or _counters[key].numel() < n:
        _counters[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return _counters[key]


def nf4_gemv_lora(x: torch.Tensor, weight, bias, s, b_scaled) -> torch.Tensor:
    """Y = X W0^T + S B_s^T (+ bias) for M <= 16 (same operands as ``nf4_lora_linear_fwd``)."""
    tensors, consts = nf4_kernel_args(weight)
    n, k = weight.shape
    _check_activation(x, k, "nf4_gemv_lora")
    m = x.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"nf4_gemv_lora: M={m} > {GEMV_MAX_M}; use nf4_lora_linear_fwd")
    r = check_lora_operands(s, b_scaled, m, n, x.dtype, "nf4_gemv_lora")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"nf4_gemv_lora: bias must be [{n}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if weight.blocksize % 32:
        raise ValueError(f"nf4_gemv_lora: blocksize must be a multiple of 32 (a 32-bit word of codes "
                         f"never straddles a block), got {weight.blocksize}")
    if weight.packed.data_ptr() % 4:
        raise ValueError("nf4_gemv_lora: packed must be 4-byte aligned (it is read as 32-bit words)")
    if n * k >= 2**34:
        raise ValueError(f"nf4_gemv_lora: N*K = {n * k} >= 2^34 (the kernel indexes 32-bit words with int32)")
    configs = kernel_configs("nf4_gemv_lora")
    # workspace for the largest config the autotuner may pick
    partial_numel = max(triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_N"] * _MAX_M_PAD
                        for c in configs)
    counters = _arrival_counters(x.device, max(triton.cdiv(n, c.kwargs["BLOCK_N"]) for c in configs))
    partial = torch.empty(partial_numel, dtype=torch.float32, device=x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
    nf4_gemv_lora_kernel[grid](
        x, *tensors, s if r else x, b_scaled if r else x, bias if bias is not None else x, y, partial, counters,
        m, n, k, r, x.stride(0),
        HAS_LORA=r > 0, HAS_BIAS=bias is not None, BLOCK_R=lora_block_r(max(r, 1)),
        UPCAST_DOT=upcast_dot(), M_PAD=triton.next_power_of_2(m), **consts)
    return y
