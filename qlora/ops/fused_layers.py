"""Autograd Functions over the fused element-wise kernels of a Llama-family block.

    swiglu(gate, up)               = silu(gate) * up        (saves gate, up; recomputes silu)
    rms_norm(x, weight, eps)       = weight * x / sqrt(mean(x^2) + eps)
                                     (dL/dweight only when weight.requires_grad)
    rope_(q, k, cos, sin)          rotary embedding of q and k, in place

Each Function calls the launchers in ``qlora.kernels``; the plain PyTorch computation they
replace is the reference (``qlora.model.patch`` swaps them into Hugging Face modules).
"""
import torch

from qlora.kernels.rms_norm import rms_norm_backward, rms_norm_forward
from qlora.kernels.rope import rope_backward_, rope_forward_
from qlora.kernels.swiglu import swiglu_backward, swiglu_forward


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        return swiglu_backward(grad_out, gate, up)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = rms_norm_backward(grad_out, x, weight, rstd,
                                           compute_grad_weight=ctx.needs_input_grad[1])
        return grad_x, grad_w, None


def _storage_owner(t):
    return t if t._base is None else t._base


def _geometry(view, owner):
    """(shape, strides, offset into the owner) of a view."""
    return tuple(view.shape), view.stride(), view.storage_offset() - owner.storage_offset()


def _view_of(owner, geometry):
    """The [B, H, S, D] window ``geometry`` into owner (or a tensor laid out like it)."""
    shape, stride, offset = geometry
    return owner.as_strided(shape, stride, owner.storage_offset() + offset)


class RoPEFunction(torch.autograd.Function):
    """In place on the storage of q and k.

    Hugging Face's q and k are [B, H, S, D] views of the projection outputs, and autograd
    cannot let one Function mark two views dirty. So the Function takes the tensors that own
    the storage (contiguous, each covered exactly by its view), rotates the views inside them,
    marks the owners dirty, and ``rope_`` re-creates the views on the returned owners.
    """

    @staticmethod
    def forward(ctx, q_owner, k_owner, cos, sin, q_geometry, k_geometry):
        rope_forward_(_view_of(q_owner, q_geometry), _view_of(k_owner, k_geometry), cos, sin)
        ctx.mark_dirty(q_owner, k_owner)
        ctx.save_for_backward(cos, sin)
        ctx.geometries = (q_geometry, k_geometry)
        return q_owner, k_owner

    @staticmethod
    def backward(ctx, grad_q_owner, grad_k_owner):
        cos, sin = ctx.saved_tensors
        q_geometry, k_geometry = ctx.geometries
        # the incoming gradients may be shared with other consumers: rotate private copies
        grad_q = grad_q_owner.clone(memory_format=torch.contiguous_format)
        grad_k = grad_k_owner.clone(memory_format=torch.contiguous_format)
        rope_backward_(_view_of(grad_q, q_geometry), _view_of(grad_k, k_geometry), cos, sin)
        return grad_q, grad_k, None, None, None, None


def swiglu(gate, up):
    """silu(gate) * up; gate, up [..., I] of one dtype."""
    return SwiGLUFunction.apply(gate, up)


def rms_norm(x, weight, eps):
    """RMSNorm of x [..., H] with weight [H]; output in promote(x.dtype, weight.dtype)."""
    return RMSNormFunction.apply(x, weight, eps)


def rope_(q, k, cos, sin):
    """Rotate q [B, Hq, S, D] and k [B, Hk, S, D] in place by cos/sin [1|B, S, D]; returns the
    rotated (q, k), views of the same storage.

    q and k may be views (of the attention projections); each must cover all of a contiguous
    storage owner, and the two owners must differ. cos and sin carry no gradient.
    """
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope_: cos and sin must not require grad")
    q_owner, k_owner = _storage_owner(q), _storage_owner(k)
    if q_owner is k_owner:
        raise ValueError("rope_: q and k are views of one tensor (a fused QKV projection); "
                         "the in-place kernel needs separate q and k storage")
    for name, t, owner in (("q", q, q_owner), ("k", k, k_owner)):
        if not owner.is_contiguous() or t.numel() != owner.numel():
            raise ValueError(f"rope_: {name} must be a contiguous tensor or a view covering all "
                             f"of a contiguous one")
    q_geometry, k_geometry = _geometry(q, q_owner), _geometry(k, k_owner)
    q_owner, k_owner = RoPEFunction.apply(q_owner, k_owner, cos, sin, q_geometry, k_geometry)
    return _view_of(q_owner, q_geometry), _view_of(k_owner, k_geometry)
