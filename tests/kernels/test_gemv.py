"""Split-K GEMV (M <= 16) vs an fp32 reference; tolerance rule as in test_kernels_nf4_lora_linear.py:
ours <= 2x PyTorch's own low-precision error + one output rounding (2^-8 bf16 on GPU, 2^-7 under
the interpreter whose fp32 -> bf16 cast truncates, 2^-11 fp16)."""
import bitsandbytes.functional as bnbf
import pytest
import torch

from qlora.kernels.nf4_gemv import nf4_gemv_lora

INTERPRET = not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bnb_nf4(w):
    packed, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    fields = dict(packed=packed, shape=tuple(w.shape), blocksize=64, absmax=st.absmax, quant_map=st.code,
                  offset=st.offset, nested_absmax=st.state2.absmax, nested_quant_map=st.state2.code,
                  nested_blocksize=st.state2.blocksize)
    weight = type("NF4Fields", (), fields)()
    return weight, bnbf.dequantize_4bit(packed, st)


@pytest.mark.parametrize("m,k,n,r,dtype", [(1, 320, 192, 8, torch.bfloat16), (3, 64, 320, 1, torch.float16),
                                           (16, 192, 64, 16, torch.bfloat16), (1, 192, 64, 0, torch.bfloat16)])
def test_gemv_matches_reference(m, k, n, r, dtype):
    gen = torch.Generator().manual_seed(0)
    weight, _ = bnb_nf4((torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(DEVICE))
    # the kernel multiplies by W0 dequantized in fp32 and rounded once, like the format's reference
    w = weight_dense(weight).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    s = torch.randn(m, r, generator=gen).to(dtype).to(DEVICE) if r else None
    b = torch.randn(n, r, generator=gen).to(dtype).to(DEVICE) if r else None
    bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    # twice: the split-K arrival counters must be back at zero after a launch
    for _ in range(2):
        y = nf4_gemv_lora(x, weight, bias, s, b)
        ref = x.float() @ w.float().t() + bias.float()
        lowp = torch.nn.functional.linear(x, w, bias)
        if r:
            ref = ref + s.float() @ b.float().t()
            lowp = lowp + s @ b.t()
        unit = 2.0**-11 if dtype == torch.float16 else (2.0**-7 if INTERPRET else 2.0**-8)
        err = (y.float() - ref).abs().max().item()
        assert err <= 2 * (lowp.float() - ref).abs().max().item() + unit * ref.abs().max().item()


def weight_dense(weight):
    byte = weight.packed.view(-1).long()
    codes = torch.stack([byte >> 4, byte & 0xF], dim=1).view(-1)
    nested = weight.nested_absmax.repeat_interleave(256)[: weight.absmax.numel()]
    absmax = weight.nested_quant_map[weight.absmax.long()] * nested + weight.offset
    return (weight.quant_map[codes] * absmax.repeat_interleave(64)).view(weight.shape)


def test_gemv_rejects_large_m():
    weight, _ = bnb_nf4(torch.randn(64, 64, dtype=torch.bfloat16).to(DEVICE))
    with pytest.raises(ValueError, match="M=17 > 16"):
        nf4_gemv_lora(torch.randn(17, 64, dtype=torch.bfloat16, device=DEVICE), weight, None, None, None)
