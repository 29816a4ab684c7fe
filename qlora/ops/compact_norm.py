"""RMSNorm that keeps its input as it came and 1/rms in fp32, evaluated over the tokens in chunks.

    y = w · cast(x · r),   r = 1 / sqrt(mean(x²) + eps)   (x upcast to fp32, cast back to x's dtype)

is Hugging Face's Llama/Mistral/Qwen2 RMSNorm, op for op. Autograd on that module keeps an fp32
copy of x (4·H bytes per token) for its backward; this Function keeps x itself (a·H bytes, and
often a tensor that is alive anyway: the layer input under checkpointing) and r (4 bytes per
token). The fp32 temporaries exist for one chunk of tokens at a time, in both passes. Backward,
with x̂ = x·r (fp32) and g = (dy·w) upcast to fp32:

    dx = cast(r · (g − x̂ · mean(g · x̂)))
    dw = Σ_tokens dy · cast(x̂)                      (only when w is trained)
"""
import torch

# Tokens per chunk: one fp32 row block of at most this many bytes (64 MiB: 4096 tokens at H = 4096).
CHUNK_BYTES = 64 << 20


def chunk_tokens(hidden_size: int) -> int:
    """Tokens per chunk for rows of ``hidden_size`` fp32 values."""
    return max(1, CHUNK_BYTES // (4 * hidden_size))


def _spans(tokens: int, chunk: int):
    return [(start, min(start + chunk, tokens)) for start in range(0, tokens, chunk)]


class CompactRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        flat = x.reshape(-1, x.shape[-1])
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty(flat.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty((flat.shape[0], 1), dtype=torch.float32, device=x.device)
        for start, stop in _spans(flat.shape[0], chunk_tokens(flat.shape[1])):
            xf = flat[start:stop].float()
            r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            rstd[start:stop] = r
            torch.mul(weight, (xf * r).to(x.dtype), out=y[start:stop])
        ctx.save_for_backward(x, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1])
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start, stop in _spans(flat.shape[0], chunk_tokens(flat.shape[1])):
            r = rstd[start:stop]
            # a copy even for fp32 x: it is scaled in place below
            x_hat = flat[start:stop].to(torch.float32, copy=True).mul_(r)
            if grad_w is not None:
                grad_w += (dy[start:stop] * x_hat.to(x.dtype)).sum(0, dtype=torch.float32)
            if grad_x is not None:
                g = (dy[start:stop] * weight).float()
                mean = (g * x_hat).mean(-1, keepdim=True)
                grad_x[start:stop] = g.sub_(x_hat.mul_(mean)).mul_(r)
        grad_x = grad_x.view(x.shape) if grad_x is not None else None
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        return grad_x, grad_w, None


def compact_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., H] by weight [H] (Hugging Face's Llama formula), saving x and 1/rms."""
    return CompactRMSNormFunction.apply(x, weight, eps)
