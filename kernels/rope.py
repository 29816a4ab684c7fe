"""Rotary position embedding (RoPE) applied to Q and K in one launch.

Math (the "rotate half" convention of Llama/Mistral/Qwen2 in Hugging Face), for one head vector
x of length D split into halves x1 = x[:D/2], x2 = x[D/2:], and the per-token rows cos, sin of
length D (halves c1, c2, s1, s2):

    out1 = x1 * c1 - x2 * s1
    out2 = x2 * c2 + x1 * s2

This is x -> R x with R block-diagonal, so the backward is the transpose:

    dx1 = d1 * c1 + d2 * s2
    dx2 = d2 * c2 - d1 * s1

(Hugging Face builds cos = cat(c, c), so c1 = c2 and s1 = s2, and the transpose is the rotation
by -theta; the kernel does not rely on that.)

Positions: cos and sin hold one row per token, [Bc, S, D] with Bc = 1 (shared by the batch) or
Bc = B. The rotary embedding gathers those rows from the position ids, so packed sequences
(position ids restarting at 0 inside a row) are handled by reading each token's own row; the
kernel never assumes position = s.

The forward is in place on q and k (each program reads a token's two halves before it writes
them). Computed in fp32, stored in the tensors' dtype.
"""
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr, b, s, stride_b, stride_h, stride_s, n_heads, c1, c2, s1, s2,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_HEADS)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < HALF)
    offs = b * stride_b + s * stride_s + heads[:, None].to(tl.int64) * stride_h + cols[None, :]

    x1_raw = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x1 = x1_raw.to(tl.float32)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        out1 = x1 * c1 + x2 * s2
        out2 = x2 * c2 - x1 * s1
    else:
        out1 = x1 * c1 - x2 * s1
        out2 = x2 * c2 + x1 * s2
    tl.store(x_ptr + offs, out1.to(x1_raw.dtype), mask=mask)
    tl.store(x_ptr + offs + HALF, out2.to(x1_raw.dtype), mask=mask)


@triton.jit
def rope_kernel(
    q_ptr,  # [B, Hq, S, D] queries, rotated in place (any strides over B, H, S; unit over D)
    k_ptr,  # [B, Hk, S, D] keys, rotated in place
    cos_ptr,  # [Bc, S, D] cosine row of each token (Bc = 1 or B; unit stride over D)
    sin_ptr,  # [Bc, S, D] sine row, same strides as cos
    S,  # sequence length
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_s,
    cs_stride_b,  # 0 when the batch shares one cos/sin row per position
    cs_stride_s,
    n_q_heads, n_k_heads,
    HALF: tl.constexpr,  # D / 2
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    BLOCK_Q_HEADS: tl.constexpr,  # next power of two >= n_q_heads
    BLOCK_K_HEADS: tl.constexpr,  # next power of two >= n_k_heads
    BACKWARD: tl.constexpr,  # apply the transpose (the gradient) instead of the rotation
):
    token = tl.program_id(0).to(tl.int64)
    b = token // S
    s = token % S

    # ---- this token's cos/sin halves, shared by all heads of Q and K -----------------------
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    cs = b * cs_stride_b + s * cs_stride_s + cols
    c1 = tl.load(cos_ptr + cs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + cs + HALF, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + cs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + cs + HALF, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    # ---- rotate every head of Q, then of K ----------------------------------------------
    _rotate_heads(q_ptr, b, s, q_stride_b, q_stride_h, q_stride_s, n_q_heads,
                  c1, c2, s1, s2, HALF, BLOCK_HALF, BLOCK_Q_HEADS, BACKWARD)
    _rotate_heads(k_ptr, b, s, k_stride_b, k_stride_h, k_stride_s, n_k_heads,
                  c1, c2, s1, s2, HALF, BLOCK_HALF, BLOCK_K_HEADS, BACKWARD)


def _check(op, q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{op}: q and k must be [batch, heads, seq, head_dim], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    B, _, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"{op}: k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, "
                         f"seq or head_dim")
    if D % 2:
        raise ValueError(f"{op}: head_dim must be even, got {D}")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (S, D) \
            or cos.shape[0] not in (1, B):
        raise ValueError(f"{op}: cos and sin must both be [1 or {B}, {S}, {D}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        raise ValueError(f"{op}: cos and sin must share strides with unit stride over head_dim")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"{op}: q and k need unit stride over head_dim")
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        raise ValueError(f"{op}: q, k, cos, sin must be on one device")


def _launch(op, q, k, cos, sin, backward):
    _check(op, q, k, cos, sin)
    B, Hq, S, D = q.shape
    Hk = k.shape[1]
    cs_stride_b = cos.stride(0) if cos.shape[0] > 1 else 0
    if B * S == 0:
        return
    rope_kernel[(B * S,)](
        q, k, cos, sin, S,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        cs_stride_b, cos.stride(1), Hq, Hk,
        HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2),
        BLOCK_Q_HEADS=triton.next_power_of_2(Hq), BLOCK_K_HEADS=triton.next_power_of_2(Hk),
        BACKWARD=backward)


def rope_forward_(q, k, cos, sin):
    """Rotate q [B, Hq, S, D] and k [B, Hk, S, D] in place by the per-token cos/sin [1|B, S, D].

    q and k may be strided views (Hugging Face passes the [B, S, H, D] projection transposed to
    [B, H, S, D]); only head_dim must have unit stride. Returns (q, k).
    """
    _launch("rope_forward_", q, k, cos, sin, backward=False)
    return q, k


def rope_backward_(grad_q, grad_k, cos, sin):
    """dL/dq, dL/dk from dL/d(rotated q), dL/d(rotated k): the transpose rotation, in place on
    grad_q and grad_k (same layouts as q, k). Returns (grad_q, grad_k)."""
    _launch("rope_backward_", grad_q, grad_k, cos, sin, backward=True)
    return grad_q, grad_k


def _aot_specs():
    specs = []
    # (head_dim, q heads, kv heads): Llama-3-8B, Mistral-7B (32/8, D=128); Qwen2-7B (28/4).
    for dt in ("bf16", "fp16"):
        for head_dim, q_heads, k_heads in ((128, 32, 8), (128, 28, 4)):
            for backward in (False, True):
                signature = {name: f"*{dt}" for name in ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr")}
                signature.update({name: "i32" for name in
                                  ("S", "q_stride_b", "q_stride_h", "q_stride_s", "k_stride_b",
                                   "k_stride_h", "k_stride_s", "cs_stride_b", "cs_stride_s",
                                   "n_q_heads", "n_k_heads")})
                constexprs = {"HALF": head_dim // 2,
                              "BLOCK_HALF": triton.next_power_of_2(head_dim // 2),
                              "BLOCK_Q_HEADS": triton.next_power_of_2(q_heads),
                              "BLOCK_K_HEADS": triton.next_power_of_2(k_heads),
                              "BACKWARD": backward}
                signature.update({name: "constexpr" for name in constexprs})
                specs.append({"kernel": rope_kernel, "signature": signature,
                              "constexprs": constexprs})
    return specs


# Ahead-of-time compile specs (see kernels/swiglu.py).
AOT_SPECS = _aot_specs()
