"""Save and load LoRA adapters in PEFT's file format (adapter_config.json + adapter_model.safetensors).

Key mapping: our ``<module>.lora_A.<adapter>.weight`` is PEFT's
``base_model.model.<module>.lora_A.weight`` (the adapter name is not stored); a DoRA magnitude is
``base_model.model.<module>.lora_magnitude_vector``; a ``modules_to_save`` copy is
``base_model.model.<module>.<param>``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
from torch import nn

from qlora.model.inject import (LoRAReport, add_lora, all_lora_layers, expert_lora_layers, modules_to_save_names,
                                pattern_value, peft_nesting)
from qlora.nn.experts import ExpertLinears4bit, LoRAExpertLinears, is_router
from qlora.model.peft_files import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, check_config, check_weights, fill_adapter,
                                    read_config, read_weights, target_layers)
from qlora.util.atomic import write_atomic
from qlora.nn.dora import DoRALinear
from qlora.nn.linear4bit import Linear4bit
from qlora.nn.modules_to_save import ModulesToSaveWrapper

_INIT_TO_PEFT = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name`` under PEFT's key names, on the CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in _parameters_by_peft_key(model, adapter_name).items()}


def _peft_config(model: nn.Module, adapter_name: str) -> dict:
    configs = model.__dict__.get("qlora_adapter_configs", {})
    if adapter_name not in configs:
        raise KeyError(f"the model has no adapter {adapter_name!r} added by add_lora/load_adapter "
                       f"(it has {sorted(configs)})")
    c = configs[adapter_name]
    if c.get("peft_type") == "ADALORA":
        raise ValueError(f"adapter {adapter_name!r} is an AdaLoRA adapter: save it with "
                         "qlora.save_adalora_adapter(model, dir, allocator), which writes its rank pattern")
    config = getattr(model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "r": c["r"],
        "lora_alpha": c["lora_alpha"],
        "lora_dropout": c["lora_dropout"],
        "target_modules": c["target_modules"] or (None if c.get("target_parameters") else []),
        "target_parameters": c.get("target_parameters") or None,
        "use_rslora": c["use_rslora"],
        "use_dora": c["use_dora"],
        "init_lora_weights": _INIT_TO_PEFT[c["init"]],
        "rank_pattern": c["rank_pattern"],
        "alpha_pattern": c["alpha_pattern"],
        "modules_to_save": c["modules_to_save"],
        "fan_in_fan_out": c["fan_in_fan_out"],
        "bias": "none",
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def save_adapter(model: nn.Module, dir: Union[str, os.PathLike], adapter_name: str = "default") -> None:
    """Write adapter ``adapter_name`` to ``dir`` as PEFT does; ``peft.PeftModel.from_pretrained``
    loads it onto the dense base model. Each file is written atomically; the weights go first, so
    a directory with a config always has the weights that belong to it."""
    from safetensors.torch import save

    config = _peft_config(model, adapter_name)
    state = adapter_state_dict(model, adapter_name)
    path = Path(dir)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / WEIGHTS_NAME, lambda f: f.write(save(state, metadata={"format": "pt"})))
    write_atomic(path / CONFIG_NAME, lambda f: f.write(json.dumps(config, indent=2, sort_keys=True).encode()))


def _expected_shapes(model: nn.Module, config: dict, layers: list[str]) -> dict[str, tuple]:
    """Key -> shape for everything an adapter with ``config`` has on ``layers`` of ``model``."""
    shapes: dict[str, tuple] = {}
    experts = [n for n in layers if isinstance(model.get_submodule(n), (ExpertLinears4bit, LoRAExpertLinears))]
    for name in layers:
        module = model.get_submodule(name)
        base = module.base_layer if hasattr(module, "base_layer") else module
        d_in, d_out = (base.weight.shape[1], base.weight.shape[0]) if is_router(base) else _features(base)
        r = pattern_value(name, config.get("rank_pattern"), config["r"])
        if name in experts:  # PEFT's ParamWrapper: A [r·E, in], B [out, r·E]
            key = f"{PREFIX}{name.rpartition('.')[0]}.{peft_nesting(model, name, experts)}"
            shapes[f"{key}lora_A.weight"] = (r * base.num_experts, d_in)
            shapes[f"{key}lora_B.weight"] = (d_out, r * base.num_experts)
            continue
        shapes[f"{PREFIX}{name}.lora_A.weight"] = (r, d_in)
        shapes[f"{PREFIX}{name}.lora_B.weight"] = (d_out, r)
        if config.get("use_dora"):
            shapes[f"{PREFIX}{name}.lora_magnitude_vector"] = (d_out,)
    return shapes


def _features(layer: nn.Module) -> tuple[int, int]:
    if hasattr(layer, "in_features"):
        return layer.in_features, layer.out_features
    return tuple(layer.weight.shape)  # GPT-2 Conv1D: weight [in, out]


def _modules_to_save_shapes(model: nn.Module, config: dict) -> dict[str, tuple]:
    shapes = {}
    for target in config.get("modules_to_save") or ():
        for name in modules_to_save_names(model, target):
            module = model.get_submodule(name)
            source = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            if isinstance(source, Linear4bit):  # trained as a dense copy (see ModulesToSaveWrapper)
                own = {"weight": (source.out_features, source.in_features)}
                if source.bias is not None:
                    own["bias"] = (source.out_features,)
            else:
                own = {key: tuple(value.shape) for key, value in source.state_dict().items()}
            shapes.update({f"{PREFIX}{name}.{key}": shape for key, shape in own.items()})
    return shapes


def load_adapter(model: nn.Module, dir: Union[str, os.PathLike], adapter_name: str = "default",
                 trainable: bool = False) -> LoRAReport:
    """Load the PEFT LoRA adapter in ``dir`` onto ``model`` as ``adapter_name`` and make it active
    (an AdaLoRA adapter goes to :func:`qlora.adalora.adapter.load_adalora_adapter`).

    Only ``adapter_model.safetensors`` is read. Before the model is touched, every tensor's key and
    shape is checked against the layers the config's ``target_modules`` select; the first key that
    does not fit (or is missing) is named in the error. With ``trainable=False`` the adapter is
    frozen (inference); otherwise its tensors get gradients. Other parameters keep their flags.
    """
    path = Path(dir)
    config = read_config(path)
    if config.get("peft_type") == "ADALORA":
        from qlora.adalora.adapter import load_adalora_adapter

        return load_adalora_adapter(model, path, adapter_name, trainable)
    check_config(path, config, "LORA", ("r", "lora_alpha", "target_modules"))
    weights = read_weights(path)
    layers = target_layers(model, path, config)
    expected = _expected_shapes(model, config, layers)
    expected.update(_modules_to_save_shapes(model, config))
    check_weights(path / WEIGHTS_NAME, weights, expected, config["target_modules"])

    init = "pissa" if config.get("init_lora_weights") == "pissa" else "default"
    trainable_before = [(p, p.requires_grad) for p in model.parameters()]  # add_lora freezes them
    report = add_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                      target_modules=layers, use_rslora=config.get("use_rslora", False),
                      use_dora=config.get("use_dora", False), init=init, rank_pattern=config.get("rank_pattern"),
                      alpha_pattern=config.get("alpha_pattern"), modules_to_save=config.get("modules_to_save"),
                      adapter_name=adapter_name)
    fill_adapter(_parameters_by_peft_key(model, adapter_name), weights, trainable_before, trainable)
    return report


def _parameters_by_peft_key(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    params: dict[str, torch.Tensor] = {}
    for name, layer in all_lora_layers(model):
        if adapter_name not in layer.lora_A or isinstance(layer, LoRAExpertLinears):
            continue
        params[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        params[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if isinstance(layer, DoRALinear):
            params[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
    experts = [(name, layer) for name, layer in expert_lora_layers(model) if adapter_name in layer.lora_A]
    for name, layer in experts:  # PEFT's key: the experts module, inside its nested ParamWrappers
        key = f"{PREFIX}{name.rpartition('.')[0]}.{peft_nesting(model, name, [n for n, _ in experts])}"
        params[f"{key}lora_A.weight"] = layer.lora_A[adapter_name].weight
        params[f"{key}lora_B.weight"] = layer.lora_B[adapter_name].weight
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, value in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                params[f"{PREFIX}{name}.{key}"] = value
    return params
