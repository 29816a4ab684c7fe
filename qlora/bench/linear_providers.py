"""The QLoRA linear layer, Y = X·W0ᵀ + s·(X·Aᵀ)·Bᵀ, as each compared implementation computes it.

Every provider is built from the same ``LinearProblem`` (one NF4 weight in bitsandbytes' layout,
one adapter A, B), so all of them compute the same function on the same bits:

* ``qlora-fused``: our layer (``qlora.ops.fused``) pinned to the fused kernels: split-K GEMV for
  M <= 16 without gradients, the fused NF4 + LoRA GEMM otherwise.
* ``qlora-dequant-cublas``: our layer pinned to "dequantize W0 into a reused buffer + cuBLAS + LoRA".
* ``dense-bf16``: ``F.linear`` on W0 already dequantized to bf16, without LoRA: the limit the
  4-bit paths approach at large M.
* ``unsloth-style``: bitsandbytes' ``dequantize_4bit`` into a reused buffer, cuBLAS, and the LoRA
  term added with ``addmm_``; the backward dequantizes again (written here, the way Unsloth's
  ``matmul_lora`` does it, as a baseline).
* ``hf-stack``: ``bitsandbytes.nn.Linear4bit`` under PEFT's LoRA layer, as transformers + PEFT
  build it.

A provider is present when its library imports and a tiny instance runs on the device
(``available``); otherwise it is left out with the reason.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from qlora.quant.nf4 import NF4Tensor, quantize

PROVIDERS = ("qlora-fused", "qlora-dequant-cublas", "dense-bf16", "unsloth-style", "hf-stack")
TRITON_PROVIDERS = ("qlora-fused", "qlora-dequant-cublas")
DTYPE = torch.bfloat16
SCALING = 2.0  # alpha / r with the common alpha = 2r


@dataclass
class LinearProblem:
    """W0 NF4 [N, K] and one adapter A [r, K], B [N, r] (bf16, trainable) with scaling s."""

    weight: NF4Tensor
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @classmethod
    def random(cls, n: int, k: int, rank: int, device: torch.device, seed: int = 0) -> "LinearProblem":
        """W0 ~ N(0, 0.02²) as LLM inits draw it; A, B scaled so that for x ~ N(0, 1) the LoRA term
        has the base term's magnitude (0.02·√K per output), so an error in either one shows."""
        gen = torch.Generator(device=device).manual_seed(seed)
        w = 0.02 * torch.randn(n, k, generator=gen, device=device)
        a = torch.randn(rank, k, generator=gen, device=device) / math.sqrt(k)
        b = torch.randn(n, rank, generator=gen, device=device) * (0.02 * math.sqrt(k) / (SCALING * math.sqrt(rank)))
        return cls(quantize(w.to(DTYPE)), a.to(DTYPE), b.to(DTYPE), SCALING)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def reference(self, x: torch.Tensor, dy: torch.Tensor, lora: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(Y, dX) in fp32 from the exactly dequantized W0 and the bf16 inputs."""
        w = self.weight.dequantize(torch.float32)
        x, dy, a, b = x.float(), dy.float(), self.a.float(), self.b.float()
        y, dx = x @ w.t(), dy @ w
        if lora:
            y = y + self.scaling * (x @ a.t()) @ b.t()
            dx = dx + self.scaling * (dy @ b) @ a
        return y, dx


@dataclass
class Layer:
    """One provider's layer: ``forward(x)``, its trainable tensors, the context its calls run in."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    params: list
    has_lora: bool = True
    context: Callable = contextlib.nullcontext


def _trainable(problem: LinearProblem) -> tuple[torch.Tensor, torch.Tensor]:
    return problem.a.clone().requires_grad_(), problem.b.clone().requires_grad_()


def _qlora(problem: LinearProblem, path: str) -> Layer:
    """Our layer on the Triton kernels, pinned to ``path`` (see qlora.ops.fused.pinned_path)."""
    from qlora.ops.functional import LoRAAdapterArgs
    from qlora.ops.fused import nf4_lora_linear_triton, pinned_path

    a, b = _trainable(problem)
    adapters = [LoRAAdapterArgs(a, b, problem.scaling, 0.0)]
    return Layer(lambda x: nf4_lora_linear_triton(x, problem.weight, None, adapters), [a, b],
                 context=lambda: pinned_path(path))


def qlora_fused(problem: LinearProblem) -> Layer:
    return _qlora(problem, "fused")


def qlora_dequant_cublas(problem: LinearProblem) -> Layer:
    return _qlora(problem, "dense")


def dense_bf16(problem: LinearProblem) -> Layer:
    w = problem.weight.dequantize(DTYPE)
    return Layer(lambda x: F.linear(x, w), [], has_lora=False)


def _bnb_dequantize(packed, quant_state, buffer: Optional[torch.Tensor]) -> torch.Tensor:
    """W0 in bf16 by bitsandbytes, into ``buffer`` when there is one."""
    from bitsandbytes.functional import dequantize_4bit

    if buffer is None:
        return dequantize_4bit(packed, quant_state)
    return dequantize_4bit(packed, quant_state, out=buffer)


class _UnslothStyleLinear(torch.autograd.Function):
    """Y = X·W0ᵀ + s·(X·Aᵀ)·Bᵀ with W0 dequantized by bitsandbytes into a reused bf16 buffer."""

    @staticmethod
    def forward(ctx, x, a, b, packed, quant_state, buffer, scaling):
        w = _bnb_dequantize(packed, quant_state, buffer)
        s = x @ a.t()  # [M, r]
        y = x @ w.t()
        y.addmm_(s, b.t(), alpha=scaling)
        ctx.save_for_backward(x, a, b, s)
        ctx.weight = (packed, quant_state, buffer)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, a, b, s = ctx.saved_tensors
        w = _bnb_dequantize(*ctx.weight)
        g = dy @ b  # [M, r]
        dx = dy @ w
        dx.addmm_(g, a, alpha=ctx.scaling)
        d_a = torch.mm(g.t(), x).mul_(ctx.scaling)
        d_b = torch.mm(dy.t(), s).mul_(ctx.scaling)
        return dx, d_a, d_b, None, None, None, None


def unsloth_style(problem: LinearProblem) -> Layer:
    packed, quant_state = problem.weight.to_bnb()
    # bitsandbytes 0.50 has no CPU kernel for dequantize_4bit's out= variant: allocate there.
    buffer = torch.empty(problem.shape, dtype=DTYPE, device=packed.device) if packed.is_cuda else None
    a, b = _trainable(problem)
    return Layer(lambda x: _UnslothStyleLinear.apply(x, a, b, packed, quant_state, buffer, problem.scaling), [a, b])


def hf_stack(problem: LinearProblem) -> Layer:
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    n, k = problem.shape
    state = problem.weight.state_dict("weight")
    packed = state.pop("weight")
    stats = {key[len("weight."):]: value for key, value in state.items()}
    base = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=DTYPE, quant_type="nf4", device="meta")
    base.weight = bnb.nn.Params4bit.from_prequantized(packed, stats, device=packed.device, module=base)
    alpha = problem.scaling * problem.rank
    config = LoraConfig(r=problem.rank, lora_alpha=alpha, lora_dropout=0.0)
    layer = PeftLinear4bit(base, adapter_name="default", config=config, r=problem.rank, lora_alpha=alpha)
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_a.copy_(problem.a)
        lora_b.copy_(problem.b)
    if layer.scaling["default"] != problem.scaling:
        raise RuntimeError(f"PEFT computed scaling {layer.scaling['default']}, expected {problem.scaling}")
    return Layer(layer, [lora_a, lora_b])


BUILDERS = {"qlora-fused": qlora_fused, "qlora-dequant-cublas": qlora_dequant_cublas, "dense-bf16": dense_bf16,
            "unsloth-style": unsloth_style, "hf-stack": hf_stack}


def interpreted(name: str, device: torch.device) -> bool:
    """True when ``name`` would run its Triton kernels in the interpreter (a CPU device)."""
    return name in TRITON_PROVIDERS and device.type != "cuda"


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why provider ``name`` cannot run on ``device`` (None when it can): its library is missing,
    or a tiny instance of it failed to run there."""
    if interpreted(name, device):
        from qlora.kernels.configs import interpreting

        if not interpreting():
            return ("its Triton kernels need a CUDA device; set TRITON_INTERPRET=1 to run them in "
                    "Triton's interpreter (checked for correctness only, never timed)")
    try:
        problem = LinearProblem.random(64, 64, 4, device)
        layer = BUILDERS[name](problem)
        x = torch.randn(2, 64, device=device, dtype=DTYPE, requires_grad=True)
        with layer.context():
            layer.forward(x).sum().backward()
    except ImportError as err:
        return f"not installed ({err})"
    except Exception as err:  # any failure to run means: not runnable on this device
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"does not run on {device.type}: {type(err).__name__}: {first_line[:200]}"
    return None
