"""LoRA on top of a frozen base linear layer, with PEFT's attribute and state-dict names."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch
from torch import nn

from qlora.ops.functional import LoRAAdapterArgs, lora_delta, nf4_lora_linear
from qlora.quant.nf4 import quantize
from qlora.nn.linear4bit import Linear4bit

LORA_INITS = ("default", "gaussian", "pissa")


def check_adapter_name(name: str) -> None:
    """Adapter names become ModuleDict keys, i.e. attribute names: no dots, no clash with methods."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):
        raise ValueError(f"invalid adapter name {name!r}: it must be a non-empty string without '.' "
                         "that is not an attribute of nn.ModuleDict (such as 'train' or 'keys')")


class LoRAAdapters(nn.Module):
    """The per-adapter state PEFT's LoraLayer keeps, shared by :class:`LoRALinear` and
    :class:`qlora.nn.experts.LoRAExpertLinears`: the ``lora_A`` / ``lora_B`` module dicts, each
    adapter's r, alpha, scaling s = α/r (α/√r with rsLoRA) and init, which adapters are active,
    merged or switched off, and selecting and deleting adapters by name."""

    def __init__(self):
        super().__init__()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.init: dict[str, str] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    def _check_new_adapter(self, name: str, r: int) -> None:
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r} (adapter {name!r})")
        check_adapter_name(name)
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self.merged_adapters:
            raise RuntimeError(f"cannot add adapter {name!r} while {self.merged_adapters} are merged; unmerge first")

    def _init_factors(self, name: str) -> None:
        """PEFT's ``init_lora_weights`` for "default" (A ~ Kaiming-uniform(a=√5), nn.Linear's own
        init, as PEFT uses) and "gaussian" (A ~ N(0, 1/r²)); B = 0, so the adapter starts at 0."""
        if self.init[name] == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)

    def _record_adapter(self, name: str, r: int, lora_alpha: float, use_rslora: bool, init: str) -> None:
        """Note a new adapter (its lora_A / lora_B already in place) and make it active."""
        self.r[name], self.lora_alpha[name], self.use_rslora[name], self.init[name] = r, lora_alpha, use_rslora, init
        self.scaling[name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (and everything kept under that name, e.g. a DoRA magnitude)."""
        if name not in self.lora_A:
            raise KeyError(f"unknown adapter {name!r}; this layer has {list(self.lora_A)}")
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge first")
        for module in self._modules.values():
            if isinstance(module, nn.ModuleDict) and name in module:
                del module[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.init):
            table.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_adapter(self, names: Union[str, Iterable[str]]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        if self.merged_adapters:
            raise RuntimeError(f"adapters {self.merged_adapters} are merged; unmerge before set_adapter")
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; this layer has {list(self.lora_A)}")
        self.active_adapters = names

    def _check_merge(self, names: list[str]) -> None:
        if self.merged_adapters:
            raise RuntimeError(f"adapters {self.merged_adapters} are already merged; unmerge first")
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; this layer has {list(self.lora_A)}")

    def _mark_merged(self, names: list[str]) -> None:
        # The merged adapters now act through the base weight; the forward must not add them again.
        self.merged_adapters = names
        self.active_before_merge = self.active_adapters
        self.active_adapters = [n for n in self.active_adapters if n not in names]

    def _mark_unmerged(self) -> None:
        self.active_adapters = self.active_before_merge
        del self.active_before_merge
        self.merged_adapters = []

    def extra_repr(self) -> str:
        return f"adapters={ {n: self.r[n] for n in self.lora_A} }, active={self.active_adapters}"


class LoRALinear(LoRAAdapters):
    """y = W0·x + b + Σ_{a active} s_a · B_a(A_a(dropout_a(x))).

    ``base_layer`` is a :class:`Linear4bit` (the QLoRA case) or a dense ``nn.Linear``. Each adapter
    has ``lora_A[name]`` (nn.Linear in→r, Kaiming-uniform init as in PEFT/the LoRA paper) and
    ``lora_B[name]`` (nn.Linear r→out, zero init, so training starts from W0 exactly);
    s = α/r, or α/√r with rsLoRA (Kalajdzievski 2023). Names match PEFT's LoraLayer, so
    ``lora_A.default.weight`` etc. map one to one onto PEFT's saved keys.
    """

    def __init__(self, base_layer: Union[Linear4bit, nn.Linear], r: int = 16, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, adapter_name: str = "default", use_rslora: bool = False,
                 init: str = "default"):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora_dropout = nn.ModuleDict()
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init)

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "default") -> None:
        self._check_new_adapter(name, r)
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r} (adapter {name!r})")
        if init not in LORA_INITS:
            raise ValueError(f"init must be one of {LORA_INITS}, got {init!r} (adapter {name!r})")
        if init == "pissa" and r > min(self.in_features, self.out_features):
            raise ValueError(f"pissa init needs r <= min(in, out) = {min(self.in_features, self.out_features)}, "
                             f"got r={r} (adapter {name!r})")
        device = self._base_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._record_adapter(name, r, lora_alpha, use_rslora, init)
        self.reset_adapter(name)

    def reset_adapter(self, name: str) -> None:
        """Initialise adapter ``name`` as ``self.init[name]`` says (PEFT's ``init_lora_weights``):

        * ``"default"``: A ~ Kaiming-uniform(a=√5) (nn.Linear's default, as PEFT uses), B = 0;
        * ``"gaussian"``: A ~ N(0, 1/r²) (PEFT's choice of std 1/r), B = 0;
        * ``"pissa"``: B·A = the top-r singular part of W0 divided by s (Meng et al. 2024), and W0
          replaced by the residual W0 − s·B·A, so the layer's output is unchanged. An NF4 W0 is
          dequantized for the SVD and the residual re-quantized (the QPiSSA recipe: the residual
          quantizes with a smaller error than W0, as its largest directions are gone).
        """
        if self.init.get(name, "default") == "pissa":
            self._pissa_init(name)
        else:
            self._init_factors(name)

    @torch.no_grad()
    def _pissa_init(self, name: str) -> None:
        r, s = self.r[name], self.scaling[name]
        w0 = self._base_weight_fp32()
        u, sigma, vh = torch.linalg.svd(w0, full_matrices=False)
        root = (sigma[:r] / s).sqrt()
        a = root[:, None] * vh[:r]
        b = u[:, :r] * root[None, :]
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)
        self._set_base_weight(w0 - s * (b @ a))

    def _base_weight_fp32(self) -> torch.Tensor:
        if isinstance(self.base_layer, Linear4bit):
            return self.base_layer.weight.dequantize(torch.float32)
        return self.base_layer.weight.float()

    def _set_base_weight(self, w: torch.Tensor) -> None:
        if isinstance(self.base_layer, Linear4bit):
            old = self.base_layer.weight
            self.base_layer.weight = quantize(w.to(old.dtype), old.blocksize, old.double_quant)
        else:
            self.base_layer.weight.data.copy_(w)

    @torch.no_grad()
    def merge(self, names: Iterable[str], dtype: Optional[torch.dtype] = None) -> None:
        """Fold adapters ``names`` into a dense base: W = W0 + Σ s·B·A formed in fp32 and stored in
        ``dtype`` (default: the dtype W0 dequantizes to). The NF4 (or dense) W0 is kept aside
        untouched, so :meth:`unmerge` restores it exactly rather than subtracting in 16 bits."""
        names = list(names)
        self._check_merge(names)
        w = self._base_weight_fp32()
        for name in names:
            w = w + self.delta_weight(name)  # never in place: w may be the base weight itself
        dtype = dtype or self.base_layer.weight.dtype
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base_layer.bias is not None,
                           device=w.device, dtype=dtype)
        merged.weight.copy_(w)
        merged.weight.requires_grad_(False)
        if merged.bias is not None:
            merged.bias.copy_(self.base_layer.bias)
            merged.bias.requires_grad_(False)
        self.unmerged_base = self.base_layer
        self.base_layer = merged
        self._mark_merged(names)

    def unmerge(self) -> None:
        """Undo :meth:`merge`: the original W0 comes back bit for bit."""
        if not self.merged_adapters:
            return
        self.base_layer = self.unmerged_base
        del self.unmerged_base
        self._mark_unmerged()

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
            return nf4_lora_linear(x, self.base_layer.nf4, self.base_layer.bias, adapters, self.training)
        y = self.base_layer(x)
        for adapter in adapters:
            y = y + lora_delta(x, adapter, self.training)
        return y

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B·A in fp32, [out, in]: what merging this adapter adds to W0."""
        return self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())
