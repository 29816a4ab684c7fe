"""Several named adapters on one model: choose the active ones, switch them off, delete, combine."""
from __future__ import annotations

import contextlib
import re
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from qlora.model.inject import adaptable_layers, all_lora_layers, lora_layers, peft_target_modules
from qlora.adalora.layer import AdaLoRALinear
from qlora.nn.dora import DoRALinear
from qlora.nn.lora import LoRAAdapters
from qlora.nn.lora import LoRALinear, check_adapter_name
from qlora.nn.modules_to_save import ModulesToSaveWrapper

COMBINE_METHODS = ("linear", "cat", "svd")


def _wrappers(model: nn.Module) -> list[tuple[str, ModulesToSaveWrapper]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def _adapter_layers(model: nn.Module) -> list[tuple[str, Union[LoRAAdapters, AdaLoRALinear]]]:
    """LoRA (and DoRA, and on MoE experts and routers) and AdaLoRA layers: what selecting,
    disabling and deleting adapters acts on."""
    return [(n, m) for n, m in adaptable_layers(model) if isinstance(m, (LoRAAdapters, AdaLoRALinear))]


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name on the model, in the order first seen."""
    names = [n for _, layer in _adapter_layers(model) for n in layer.lora_A]
    names += [n for _, w in _wrappers(model) for n in w.modules_to_save]
    return list(dict.fromkeys(names))


def _check_known(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; the model has {known}")


def set_adapter(model: nn.Module, names: Union[str, Iterable[str]]) -> None:
    """Make ``names`` (one or several) the active adapters everywhere; a layer without one of them
    runs those it has. Gradients are left as they are."""
    names = [names] if isinstance(names, str) else list(names)
    _check_known(model, names)
    for _, layer in _adapter_layers(model):
        layer.set_adapter([n for n in names if n in layer.lora_A])
    for _, wrapper in _wrappers(model):
        wrapper.set_adapter([n for n in names if n in wrapper.modules_to_save])


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapters(model):`` runs the base model alone; the previous state comes back
    on exit, also after an exception."""
    layers = [layer for _, layer in _adapter_layers(model)] + [w for _, w in _wrappers(model)]
    merged = [n for n, layer in all_lora_layers(model) if layer.merged_adapters]
    if merged:
        raise RuntimeError(f"adapters are merged into {merged[0]} (and {len(merged) - 1} more layers); "
                           "unmerge before disabling them")
    before = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.disable_adapters = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.disable_adapters = flag


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; a layer left without adapters becomes its base layer again."""
    _check_known(model, [name])
    for layer_name, layer in _adapter_layers(model):
        if name in layer.lora_A:
            layer.delete_adapter(name)
            if not layer.lora_A:
                _set_module(model, layer_name, layer.base_layer)
    for wrapper_name, wrapper in _wrappers(model):
        wrapper.delete_adapter(name)
        if not wrapper.modules_to_save:
            _set_module(model, wrapper_name, wrapper.original_module)
    model.__dict__.get("qlora_adapter_configs", {}).pop(name, None)


def _factors(layer: LoRALinear, names: Sequence[str], weights: Sequence[float], method: str,
             rank: Optional[int], layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combined adapter on one layer, with scaling 1: B·A = the combination."""
    present = [(n, w) for n, w in zip(names, weights) if n in layer.lora_A]
    As = [layer.lora_A[n].weight.detach().float() for n, _ in present]
    Bs = [w * layer.scaling[n] * layer.lora_B[n].weight.detach().float() for n, w in present]
    if method == "cat":
        return torch.cat(As, dim=0), torch.cat(Bs, dim=1)
    if method == "linear":
        if any(not torch.equal(a, As[0]) for a in As[1:]):
            raise ValueError(f"{layer_name}: method='linear' needs adapters that share lora_A (then the weighted "
                             "sum of B is exact); these differ, use method='cat' (exact, ranks add up) or 'svd'")
        return As[0], sum(Bs)
    delta = sum(b @ a for a, b in zip(As, Bs))
    k = rank or max(a.shape[0] for a in As)
    if k > min(delta.shape):
        raise ValueError(f"{layer_name}: rank {k} exceeds min(out, in) = {min(delta.shape)}")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root[None, :]


def combine_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float], method: str = "linear",
                     rank: Optional[int] = None, adapter_name: str = "combined") -> list[str]:
    """Add adapter ``adapter_name`` whose delta on each layer is Σ_i weights[i]·ΔW_i (ΔW_i = s_i·B_i·A_i,
    zero where adapter i is absent), built from the factors:

    * ``"cat"``: A and B stacked (rank Σ r_i), exact;
    * ``"linear"``: for adapters that share lora_A (e.g. trained from one initialisation with A
      frozen): A kept, the B's summed with their weights — exact at the common rank. (PEFT's
      "linear" mixes A's and B's separately, which adds cross terms B_i·A_j; we refuse instead.)
    * ``"svd"``: the best rank-``rank`` approximation (Eckart–Young) of the weighted sum,
      default rank the largest r_i.

    The new adapter has scaling 1 (alpha = its rank) and is not activated. DoRA adapters cannot be
    combined this way (their delta depends on W0 nonlinearly), nor AdaLoRA ones (their layers hold
    no LoRA adapters to add it to), nor adapters on MoE experts and routers. Returns the layers it was added to.
    """
    names, weights = list(names), [float(w) for w in weights]
    if method not in COMBINE_METHODS:
        raise ValueError(f"method must be one of {COMBINE_METHODS}, got {method!r}")
    if not names or len(names) != len(weights):
        raise ValueError(f"need one weight per adapter, got {len(names)} names and {len(weights)} weights")
    if rank is not None and method != "svd":
        raise ValueError("rank applies to method='svd' only")
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    _check_known(model, names)
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    adalora = [n for n, layer in _adapter_layers(model)
               if isinstance(layer, AdaLoRALinear) and any(a in layer.lora_A for a in names)]
    if adalora:
        raise ValueError(f"{adalora[0]}: AdaLoRA adapters cannot be combined")
    moe = [n for n, layer in all_lora_layers(model)
           if not isinstance(layer, LoRALinear) and any(a in layer.lora_A for a in names)]
    if moe:
        raise ValueError(f"{moe[0]}: adapters on MoE experts and routers cannot be combined")
    layers = [(n, layer) for n, layer in lora_layers(model) if any(a in layer.lora_A for a in names)]
    dora = [n for n, layer in layers if isinstance(layer, DoRALinear)]
    if dora:
        raise ValueError(f"{dora[0]}: DoRA adapters cannot be combined")
    factors = {n: _factors(layer, names, weights, method, rank, n) for n, layer in layers}  # all checks first
    ranks = {}
    for n, layer in layers:
        a, b = factors[n]
        r = a.shape[0]
        active = list(layer.active_adapters)
        layer.add_adapter(adapter_name, r, r)
        layer.set_adapter(active)
        with torch.no_grad():
            layer.lora_A[adapter_name].weight.copy_(a)
            layer.lora_B[adapter_name].weight.copy_(b)
        layer.lora_A[adapter_name].weight.requires_grad_(False)
        layer.lora_B[adapter_name].weight.requires_grad_(False)
        ranks[n] = r
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(n): r for n, r in ranks.items() if r != common}
    model.__dict__.setdefault("qlora_adapter_configs", {})[adapter_name] = {
        "r": common, "lora_alpha": common, "lora_dropout": 0.0,
        "target_modules": peft_target_modules(model, list(ranks)), "use_rslora": False, "use_dora": False,
        "init": "default", "rank_pattern": pattern, "alpha_pattern": dict(pattern), "modules_to_save": None,
        "fan_in_fan_out": any(getattr(model.get_submodule(n).base_layer, "fan_in_fan_out", False) for n in ranks),
    }
    return list(ranks)
