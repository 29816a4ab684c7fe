"""Autograd Functions for the QLoRA linear layer and the dispatcher between backends.

The reference path computes ``y = x·W0ᵀ (+ bias) + Σ_a s_a · B_a(A_a(dropout_a(x)))`` with W0
dequantized on the fly: :class:`NF4LinearFunction` dequantizes in forward and again in backward, so
no dense copy of W0 outlives a single matmul, and W0 gets no gradient.
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
    """y = x·W0ᵀ for a frozen NF4 W0 [N, K]; x [..., K] -> y [..., N].

    Saves only the NF4 weight (4.127 bits/param), never its dequantized copy: backward
    dequantizes again to form dX = dY·W0.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor) -> torch.Tensor:
        ctx.weight = weight
        return x @ weight.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return grad_y @ ctx.weight.dequantize(grad_y.dtype), None


def nf4_linear(x: torch.Tensor, weight: NF4Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x·W0ᵀ + bias on the reference path."""
    y = NF4LinearFunction.apply(x, weight)
    return y if bias is None else y + bias.to(y.dtype)


def lora_delta(x: torch.Tensor, adapter: LoRAAdapterArgs, training: bool) -> torch.Tensor:
    """s · dropout(x)·Aᵀ·Bᵀ, x [..., K] -> [..., N]."""
    x_d = F.dropout(x, p=adapter.dropout, training=training) if adapter.dropout > 0 else x
    return adapter.scaling * F.linear(F.linear(x_d, adapter.A.to(x.dtype)), adapter.B.to(x.dtype))


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
    y = nf4_linear(x, weight, bias)
    for adapter in adapters:
        y = y + lora_delta(x, adapter, training)
    return y
