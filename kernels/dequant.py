"""NF4 -> bf16/fp16 dequantization, as a tile helper for the fused kernels and as a standalone op.

Format (bitsandbytes' packed NF4, double-quantized absmax). For a weight W of logical shape
[N, K] (row-major, flat index i = n*K + k):

    byte j of ``packed``  holds elements 2j (HIGH nibble) and 2j+1 (LOW nibble)
    absmax_fp32[b]      = nested_quant_map[absmax[b]] * nested_absmax[b // NESTED_BLOCK] + offset
    W.flat[i]           = quant_map[code_i] * absmax_fp32[i // QBLOCK]         (fp32, then cast)

quant_map is the standard NF4 code book (``NF4_CODE_VALUES``, bitsandbytes' NF4 table; the format
module checks every NF4Tensor against it). The kernels select the code value with a 4-level
``where`` tree on compile-time constants instead of loading from a table: a per-element gather
from global memory would be treated as a pipelined load (shared memory and registers per stage)
and cost an LSU instruction per weight.

Without double quantization ``absmax`` is already fp32 and the first line is skipped. Because K is
a multiple of QBLOCK, a quantization block never straddles two rows, so block b of row n covers
columns [(b - n*K/QBLOCK) * QBLOCK, ... + QBLOCK) of that row.

``nf4_dequant_tile`` is the one place that knows this layout; every kernel that reads W0 calls it
with the rows and the column range it needs, so forward (tile [BLOCK_N, BLOCK_K] along K) and
backward (same tile shape, consumed along N) read the same packed bytes without a second copy.
"""
import torch
import triton
import triton.language as tl

# NF4 code book as fp32 values (exactly bitsandbytes' NF4 quant_map); used by nf4_code_value.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_DEQUANT_BLOCK_BYTES = 1024  # packed bytes per program of the standalone kernel (2048 elements)


@triton.jit
def nf4_code_value(code):
    """NF4_CODE_VALUES[code] (fp32) for integer codes 0..15: 15 selects on the code's bits."""
    bit0 = (code & 1) != 0
    bit1 = (code & 2) != 0
    bit2 = (code & 4) != 0
    pair0 = tl.where(bit0, -0.6961928009986877, -1.0)
    pair1 = tl.where(bit0, -0.39491748809814453, -0.5250730514526367)
    pair2 = tl.where(bit0, -0.18477343022823334, -0.28444138169288635)
    pair3 = tl.where(bit0, 0.0, -0.09105003625154495)
    pair4 = tl.where(bit0, 0.16093020141124725, 0.07958029955625534)
    pair5 = tl.where(bit0, 0.33791524171829224, 0.24611230194568634)
    pair6 = tl.where(bit0, 0.5626170039176941, 0.44070982933044434)
    pair7 = tl.where(bit0, 1.0, 0.7229568362236023)
    quad0 = tl.where(bit1, pair1, pair0)
    quad1 = tl.where(bit1, pair3, pair2)
    quad2 = tl.where(bit1, pair5, pair4)
    quad3 = tl.where(bit1, pair7, pair6)
    negative = tl.where(bit2, quad1, quad0)
    positive = tl.where(bit2, quad3, quad2)
    return tl.where((code & 8) != 0, positive, negative)


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
):
    """Return W[rows, k0:k0+BLOCK_K] as OUT_DTYPE [BLOCK_ROWS, BLOCK_K]; out-of-range entries are 0.

    Each value is quant_map[code] * absmax in fp32, rounded once to OUT_DTYPE (as the reference
    dequantize does). The two nibbles of a byte share an absmax block (QBLOCK is even), so both
    halves are scaled and rounded while still [BLOCK_ROWS, BLOCK_K/2] and interleaved last, in
    16-bit: that keeps half as many fp32 values live as scaling the interleaved tile would.
    """
    row_ok = rows < N
    rows64 = rows.to(tl.int64)

    # ---- load the packed bytes: [BLOCK_ROWS, BLOCK_K/2] -------------------------------
    byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte_mask = row_ok[:, None] & (byte_cols[None, :] < K // 2)
    packed = tl.load(packed_ptr + rows64[:, None] * (K // 2) + byte_cols[None, :], mask=byte_mask, other=0)

    # ---- per-block absmax: BLOCK_K / QBLOCK blocks per row ----------------------------
    blocks_per_row = K // QBLOCK
    block_cols = k0 // QBLOCK + tl.arange(0, BLOCK_K // QBLOCK)
    block_mask = row_ok[:, None] & (block_cols[None, :] < blocks_per_row)
    block = rows64[:, None] * blocks_per_row + block_cols[None, :]
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + block, mask=block_mask, other=0)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCK, mask=block_mask, other=0.0)
        scale = tl.load(nested_quant_map_ptr + code) * nested + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=block_mask, other=0.0)
    scale = tl.where(block_mask, scale, 0.0)[:, :, None]  # [BLOCK_ROWS, blocks, 1]

    # ---- code book lookup and scale, per nibble; the high nibble is the earlier element -
    high = tl.reshape(nf4_code_value(packed >> 4), (BLOCK_ROWS, BLOCK_K // QBLOCK, QBLOCK // 2)) * scale
    low = tl.reshape(nf4_code_value(packed & 0xF), (BLOCK_ROWS, BLOCK_K // QBLOCK, QBLOCK // 2)) * scale
    high = tl.reshape(high, (BLOCK_ROWS, BLOCK_K // 2)).to(OUT_DTYPE)
    low = tl.reshape(low, (BLOCK_ROWS, BLOCK_K // 2)).to(OUT_DTYPE)
    return tl.reshape(tl.join(high, low), (BLOCK_ROWS, BLOCK_K))


@triton.jit
def nf4_dequantize_kernel(
    packed_ptr,  # uint8 [N*K/2] packed codes
    absmax_ptr,  # uint8 or fp32 [N*K/QBLOCK] (see nf4_dequant_tile)
    nested_absmax_ptr,  # fp32 second-level scales
    nested_quant_map_ptr,  # fp32 [256]
    offset_ptr,  # fp32 [1]
    out_ptr,  # bf16/fp16 [N*K] output, row-major [N, K]
    n_bytes,  # N*K/2
    BLOCK_BYTES: tl.constexpr,
    QBLOCK: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):
    """out.flat[i] = quant_map[code_i] * absmax_fp32[i // QBLOCK]; one program per BLOCK_BYTES bytes.

    Bandwidth-bound: reads 0.5 B + 1/QBLOCK B per element and writes 2 B, with every load and
    store contiguous, so it runs near copy speed. The flat view is used (not rows) because a
    block never straddles rows, so the row structure is irrelevant here.
    """
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    byte_ok = byte < n_bytes
    packed = tl.load(packed_ptr + byte, mask=byte_ok, other=0)
    high = nf4_code_value(packed >> 4)
    low = nf4_code_value(packed & 0xF)

    # both elements of a byte share a block because QBLOCK is even
    block = (2 * byte) // QBLOCK
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + block, mask=byte_ok, other=0)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCK, mask=byte_ok, other=0.0)
        scale = tl.load(nested_quant_map_ptr + code) * nested + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=byte_ok, other=0.0)

    values = tl.join(high * scale, low * scale).to(out_ptr.dtype.element_ty)  # [BLOCK_BYTES, 2]
    elem = 2 * byte[:, None] + tl.arange(0, 2)[None, :]
    tl.store(out_ptr + elem, values, mask=byte_ok[:, None])


def nf4_kernel_args(weight):
    """The tensors and constants every kernel needs from an NF4 weight, checked once.

    ``weight`` has the fields of ``qlora.quant.nf4.NF4Tensor`` (packed, shape, blocksize, absmax,
    nested_absmax, nested_quant_map, nested_blocksize, offset, and quant_map = NF4_CODE_VALUES);
    the kernels layer reads them by name and does not import the format module above it.
    Returns (tensor args in kernel order, constexpr dict).
    """
    if len(weight.shape) != 2:
        raise ValueError(f"NF4 weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if n % weight.blocksize or k % weight.blocksize:
        raise ValueError(
            f"NF4 weight shape [N={n}, K={k}]: N and K must be multiples of the quantization "
            f"blocksize {weight.blocksize} (the fused kernels index blocks per row)")
    if weight.blocksize % 2:
        raise ValueError(f"NF4 blocksize must be even, got {weight.blocksize}")
    double_quant = weight.absmax.dtype == torch.uint8
    if double_quant:
        nested_absmax, nested_map, offset = weight.nested_absmax, weight.nested_quant_map, weight.offset
        nested_block = weight.nested_blocksize
    else:
        # unused by the kernel when DOUBLE_QUANT is False; any fp32 tensor keeps the signature
        nested_absmax = nested_map = offset = weight.quant_map
        nested_block = 256
    offset = offset.reshape(1).to(torch.float32)
    tensors = (weight.packed, weight.absmax, nested_absmax, nested_map, offset)
    for name, t in zip(("packed", "absmax", "nested_absmax", "nested_quant_map"), tensors):
        if t.device != weight.packed.device:
            raise ValueError(f"NF4 weight field {name} is on {t.device}, packed is on {weight.packed.device}")
    consts = dict(QBLOCK=weight.blocksize, NESTED_BLOCK=nested_block, DOUBLE_QUANT=double_quant)
    return tensors, consts


def nf4_dequantize(weight, out: torch.Tensor) -> torch.Tensor:
    """Dequantize ``weight`` (NF4 [N, K]) into the caller's ``out`` (bf16/fp16, N*K elements).

    ``out`` is typically one buffer reused by every layer of a model (the "dequantize + cuBLAS"
    path), so nothing is allocated here. Returns ``out`` viewed as [N, K].
    """
    tensors, consts = nf4_kernel_args(weight)
    n, k = weight.shape
    if out.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"nf4_dequantize: out must be bf16 or fp16, got {out.dtype}")
    if out.numel() < n * k or not out.is_contiguous():
        raise ValueError(f"nf4_dequantize: out must be contiguous with >= {n * k} elements, got "
                         f"{out.numel()} (contiguous={out.is_contiguous()})")
    if out.device != weight.packed.device:
        raise ValueError(f"nf4_dequantize: out is on {out.device}, weight on {weight.packed.device}")
    out = out.view(-1)[: n * k]
    n_bytes = n * k // 2
    grid = (triton.cdiv(n_bytes, _DEQUANT_BLOCK_BYTES),)
    nf4_dequantize_kernel[grid](*tensors, out, n_bytes, BLOCK_BYTES=_DEQUANT_BLOCK_BYTES, **consts)
    return out.view(n, k)
