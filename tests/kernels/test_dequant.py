"""NF4 dequantize kernel vs an fp32 reference of bitsandbytes' format (built from bnb's quantizer)."""
import bitsandbytes.functional as bnbf
import pytest
import torch

from qlora.kernels.dequant import NF4_CODE_VALUES, nf4_dequantize

INTERPRET = not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class BnbNF4:
    """The NF4Tensor fields, filled from bitsandbytes' own quantizer (a second implementation)."""

    def __init__(self, w: torch.Tensor, blocksize: int = 64):
        packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
        self.packed, self.shape, self.blocksize, self.bnb_state = packed, tuple(w.shape), blocksize, state
        self.absmax, self.quant_map, self.offset = state.absmax, state.code, state.offset
        self.nested_absmax, self.nested_quant_map = state.state2.absmax, state.state2.code
        self.nested_blocksize = state.state2.blocksize

    def dequantize_fp32(self) -> torch.Tensor:
        """The format's definition, in fp32: quant_map[code] * (nested_map[c] * nested_absmax + offset)."""
        byte = self.packed.view(-1).long()
        codes = torch.stack([byte >> 4, byte & 0xF], dim=1).view(-1)  # high nibble first
        nested = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: self.absmax.numel()]
        absmax = self.nested_quant_map[self.absmax.long()] * nested + self.offset
        return (self.quant_map[codes] * absmax.repeat_interleave(self.blocksize)).view(self.shape)


def test_code_book_is_bitsandbytes_nf4():
    bnb_code = bnbf.get_4bit_type("nf4", device="cpu")
    assert torch.equal(torch.tensor(NF4_CODE_VALUES, dtype=torch.float32), bnb_code.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# (32, 96) at blocksize 32: 1536 packed bytes, less than one program of 2048, so the program is masked
@pytest.mark.parametrize("shape,blocksize", [((64, 64), 64), ((32, 96), 32), ((192, 320), 64), ((384, 256), 128)])
def test_dequantize_matches_format(shape, blocksize, dtype):
    torch.manual_seed(0)
    weight = BnbNF4(torch.randn(shape, dtype=dtype).to(DEVICE), blocksize)
    ref = weight.dequantize_fp32()
    buffer = torch.full((shape[0] * shape[1] + 100,), float("nan"), dtype=dtype, device=DEVICE)
    out = nf4_dequantize(weight, buffer)
    assert out.shape == shape and out.data_ptr() == buffer.data_ptr()
    # On the GPU the cast of the same fp32 value is exact round-to-nearest: bit-identical to the
    # reference. Triton's interpreter casts fp32 -> bf16 by truncation (interpreter._convert_float
    # without a rounding mode), so there the result may sit one ulp (2^-7 relative) off.
    if INTERPRET and dtype == torch.bfloat16:
        torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=2.0**-7, atol=0)
    else:
        assert torch.equal(out, ref.to(dtype))
    # bitsandbytes' own dequantize, same format: same to its rounding (one ulp)
    bnb_out = bnbf.dequantize_4bit(weight.packed, weight.bnb_state)
    torch.testing.assert_close(out.float(), bnb_out.float(), rtol=2.0**-7, atol=0)


def test_dequantize_rejects_bad_input():
    weight = BnbNF4(torch.randn(64, 64, dtype=torch.bfloat16).to(DEVICE))
    with pytest.raises(ValueError, match="out must be contiguous"):
        nf4_dequantize(weight, torch.empty(10, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="bf16 or fp16"):
        nf4_dequantize(weight, torch.empty(64 * 64, dtype=torch.float32, device=DEVICE))
    weight.shape = (64, 96)
    with pytest.raises(ValueError, match="multiples of the quantization blocksize 64"):
        nf4_dequantize(weight, torch.empty(64 * 96, dtype=torch.bfloat16, device=DEVICE))
    weight.shape, weight.blocksize = (64, 64), 16
    with pytest.raises(ValueError, match="blocksize must be a multiple of 32"):
        nf4_dequantize(weight, torch.empty(64 * 64, dtype=torch.bfloat16, device=DEVICE))
    weight.blocksize, weight.packed = 64, torch.empty(64 * 32 + 1, dtype=torch.uint8, device=DEVICE)[1:]
    with pytest.raises(ValueError, match="packed must be 4-byte aligned"):
        nf4_dequantize(weight, torch.empty(64 * 64, dtype=torch.bfloat16, device=DEVICE))
