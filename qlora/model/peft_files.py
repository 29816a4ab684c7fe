"""PEFT's adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``, read and
checked against a model, shared by the LoRA (``qlora.model.adapters``) and AdaLoRA
(``qlora.adalora.adapter``) loaders. Every error names the file and the key."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from qlora.model.inject import (adaptable_layers, is_parameter_layer, matches_target, peft_parameter_key,
                                resolve_targets)
from qlora.util.files import load_safetensors, read_text

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def read_config(path: Path) -> dict:
    """The parsed ``adapter_config.json`` of adapter directory ``path``, unchecked."""
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    try:
        return json.loads(read_text(file))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: line {err.lineno}: not valid JSON ({err.msg})") from err


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_names(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# What the loaders read from a config, and what each value must be (null means PEFT's default)
_VALUE_CHECKS = {
    "r": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "init_r": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "target_r": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "lora_alpha": ("a finite number", _is_number),
    "lora_dropout": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "target_modules": ("a module name or a list of names", lambda v: isinstance(v, str) or _is_names(v)),
    "exclude_modules": ("a module name or a list of names", lambda v: isinstance(v, str) or _is_names(v)),
    "modules_to_save": ("a list of module names", _is_names),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "rank_pattern": ("an object", lambda v: isinstance(v, dict)),
    "alpha_pattern": ("an object", lambda v: isinstance(v, dict)),
}


def check_config(path: Path, config: dict, peft_type: str, required: tuple[str, ...]) -> None:
    """Refuse a config that is not a JSON object, of another ``peft_type``, without a
    ``required`` key, with a value of the wrong type (``"r": "8"``), or using a PEFT feature this
    package does not implement; the error names the file and the key."""
    file = path / CONFIG_NAME
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != peft_type:
        raise ValueError(f"{file}: peft_type is {config.get('peft_type')!r}; expected {peft_type!r}")
    for key in required:
        if config.get(key) is None and not (key == "target_modules" and config.get("target_parameters")):
            raise ValueError(f"{file}: missing key {key!r}")
    for key, (expected, valid) in _VALUE_CHECKS.items():
        if config.get(key) is not None and not valid(config[key]):
            raise ValueError(f"{file}: {key} must be {expected}, got {config[key]!r}")
    unsupported = {"bias": "none", "lora_bias": False, "layers_to_transform": None,
                   "use_qalora": False, "trainable_token_indices": None, "layer_replication": None}
    if peft_type != "LORA":
        unsupported["target_parameters"] = None
    for key, default in unsupported.items():
        if config.get(key, default) not in (default, [], {}):
            raise ValueError(f"{file}: {key}={config[key]!r} is not supported (only {default!r})")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_NAME
    if not file.is_file():
        others = sorted(p.name for p in path.iterdir() if p.name.startswith("adapter_model"))
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}" + (
            f"; found {', '.join(others)}, but only safetensors files are read (a .bin is a pickle, "
            f"which can run code when loaded)" if others else ""))
    return load_safetensors(file)


def target_layers(model: nn.Module, path: Path, config: dict) -> list[str]:
    """The layers of ``model`` that the config's ``target_modules`` select (linear layers, as in
    PEFT: ``all-linear`` leaves MoE experts and routers alone) and its ``target_parameters`` (fused
    MoE expert weights and router weights by PEFT's ``<module>.<parameter>`` key or a dotted end of
    it), less ``exclude_modules``."""
    layers = []
    if config.get("target_modules"):
        try:
            layers += resolve_targets(model, config["target_modules"], parameters=False)
        except ValueError as err:
            raise ValueError(f"{path / CONFIG_NAME}: target_modules do not fit the model: {err}") from err
    keys = {peft_parameter_key(model, n): n for n, m in adaptable_layers(model) if is_parameter_layer(m)}
    for entry in config.get("target_parameters") or []:
        hits = [n for key, n in keys.items() if matches_target(key, entry)]
        if not hits:
            raise ValueError(f"{path / CONFIG_NAME}: target_parameters entry {entry!r} matches no MoE expert or "
                             f"router weight of the model (those are e.g. {sorted(keys)[:4]})")
        layers += [n for n in hits if n not in layers]
    excluded = config.get("exclude_modules") or []
    excluded = [excluded] if isinstance(excluded, str) else excluded
    return [n for n in layers if not any(matches_target(n, e) for e in excluded)]


def check_weights(file: Path, weights: dict[str, torch.Tensor], expected: dict[str, tuple],
                  target_modules) -> None:
    """Every tensor's key and shape must be in ``expected`` and every expected key present; the
    error names the first key that is not."""
    for key, tensor in weights.items():
        if key not in expected:
            raise ValueError(f"{file}: key {key!r} has no matching layer in the model "
                             f"(target_modules={target_modules!r})")
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(f"{file}: key {key!r} has shape {tuple(tensor.shape)}, the model needs {expected[key]}")
    for key in expected:
        if key not in weights:
            raise ValueError(f"{file}: missing key {key!r} for a layer selected by target_modules")


def fill_adapter(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                 trainable_before: list[tuple[torch.Tensor, bool]], trainable: bool) -> None:
    """Copy checked ``weights`` into a just-added adapter's parameters ``own`` (both by PEFT key),
    give every other parameter back the flag it had in ``trainable_before`` (adding an adapter
    freezes them) and make the adapter's parameters ``trainable`` or frozen."""
    with torch.no_grad():
        for key, tensor in weights.items():
            own[key].copy_(tensor.to(own[key].dtype))
    for param, flag in trainable_before:
        param.requires_grad_(flag)
    for param in own.values():
        param.requires_grad_(trainable)
