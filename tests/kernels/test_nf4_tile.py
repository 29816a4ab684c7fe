"""nf4_dequant_tile (the tile helper of every kernel that reads W0) against an fp32 lookup of
bitsandbytes' format, for blocksizes below, equal to and above the tile width, with and without
double quantization, masked and mask-free (IN_BOUNDS).

On a GPU this runs the warp-shuffle code-book lookup (inline PTX); under TRITON_INTERPRET=1 its
pure-Triton twin, the select tree. Both return the code book's fp32 value and multiply it by the
fp32 absmax, which is rounded after its product and after its sum as bitsandbytes rounds it, then
round once, so the tile is the reference rounded to the output dtype: bit-exact on the GPU (round
to nearest). The interpreter's fp32 -> bf16 cast truncates, so there bf16 may sit
one ulp (2^-7 relative) below; its fp32 -> fp16 cast rounds to nearest, so fp16 is exact.
"""
import bitsandbytes.functional as bnbf
import pytest
import torch
import triton
import triton.language as tl

from qlora.kernels.dequant import nf4_kernel_args
from qlora.kernels.nf4_tile import nf4_dequant_tile
from qlora.quant.nf4 import NF4Tensor

INTERPRET = not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_ROWS, BLOCK_K = 64, 64


@triton.jit
def dequant_tiles_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, offset_ptr,
    out_ptr,  # [tiles_n * BLOCK_ROWS, stride_out] every tile as the helper returns it
    N, K, stride_out,
    QBLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, IN_BOUNDS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    k0 = tl.program_id(1) * BLOCK_K
    w = nf4_dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, tl.load(offset_ptr),
                         rows, k0, N, K, BLOCK_ROWS, BLOCK_K, QBLOCK, NESTED_BLOCK, DOUBLE_QUANT,
                         out_ptr.dtype.element_ty, IN_BOUNDS)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], w)


def dequant_tiles(weight, dtype, in_bounds):
    n, k = weight.shape
    tensors, consts = nf4_kernel_args(weight)
    grid = (triton.cdiv(n, BLOCK_ROWS), triton.cdiv(k, BLOCK_K))
    out = torch.full((grid[0] * BLOCK_ROWS, grid[1] * BLOCK_K), float("nan"), dtype=dtype, device=DEVICE)
    dequant_tiles_kernel[grid](*tensors, out, n, k, out.stride(0), IN_BOUNDS=in_bounds,
                               BLOCK_ROWS=BLOCK_ROWS, BLOCK_K=BLOCK_K, **consts)
    return out


# (N, K, blocksize, double quant, IN_BOUNDS): with IN_BOUNDS the shape is a whole number of tiles;
# without, rows and (for blocksize 32) columns are ragged and the overhang must read as 0.
CASES = [
    (96, 96, 32, True, False),
    (128, 256, 64, True, True),
    (192, 320, 64, False, False),
    (128, 256, 128, False, True),
    (256, 512, 256, True, False),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,blocksize,double_quant,in_bounds", CASES)
def test_tile_is_the_format_rounded_once(n, k, blocksize, double_quant, in_bounds, dtype, bnb_lookup_dequantize):
    g = torch.Generator().manual_seed(blocksize + n)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    weight = NF4Tensor.from_bnb(packed, state)
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF]).unique()
    assert codes.numel() == 16  # every code book entry goes through the lookup
    ref = bnb_lookup_dequantize(packed, state).to(DEVICE).to(dtype)

    out = dequant_tiles(weight, dtype, in_bounds)
    tile = out[:n, :k]
    if INTERPRET and dtype == torch.bfloat16:
        torch.testing.assert_close(tile.float(), ref.float(), rtol=2.0**-7, atol=0)
    else:
        assert torch.equal(tile, ref)
    overhang = torch.cat([out[n:].flatten(), out[:n, k:].flatten()])
    assert torch.equal(overhang, torch.zeros_like(overhang))
