"""Fused RMSNorm (kernels/rms_norm.py via qlora.ops.fused_layers.rms_norm) against Hugging Face's
LlamaRMSNorm computation: in fp32 from the rounded inputs (exact) and in bf16 (PyTorch's error).
"""
import pytest
import torch

from qlora.ops.fused_layers import rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def unfused(x, weight, grad_out, dtype, train_weight):
    """LlamaRMSNorm.forward with x and weight in dtype; (y, dx, dw)."""
    x = x.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_(train_weight)
    xf = x.to(torch.float32)
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    y = w * xn.to(dtype)
    y.backward(grad_out.to(dtype))
    return y.detach(), x.grad, w.grad


# H = 100 (not a power of two: a masked tail); rows = 1, and 2 * 19 = 38 (two backward programs
# of 16 rows and a partial third)
@pytest.mark.parametrize("shape", [(1, 100), (2, 19, 100)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_bf16_output_and_grads_match_torch(shape, train_weight, assert_close_as_torch):
    gen = torch.Generator().manual_seed(shape[0])
    x = (2 * torch.randn(shape, generator=gen)).to(torch.bfloat16).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(torch.bfloat16).to(DEVICE)
    grad_out = torch.randn(shape, generator=gen).to(torch.bfloat16).to(DEVICE)

    xs = x.clone().requires_grad_()
    w = weight.clone().requires_grad_(train_weight)
    y = rms_norm(xs, w, EPS)
    y.backward(grad_out)

    exact = unfused(x, weight, grad_out, torch.float32, train_weight)
    torch_bf16 = unfused(x, weight, grad_out, torch.bfloat16, train_weight)
    assert y.dtype == torch.bfloat16
    assert_close_as_torch(y, torch_bf16[0], exact[0], "y")
    assert_close_as_torch(xs.grad, torch_bf16[1], exact[1], "dx")
    if train_weight:
        assert_close_as_torch(w.grad, torch_bf16[2], exact[2], "dw")
    else:
        assert w.grad is None


def test_fp32_weight_with_bf16_input_promotes_like_hugging_face():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16).to(DEVICE)
    weight = torch.randn(64, generator=gen).to(DEVICE)
    y = rms_norm(x, weight, EPS)
    xf = x.float()
    ref = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.bfloat16)
    assert y.dtype == ref.dtype == torch.float32
    # both round xn to bf16 once and multiply in fp32; rsqrt vs 1/sqrt may flip that rounding:
    # one bf16 ulp (2^-7) of the largest value
    torch.testing.assert_close(y, ref, rtol=0, atol=2 ** -7 * ref.abs().max().item())


def test_fp32_matches_autograd_tightly():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(21, 37, generator=gen).to(DEVICE)
    weight = torch.randn(37, generator=gen).to(DEVICE)
    grad_out = torch.randn(21, 37, generator=gen).to(DEVICE)
    xs = x.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    rms_norm(xs, w, EPS).backward(grad_out)
    ref_y, ref_dx, ref_dw = unfused(x, weight, grad_out, torch.float32, True)
    # fp32 reductions over H = 37 (dx) and 21 rows (dw) in a different order: ~50 roundings
    # of u = 2^-24 relative to the largest term, well inside 1e-5
    torch.testing.assert_close(xs.grad, ref_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_dw, rtol=1e-5, atol=1e-5)


def test_wrong_weight_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        rms_norm(torch.zeros(2, 8, device=DEVICE), torch.ones(9, device=DEVICE), EPS)
