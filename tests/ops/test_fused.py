"""NF4LoRALinearFunction (qlora/ops/fused.py): output and every gradient (dX, dA, dB, dbias) vs a plain
fp32 PyTorch reference, on all three paths (gemv, fused, dense). Under TRITON_INTERPRET=1 on CPU.

Tolerance: as in test_kernels_nf4_lora_linear.py, ours <= 2x the error of the same formula in
PyTorch low precision + one output rounding (2^-7 bf16 under the interpreter's truncating cast,
2^-8 on GPU); dA and dB are plain bf16 matmuls in both, so the same rule holds.
"""
import types

import pytest
import torch

from qlora.ops import fused
from qlora.kernels.nf4_lora_linear import lora_dropout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UNIT = 2.0**-8 if torch.cuda.is_available() else 2.0**-7


def reference(x, w, bias, adapters, masks, dtype):
    """Y = X W^T + bias + sum_a s_a (X*mask_a) A_a^T B_a^T in ``dtype`` (fp32 = the reference)."""
    y = x.to(dtype) @ w.to(dtype).t() + bias.to(dtype)
    for ad, mask in zip(adapters, masks):
        x_d = x.to(dtype) * mask.to(dtype) if mask is not None else x.to(dtype)
        y = y + ((x_d @ ad.A.to(dtype).t()) @ ad.B.to(dtype).t()) * ad.scaling
    return y


def grads(fn, leaves, dy):
    for t in leaves:
        t.grad = None
    fn().backward(dy)
    return [None if t.grad is None else t.grad.clone() for t in leaves]


def check(ours, ref32, lowp):
    err = (ours.float() - ref32).abs().max().item()
    assert err <= 2 * (lowp.float() - ref32).abs().max().item() + UNIT * ref32.abs().max().item()


@pytest.mark.parametrize("path,m,with_bias", [("fused", 3, True), ("fused", 130, True), ("dense", 64, True),
                                               ("dense", 3, False), ("gemv", 1, True)])
def test_function_matches_reference(path, m, with_bias, bnb_nf4_weight):
    gen = torch.Generator().manual_seed(0)
    k, n = 192, 64
    weight, w = bnb_nf4_weight(n, k, torch.bfloat16, DEVICE, gen)
    x = torch.randn(2, m, k, generator=gen).bfloat16().to(DEVICE)  # 3-D input: [..., K]
    bias = torch.randn(n, generator=gen).bfloat16().to(DEVICE)
    if not with_bias:
        bias = torch.zeros_like(bias)  # the reference adds zeros; the layer gets None
    adapters = [types.SimpleNamespace(A=(torch.randn(r, k, generator=gen) / k**0.5).bfloat16().to(DEVICE),
                                      B=torch.randn(n, r, generator=gen).bfloat16().to(DEVICE), scaling=s, dropout=p)
                for r, s, p in ((8, 2.0, 0.0 if path == "gemv" else 0.1), (1, 0.5, 0.0))]
    rank_start, dropout_p = (0, 8, 9), tuple(a.dropout for a in adapters)
    seeds = torch.tensor([11, 12], dtype=torch.int64, device=DEVICE)
    x2d = x.reshape(-1, k)
    masks = [lora_dropout(torch.ones_like(x2d), a.dropout, seeds[i:i + 1]) if a.dropout else None
             for i, a in enumerate(adapters)]

    def ours():
        a_cat = torch.cat([a.A for a in adapters])
        b_scaled = torch.cat([a.B * a.scaling for a in adapters], dim=1)
        with fused.pinned_path("dense" if path == "dense" else "fused"):
            return fused.NF4LoRALinearFunction.apply(x2d, weight, bias if with_bias else None, a_cat, b_scaled,
                                                     rank_start, dropout_p, seeds)

    if path == "gemv":
        with torch.no_grad(), fused.pinned_path("fused"):
            assert fused.choose_path(x2d.shape[0], n, k, 9) == "gemv"
            y = ours()
        check(y, reference(x2d, w, bias, adapters, masks, torch.float32),
              reference(x2d, w, bias, adapters, masks, torch.bfloat16))
        return
    with fused.pinned_path("dense" if path == "dense" else "fused"):
        assert fused.choose_path(x2d.shape[0], n, k, 9, requires_grad=True) == path
    leaves = [x2d.requires_grad_(), bias.requires_grad_()] + [t.requires_grad_() for a in adapters for t in (a.A, a.B)]
    dy = torch.randn(x2d.shape[0], n, generator=gen).bfloat16().to(DEVICE)
    y = ours()
    ours_grads = grads(ours, leaves, dy)
    ref32 = [t.detach().float().requires_grad_() for t in leaves]
    ad32 = [types.SimpleNamespace(A=ref32[2 + 2 * i], B=ref32[3 + 2 * i], scaling=a.scaling)
            for i, a in enumerate(adapters)]
    y32 = reference(ref32[0], w, ref32[1], ad32, masks, torch.float32)
    y32.backward(dy.float())
    lowp_grads = grads(lambda: reference(x2d, w, bias, adapters, masks, torch.bfloat16), leaves, dy)
    check(y, y32.detach(), reference(x2d, w, bias, adapters, masks, torch.bfloat16).detach())
    for name, g, g32, glow in zip(["x", "bias", "A1", "B1", "A2", "B2"], ours_grads, ref32, lowp_grads):
        if name == "bias" and not with_bias:
            assert g is None
            continue
        assert g.shape == g32.shape, name
        check(g, g32.grad, glow)


def test_triton_entry_point_reshapes_and_rejects_other_code_books(bnb_nf4_weight):
    gen = torch.Generator().manual_seed(1)
    weight, w = bnb_nf4_weight(64, 64, torch.bfloat16, DEVICE, gen)
    x = torch.randn(2, 3, 64, generator=gen).bfloat16().to(DEVICE)
    y = fused.nf4_lora_linear_triton(x, weight, None, [])
    assert y.shape == (2, 3, 64)
    check(y, x.float() @ w.float().t(), x @ w.t())
    weight.quant_map = weight.quant_map * 2
    with pytest.raises(ValueError, match="standard NF4 quant_map"):
        fused.nf4_lora_linear_triton(x, weight, None, [])


def test_pinned_path_overrides_the_table_and_restores_it(monkeypatch):
    table = {50: "fused", 200: "dense", 1: "gemv"}
    monkeypatch.setattr(fused, "best_path", lambda arch, m, n, k, r, training: table[m])
    assert [fused.choose_path(m, 64, 64, 8) for m in (1, 50, 200)] == ["gemv", "fused", "dense"]
    with fused.pinned_path("fused"):
        assert [fused.choose_path(m, 64, 64, 8) for m in (1, 50, 200)] == ["gemv", "fused", "fused"]
        assert fused.choose_path(1, 64, 64, 8, requires_grad=True) == "fused"
        with fused.pinned_path("dense"):
            assert [fused.choose_path(m, 64, 64, 8) for m in (1, 50, 200)] == ["dense", "dense", "dense"]
        assert fused.choose_path(200, 64, 64, 8) == "fused"
    assert fused.choose_path(200, 64, 64, 8) == "dense"
    with pytest.raises(ValueError, match="'gemv'"):
        with fused.pinned_path("gemv"):
            pass


def test_choose_path_asks_the_path_table_with_the_layer_shape(monkeypatch):
    asked = []
    monkeypatch.setattr(fused, "best_path", lambda *args, **kw: asked.append((args, kw)) or "fused")
    assert fused.choose_path(4096, 11008, 4096, 16, requires_grad=True) == "fused"
    assert asked == [((fused.current_arch(), 4096, 11008, 4096, 16), {"training": True})]
