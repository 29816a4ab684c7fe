"""The reference QLoRA linear layer (qlora.ops.functional on the torch backend) against a float64
reference of the same formula, and what its order of operations buys under checkpointing."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora.ops.functional import LoRAAdapterArgs, nf4_lora_linear
from qlora.quant import nf4

U = 2.0 ** -24  # unit roundoff of fp32


def _gamma(n):
    """γ_n = n·u / (1 - n·u): a sum or dot product of n fp32 terms, in any order, is off from the
    exact value by at most γ_n times the sum of the terms' magnitudes (Higham, Accuracy and
    Stability of Numerical Algorithms, §3.1). The bound holds whatever order or blocking the GEMMs
    use; a wrong or missing term is off by O(the terms) instead."""
    return n * U / (1 - n * U)


def _problem(shape, n, bias, adapters, seed=0):
    """x [*shape], an NF4 W0 [n, K] (K = shape[-1]), a bias, and adapters given as (r, s, p)."""
    gen = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(*shape, generator=gen)
    weight = nf4.quantize(torch.randn(n, k, generator=gen) * 0.05)
    b = torch.randn(n, generator=gen) if bias else None
    args = [LoRAAdapterArgs(torch.randn(r, k, generator=gen) / k ** 0.5, torch.randn(n, r, generator=gen), s, p)
            for r, s, p in adapters]
    return x, weight, b, args


def _leaves(x, args):
    return [x] + [t for a in args for t in (a.A, a.B)]


@pytest.mark.parametrize("shape, n, bias, adapters", [
    ((2, 3, 100), 37, True, [(4, 2.0, 0.25), (1, 0.5, 0.0)]),  # K not a multiple of the NF4 block
    ((1, 64), 64, False, [(16, 1.0, 0.0)]),  # M = 1
    ((5, 128), 96, True, [(1, 0.125, 0.5)]),  # r = 1, a single adapter with dropout
])
def test_output_and_every_gradient_match_float64_reference(shape, n, bias, adapters):
    x, weight, b, args = _problem(shape, n, bias, adapters)
    for t in _leaves(x, args):
        t.requires_grad_(True)
    k = shape[-1]
    dy = torch.randn(*shape[:-1], n, generator=torch.Generator().manual_seed(1))

    torch.manual_seed(7)
    y = nf4_lora_linear(x, weight, b, args, training=True)
    y.backward(dy)
    ours = [y.detach()] + [t.grad for t in _leaves(x, args)]

    # float64 reference with the same dropout masks: F.dropout draws them from the same generator
    # in the same adapter order, on tensors of x's shape.
    torch.manual_seed(7)
    masks = [F.dropout(torch.ones_like(x), a.dropout, training=True) if a.dropout else torch.ones_like(x)
             for a in args]
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.dequantize(torch.float32).double()
    ab64 = [(a.A.detach().double().requires_grad_(True), a.B.detach().double().requires_grad_(True)) for a in args]
    y64 = x64 @ w64.t() + (0 if b is None else b.double())
    for a, m, (a64, b64) in zip(args, masks, ab64):
        y64 = y64 + a.scaling * ((x64 * m.double()) @ a64.t()) @ b64.t()
    y64.backward(dy.double())
    reference = [y64.detach(), x64.grad] + [g.grad for pair in ab64 for g in pair]

    # The magnitudes each rounding error scales with: the same formulas over absolute values.
    ax, aw, ady = x.detach().abs().double(), w64.abs(), dy.abs().double()
    mag_y = ax @ aw.t() + (0 if b is None else b.abs().double())
    mag_dx = ady @ aw
    mag_ab = []
    r_max = max(r for r, _, _ in adapters)
    for a, m, (a64, b64) in zip(args, masks, ab64):
        axd, aa, ab = (ax * m.double()), a64.detach().abs(), b64.detach().abs()
        mag_y = mag_y + a.scaling * (axd @ aa.t()) @ ab.t()
        mag_dx = mag_dx + a.scaling * ((ady @ ab) @ aa) * m.double()
        mag_ab.append((a.scaling * (ady @ ab).reshape(-1, a64.shape[0]).t() @ axd.reshape(-1, k),
                       a.scaling * ady.reshape(-1, n).t() @ (axd @ aa.t()).reshape(-1, a64.shape[0])))
    m_rows = x.numel() // k
    # Terms per output: y sums K base products, r products of sums of K, and one term per adapter
    # and bias; dX sums N + r·N; dA sums M·N; dB sums M·K. Each nested sum adds its length.
    bounds = [_gamma(k + r_max + len(args) + 2) * mag_y, _gamma(n + r_max + len(args) + 2) * mag_dx]
    for mag_a, mag_b in mag_ab:
        bounds += [_gamma(m_rows + n + 2) * mag_a, _gamma(m_rows + k + r_max + 2) * mag_b]
    for name, got, want, bound in zip(["y", "dx"] + [f"d{p}{i}" for i in range(len(args)) for p in "AB"],
                                      ours, reference, bounds):
        err = (got.double() - want).abs()
        assert got.shape == want.shape, name
        assert bool((err <= bound).all()), f"{name}: error {err.max().item():.3g} beyond its bound"


def test_fresh_adapter_gives_the_base_layer_exactly():
    """B = 0 (a fresh adapter): y must be x·W0ᵀ + b bit for bit, as for the base layer alone."""
    x, weight, b, args = _problem((4, 7, 64), 48, True, [(8, 2.0, 0.1)])
    args[0].B.zero_()
    y = nf4_lora_linear(x, weight, b, args, training=True)
    assert torch.equal(y, nf4_lora_linear(x, weight, b, [], training=True))


def test_last_projection_is_not_recomputed_under_checkpointing(monkeypatch):
    """With non-reentrant checkpointing (early stop), the recompute of a block ends at the last op
    that saves a tensor for backward. The base product is computed after the LoRA terms and saves
    nothing, so when the QLoRA linear ends the block its W0 is dequantized twice per step (forward,
    backward dX) instead of three times, and the gradients are those of the plain run."""
    calls = []
    dequantize = nf4.NF4Tensor.dequantize

    def counted_dequantize(self, dtype=None):
        calls.append(self)
        return dequantize(self, dtype)

    monkeypatch.setattr(nf4.NF4Tensor, "dequantize", counted_dequantize)
    x, weight, b, args = _problem((3, 64), 32, False, [(4, 1.0, 0.0)])
    for t in _leaves(x, args):
        t.requires_grad_(True)

    def block(inp):
        return nf4_lora_linear(torch.tanh(inp), weight, b, args, training=True)

    def grads(run):
        for t in _leaves(x, args):
            t.grad = None
        calls.clear()
        run(x).sum().backward()
        return len(calls), [t.grad.clone() for t in _leaves(x, args)]

    plain_calls, plain = grads(block)
    checkpointed_calls, checkpointed = grads(lambda inp: checkpoint(block, inp, use_reentrant=False))
    assert plain_calls == 2 and checkpointed_calls == 2
    for got, want in zip(checkpointed, plain):
        assert torch.equal(got, want)
