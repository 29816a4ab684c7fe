"""AdaLoRA's SVD-form adapter (Zhang et al. 2023) on a frozen NF4 or dense base, with PEFT's names.

ΔW = P·diag(λ)·Q · α / r_init, stored as PEFT's AdaLoRA layer stores it: ``lora_A`` = Q [r, in]
(right singular vectors), ``lora_E`` = λ [r, 1], ``lora_B`` = P [out, r] (left singular vectors),
all ``nn.ParameterDict`` keyed by adapter name, and ``ranknum`` (the initial rank, frozen). The
rank allocator (:mod:`qlora.adalora.allocator`) masks entries of λ; :meth:`AdaLoRALinear.prune`
then drops the masked triplets.
"""
from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch
from torch import nn

from qlora.ops.functional import LoRAAdapterArgs, lora_delta, nf4_lora_linear
from qlora.nn.linear4bit import Linear4bit

# PEFT divides by ranknum + 1e-5 (so that a rank-0 layer does not divide by zero); kept for equal outputs.
_RANKNUM_EPS = 1e-5


class AdaLoRALinear(nn.Module):
    """y = W0·x + b + Σ_a c_a · P_a·diag(λ_a)·Q_a·dropout_a(x), c_a = α_a / (r_init,a + 1e-5).

    ``base_layer`` is a :class:`Linear4bit` or a dense ``nn.Linear``; on CUDA the adapter runs in the
    fused NF4 kernel as a LoRA adapter with A = Q·diag(λ) and B = c·P. Initialisation is PEFT's:
    λ = 0 (so training starts from W0 exactly), P and Q ~ N(0, 0.02²). α ≤ 0 means α = r, as in PEFT.
    """

    def __init__(self, base_layer: Union[Linear4bit, nn.Linear], r: int = 12, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, adapter_name: str = "default"):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout)

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0) -> None:
        if not isinstance(r, int) or r < 0:
            raise ValueError(f"AdaLoRA rank r must be a non-negative integer, got {r!r} (adapter {name!r})")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r} (adapter {name!r})")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        device = self.base_layer.weight.device
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_E[name] = nn.Parameter(torch.empty(r, 1, device=device))
        self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, r, device=device))
        self.ranknum[name] = nn.Parameter(torch.full((1,), float(r), device=device), requires_grad=False)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha if lora_alpha > 0 else float(r)
        self.reset_adapter(name)
        self.active_adapters.append(name)

    def reset_adapter(self, name: str) -> None:
        with torch.no_grad():
            self.lora_E[name].zero_()
            self.lora_A[name].normal_(0.0, 0.02)
            self.lora_B[name].normal_(0.0, 0.02)

    def set_adapter(self, names: Union[str, Iterable[str]]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; this layer has {list(self.lora_A)}")
        self.active_adapters = names

    def delete_adapter(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(f"unknown adapter {name!r}; this layer has {list(self.lora_A)}")
        for table in (self.lora_A, self.lora_B, self.lora_E, self.ranknum, self.lora_dropout,
                      self.r, self.lora_alpha, self.scaling):
            del table[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def _coefficient(self, name: str) -> torch.Tensor:
        return self.scaling[name] / (self.ranknum[name] + _RANKNUM_EPS)

    def _adapter_args(self) -> list[LoRAAdapterArgs]:
        if self.disable_adapters:
            return []
        return [
            LoRAAdapterArgs(self.lora_A[n] * self.lora_E[n], self.lora_B[n] * self._coefficient(n), 1.0,
                            getattr(self.lora_dropout[n], "p", 0.0))
            for n in self.active_adapters if self.r[n] > 0
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = self._adapter_args()
        if isinstance(self.base_layer, Linear4bit):
            return nf4_lora_linear(x, self.base_layer.weight, self.base_layer.bias, adapters, self.training)
        y = self.base_layer(x)
        for adapter in adapters:
            y = y + lora_delta(x, adapter, self.training)
        return y

    def delta_weight(self, name: str) -> torch.Tensor:
        """c · P·diag(λ)·Q in fp32, [out, in]: what merging this adapter adds to W0."""
        a = self.lora_A[name].float() * self.lora_E[name].float()
        return (self.lora_B[name].float() @ a) * self._coefficient(name).float()

    @torch.no_grad()
    def prune(self, name: str, keep: Union[Sequence[bool], torch.Tensor]) -> None:
        """Keep only the triplets (P column, λ, Q row) where ``keep`` is true; the others must have
        been masked (λ = 0) so the output is unchanged. ``ranknum`` keeps the initial rank, as in
        PEFT's pruned adapters, so the scaling α / r_init is unchanged too."""
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.lora_E[name].device).view(-1)
        if keep.numel() != self.r[name]:
            raise ValueError(f"adapter {name!r}: rank mask has {keep.numel()} entries, the layer has rank {self.r[name]}")
        for params, rows in ((self.lora_A, True), (self.lora_E, True), (self.lora_B, False)):
            old = params[name]
            kept = old[keep] if rows else old[:, keep]
            params[name] = nn.Parameter(kept.clone(), requires_grad=old.requires_grad)
        self.r[name] = int(keep.sum())

    def extra_repr(self) -> str:
        return f"adapters={ {n: self.r[n] for n in self.lora_A} }, active={self.active_adapters}"


def adalora_layers(model: nn.Module, adapter_name: str = "default") -> list[tuple[str, AdaLoRALinear]]:
    """(qualified name, layer) for every AdaLoRA layer of ``model`` that holds ``adapter_name``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaLoRALinear) and adapter_name in m.lora_A]


def orthogonal_regularization(model: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """R(P, Q) = mean over all P and Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (AdaLoRA eq. 4, PEFT's form).

    The training loop adds ``orth_reg_weight · R`` to the loss; computed in fp32 (r × r products)."""
    layers = adalora_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"orthogonal_regularization: the model has no AdaLoRA layer with adapter {adapter_name!r}")
    terms = []
    device = layers[0][1].lora_A[adapter_name].device
    with torch.autocast(device.type, enabled=False):  # the r × r Gram matrices stay fp32 under bf16 autocast
        for _, layer in layers:
            q = layer.lora_A[adapter_name].float()
            p = layer.lora_B[adapter_name].float()
            for gram in (q @ q.t(), p.t() @ p):
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                terms.append(torch.linalg.matrix_norm(gram - eye))
    return torch.stack(terms).mean()
