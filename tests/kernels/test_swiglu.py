"""Fused SwiGLU (kernels/swiglu.py via qlora.ops.fused_layers.swiglu) against PyTorch.

Reference: Hugging Face's ``F.silu(gate) * up``, once in fp32 from the rounded inputs (exact)
and once in the input dtype (PyTorch's own rounding error).
"""
import pytest
import torch
import torch.nn.functional as F

from qlora.ops.fused_layers import swiglu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def unfused(gate, up, grad_out, dtype):
    g = gate.detach().to(dtype).requires_grad_()
    u = up.detach().to(dtype).requires_grad_()
    h = F.silu(g) * u
    h.backward(grad_out.to(dtype))
    return h.detach(), g.grad, u.grad


# an odd element count smaller than a block, and [3, 5, 689] (= 10335: ten blocks + a tail)
@pytest.mark.parametrize("shape", [(7,), (3, 5, 689)])
def test_bf16_output_and_grads_match_torch(shape, assert_close_as_torch):
    gen = torch.Generator().manual_seed(len(shape))
    gate = (3 * torch.randn(shape, generator=gen)).to(torch.bfloat16).to(DEVICE)
    up = torch.randn(shape, generator=gen).to(torch.bfloat16).to(DEVICE)
    grad_out = torch.randn(shape, generator=gen).to(torch.bfloat16).to(DEVICE)

    g = gate.clone().requires_grad_()
    u = up.clone().requires_grad_()
    h = swiglu(g, u)
    h.backward(grad_out)

    exact = unfused(gate, up, grad_out, torch.float32)
    torch_bf16 = unfused(gate, up, grad_out, torch.bfloat16)
    assert h.dtype == torch.bfloat16 and h.shape == gate.shape
    for name, ours, theirs, ref in zip(("h", "dgate", "dup"), (h, g.grad, u.grad), torch_bf16,
                                       exact):
        assert_close_as_torch(ours, theirs, ref, name)


def test_fp32_matches_autograd_tightly():
    gen = torch.Generator().manual_seed(3)
    gate = torch.randn(5, 33, generator=gen, device="cpu").to(DEVICE).requires_grad_()
    up = torch.randn(5, 33, generator=gen).to(DEVICE).requires_grad_()
    grad_out = torch.randn(5, 33, generator=gen).to(DEVICE)
    h = swiglu(gate, up)
    h.backward(grad_out)
    ref_h, ref_dg, ref_du = unfused(gate, up, grad_out, torch.float32)
    # fp32 on both sides, a handful of roundings (u = 2^-24) in a different order: 1e-6 relative
    torch.testing.assert_close(h, ref_h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gate.grad, ref_dg, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(up.grad, ref_du, rtol=1e-6, atol=1e-6)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="differ in shape"):
        swiglu(torch.zeros(3, 4, device=DEVICE), torch.zeros(3, 5, device=DEVICE))
