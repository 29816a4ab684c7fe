"""Mixture-of-experts weights in NF4, one NF4 tensor per expert, and LoRA on them as PEFT lays it out.

transformers keeps the experts of an MoE block in one module (``MixtralExperts``,
``Qwen3MoeExperts``, ... declared with ``@use_experts_implementation``) that holds fused 3-D
parameters: ``gate_up_proj`` [E, 2I, H] (``up_proj`` [E, I, H] when the experts have no gate) and
``down_proj`` [E, H, I], or [E, in, out] when the class is ``is_transposed``. bitsandbytes leaves
them dense, though they are most of an MoE model. :func:`quantize_experts` replaces each by an
:class:`ExpertLinears4bit` of the same name: E :class:`~qlora.nn.linear4bit.Linear4bit` layers,
expert e's [out, in] weight quantized on its own (bitsandbytes' block format, as if that expert were
a linear layer of its own). The experts module keeps its class, name, activation, gating, biases and
norms; its forward becomes :func:`nf4_experts_forward`, which sends each token through its top-k
experts, one expert's tokens at a time.
"""
from __future__ import annotations

import types
from typing import Iterable, Optional

import torch
from torch import nn

from qlora.ops.functional import LoRAAdapterArgs, nf4_lora_linear
from qlora.quant.nf4 import NF4Tensor
from qlora.nn.linear4bit import Linear4bit
from qlora.nn.lora import LORA_INITS, LoRAAdapters


def fused_expert_parameters(module: nn.Module) -> list[str]:
    """The fused 3-D expert weights of ``module`` (``gate_up_proj`` or ``up_proj``, and
    ``down_proj``) that are still dense parameters, in the order the module registered them, if it
    is a transformers experts module."""
    if not all(hasattr(module, a) for a in ("num_experts", "has_gate", "is_transposed", "has_bias")):
        return []  # not declared with transformers' @use_experts_implementation
    names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    return [n for n, p in module._parameters.items() if n in names and isinstance(p, torch.Tensor) and p.dim() == 3]


class ExpertLinears4bit(nn.Module):
    """One fused expert weight as E frozen NF4 linear layers: ``forward(x, e) = x·W_eᵀ``.

    W_e is [out_features, in_features]; ``transposed`` records that the fused parameter was stored
    [E, in, out] (export writes it back that way). The state dict is ``experts.<e>.weight`` and its
    bitsandbytes constants, per expert.
    """

    def __init__(self, weights: list[NF4Tensor], transposed: bool):
        super().__init__()
        shapes = {tuple(w.shape) for w in weights}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"ExpertLinears4bit needs E weights of one 2-D shape, got {sorted(shapes)}")
        self.experts = nn.ModuleList(Linear4bit(w) for w in weights)
        self.num_experts = len(weights)
        self.out_features, self.in_features = weights[0].shape
        self.transposed = transposed

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return self.experts[expert](x)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stacked expert weights [E, out, in] in ``dtype``."""
        return torch.stack([layer.weight.dequantize(dtype) for layer in self.experts])

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, transposed={self.transposed}")


class LoRAExpertLinears(LoRAAdapters):
    """LoRA on every expert of an :class:`ExpertLinears4bit`, in PEFT's layout for a targeted 3-D
    parameter (``LoraConfig(target_parameters=...)``, ``peft.tuners.lora.ParamWrapper``).

    Adapter ``a`` of rank r has ``lora_A[a]``: Linear(in, r·E) and ``lora_B[a]``: Linear(r·E, out).
    Expert e uses A_e = ``lora_A[a].weight[e·r:(e+1)·r]`` [r, in] and B_e = ``lora_B[a].weight[:,
    e::E]`` [out, r] (PEFT reshapes A to (E, r, in) and B to (out, r, E)), so

        y_e = x·W_eᵀ + s · (x·A_eᵀ)·B_eᵀ,    s = α/r (α/√r with rsLoRA),

    and merging adds s·B_e·A_e to W_e. There is no dropout: PEFT's ParamWrapper has none (it cannot
    factor x out of a parametrized weight), and these adapters must load there.
    """

    def __init__(self, base_layer: ExpertLinears4bit, r: int, lora_alpha: float,
                 adapter_name: str = "default", use_rslora: bool = False, init: str = "default"):
        super().__init__()
        self.base_layer = base_layer
        self.num_experts = base_layer.num_experts
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.add_adapter(adapter_name, r, lora_alpha, use_rslora, init)

    def add_adapter(self, name: str, r: int, lora_alpha: float, use_rslora: bool = False,
                    init: str = "default") -> None:
        self._check_new_adapter(name, r)
        if init not in LORA_INITS or init == "pissa":
            raise ValueError(f"init for MoE experts must be 'default' or 'gaussian', got {init!r} (adapter {name!r})")
        device = self.base_layer.experts[0].weight.device
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False, device=device)
        self._record_adapter(name, r, lora_alpha, use_rslora, init)
        self._init_factors(name)  # as PEFT: A [r·E, in] initialised as one linear layer's

    def expert_factors(self, name: str, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e [r, in], B_e [out, r]) of adapter ``name`` for ``expert`` (views of the parameters)."""
        r = self.r[name]
        return (self.lora_A[name].weight[expert * r:(expert + 1) * r],
                self.lora_B[name].weight[:, expert::self.num_experts])

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        layer = self.base_layer.experts[expert]
        if self.merged_adapters:
            return x @ self.merged_weight[expert].to(x.dtype).t()
        adapters = [] if self.disable_adapters else [
            LoRAAdapterArgs(*self.expert_factors(n, expert), self.scaling[n], 0.0) for n in self.active_adapters]
        return nf4_lora_linear(x, layer.weight, layer.bias, adapters, self.training)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B_e·A_e for every expert, fp32 [E, out, in]."""
        r, E = self.r[name], self.num_experts
        a = self.lora_A[name].weight.float().reshape(E, r, self.in_features)
        b = self.lora_B[name].weight.float().reshape(self.out_features, r, E).permute(2, 0, 1)
        return self.scaling[name] * (b @ a)

    @torch.no_grad()
    def merge(self, names: Iterable[str], dtype: Optional[torch.dtype] = None) -> None:
        """Run with W_e + Σ s·B_e·A_e, formed in fp32 and kept dense in ``dtype`` (default: what the
        NF4 weights dequantize to); the NF4 experts stay untouched for :meth:`unmerge`."""
        names = list(names)
        self._check_merge(names)
        w = self.base_layer.dequantized(torch.float32)
        for name in names:
            w += self.delta_weight(name)
        self.merged_weight = w.to(dtype or self.base_layer.experts[0].weight.dtype)
        self._mark_merged(names)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        del self.merged_weight
        self._mark_unmerged()


def is_router(module: nn.Module) -> bool:
    """A transformers MoE router (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``, ...): no linear
    layer, but a module of that name holding a 2-D ``weight`` [E, h] it multiplies the hidden
    states by."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.lower().endswith("router") and not isinstance(module, nn.Linear)
            and isinstance(weight, torch.Tensor) and weight.dim() == 2)


class LoRARouter(LoRAAdapters):
    """LoRA on an MoE router's weight W [E, h], as PEFT adapts a targeted 2-D parameter
    (``target_parameters=["mlp.gate.weight"]``): ``lora_A[a]``: Linear(h, r), ``lora_B[a]``:
    Linear(r, E), and the router runs its own forward with W + Σ s·B·A in place of W. No dropout,
    as in PEFT. The weight stays dense (a router is small); LoRA on it is never the default."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, adapter_name: str = "default",
                 use_rslora: bool = False, init: str = "default"):
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = base_layer.weight.shape
        self.add_adapter(adapter_name, r, lora_alpha, use_rslora, init)

    def add_adapter(self, name: str, r: int, lora_alpha: float, use_rslora: bool = False,
                    init: str = "default") -> None:
        self._check_new_adapter(name, r)
        if init not in LORA_INITS or init == "pissa":
            raise ValueError(f"init for an MoE router must be 'default' or 'gaussian', got {init!r} (adapter {name!r})")
        device = self.base_layer.weight.device
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device)
        self._record_adapter(name, r, lora_alpha, use_rslora, init)
        self._init_factors(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B·A in fp32, [E, h]."""
        return self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())

    def forward(self, *args, **kwargs):
        active = [] if self.disable_adapters else self.active_adapters
        if not active:
            return self.base_layer(*args, **kwargs)
        w = self.base_layer.weight
        for name in active:
            w = w + self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight).to(w.dtype)
        return torch.func.functional_call(self.base_layer, {"weight": w}, args, kwargs)

    @torch.no_grad()
    def merge(self, names: Iterable[str], dtype: Optional[torch.dtype] = None) -> None:
        """Run with W + Σ s·B·A (formed in fp32, stored in ``dtype``, default W's); W is kept aside."""
        names = list(names)
        self._check_merge(names)
        w = self.base_layer.weight.float()
        for name in names:
            w = w + self.delta_weight(name)  # never in place: w may be the base weight itself
        self.unmerged_weight = self.base_layer.weight
        self.base_layer.weight = nn.Parameter(w.to(dtype or self.unmerged_weight.dtype), requires_grad=False)
        self._mark_merged(names)

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        self.base_layer.weight = self.unmerged_weight
        del self.unmerged_weight
        self._mark_unmerged()


def nf4_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """The forward of a transformers experts module whose fused weights are :class:`ExpertLinears4bit`
    (or LoRA on them): hidden_states [T, H], top_k_index / top_k_weights [T, k] ->

        out[t] = Σ_j top_k_weights[t, j] · down_e(act(gate_up_e(hidden[t])))    with e = top_k_index[t, j]

    where ``act`` is the module's own gating (``_apply_gate``) or activation, biases and a post-expert
    norm included when the module has them. Sums run in fp32, as transformers' batched experts do.
    """
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    up, down = getattr(self, up_name), self.down_proj
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    for expert in torch.unique(top_k_index).tolist():
        if expert >= self.num_experts:  # transformers' sentinel for a slot routed to no local expert
            continue
        token, slot = torch.where(top_k_index == expert)
        h = up(hidden_states[token], expert)
        if self.has_bias:
            h = h + getattr(self, up_name + "_bias")[expert]
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = down(h, expert)
        if self.has_bias:
            y = y + self.down_proj_bias[expert]
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).float())
    return out.to(hidden_states.dtype)


def quantize_experts(module: nn.Module, name: str, weight: torch.Tensor, quantize) -> ExpertLinears4bit:
    """Replace ``module``'s fused expert parameter ``name`` ([E, out, in], or [E, in, out] when the
    module ``is_transposed``) by an :class:`ExpertLinears4bit` of ``quantize(W_e)`` per expert,
    reading one expert at a time, and give the module :func:`nf4_experts_forward`."""
    if weight.dim() != 3:
        raise ValueError(f"{name}: fused expert weights are 3-D [E, out, in], got shape {tuple(weight.shape)}")
    per_expert = [quantize(weight[e].t() if module.is_transposed else weight[e]) for e in range(weight.shape[0])]
    layers = ExpertLinears4bit(per_expert, module.is_transposed)
    if not hasattr(module, "fused_expert_order"):  # PEFT nests its wrappers in this order
        module.fused_expert_order = fused_expert_parameters(module)
    del module._parameters[name]
    setattr(module, name, layers)
    module.forward = types.MethodType(nf4_experts_forward, module)
    return layers
