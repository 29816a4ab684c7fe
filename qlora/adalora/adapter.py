"""Save and load AdaLoRA adapters in PEFT's AdaLoRA format (peft_type "ADALORA").

Key mapping: our ``<module>.lora_A.<adapter>`` (Q), ``lora_E`` (λ) and ``lora_B`` (P) are PEFT's
``base_model.model.<module>.lora_A`` / ``lora_E`` / ``lora_B`` (no ``.weight``: they are bare
parameters; no adapter name; ``ranknum`` is not stored, it is ``init_r``). The tensors hold only
the triplets the rank pattern keeps; ``rank_pattern`` in the config, ``{"<module>.lora_E":
[bool] * init_r}``, says which, and a loader builds each layer at ``init_r`` and prunes it to the
pattern before copying the tensors in (as PEFT does).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from qlora.adalora.allocator import RankAllocator
from qlora.adalora.ranks import prune_to_rank_pattern
from qlora.model.peft_files import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, check_config, check_weights, fill_adapter,
                                    read_config, read_weights, target_layers)
from qlora.util.atomic import write_atomic
from qlora.model.inject import LoRAReport, add_adalora, trainable_parameters
from qlora.adalora.layer import adalora_layers

_FACTORS = ("lora_A", "lora_E", "lora_B")


def _adalora_config(model: nn.Module, adapter_name: str) -> dict:
    config = model.__dict__.get("qlora_adapter_configs", {}).get(adapter_name)
    if config is None or config.get("peft_type") != "ADALORA":
        raise KeyError(f"the model has no AdaLoRA adapter {adapter_name!r} added by add_adalora/load_adalora_adapter")
    return config


def _kept_triplets(model: nn.Module, rank_pattern: dict[str, list[bool]], adapter_name: str,
                   init_r: int) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor holding only the kept triplets. A layer may still be at ``init_r`` (its
    masked triplets are dropped here) or already pruned to the pattern (written as it is)."""
    state = {}
    for name, layer in adalora_layers(model, adapter_name):
        key = f"{name}.lora_E"
        if key not in rank_pattern:
            raise ValueError(f"rank_pattern has no entry {key!r} for AdaLoRA layer {name}")
        keep = torch.tensor(rank_pattern[key], dtype=torch.bool)
        r = layer.r[adapter_name]
        if keep.numel() != init_r or r not in (init_r, int(keep.sum())):
            raise ValueError(f"rank_pattern[{key!r}] has {keep.numel()} entries ({int(keep.sum())} kept), "
                             f"but {name} has rank {r} and init_r is {init_r}")
        a, e, b = (getattr(layer, f)[adapter_name].detach().cpu() for f in _FACTORS)
        if r == init_r:
            a, e, b = a[keep], e[keep], b[:, keep]
        state.update({f"{PREFIX}{name}.lora_A": a.contiguous(), f"{PREFIX}{name}.lora_E": e.contiguous(),
                      f"{PREFIX}{name}.lora_B": b.contiguous()})
    return state


def save_adalora_adapter(model: nn.Module, dir: Union[str, os.PathLike], allocator: RankAllocator,
                         orth_reg_weight: float = 0.5, adapter_name: Optional[str] = None) -> None:
    """Write the AdaLoRA adapter to ``dir`` as PEFT does (``peft.PeftModel.from_pretrained`` loads it
    onto the dense base model), with the schedule and rank pattern of ``allocator`` (the one that
    trained it; call ``allocator.finish(model)`` first for the final pattern). The layers may be
    pruned to the pattern already or still at ``init_r``. Each file is written atomically, the
    weights first, so a directory with a config always has the weights that belong to it."""
    from safetensors.torch import save

    adapter_name = allocator.adapter_name if adapter_name is None else adapter_name
    c = _adalora_config(model, adapter_name)
    rank_pattern = allocator.rank_pattern
    if rank_pattern is None:  # saved before the first masking step: every triplet is kept
        rank_pattern = {f"{name}.lora_E": [True] * c["init_r"] for name in allocator.initial_ranks}
    state = _kept_triplets(model, rank_pattern, adapter_name, c["init_r"])
    hf_config = getattr(model, "config", None)
    config = {
        "peft_type": "ADALORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(hf_config, "_name_or_path", None) or None,
        "init_r": c["init_r"],
        "target_r": allocator.target_r,
        "tinit": allocator.tinit,
        "tfinal": allocator.tfinal,
        "deltaT": allocator.deltaT,
        "beta1": allocator.beta1,
        "beta2": allocator.beta2,
        "orth_reg_weight": orth_reg_weight,
        "total_step": allocator.total_step,
        "lora_alpha": c["lora_alpha"],
        "lora_dropout": c["lora_dropout"],
        "target_modules": c["target_modules"],
        "rank_pattern": rank_pattern,
        "fan_in_fan_out": c["fan_in_fan_out"],
        "bias": "none",
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    path = Path(dir)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / WEIGHTS_NAME, lambda f: f.write(save(state, metadata={"format": "pt"})))
    write_atomic(path / CONFIG_NAME, lambda f: f.write(json.dumps(config, indent=2, sort_keys=True).encode()))


def _final_ranks(path: Path, config: dict, layers: list[str]) -> dict[str, int]:
    """Layer -> rank after pruning to the config's rank pattern (``init_r`` where it has no entry)."""
    file = path / CONFIG_NAME
    init_r = config["init_r"]
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise ValueError(f"{file}: rank_pattern must be an object of bool lists, got {type(pattern).__name__}")
    ranks = {name: init_r for name in layers}
    for key, mask in pattern.items():
        name = key.removesuffix(".lora_E")
        if name == key or name not in ranks:
            raise ValueError(f"{file}: rank_pattern key {key!r} is not '<adapted layer>.lora_E' for a layer "
                             f"target_modules selects")
        if not isinstance(mask, list) or len(mask) != init_r or not all(isinstance(v, bool) for v in mask):
            raise ValueError(f"{file}: rank_pattern[{key!r}] must be a list of {init_r} (init_r) bools")
        ranks[name] = sum(mask)
    return ranks


def load_adalora_adapter(model: nn.Module, dir: Union[str, os.PathLike], adapter_name: str = "default",
                         trainable: bool = False) -> LoRAReport:
    """Load the PEFT AdaLoRA adapter in ``dir`` onto ``model`` as ``adapter_name``.

    Only ``adapter_model.safetensors`` is read. Before the model is touched, the rank pattern and
    every tensor's key and shape are checked against the layers ``target_modules`` selects; the
    error names the first key that does not fit (or is missing). Each layer is built at ``init_r``,
    pruned to the rank pattern, and filled. With ``trainable=False`` the adapter is frozen; other
    parameters keep their flags.
    """
    path = Path(dir)
    config = read_config(path)
    check_config(path, config, "ADALORA", ("init_r", "lora_alpha", "target_modules"))
    weights = read_weights(path)
    layers = target_layers(model, path, config)
    ranks = _final_ranks(path, config, layers)
    expected = {}
    for name in layers:
        base = model.get_submodule(name)
        d_in, d_out = (base.in_features, base.out_features) if hasattr(base, "in_features") else base.weight.shape
        r = ranks[name]
        expected.update({f"{PREFIX}{name}.lora_A": (r, d_in), f"{PREFIX}{name}.lora_E": (r, 1),
                         f"{PREFIX}{name}.lora_B": (d_out, r)})
    check_weights(path / WEIGHTS_NAME, weights, expected, config["target_modules"])

    trainable_before = [(p, p.requires_grad) for p in model.parameters()]  # add_adalora freezes them
    report = add_adalora(model, init_r=config["init_r"], alpha=config["lora_alpha"],
                         dropout=config.get("lora_dropout", 0.0), target_modules=layers, adapter_name=adapter_name)
    prune_to_rank_pattern(model, config.get("rank_pattern") or {}, adapter_name)
    own = {f"{PREFIX}{name}.{f}": getattr(layer, f)[adapter_name]
           for name, layer in adalora_layers(model, adapter_name) for f in _FACTORS}
    fill_adapter(own, weights, trainable_before, trainable)
    return LoRAReport(adapter_name, report.layers, trainable_parameters(model))
