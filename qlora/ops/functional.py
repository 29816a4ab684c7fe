"""Autograd Functions for the QLoRA linear layer and the dispatcher between backends.

The reference path computes ``y = x·W0ᵀ (+ bias) + Σ_a s_a · B_a(A_a(dropout_a(x)))`` with W0
dequantized on the fly: :class:`NF4LinearFunction` dequantizes in forward and again in backward, so
no dense copy of W0 outlives a single matmul, and W0 gets no gradient. The LoRA terms are formed
first and the base product accumulates into them in place (see :func:`nf4_lora_linear`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from qlora.ops.backend import get_backend
from qlora.quant.nf4 import NF4Tensor


@dataclass
class LoRAAdapterArgs:
    """One active adapter: A [r, K], B [N, r], scaling s (α/r or α/√r), dropout probability on x."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    dropout: float


class NF4LinearFunction(torch.autograd.Function):
    """y = x·W0ᵀ for a frozen NF4 W0 [N, K]; x [..., K] -> y [..., N]. With ``acc`` [M, N] (x then
    [M, K]): y = acc + x·W0ᵀ, accumulated in place into ``acc`` by the GEMM (beta = 1).

    Saves only the NF4 weight (4.127 bits/param), never its dequantized copy: backward
    dequantizes again to form dX = dY·W0 (and d acc = dY).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor, acc: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.weight = weight
        w_t = weight.dequantize(x.dtype).t()
        if acc is None:
            return x @ w_t
        ctx.mark_dirty(acc)
        return acc.addmm_(x, w_t)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_y @ ctx.weight.dequantize(grad_y.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, grad_y if ctx.needs_input_grad[2] else None


def nf4_linear(x: torch.Tensor, weight: NF4Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x·W0ᵀ + bias on the reference path."""
    y = NF4LinearFunction.apply(x, weight, None)
    return y if bias is None else y + bias.to(y.dtype)


def _lora_hidden(x: torch.Tensor, adapter: LoRAAdapterArgs, training: bool) -> torch.Tensor:
    """dropout(x)·Aᵀ, x [..., K] -> [..., r]."""
    x_d = F.dropout(x, p=adapter.dropout, training=training) if adapter.dropout > 0 else x
    return F.linear(x_d, adapter.A.to(x.dtype))


def lora_delta(x: torch.Tensor, adapter: LoRAAdapterArgs, training: bool) -> torch.Tensor:
    """s · dropout(x)·Aᵀ·Bᵀ, x [..., K] -> [..., N]."""
    return adapter.scaling * F.linear(_lora_hidden(x, adapter, training), adapter.B.to(x.dtype))


def nf4_lora_linear(
    x: torch.Tensor,
    weight: NF4Tensor,
    bias: Optional[torch.Tensor],
    adapters: Sequence[LoRAAdapterArgs],
    training: bool = False,
) -> torch.Tensor:
    """The QLoRA linear layer on the backend ``qlora.ops.backend.get_backend`` picks for ``x``."""
    if get_backend(x.device) in ("triton", "cuda"):
        from qlora.ops.fused import nf4_lora_linear_triton

        if not training:
            adapters = [LoRAAdapterArgs(a.A, a.B, a.scaling, 0.0) for a in adapters]
        return nf4_lora_linear_triton(x, weight, bias, adapters)
    if not adapters:
        return nf4_linear(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])  # [M, K]
    y = None  # [M, N]: Σ_a s_a·H_a·B_aᵀ, each term scaled and accumulated inside its GEMM
    for adapter in adapters:
        h = _lora_hidden(x2d, adapter, training)  # [M, r]
        b_t = adapter.B.to(x.dtype).t()  # [r, N]
        if y is None:  # beta = 0: the empty first argument is never read
            y = torch.addmm(h.new_empty(h.shape[0], b_t.shape[1]), h, b_t, beta=0, alpha=adapter.scaling)
        else:
            y.addmm_(h, b_t, alpha=adapter.scaling)
    # The base product comes last and saves no tensor. Non-reentrant checkpointing (early stop)
    # ends a layer's recompute at the last op that saves one, so the base GEMM of a decoder
    # layer's last projection (down_proj), whose output backward never reads, is not recomputed.
    y = NF4LinearFunction.apply(x2d, weight, y)  # [M, N]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])
