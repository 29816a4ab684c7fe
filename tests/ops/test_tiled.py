"""The tiled MLP against the untiled one: forward and every gradient, awkward chunkings, dropout.

Tolerance, the flash-attention way: both runs are compared with an fp64 evaluation of the same
computation, and the tiled run's error may be at most twice the untiled run's plus a floor.
Tiling changes only the order of additions: dx is computed row for row by the same matmuls on
fewer rows (a GEMM may block the K reduction differently for another M), and dθ sums the
token-chunks' products instead of one matmul over all tokens. A reordered fp32 sum of K terms
differs by at most (K-1)·2^-24 of the sum of |terms| (Higham, Accuracy and Stability, §4.2),
the same bound the untiled sum's own error obeys, hence the factor 2; the floor, 2^-24 of the
largest value, covers a reference error that happens to be zero.
"""
import pytest
import torch
import torch.nn.functional as F

from qlora.ops.tiled import tiled


def make_mlp(h=32, i=48, r=4, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def w(*shape, trained):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5) \
            .to(dtype).requires_grad_(trained)

    weights = {"gate": w(i, h, trained=False), "up": w(i, h, trained=False),
               "down": w(h, i, trained=False)}
    adapters = {name: (w(r, weights[name].shape[1], trained=True),
                       w(weights[name].shape[0], r, trained=True)) for name in weights}
    return weights, adapters


def mlp_fn(weights, adapters, dropout=0.0):
    def proj(name, x):
        a, b = adapters[name]
        return F.linear(x, weights[name]) + F.linear(F.linear(F.dropout(x, dropout), a), b)

    return lambda x: proj("down", F.silu(proj("gate", x)) * proj("up", x))


def params_of(adapters):
    return [p for pair in adapters.values() for p in pair]


def grads(fn, x, params, dy):
    y = fn(x)
    return (y.detach(),) + torch.autograd.grad(y, [x] + params, dy)


def cast(dtype, weights, adapters):
    return ({k: v.detach().to(dtype) for k, v in weights.items()},
            {k: tuple(t.detach().to(dtype).requires_grad_() for t in pair)
             for k, pair in adapters.items()})


@pytest.mark.parametrize("shape,chunk", [((2, 19, 32), 5), ((1, 37, 32), 37), ((3, 7, 32), 64),
                                         ((1, 16, 32), 1)])
def test_tiled_equals_untiled_up_to_the_order_of_additions(shape, chunk):
    weights64, adapters64 = make_mlp()
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    dy64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    exact = grads(mlp_fn(weights64, adapters64), x64.requires_grad_(), params_of(adapters64), dy64)

    weights, adapters = cast(torch.float32, weights64, adapters64)
    fn, params = mlp_fn(weights, adapters), params_of(adapters)
    x = x64.detach().float().requires_grad_()
    untiled = grads(fn, x, params, dy64.float())
    tiled_out = grads(lambda t: tiled(fn, t, chunk, params), x, params, dy64.float())
    names = ["y", "dx"] + [f"d{k}.{ab}" for k in adapters for ab in "AB"]
    for name, e, u, t in zip(names, exact, untiled, tiled_out):
        err_untiled = (u.double() - e).abs().max().item()
        err_tiled = (t.double() - e).abs().max().item()
        floor = 2**-24 * e.abs().max().item()
        assert t.shape == e.shape and t.dtype == torch.float32, name
        assert err_tiled <= 2 * err_untiled + floor, (name, err_tiled, err_untiled)


def test_gradients_reach_only_what_needs_them():
    weights, adapters = cast(torch.float32, *make_mlp())
    fn, params = mlp_fn(weights, adapters), params_of(adapters)
    x = torch.randn(2, 9, 32)                     # the input needs no gradient (layer 0)
    y = tiled(fn, x, 4, params)
    assert y.requires_grad and y.shape == (2, 9, 32)
    y.sum().backward()
    assert x.grad is None and all(p.grad is not None for p in params)
    with torch.no_grad():                         # no graph: the chunks are evaluated and dropped
        assert not tiled(fn, x, 4, params).requires_grad
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        tiled(fn, x, 0, params)


def test_dropout_masks_are_replayed_in_the_backward():
    """With dropout the recomputed chunks must see the forward's masks. Reference: each chunk
    run under autograd from the same RNG state, one after the other as the tiled forward draws
    them. The output and dx are then the same numbers (row for row the same ops); dθ sums the
    same per-chunk gradients g_c in another order, which moves it by at most 2(n-1)·2^-24·Σ|g_c|
    for n chunks (each order is within (n-1)·2^-24·Σ|g_c| of the exact sum)."""
    weights, adapters = cast(torch.float32, *make_mlp())
    fn, params = mlp_fn(weights, adapters, dropout=0.3), params_of(adapters)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 23, 32, generator=gen).requires_grad_()
    dy = torch.randn(1, 23, 32, generator=gen)
    spans = [(s, min(s + 6, 23)) for s in range(0, 23, 6)]

    torch.manual_seed(7)
    y, dx, *dparams = grads(lambda t: tiled(fn, t, 6, params), x, params, dy)
    after_tiled = torch.rand(1)
    torch.manual_seed(7)
    rows, dx_rows, partials = [], [], []
    for start, stop in spans:
        piece = x.detach()[0, start:stop].requires_grad_()
        out, g_x, *g_params = grads(fn, piece, params, dy[0, start:stop])
        rows.append(out)
        dx_rows.append(g_x)
        partials.append(g_params)
    assert torch.equal(after_tiled, torch.rand(1))  # the backward left the RNG where it was
    assert torch.equal(y[0], torch.cat(rows)) and torch.equal(dx[0], torch.cat(dx_rows))
    n = len(spans)
    for i, got in enumerate(dparams):
        parts = torch.stack([p[i] for p in partials])
        bound = 2 * (n - 1) * 2**-24 * parts.abs().sum(0)
        assert ((got - parts.sum(0)).abs() <= bound).all(), i


def rotary_fn(w, adapters):
    """Two outputs of different widths from x and per-token cos, sin (a RoPE-like product)."""
    (a1, b1), (a2, b2) = adapters

    def fn(x, cos, sin):
        q = F.linear(x, w[0]) + F.linear(F.linear(x, a1), b1)
        v = F.linear(x, w[1]) + F.linear(F.linear(x, a2), b2)
        return q * cos + q.flip(-1) * sin, v

    return fn


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_several_outputs_and_per_token_tensors(chunk):
    """fn(x, cos, sin) -> (q, v): each token gets its own cos and sin rows (given once for the
    batch, [1, S, D], and broadcast), and both outputs' gradients reach x and the adapters. The
    tolerance is the one above: the tiled run at most twice as far from fp64 as the untiled."""
    gen = torch.Generator().manual_seed(3)

    def t(*shape, trained=False):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(trained)

    w64 = (t(16, 32) / 32**0.5, t(8, 32) / 32**0.5)
    adapters64 = ((t(4, 32, trained=True), t(16, 4, trained=True)),
                  (t(4, 32, trained=True), t(8, 4, trained=True)))
    x64, cos64, sin64 = t(2, 11, 32), t(1, 11, 16), t(1, 11, 16)
    dq64, dv64 = t(2, 11, 16), t(2, 11, 8)

    def run(dtype, tile):
        w = tuple(m.detach().to(dtype) for m in w64)
        adapters = tuple(tuple(m.detach().to(dtype).requires_grad_() for m in pair) for pair in adapters64)
        params = [m for pair in adapters for m in pair]
        x = x64.detach().to(dtype).requires_grad_()
        cos, sin = cos64.to(dtype), sin64.to(dtype)
        fn = rotary_fn(w, adapters)
        q, v = tiled(fn, x, chunk, params, per_token=(cos, sin)) if tile else fn(x, cos, sin)
        got = torch.autograd.grad((q, v), [x] + params, (dq64.to(dtype), dv64.to(dtype)))
        return (q.detach(), v.detach()) + got

    exact, untiled, tiled_out = run(torch.float64, False), run(torch.float32, False), \
        run(torch.float32, True)
    for e, u, g in zip(exact, untiled, tiled_out):
        err_untiled = (u.double() - e).abs().max().item()
        err_tiled = (g.double() - e).abs().max().item()
        assert g.shape == e.shape and err_tiled <= 2 * err_untiled + 2**-24 * e.abs().max().item()


def test_a_frozen_output_and_a_per_token_tensor_needing_a_gradient():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(8, 8, generator=gen)
    a = torch.randn(8, 8, generator=gen).requires_grad_()

    def fn(x):  # the second output depends on nothing that is trained
        return x @ a, x @ w

    x = torch.randn(3, 5, 8, generator=gen)
    trained, frozen = tiled(fn, x, 2, [a])
    # autograd marks every output of the Function; the recomputed chunks skip the frozen one
    (trained.sum() + frozen.sum()).backward()
    expected, = torch.autograd.grad((x @ a).sum(), a)
    # dA[i, j] = Σ over the 15 tokens of x[t, i], summed in another order: each order is within
    # 14·2^-24·Σ|x[t, i]| of the exact sum
    bound = 2 * 14 * 2**-24 * x.abs().sum((0, 1))[:, None]
    assert ((a.grad - expected).abs() <= bound).all()
    with pytest.raises(ValueError, match="a per-token tensor needs a gradient"):
        tiled(lambda x, c: x * c, x, 2, per_token=(torch.ones(5, 8, requires_grad=True),))
