"""SwiGLU activation of the Llama MLP, forward and backward.

Math, element-wise over gate g and up u (same shape [..., I]), sigma the logistic sigmoid:

    h      = silu(g) * u              silu(g) = g * sigma(g)
    dL/du  = dh * silu(g)
    dL/dg  = dh * u * sigma(g) * (1 + g * (1 - sigma(g)))

The backward recomputes sigma(g) from the saved g instead of keeping h or silu(g): the autograd
layer saves g and u (which the backward needs anyway) and nothing of size [..., I] more.
Everything is computed in fp32 and rounded once, when stored in the input dtype (Hugging Face's
``act_fn(gate) * up`` rounds twice: silu(g), then the product).
"""
import torch
import triton
import triton.language as tl

_BLOCK = 1024  # elements per program


@triton.jit
def swiglu_fwd_kernel(
    gate_ptr,  # [n] gate projection g, contiguous
    up_ptr,  # [n] up projection u, same dtype
    out_ptr,  # [n] h = silu(g) * u, same dtype
    n,  # number of elements
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g_raw = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    g = g_raw.to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(g_raw.dtype), mask=mask)


@triton.jit
def swiglu_bwd_kernel(
    grad_out_ptr,  # [n] dL/dh
    gate_ptr,  # [n] saved gate g
    up_ptr,  # [n] saved up u
    grad_gate_ptr,  # [n] out: dL/dg
    grad_up_ptr,  # [n] out: dL/du
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n

    # ---- load -------------------------------------------------------------------------
    dh_raw = tl.load(grad_out_ptr + offs, mask=mask, other=0.0)
    dh = dh_raw.to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    # ---- recompute the activation and differentiate -----------------------------------
    sig = tl.sigmoid(g)
    silu = g * sig
    d_up = dh * silu
    d_gate = dh * u * sig * (1.0 + g * (1.0 - sig))

    # ---- store ------------------------------------------------------------------------
    tl.store(grad_gate_ptr + offs, d_gate.to(dh_raw.dtype), mask=mask)
    tl.store(grad_up_ptr + offs, d_up.to(dh_raw.dtype), mask=mask)


def _check_pair(op, gate, up):
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    if gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"{op}: gate ({gate.dtype}, {gate.device}) and up ({up.dtype}, "
                         f"{up.device}) differ in dtype or device")
    if not gate.dtype.is_floating_point:
        raise ValueError(f"{op}: gate must be floating point, got {gate.dtype}")


def swiglu_forward(gate, up):
    """h = silu(gate) * up. gate, up: [..., I], same dtype; returns [..., I] in that dtype."""
    _check_pair("swiglu_forward", gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK)
    return out


def swiglu_backward(grad_out, gate, up):
    """(dL/dgate, dL/dup) from dL/dh. All [..., I]; returns tensors in grad_out's dtype."""
    _check_pair("swiglu_backward", gate, up)
    if grad_out.shape != gate.shape:
        raise ValueError(f"swiglu_backward: grad_out {tuple(grad_out.shape)} does not match gate "
                         f"{tuple(gate.shape)}")
    grad_out, gate, up = grad_out.contiguous(), gate.contiguous(), up.contiguous()
    grad_gate = torch.empty_like(grad_out)
    grad_up = torch.empty_like(grad_out)
    n = gate.numel()
    if n:
        swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](grad_out, gate, up, grad_gate, grad_up, n,
                                                     BLOCK=_BLOCK)
    return grad_gate, grad_up


# Ahead-of-time compile specs: one entry per kernel specialisation the launchers use, in the
# form triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs)) takes.
AOT_SPECS = [
    {"kernel": swiglu_fwd_kernel,
     "signature": {"gate_ptr": f"*{dt}", "up_ptr": f"*{dt}", "out_ptr": f"*{dt}", "n": "i32",
                   "BLOCK": "constexpr"},
     "constexprs": {"BLOCK": _BLOCK}}
    for dt in ("bf16", "fp16")
] + [
    {"kernel": swiglu_bwd_kernel,
     "signature": {"grad_out_ptr": f"*{dt}", "gate_ptr": f"*{dt}", "up_ptr": f"*{dt}",
                   "grad_gate_ptr": f"*{dt}", "grad_up_ptr": f"*{dt}", "n": "i32",
                   "BLOCK": "constexpr"},
     "constexprs": {"BLOCK": _BLOCK}}
    for dt in ("bf16", "fp16")
]
