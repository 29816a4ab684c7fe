"""NF4 -> bf16/fp16 dequantization of a W0 tile for the fused GEMM kernels (forward and dX).

The format and the warp-shuffle code-book lookup are in dequant.py. ``nf4_dequant_tile`` loads a
tile's packed codes as 32-bit words, looks up each code's fp32 value (``nf4_word_values``: one
shuffle and one shift per code on the GPU, the select tree under ``TRITON_INTERPRET=1``),
multiplies it by its block's fp32 absmax and rounds once to the activation dtype: bitsandbytes'
dequantization, bit for bit. A kernel that calls it first calls ``declare_code_table`` once.
"""
import triton
import triton.language as tl

from .configs import interpreting
from .dequant import nf4_word_values

# The uncontracted product of nf4_absmax is inline PTX where the kernels are compiled for a GPU;
# Triton's interpreter cannot execute PTX (and numpy does not contract).
INLINE_PTX = tl.constexpr(not interpreting())


@triton.jit
def nf4_absmax(nested_code_value, nested_absmax, offset):
    """absmax_fp32 = nested_code_value * nested_absmax + offset, rounded after the product and
    after the sum, as bitsandbytes computes it (dequantize_blockwise, then + offset).

    Triton contracts a product followed by a sum into one FMA (one rounding), which can move the
    absmax by an ulp and, rarely, a weight by a bf16 ulp. On the GPU the product is a
    ``mul.rn.f32``, which PTX never contracts; the interpreter (numpy) does not contract either.
    """
    if INLINE_PTX:
        product = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [nested_code_value, nested_absmax],
                                            dtype=tl.float32, is_pure=True, pack=1)
    else:
        product = nested_code_value * nested_absmax
    return product + offset


@triton.jit
def nf4_dequant_tile(
    packed_ptr,  # uint8 [N*K/2] packed codes, row-major over [N, K]
    absmax_ptr,  # uint8 [N*K/QBLOCK] codes into nested_quant_map (DOUBLE_QUANT) or fp32 absmax
    nested_absmax_ptr,  # fp32 [ceil(n_blocks / NESTED_BLOCK)] second-level scales
    nested_quant_map_ptr,  # fp32 [256] signed dynamic map
    offset,  # fp32 scalar added to every dequantized absmax (already loaded)
    rows,  # int [BLOCK_ROWS] row indices n of W
    k0,  # first column of the tile (a multiple of BLOCK_K)
    N,
    K,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    QBLOCK: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    IN_BOUNDS: tl.constexpr = False,
):
    """Return W[rows, k0:k0+BLOCK_K] as OUT_DTYPE [BLOCK_ROWS, BLOCK_K]; out-of-range entries are 0.

    IN_BOUNDS: the caller guarantees rows < N and k0 + BLOCK_K <= K (rows wrapped modulo N, K a
    multiple of BLOCK_K), so the loads carry no mask: in a pipelined main loop every mask costs
    predicate and select instructions per load and iteration.

    Each value is quant_map[code] * absmax in fp32, rounded once to OUT_DTYPE (as the reference
    dequantize does). The kernel must have called ``declare_code_table`` (dequant.py).
    """
    # the tile spans BLOCKS absmax blocks per row, SPAN columns of each (one block when QBLOCK >=
    # BLOCK_K: k0 is a multiple of BLOCK_K, both are powers of two, so the tile never straddles)
    BLOCKS: tl.constexpr = (BLOCK_K + QBLOCK - 1) // QBLOCK
    SPAN: tl.constexpr = BLOCK_K // BLOCKS
    rows64 = rows.to(tl.int64)
    word_cols = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    blocks_per_row = K // QBLOCK
    block_cols = k0 // QBLOCK + tl.arange(0, BLOCKS)
    block = rows64[:, None] * blocks_per_row + block_cols[None, :]
    # a row is K/8 words, written (K/32)*4 so that Triton sees 16-byte aligned rows (K % 32 == 0)
    word_ptrs = packed_ptr.to(tl.pointer_type(tl.int32)) + rows64[:, None] * ((K // 32) * 4) + word_cols[None, :]

    # ---- load the packed words [BLOCK_ROWS, BLOCK_K/8] and the per-block absmax --------
    if IN_BOUNDS:
        words = tl.load(word_ptrs)
        if DOUBLE_QUANT:
            code = tl.load(absmax_ptr + block)
            nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCK)
            scale = nf4_absmax(tl.load(nested_quant_map_ptr + code), nested, offset)
        else:
            scale = tl.load(absmax_ptr + block)
    else:
        row_ok = rows < N
        words = tl.load(word_ptrs, mask=row_ok[:, None] & (word_cols[None, :] < K // 8), other=0)
        block_mask = row_ok[:, None] & (block_cols[None, :] < blocks_per_row)
        if DOUBLE_QUANT:
            code = tl.load(absmax_ptr + block, mask=block_mask, other=0)
            nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCK, mask=block_mask, other=0.0)
            scale = nf4_absmax(tl.load(nested_quant_map_ptr + code), nested, offset)
        else:
            scale = tl.load(absmax_ptr + block, mask=block_mask, other=0.0)
        scale = tl.where(block_mask, scale, 0.0)

    # ---- code book lookup [rows, words, 2, 2, 2] (element order), scale, round once -----
    values = tl.reshape(nf4_word_values(words), (BLOCK_ROWS, BLOCKS, SPAN)) * scale[:, :, None]
    return tl.reshape(values, (BLOCK_ROWS, BLOCK_K)).to(OUT_DTYPE)
