"""A token-wise block of a decoder layer run over the tokens in chunks: the MLP, or the input norm
with the q/k/v projections and RoPE.

    ys = f(x, *per_token),  x [..., H] -> one tensor or a tuple, each [..., H_j]

f is applied to each token independently; ``per_token`` tensors [..., D] (the rotary cos and
sin) give each token values of its own and need no gradient. ``tiled(f, x, chunk, params,
per_token)`` evaluates f on ``chunk`` tokens at a time, so the intermediates of f (for a SwiGLU
MLP: gate, up and their product, 3·I per token against H for x; for the attention's input: the
normalized x and the unrotated q and k) exist for one chunk only, in the forward and in the
backward. Autograd keeps only x and the per-token tensors; the backward runs f again chunk by
chunk under autograd and back-propagates each chunk at once:

    dx[c]      = Σ_j (∂f_j/∂x)(x[c])ᵀ · dy_j[c]                per chunk c, written into dx
    dθ         = Σ_c Σ_j (∂f_j/∂θ)(x[c])ᵀ · dy_j[c]            summed over chunks in fp32 (fp64 for fp64 θ)

so dx is the untiled gradient row for row, and dθ differs from it only in the order of the
token sum (the untiled matmul reduces over all tokens at once).

Dropout inside f draws its masks chunk by chunk; the backward replays the RNG state of the
forward, so the recomputed chunks see the masks the forward saw.
"""
import torch

# Tokens per chunk when a run turns tiling on by itself (model.tiled_mlp or model.tiled_qkv:
# auto): a [4096, h] x [h, i] GEMM is still large enough to keep a GPU busy, and at h = 4096,
# i = 14336 in bf16 one chunk of the MLP's intermediates is about 0.5 GB.
DEFAULT_CHUNK_TOKENS = 4096


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _chunks(tokens: int, chunk: int):
    return [(start, min(start + chunk, tokens)) for start in range(0, tokens, chunk)]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _as_tuple(ys) -> tuple:
    return (ys,) if isinstance(ys, torch.Tensor) else tuple(ys)


def _forward_chunks(fn, flat: torch.Tensor, extras: list, chunk: int) -> list:
    """fn over the rows of flat [T, H] (and of each [T, D] extra), ``chunk`` rows at a time,
    into one [T, H_j] tensor per output of fn."""
    outs = None
    for start, stop in _chunks(flat.shape[0], chunk):
        outs = _write_chunk(fn, flat, extras, start, stop, outs)
    return outs


def _write_chunk(fn, flat, extras, start, stop, outs):
    """fn on rows [start, stop) written into ``outs`` (allocated at the first chunk); what fn
    made is released on return, before the next chunk's exists."""
    ys = _as_tuple(fn(flat[start:stop], *(e[start:stop] for e in extras)))
    if outs is None:
        outs = [y.new_empty((flat.shape[0], y.shape[-1])) for y in ys]
    for out, y in zip(outs, ys):
        out[start:stop] = y
    return outs


def _backward_chunk(fn, rows, extras, grad_outs, grad_rows, params, sums):
    """fn recomputed on ``rows`` under autograd and back-propagated from ``grad_outs``: the input
    gradient written into ``grad_rows`` (None: not needed), each param's added to its fp32 sum.
    The chunk's graph and gradients are released on return, before the next chunk's exist."""
    piece = rows.detach().requires_grad_(grad_rows is not None)
    ys = _as_tuple(fn(piece, *extras))
    # an output none of the inputs reaches (a frozen branch) has nothing to give
    reached = [(y, g) for y, g in zip(ys, grad_outs) if y.requires_grad]
    inputs = ([piece] if grad_rows is not None else []) + list(params)
    grads = torch.autograd.grad([y for y, _ in reached], inputs, [g for _, g in reached],
                                allow_unused=True)
    if grad_rows is not None:
        if grads[0] is None:
            grad_rows.zero_()
        else:
            grad_rows.copy_(grads[0])
        grads = grads[1:]
    for total, g in zip(sums, grads):
        if g is not None:
            total += g


class TiledFunction(torch.autograd.Function):
    """ys = fn(x, *extras) chunk by chunk; saves x and the extras only and recomputes each chunk
    in the backward.

    ``params`` are the tensors fn uses that need gradients (LoRA adapters): passing them as
    inputs lets autograd route their gradients through this Function.
    """

    @staticmethod
    def forward(ctx, fn, chunk, n_extras, x, *rest):
        extras, params = rest[:n_extras], rest[n_extras:]
        ctx.fn, ctx.chunk, ctx.n_extras = fn, chunk, n_extras
        ctx.rng_state = _rng_state(x.device)
        ctx.autocast = (torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        # Saved before the chunks run: when a non-reentrant checkpoint recomputes the layer for
        # its backward, it stops once the last saved tensor is back, skipping the chunks here.
        ctx.save_for_backward(x, *extras)
        ctx.params = params  # module parameters: alive anyway, and the chunk graphs use these objects
        with torch.no_grad():
            outs = _forward_chunks(fn, _rows(x), [_rows(e) for e in extras], chunk)
        ctx.single = len(outs) == 1
        shaped = tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)
        return shaped[0] if ctx.single else shaped

    @staticmethod
    def backward(ctx, *grad_outs):
        x, *extras = ctx.saved_tensors
        params = ctx.params
        flat, extras = _rows(x), [_rows(e) for e in extras]
        grad_rows = [_rows(g) for g in grad_outs]
        x_needs_grad = ctx.needs_input_grad[3]
        first_param = 4 + ctx.n_extras
        trained = [i for i, p in enumerate(params) if ctx.needs_input_grad[first_param + i]]
        grad_x = torch.empty_like(flat) if x_needs_grad else None
        # at least fp32 sums: a 16-bit running sum would round once per chunk
        sums = {i: torch.zeros_like(params[i], dtype=torch.promote_types(params[i].dtype, torch.float32))
                for i in trained}
        cpu_rng, cuda_rng = ctx.rng_state
        devices = [x.device] if cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, x.device)
            for start, stop in _chunks(flat.shape[0], ctx.chunk):
                _backward_chunk(ctx.fn, flat[start:stop], [e[start:stop] for e in extras],
                                [g[start:stop] for g in grad_rows],
                                None if grad_x is None else grad_x[start:stop],
                                [params[i] for i in trained], [sums[i] for i in trained])
        grad_params = [sums[i].to(p.dtype) if i in sums else None for i, p in enumerate(params)]
        grad_x = grad_x.view_as(x) if grad_x is not None else None
        return (None, None, None, grad_x, *[None] * ctx.n_extras, *grad_params)


def tiled(fn, x: torch.Tensor, chunk: int, params=(), per_token=()):
    """fn(x, *per_token) for a token-wise fn, computed ``chunk`` tokens at a time (x [..., H];
    each per-token tensor [..., D] with x's leading dimensions, or broadcast to them). Returns
    what fn returns: one tensor, or a tuple.

    With gradients enabled and x or a tensor of ``params`` needing one, the Function above
    keeps x and the per-token tensors only; otherwise the chunks are evaluated and discarded
    (the forward of a checkpointed layer, evaluation).
    """
    if chunk < 1:
        raise ValueError(f"tiled: chunk must be >= 1 token, got {chunk}")
    params = tuple(params)
    if any(e.requires_grad for e in per_token):
        raise ValueError("tiled: a per-token tensor needs a gradient, which the tiled backward "
                         "does not give")
    extras = tuple(e.expand(*x.shape[:-1], e.shape[-1]) for e in per_token)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return TiledFunction.apply(fn, chunk, len(extras), x, *extras, *params)
    outs = _forward_chunks(fn, _rows(x), [_rows(e) for e in extras], chunk)
    shaped = tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)
    return shaped[0] if len(shaped) == 1 else shaped
