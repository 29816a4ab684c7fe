"""A token-wise block (the MLP of a decoder layer) run over the tokens in chunks.

    y = f(x),  x [..., H] -> y [..., H'],  f applied to each token independently

``tiled(f, x, chunk, params)`` evaluates f on ``chunk`` tokens at a time, so the intermediates
of f (for a SwiGLU MLP: gate, up and their product, 3·I per token against H for x) exist for one
chunk only, in the forward and in the backward. Autograd keeps only x; the backward runs f again
chunk by chunk under autograd and back-propagates each chunk at once:

    dx[c]      = (∂f/∂x)(x[c])ᵀ · dy[c]                  per chunk c, written into dx
    dθ         = Σ_c (∂f/∂θ)(x[c])ᵀ · dy[c]              summed over chunks in fp32

so dx is the untiled gradient row for row, and dθ differs from it only in the order of the
token sum (the untiled matmul reduces over all tokens at once).

Dropout inside f draws its masks chunk by chunk; the backward replays the RNG state of the
forward, so the recomputed chunks see the masks the forward saw.
"""
import torch

# Tokens per chunk when a run turns the tiled MLP on by itself (model.tiled_mlp: auto): a
# [4096, h] x [h, i] GEMM is still large enough to keep a GPU busy, and at h = 4096, i = 14336 in
# bf16 one chunk's intermediates are about 0.5 GB.
DEFAULT_CHUNK_TOKENS = 4096


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _chunks(tokens: int, chunk: int):
    return [(start, min(start + chunk, tokens)) for start in range(0, tokens, chunk)]


def _forward_chunks(fn, flat: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn over the rows of flat [T, H], ``chunk`` rows at a time, into one [T, H'] output."""
    out = None
    for start, stop in _chunks(flat.shape[0], chunk):
        y = fn(flat[start:stop])
        if out is None:
            out = y.new_empty((flat.shape[0], y.shape[-1]))
        out[start:stop] = y
    return out


class TiledFunction(torch.autograd.Function):
    """y = fn(x) chunk by chunk; saves x only and recomputes each chunk in the backward.

    ``params`` are the tensors fn uses that need gradients (a LoRA MLP's adapters): passing them
    as inputs lets autograd route their gradients through this Function.
    """

    @staticmethod
    def forward(ctx, fn, chunk, x, *params):
        ctx.fn, ctx.chunk = fn, chunk
        ctx.rng_state = _rng_state(x.device)
        ctx.autocast = (torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        # Saved before the chunks run: when a non-reentrant checkpoint recomputes the layer for
        # its backward, it stops once the last saved tensor is back, skipping the chunks here.
        ctx.save_for_backward(x)
        ctx.params = params  # module parameters: alive anyway, and the chunk graphs use these objects
        with torch.no_grad():
            out = _forward_chunks(fn, x.reshape(-1, x.shape[-1]), chunk)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, = ctx.saved_tensors
        params = ctx.params
        flat = x.reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        x_needs_grad = ctx.needs_input_grad[2]
        trained = [i for i, p in enumerate(params) if ctx.needs_input_grad[3 + i]]
        grad_x = torch.empty_like(flat) if x_needs_grad else None
        # fp32 sums: a 16-bit running sum would round once per chunk
        sums = {i: torch.zeros_like(params[i], dtype=torch.float32) for i in trained}
        cpu_rng, cuda_rng = ctx.rng_state
        devices = [x.device] if cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, x.device)
            for start, stop in _chunks(flat.shape[0], ctx.chunk):
                piece = flat[start:stop].detach().requires_grad_(x_needs_grad)
                y = ctx.fn(piece)
                inputs = ([piece] if x_needs_grad else []) + [params[i] for i in trained]
                grads = torch.autograd.grad(y, inputs, grad_flat[start:stop], allow_unused=True)
                if x_needs_grad:
                    grad_x[start:stop] = grads[0]
                    grads = grads[1:]
                for i, g in zip(trained, grads):
                    if g is not None:
                        sums[i] += g
        grad_params = [sums[i].to(p.dtype) if i in sums else None for i, p in enumerate(params)]
        grad_x = grad_x.view_as(x) if grad_x is not None else None
        return (None, None, grad_x, *grad_params)


def tiled(fn, x: torch.Tensor, chunk: int, params=()) -> torch.Tensor:
    """fn(x) for a token-wise fn, computed ``chunk`` tokens at a time (x [..., H]).

    With gradients enabled and x or a tensor of ``params`` needing one, the Function above
    keeps x only; otherwise the chunks are evaluated and discarded (the forward of a
    checkpointed layer, evaluation).
    """
    if chunk < 1:
        raise ValueError(f"tiled: chunk must be >= 1 token, got {chunk}")
    params = tuple(params)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return TiledFunction.apply(fn, chunk, x, *params)
    out = _forward_chunks(fn, x.reshape(-1, x.shape[-1]), chunk)
    return out.view(*x.shape[:-1], out.shape[-1])
