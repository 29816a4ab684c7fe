"""The compact RMSNorm against Hugging Face's LlamaRMSNorm: the same forward numbers, and
gradients as accurate as autograd's on the original module.

The forward replays the module's ops row for row, so it must equal it bit for bit. The backward
uses the closed form r·(g - x̂·m), m = mean(g·x̂), instead of autograd's chain of ops: both are
compared with an fp64 evaluation, and ours may have twice the module's error plus what its own
arithmetic can add, element by element:
  dx: four fp32 roundings (x̂·m, the difference, ·r, and m itself), each within 2^-24 of
      r·(|g| + |x̂·m|), then the cast to the input dtype (its unit roundoff u of |dx|);
  dw: an fp32 sum over N tokens, within (N-1)·2^-24·Σ|dy·x̂|, then the cast (u of |dw|).
"""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qlora.ops import compact_norm
from qlora.ops.compact_norm import compact_rms_norm

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


def hf_norm(h, dtype, weight):
    norm = LlamaRMSNorm(h, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 48), (1, 1, 8), (3, 33, 40)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_matches_the_hugging_face_module(dtype, shape, train_weight, monkeypatch):
    # chunks of 5 tokens (2 for the 1-token case), so the chunk loop and its tail both run
    monkeypatch.setattr(compact_norm, "CHUNK_BYTES", 4 * shape[-1] * 5)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)

    norm = hf_norm(shape[-1], dtype, weight)
    norm.weight.requires_grad_(train_weight)
    x_ref = x.clone().requires_grad_()
    norm(x_ref).backward(dy)
    # fp64 reference (the module itself upcasts to fp32 whatever its dtype)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_(train_weight)
    y64 = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    y64.backward(dy.double())
    y_ref = norm(x)

    w = weight.clone().requires_grad_(train_weight)
    x_ours = x.clone().requires_grad_()
    y = compact_rms_norm(x_ours, w, 1e-5)
    assert torch.equal(y.detach(), y_ref.detach())
    y.backward(dy)
    # the terms of the closed form, in fp64, for the bounds
    xd = x.double()
    r = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    x_hat = xd * r
    g = (dy * weight).double()
    m = (g * x_hat).mean(-1, keepdim=True)
    u32, u = 2.0**-24, UNIT_ROUNDOFF[dtype]
    checks = [("dx", x_ours.grad, x_ref.grad, x64.grad, 4 * u32 * r * (g.abs() + (x_hat * m).abs()))]
    if train_weight:
        terms = (dy.double() * x_hat).abs().flatten(0, -2)
        checks.append(("dw", w.grad, norm.weight.grad, w64.grad,
                       (terms.shape[0] - 1) * u32 * terms.sum(0)))
    else:
        assert w.grad is None
    for name, ours, theirs, exact, own_rounding in checks:
        assert ours.dtype == dtype and ours.shape == exact.shape
        err_theirs = (theirs.double() - exact).abs().max().item()
        bound = 2 * err_theirs + own_rounding + u * exact.abs()
        assert ((ours.double() - exact).abs() <= bound).all(), name


def test_input_without_gradient_saves_nothing():
    x = torch.randn(4, 16)
    w = torch.ones(16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = compact_rms_norm(x, w, 1e-5)
    assert not y.requires_grad and saved == []
