"""LoRA on top of a frozen base linear layer, with PEFT's attribute and state-dict names."""
from __future__ import annotations

import math
from typing import Iterable, Union

import torch
from torch import nn

from qlora.functional import LoRAAdapterArgs, lora_delta, nf4_lora_linear
from qlora.nn.linear4bit import Linear4bit


class LoRALinear(nn.Module):
    """y = W0·x + b + Σ_{a active} s_a · B_a(A_a(dropout_a(x))).

    ``base_layer`` is a :class:`Linear4bit` (the QLoRA case) or a dense ``nn.Linear``. Each adapter
    has ``lora_A[name]`` (nn.Linear in→r, Kaiming-uniform init as in PEFT/the LoRA paper) and
    ``lora_B[name]`` (nn.Linear r→out, zero init, so training starts from W0 exactly);
    s = α/r, or α/√r with rsLoRA (Kalajdzievski 2023). Names match PEFT's LoraLayer, so
    ``lora_A.default.weight`` etc. map one to one onto PEFT's saved keys.
    """

    def __init__(self, base_layer: Union[Linear4bit, nn.Linear], r: int = 16, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, adapter_name: str = "default", use_rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> None:
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r} (adapter {name!r})")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r} (adapter {name!r})")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        device = self._base_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.use_rslora[name] = use_rslora
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.reset_adapter(name)
        self.active_adapters.append(name)

    def reset_adapter(self, name: str) -> None:
        """A ~ Kaiming-uniform(a=√5) (nn.Linear's default, as PEFT uses), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def set_adapter(self, names: Union[str, Iterable[str]]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; this layer has {list(self.lora_A)}")
        self.active_adapters = names

    def _base_device(self) -> torch.device:
        return self.base_layer.weight.device

    def _adapter_args(self) -> list[LoRAAdapterArgs]:
        if self.disable_adapters:
            return []
        return [
            LoRAAdapterArgs(self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n],
                            getattr(self.lora_dropout[n], "p", 0.0))
            for n in self.active_adapters
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
        """s · B·A in fp32, [out, in]: what merging this adapter adds to W0."""
        return self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())

    def extra_repr(self) -> str:
        return f"adapters={ {n: self.r[n] for n in self.lora_A} }, active={self.active_adapters}"
