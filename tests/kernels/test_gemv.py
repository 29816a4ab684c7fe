"""Split-K GEMV (M <= 16) against fp32 references built from bitsandbytes' quantizer.

Tolerances, derived. The kernel multiplies X by W0 = rnd(code_value) * absmax (the code value rounded
once to the activation dtype, the absmax exact in fp32) with fp32 products and sums, and rounds Y
once. Two references, with the same S, B and bias in fp32:
* "kernel rounding": W0 = rnd(code_value) * absmax as the kernel forms it. What is left is the fp32
  summation order, at most K * 2^-24 * sum_k |x_k| |w_k| (Higham), and the output rounding, at most
  u |y|. This one catches any error in the indexing, the absmax or the permutation.
* "exact": W0 = code_value * absmax. The weights then add at most u * sum_k |x_k| |w_k| per output,
  since |rnd(v) - v| <= u |v|: the accuracy against the format's true values.
u = 2^-8 for bf16 and 2^-11 for fp16 (round to nearest). Triton's interpreter casts fp32 to bf16 by
truncation (interpreter._convert_float has no rounding mode): there u = 2^-7 for bf16 and the kernel
rounding reference truncates too.
"""
import bitsandbytes.functional as bnbf
import pytest
import torch

from qlora.kernels.nf4_gemv import nf4_gemv_lora

INTERPRET = not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class NF4Fields:
    """The NF4Tensor fields of W, from bitsandbytes' own quantizer (a second implementation)."""

    def __init__(self, w: torch.Tensor, blocksize: int, double_quant: bool):
        packed, st = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
        self.packed, self.shape, self.blocksize, self.quant_map = packed, tuple(w.shape), blocksize, st.code
        self.absmax = st.absmax
        if double_quant:
            self.offset, self.nested_absmax = st.offset, st.state2.absmax
            self.nested_quant_map, self.nested_blocksize = st.state2.code, st.state2.blocksize

    def dense_fp32(self, code_values=None) -> torch.Tensor:
        """code_values[code] * absmax_fp32 as [N, K] fp32; code_values defaults to quant_map (exact)."""
        code_values = self.quant_map if code_values is None else code_values
        byte = self.packed.view(-1).long()
        codes = torch.stack([byte >> 4, byte & 0xF], dim=1).view(-1)  # high nibble first
        absmax = self.absmax
        if absmax.dtype == torch.uint8:
            nested = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: absmax.numel()]
            absmax = self.nested_quant_map[absmax.long()] * nested + self.offset
        return (code_values[codes] * absmax.repeat_interleave(self.blocksize)).view(self.shape)


def unit_roundoff(dtype) -> float:
    if dtype == torch.float16:
        return 2.0**-11
    return 2.0**-7 if INTERPRET else 2.0**-8


def kernel_rounding(values: torch.Tensor, dtype) -> torch.Tensor:
    """fp32 values rounded to ``dtype`` as the kernel rounds them (truncated: bf16 in the interpreter)."""
    if INTERPRET and dtype == torch.bfloat16:
        return (values.view(torch.int32) & -65536).view(torch.float32)
    return values.to(dtype).float()


# M: 1 (decode), 2, 3, 8, 16 cover every padded row count and so every way the kernel lays out its
# absmax column groups; K = 320 leaves a partial tile and splits unevenly; blocksizes 32/64/128 give
# 4, 2 and 1 absmax blocks per interpreter tile; r = 0 (no LoRA), 1 and 16; fp32 absmax once.
CASES = [
    (1, 320, 192, 8, torch.bfloat16, 64, True),
    (1, 192, 64, 0, torch.bfloat16, 64, True),
    (2, 256, 128, 16, torch.bfloat16, 32, True),
    (3, 64, 320, 1, torch.float16, 64, True),
    (8, 384, 128, 16, torch.bfloat16, 128, True),
    (16, 192, 64, 16, torch.bfloat16, 64, True),
    (5, 320, 64, 4, torch.float16, 32, False),
]


@pytest.mark.parametrize("m,k,n,r,dtype,blocksize,double_quant", CASES, ids=str)
def test_gemv_matches_reference(m, k, n, r, dtype, blocksize, double_quant):
    gen = torch.Generator().manual_seed(m + k + n)
    w = torch.randn(n, k, generator=gen) / k**0.5
    w.view(-1)[::97] *= 8.0  # outliers, as in LLM weights, so the absmax varies between blocks
    weight = NF4Fields(w.to(dtype).to(DEVICE), blocksize, double_quant)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    s = torch.randn(m, r, generator=gen).to(dtype).to(DEVICE) if r else None
    b = torch.randn(n, r, generator=gen).to(dtype).to(DEVICE) if r else None
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    lora_bias = bias.float() + (s.float() @ b.float().t() if r else 0.0)
    u = unit_roundoff(dtype)
    w_exact = weight.dense_fp32()
    w_kernel = weight.dense_fp32(kernel_rounding(weight.quant_map.float(), dtype))
    magnitude = x.float().abs() @ w_exact.abs().t()  # sum_k |x_k| |w_k| per output (the same for both W0)
    references = {
        "kernel rounding": (x.float() @ w_kernel.t() + lora_bias, k * 2.0**-24 * magnitude),
        "exact": (x.float() @ w_exact.t() + lora_bias, (u + k * 2.0**-24) * magnitude),
    }
    # twice: the split-K arrival counters must be back at zero after a launch
    for _ in range(2):
        y = nf4_gemv_lora(x, weight, bias, s, b)
        assert y.shape == (m, n) and y.dtype == dtype
        for name, (ref, weight_error) in references.items():
            err = (y.float() - ref).abs()
            bound = weight_error + u * ref.abs()
            assert (err <= bound).all(), (name, err.max().item(), (err - bound).max().item())


def test_gemv_rejects_bad_input():
    weight = NF4Fields(torch.randn(64, 64, dtype=torch.bfloat16).to(DEVICE), 64, True)
    with pytest.raises(ValueError, match="M=17 > 16"):
        nf4_gemv_lora(torch.randn(17, 64, dtype=torch.bfloat16, device=DEVICE), weight, None, None, None)
    x = torch.randn(1, 64, dtype=torch.bfloat16, device=DEVICE)
    weight.packed = torch.empty(64 * 32 + 1, dtype=torch.uint8, device=DEVICE)[1:]
    with pytest.raises(ValueError, match="packed must be 4-byte aligned"):
        nf4_gemv_lora(x, weight, None, None, None)
