"""Cross-entropy of a linear head (lm_head), chunked over tokens so the logits never exist whole.

Math, for token t with hidden state h_t [H], head W [V, H], target y_t, label smoothing eps,
and a caller-given scale c = dL/dloss_t (1 / number of trained tokens). The model's final-logit
transform (Gemma's soft-capping, Cohere's and Granite's logit scaling) is applied to the head's
output: logit scale s > 0 and soft cap m (none, or m > 0):

    u      = W h_t                                     (one chunk of rows at a time, [C, V])
    z      = m·tanh(s·u / m)   (z = s·u without a cap)
    lse    = log sum_j exp(z_j)                        (fp32, max-shifted, streamed over V)
    loss_t = (1 - eps) (lse - z_y) + eps (lse - mean_j z_j)
    dL/dz_j = c (softmax_j(z) - (1 - eps) [j = y] - eps / V)
    dL/du_j = dL/dz_j · s·(1 - tanh²(s·u_j / m))        (dL/dz_j · s without a cap)
    dL/dh_t = (dL/du) W            dL/dW += (dL/du)^T h_t   (only when the head is trained)

Tokens whose target is ignore_index have loss 0 and gradient 0.

The gradients are produced in the forward pass, chunk by chunk, while the chunk's logits are at
hand (the kernel overwrites u with dL/du in place): the backward pass then only scales them by
the incoming gradient, and nothing of size [tokens, V] is ever allocated. Peak extra memory is
one chunk of logits [C, V] in the hidden dtype.
"""
import torch
import triton
import triton.language as tl

_BLOCK_V = 2048  # vocabulary entries per inner-loop step
_CHUNK_LOGIT_BYTES = 256 * 2**20  # default chunk: as many tokens as fit this many logit bytes


@triton.jit
def _final_logits(u, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = softcap·tanh(logit_scale·u / softcap), or logit_scale·u; tanh(a) = 2·sigmoid(2a) - 1."""
    z = u * logit_scale
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
    return z


@triton.jit
def cross_entropy_fwd_bwd_kernel(
    logits_ptr,  # [C, V] one chunk of head outputs u, rows at logits_row_stride; dL/du if COMPUTE_GRAD
    labels_ptr,  # [C] int64 targets (ignore_index for untrained tokens)
    loss_ptr,  # [C] fp32 out: per-token loss, 0 for ignored tokens
    scale_ptr,  # [1] fp32: dL/dloss_t, applied to the gradient only
    logits_row_stride,
    V,  # vocabulary size
    ignore_index,
    label_smoothing,  # eps in [0, 1)
    logit_scale,  # s > 0: z = s·u (before the cap)
    softcap,  # m > 0: z = m·tanh(s·u / m); read only if HAS_SOFTCAP
    BLOCK_V: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    safe_label = tl.where(ignored, 0, label)

    # ---- pass 1: running max m and sum of exp(z - m) over the vocabulary ----------------
    m = float("-inf")
    d = 0.0
    z_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        u = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        z = tl.where(cols < V, _final_logits(u, logit_scale, softcap, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(cols < V, z, 0.0), axis=0)
    lse = m + tl.log(d)

    # ---- loss -----------------------------------------------------------------------------
    z_y = _final_logits(tl.load(row_ptr + safe_label).to(tl.float32), logit_scale, softcap, HAS_SOFTCAP)
    loss = lse - z_y
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_sum / V)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))

    # ---- pass 2: dL/du overwrites the head outputs ----------------------------------------
    if COMPUTE_GRAD:
        scale = tl.where(ignored, 0.0, tl.load(scale_ptr))
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            u_raw = tl.load(row_ptr + cols, mask=mask, other=0.0)
            z = _final_logits(u_raw.to(tl.float32), logit_scale, softcap, HAS_SOFTCAP)
            grad = tl.exp(z - lse)
            grad -= tl.where(cols == safe_label, 1.0 - label_smoothing, 0.0)
            if HAS_SMOOTHING:
                grad -= label_smoothing / V
            if HAS_SOFTCAP:
                tanh = z / softcap
                grad *= logit_scale * (1.0 - tanh * tanh)
            else:
                grad *= logit_scale
            tl.store(row_ptr + cols, (grad * scale).to(u_raw.dtype), mask=mask)


def cross_entropy_rows_(logits, labels, scale, *, ignore_index, label_smoothing, compute_grad,
                        logit_scale=1.0, softcap=None):
    """Per-row loss of head outputs u [C, V] against labels [C]; optionally dL/du in place of u.

    scale: fp32 tensor with one element, dL/dloss_row. logit_scale, softcap: the final-logit
    transform (see the module docstring; softcap None: no cap). Returns fp32 loss [C].
    """
    C, V = logits.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C:
        cross_entropy_fwd_bwd_kernel[(C,)](
            logits, labels, loss, scale, logits.stride(0), V, ignore_index, label_smoothing,
            float(logit_scale), float(softcap or 1.0),
            BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(V)), HAS_SMOOTHING=label_smoothing > 0,
            HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad)
    return loss


def default_chunk_size(vocab_size, dtype):
    """Tokens per chunk so one chunk of logits takes at most ~256 MiB (a multiple of 64, >= 64)."""
    tokens = _CHUNK_LOGIT_BYTES // (vocab_size * torch.empty((), dtype=dtype).element_size())
    return max(64, tokens // 64 * 64)


def linear_cross_entropy(hidden, weight, labels, scale, *, ignore_index, label_smoothing,
                         chunk_size, grad_hidden, grad_weight, logit_scale=1.0, softcap=None):
    """Chunked head + cross-entropy, with the gradients computed on the way.

    hidden: [T, H]; weight: [V, H] (same dtype as hidden); labels: int64 [T]; scale: fp32 [1]
    = dL/dloss_t. grad_hidden / grad_weight say which gradients to produce. logit_scale (> 0) and
    softcap (None or > 0): the model's final-logit transform (see the module docstring).
    Returns (per-token fp32 loss [T], dL/dhidden [T, H] or None, fp32 dL/dW [V, H] or None).
    """
    T, H = hidden.shape
    V = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"linear_cross_entropy: weight must be [vocab, {H}], got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"linear_cross_entropy: weight dtype {weight.dtype} differs from hidden "
                         f"dtype {hidden.dtype}")
    if labels.shape != (T,) or labels.dtype != torch.int64:
        raise ValueError(f"linear_cross_entropy: labels must be int64 [{T}], got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1), got "
                         f"{label_smoothing}")
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if not logit_scale > 0 or not (softcap is None or softcap > 0):
        raise ValueError(f"linear_cross_entropy: logit_scale must be > 0 and softcap None or > 0, got "
                         f"{logit_scale} and {softcap}")
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(out_of_range.any()):
        bad = labels[out_of_range][0].item()
        raise ValueError(f"linear_cross_entropy: label {bad} outside the vocabulary [0, {V}) "
                         f"and not ignore_index ({ignore_index})")

    compute_grad = grad_hidden or grad_weight
    loss = torch.empty(T, dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    d_weight = torch.zeros(V, H, dtype=torch.float32, device=hidden.device) if grad_weight \
        else None
    for start in range(0, T, chunk_size):
        stop = min(start + chunk_size, T)
        h = hidden[start:stop]  # [C, H]
        logits = h @ weight.t()  # [C, V], hidden dtype; becomes dL/dz in place
        loss[start:stop] = cross_entropy_rows_(
            logits, labels[start:stop], scale, ignore_index=ignore_index,
            label_smoothing=label_smoothing, compute_grad=compute_grad,
            logit_scale=logit_scale, softcap=softcap)
        if grad_hidden:
            torch.matmul(logits, weight, out=d_hidden[start:stop])  # [C, V] @ [V, H]
        if grad_weight:
            d_weight += (logits.t() @ h).float()  # [V, C] @ [C, H]
    return loss, d_hidden, d_weight


def _aot_specs():
    specs = []
    for dt in ("bf16", "fp16"):
        for smoothing in (False, True):
            for softcap in (False, True):
                for compute_grad in (False, True):
                    specs.append({
                        "kernel": cross_entropy_fwd_bwd_kernel,
                        "signature": {"logits_ptr": f"*{dt}", "labels_ptr": "*i64",
                                      "loss_ptr": "*fp32", "scale_ptr": "*fp32",
                                      "logits_row_stride": "i32", "V": "i32", "ignore_index": "i32",
                                      "label_smoothing": "fp32", "logit_scale": "fp32",
                                      "softcap": "fp32", "BLOCK_V": "constexpr",
                                      "HAS_SMOOTHING": "constexpr", "HAS_SOFTCAP": "constexpr",
                                      "COMPUTE_GRAD": "constexpr"},
                        "constexprs": {"BLOCK_V": _BLOCK_V, "HAS_SMOOTHING": smoothing,
                                       "HAS_SOFTCAP": softcap, "COMPUTE_GRAD": compute_grad}})
    return specs


# Ahead-of-time compile specs (see kernels/swiglu.py).
AOT_SPECS = _aot_specs()
