"""NF4 -> bf16/fp16 dequantization: the format, the code-book lookup every kernel that reads W0
calls, the checked kernel arguments of an NF4 weight, and the standalone dequantize op.

Format (bitsandbytes' packed NF4, double-quantized absmax). For a weight W of logical shape
[N, K] (row-major, flat index i = n*K + k):

    byte j of ``packed``  holds elements 2j (HIGH nibble) and 2j+1 (LOW nibble)
    absmax_fp32[b]      = nested_quant_map[absmax[b]] * nested_absmax[b // NESTED_BLOCK] + offset
    W.flat[i]           = quant_map[code_i] * absmax_fp32[i // QBLOCK]         (fp32, then cast)

quant_map is the standard NF4 code book (``NF4_CODE_VALUES``, bitsandbytes' NF4 table; the format
module checks every NF4Tensor against it). Without double quantization ``absmax`` is already fp32
and the first line is skipped. Because K is a multiple of QBLOCK, a quantization block never
straddles two rows, so block b of row n covers columns [(b - n*K/QBLOCK) * QBLOCK, ... + QBLOCK)
of that row.

The code book is looked up by warp shuffle (``nf4_word_values``, below) in every kernel: the
GEMV, the standalone dequantize here, and the fused GEMMs' tile helper (nf4_tile.py).
"""
import struct

import torch
import triton
import triton.language as tl

from .configs import interpreting

# NF4 code book as fp32 values (exactly bitsandbytes' NF4 quant_map); used by nf4_code_value.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# launch config of the standalone kernel, public so that the kernel inspector compiles what is launched:
# 16 packed bytes (32 weights) per thread
DEQUANT_NUM_WARPS = 4
DEQUANT_BLOCK_BYTES = 16 * 32 * DEQUANT_NUM_WARPS


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


# ---- code-book lookup of the memory-bound kernels ------------------------------------------------
# nf4_code_values(words, SHIFT)[i] = NF4_CODE_VALUES[(words[i] >> SHIFT) & 15] (fp32), by warp shuffle:
# lane l of a warp holds NF4_CODE_VALUES[l & 15] in a register, loaded from a 16-entry table that
# declare_code_table puts in global memory once per kernel, and code c is read from lane c of the
# thread's own half-warp (segment width 16: bits 4 and up of the shifted word are ignored, so no mask).
# Per code: one SHFL, and one shift (none for the lowest nibble), so 8 codes of a 32-bit word cost 8 SHFL
# + 7 SHF against about 19 instructions per code for the select tree (4 bit tests, 15 FSEL); sm_90 SASS
# counts in the README. The lane's entry is loaded inside the same inline asm as the shuffle and is
# never a Triton value: Triton may move values between threads when it changes layouts, which would
# break "lane l holds entry l"; ptxas shares the load among the shuffles of a loop iteration.
# Inline asm cannot run under TRITON_INTERPRET=1: there _SHUFFLE is False and nf4_code_value (the
# select tree) is used instead, so the interpreter tests check all but the shuffle, which the same
# tests check on a GPU.
_LANE_TABLE = "qlora_nf4_lane_table"
_LANE_TABLE_WORDS = ", ".join(f"0x{struct.unpack('<I', struct.pack('<f', v))[0]:08X}" for v in NF4_CODE_VALUES)
# a function-scope .global array; the dummy output lets Triton keep the (impure) asm
_DECLARE_TABLE_ASM = tl.constexpr(
    f".global .align 64 .b32 {_LANE_TABLE}[16] = {{{_LANE_TABLE_WORDS}}};\nmov.b32 $0, 0;")
_SHUFFLE_ASM = tl.constexpr(
    "{ .reg .b32 %lane, %entry; .reg .b64 %addr, %base;\n"
    "mov.u32 %lane, %laneid; and.b32 %lane, %lane, 15; mul.wide.u32 %addr, %lane, 4;\n"
    f"mov.u64 %base, {_LANE_TABLE}; add.s64 %addr, %addr, %base; ld.global.nc.b32 %entry, [%addr];\n"
    "shfl.sync.idx.b32 $0, %entry, $1, 0x101f, 0xffffffff; }")
_SHUFFLE = tl.constexpr(not interpreting())


@triton.jit
def declare_code_table(anchor):
    """Emit the lane table of nf4_code_values; once per kernel, before the lookups (anchor: any scalar)."""
    if _SHUFFLE:
        tl.inline_asm_elementwise(_DECLARE_TABLE_ASM, "=r,r", [anchor], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def nf4_code_values(words, SHIFT: tl.constexpr):
    """fp32 NF4_CODE_VALUES[(words >> SHIFT) & 15] for an int32 tensor ``words`` (see above)."""
    if _SHUFFLE:
        return tl.inline_asm_elementwise(_SHUFFLE_ASM, "=r,r", [words >> SHIFT], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return nf4_code_value((words >> SHIFT) & 15)


@triton.jit
def nf4_word_values(words):
    """The 8 codes of each packed int32 word as fp32 values [..., 2, 2, 2]: [..., a, b, c] is element
    4a + 2b + c of the word in memory order (a reshape to [..., 8] lists them in order).

    A word loaded from memory is little-endian: byte j (bits 8j..8j+7) holds elements 2j (high
    nibble) and 2j+1 (low nibble), so element e sits at bit 8*(e//2) + 4*(1 - e%2).
    """
    v0 = nf4_code_values(words, 4)
    v1 = nf4_code_values(words, 0)
    v2 = nf4_code_values(words, 12)
    v3 = nf4_code_values(words, 8)
    v4 = nf4_code_values(words, 20)
    v5 = nf4_code_values(words, 16)
    v6 = nf4_code_values(words, 28)
    v7 = nf4_code_values(words, 24)
    # tl.join appends its new axis last: the innermost join picks a (element bit 2), the outermost c
    return tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))


@triton.jit
def nf4_dequantize_kernel(
    packed_ptr,  # uint8 [N*K/2] packed codes, read as int32 words (4-byte aligned)
    absmax_ptr,  # uint8 codes into nested_quant_map (DOUBLE_QUANT) or fp32 [N*K/QBLOCK]
    nested_absmax_ptr,  # fp32 second-level scales
    nested_quant_map_ptr,  # fp32 [256]
    offset_ptr,  # fp32 [1]
    out_ptr,  # bf16/fp16 [N*K] output, row-major [N, K]
    n_bytes,  # N*K/2, a multiple of 16
    BLOCK_BYTES: tl.constexpr,
    QBLOCK: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):
    """out.flat[i] = quant_map[code_i] * absmax_fp32[i // QBLOCK]; one program per BLOCK_BYTES bytes.

    Bandwidth-bound: it reads 0.5 + 1/QBLOCK bytes per element and writes 2, so its time is the time
    to move 2.52 bytes per element if the instructions per element stay below what HBM allows (at
    80% of an H200's 4.8 TB/s over 132 SMs at 1.83 GHz: about 16). Each thread owns a chunk of 32
    consecutive elements: one 128-bit load of 16 packed bytes, one absmax decode (a chunk never
    straddles a block since QBLOCK is a multiple of 32), per element one lookup, one fp32 multiply
    and half a pack to 16 bits, and 128-bit stores (Triton restripes the tile through shared memory
    so that a warp's stores are contiguous). The product is rounded once from fp32, as bitsandbytes
    and the reference do, so the result is bit-exact.
    """
    CHUNKS: tl.constexpr = BLOCK_BYTES // 16
    words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    chunk = tl.program_id(0).to(tl.int64) * CHUNKS + tl.arange(0, CHUNKS)  # [CHUNKS]
    chunk_ok = chunk < n_bytes // 16
    declare_code_table(n_bytes)

    # ---- load 4 words (32 codes) per chunk, and the chunk's absmax ------------------------------
    words = tl.load(words_ptr + 4 * chunk[:, None] + tl.arange(0, 4)[None, :], mask=chunk_ok[:, None], other=0)
    block = (32 * chunk) // QBLOCK
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + block, mask=chunk_ok, other=0)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCK, mask=chunk_ok, other=0.0)
        scale = tl.load(nested_quant_map_ptr + code) * nested + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=chunk_ok, other=0.0)

    # ---- look up, scale in fp32, round once; [CHUNKS, 4 words, 2, 2, 2] -> 32 elements per chunk ----
    values = nf4_word_values(words) * scale[:, None, None, None, None]
    values = tl.reshape(values.to(out_ptr.dtype.element_ty), (CHUNKS, 32))
    tl.store(out_ptr + 32 * chunk[:, None] + tl.arange(0, 32)[None, :], values, mask=chunk_ok[:, None])


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
        nested_absmax = nested_map = weight.quant_map
        offset = weight.quant_map[:1]
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
    if weight.blocksize % 32:
        raise ValueError(f"nf4_dequantize: blocksize must be a multiple of 32 (32 elements per thread share "
                         f"one absmax), got {weight.blocksize}")
    if weight.packed.data_ptr() % 4:
        raise ValueError("nf4_dequantize: packed must be 4-byte aligned (it is read as 32-bit words)")
    out = out.view(-1)[: n * k]
    n_bytes = n * k // 2
    grid = (triton.cdiv(n_bytes, DEQUANT_BLOCK_BYTES),)
    # no FMA contraction: the absmax is a rounded multiply then a rounded add, as in bitsandbytes
    nf4_dequantize_kernel[grid](*tensors, out, n_bytes, BLOCK_BYTES=DEQUANT_BLOCK_BYTES, num_warps=DEQUANT_NUM_WARPS,
                                enable_fp_fusion=False, **consts)
    return out.view(n, k)
