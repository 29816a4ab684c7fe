"""Put LoRA adapters on a model's linear layers, pick them by name or preset, count what trains."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import nn

from qlora.adalora.layer import AdaLoRALinear
from qlora.nn.dora import DoRALinear
from qlora.nn.experts import ExpertLinears4bit, LoRAExpertLinears, LoRARouter, is_router
from qlora.nn.linear4bit import Linear4bit
from qlora.nn.lora import LORA_INITS, LoRAAdapters, LoRALinear, check_adapter_name
from qlora.nn.modules_to_save import ModulesToSaveWrapper

TargetSpec = Union[str, Iterable[str]]

# Regexes over full module names, per architecture family (config.model_type).
_LLAMA_LIKE = {
    "attention": r"(.*\.)?(q_proj|k_proj|v_proj|o_proj)",
    "mlp": r"(.*\.)?(gate_proj|up_proj|down_proj|gate_up_proj)",  # gate_up_proj: fused MoE experts
}
PRESETS: dict[str, dict[str, str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "qwen2_moe": _LLAMA_LIKE,
    "qwen3_moe": _LLAMA_LIKE,
    "gpt2": {"attention": r"(.*\.)?attn\.(c_attn|c_proj)", "mlp": r"(.*\.)?mlp\.(c_fc|c_proj)"},
    "bert": {
        "attention": r"(.*\.)?attention\.(self\.(query|key|value)|output\.dense)",
        "mlp": r"(.*\.)?layer\.\d+\.(intermediate|output)\.dense",
    },
}


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def adaptable_layers(model: nn.Module, parameters: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every layer LoRA can wrap: ``Linear4bit``, dense ``nn.Linear``, GPT-2
    ``Conv1D``, and, with ``parameters``, what PEFT adapts as ``target_parameters``: the NF4 fused
    weights of MoE experts (``ExpertLinears4bit``, named ``<experts module>.<parameter>``) and MoE
    routers (named as their module; PEFT's key adds ``.weight``); and layers already wrapped
    (``LoRALinear``, ``AdaLoRALinear``, ``LoRAExpertLinears``, ``LoRARouter``), without looking
    inside any of them."""
    conv1d = _conv1d_class()

    def walk(module: nn.Module, prefix: str):
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if is_parameter_layer(child):
                if parameters:
                    yield name, child
            elif isinstance(child, (LoRALinear, AdaLoRALinear, Linear4bit, nn.Linear, conv1d)):
                yield name, child
            elif not isinstance(child, ModulesToSaveWrapper):
                yield from walk(child, name)

    yield from walk(model, "")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in adaptable_layers(model):
        if isinstance(module, LoRALinear):
            yield name, module


def expert_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRAExpertLinears]]:
    for name, module in adaptable_layers(model):
        if isinstance(module, LoRAExpertLinears):
            yield name, module


def all_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRAAdapters]]:
    """Every layer holding LoRA adapters: linear (and DoRA), MoE experts, MoE routers."""
    for name, module in adaptable_layers(model):
        if isinstance(module, LoRAAdapters):
            yield name, module


def _output_head_name(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        return None
    for name, module in model.named_modules():
        wrapped = isinstance(module, (LoRALinear, AdaLoRALinear, ModulesToSaveWrapper))
        if module is head or (wrapped and head in (getattr(module, "base_layer", None),
                                                   getattr(module, "original_module", None))):
            return name
    return None


def _family(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PRESETS:
        raise ValueError(f"no target_modules preset for model_type {model_type!r}; presets exist for "
                         f"{sorted(PRESETS)}. Name the modules instead (e.g. ['q_proj', 'v_proj']) or use 'all-linear'")
    return model_type


def matches_target(name: str, target: str) -> bool:
    """``target`` is the exact name, a dotted suffix of it (``q_proj``, ``self_attn.q_proj``), or a
    regex matching the whole name."""
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def resolve_targets(model: nn.Module, target_modules: TargetSpec, parameters: bool = True) -> list[str]:
    """Names of the layers ``target_modules`` selects (MoE experts and routers among the candidates
    only with ``parameters``); every entry must select at least one layer."""
    candidates = [name for name, _ in adaptable_layers(model, parameters)]
    if isinstance(target_modules, str) and target_modules == "all-linear":
        head = _output_head_name(model)  # and no router: its LoRA is only ever asked for by name
        selected = [n for n in candidates if n != head and not _is_router_layer(model.get_submodule(n))]
    elif isinstance(target_modules, str) and target_modules in ("attention", "mlp"):
        pattern = PRESETS[_family(model)][target_modules]
        selected = [n for n in candidates if re.fullmatch(pattern, n)]
    else:
        entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        if not entries:
            raise ValueError("target_modules is empty")
        selected = []
        for entry in entries:
            if not isinstance(entry, str):
                raise ValueError(f"target_modules entries must be strings, got {entry!r}")
            hits = [n for n in candidates if matches_target(n, entry)]
            if not hits:
                examples = ", ".join(candidates[:6])
                raise ValueError(f"target_modules entry {entry!r} matches no linear layer of the model "
                                 f"(its linear layers are e.g. {examples})")
            selected += [n for n in hits if n not in selected]
        selected = [n for n in candidates if n in selected]
    if not selected:
        raise ValueError(f"target_modules={target_modules!r} selects no linear layer of the model")
    return selected


def pattern_value(name: str, pattern: Optional[dict], default):
    """PEFT's rank_pattern/alpha_pattern rule: the first key k with ``(.*\\.)?k$`` matching the name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def is_parameter_layer(module: nn.Module) -> bool:
    """What PEFT adapts as ``target_parameters``: fused MoE expert weights and MoE routers."""
    return isinstance(module, (ExpertLinears4bit, LoRAExpertLinears, LoRARouter)) or is_router(module)


def _is_router_layer(module: nn.Module) -> bool:
    return isinstance(module, LoRARouter) or is_router(module)


def _suffix_names(names: list[str], candidates: list[str], min_components: int) -> list[str]:
    """The shortest name ends (at least ``min_components`` components) that select exactly
    ``names`` among ``candidates`` under PEFT's rule (equal, or ending in "." + the entry), else the
    full names."""
    for k in range(min_components, max((n.count(".") for n in names), default=0) + 1):
        short = sorted({".".join(n.split(".")[-k:]) for n in names})
        if sorted(n for n in candidates if any(n == s or n.endswith("." + s) for s in short)) == sorted(names):
            return short
    return sorted(names)


def peft_target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """What to write as PEFT's ``target_modules`` for the adapted linear layers ``names``: their last
    name components when those select exactly the same layers under PEFT's suffix rule, else the
    full names. (MoE experts and routers are parameters to PEFT: see :func:`peft_target_parameters`.)"""
    linear = [n for n, m in adaptable_layers(model) if not is_parameter_layer(m)]
    return _suffix_names([n for n in names if n in linear], linear, 1)


def peft_parameter_key(model: nn.Module, name: str) -> str:
    """PEFT's ``<module>.<parameter>`` key of a parameter layer: the expert weight's own name, a
    router's name plus ``.weight``."""
    return f"{name}.weight" if _is_router_layer(model.get_submodule(name)) else name


def peft_target_parameters(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT's ``target_parameters`` for the adapted MoE experts and routers among ``names``
    (``experts.gate_up_proj``, ``gate.weight``-style ends when they select exactly those)."""
    keys = [peft_parameter_key(model, n) for n, m in adaptable_layers(model) if is_parameter_layer(m)]
    chosen = [peft_parameter_key(model, n) for n in names if is_parameter_layer(model.get_submodule(n))]
    return _suffix_names(chosen, keys, 2)


def peft_nesting(model: nn.Module, name: str, adapted: Iterable[str]) -> str:
    """The ``base_layer.`` chain PEFT puts before the LoRA keys of MoE expert weight ``name``: PEFT
    wraps the targeted parameters of one experts module in turn, in the order the module registers
    them (the experts module's ``fused_expert_order``), each wrapper around the previous, so the first is
    innermost. ``adapted``: every adapted expert weight of the model."""
    owner, _, param = name.rpartition(".")
    adapted = set(adapted)
    order = [p for p in model.get_submodule(owner).fused_expert_order if f"{owner}.{p}" in adapted]
    return "base_layer." * (len(order) - 1 - order.index(param))


@dataclass
class ParameterCount:
    """Trainable and total parameters (an NF4 weight counts its elements), with a row per kind of
    adapted layer (its last name component) and one for other trainable parameters."""

    trainable: int
    total: int
    rows: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, layers, trainable params)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def table(self) -> str:
        width = max([len("module")] + [len(kind) for kind, _, _ in self.rows])
        lines = [f"{'module':<{width}}  {'layers':>6}  {'trainable':>12}"]
        lines += [f"{kind:<{width}}  {layers:>6}  {count:>12,}" for kind, layers, count in self.rows]
        lines.append(f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.4f}%)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Counts of trainable and all parameters, each tensor once (tied weights are shared)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            total += module.weight.numel()  # MoE experts are Linear4bit layers too, one per expert
    rows: dict[str, list[int]] = {}
    in_layers: set[int] = set()
    adapted = ((n, m) for n, m in adaptable_layers(model) if isinstance(m, (LoRAAdapters, AdaLoRALinear)))
    for name, layer in adapted:
        count = 0
        for p in layer.parameters():
            in_layers.add(id(p))
            count += p.numel() if p.requires_grad else 0
        row = rows.setdefault(name.rpartition(".")[2], [0, 0])
        row[0] += 1
        row[1] += count
    other = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()
                if p.requires_grad and id(p) not in in_layers)
    table = [(kind, n, c) for kind, (n, c) in sorted(rows.items())]
    if other:
        table.append(("other", 0, other))
    return ParameterCount(trainable, total, table)


@dataclass
class LoRAReport:
    adapter_name: str
    layers: list[str]
    parameters: ParameterCount

    def __str__(self) -> str:
        return f"adapter {self.adapter_name!r} on {len(self.layers)} layers\n{self.parameters.table()}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _dense_from_conv1d(conv) -> nn.Linear:
    """GPT-2's Conv1D (weight [in, out]) as an nn.Linear (weight [out, in]), flagged so that export
    writes the weight back in Conv1D's layout."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    linear.fan_in_fan_out = True
    return linear


def _check_parameter_lora(name: str, dropout: float, use_dora: bool, init: str) -> None:
    """LoRA on MoE experts and routers is PEFT's ParamWrapper, which has no dropout, DoRA or PiSSA."""
    if dropout > 0:
        raise ValueError(f"{name}: LoRA on MoE experts and routers takes no dropout (PEFT's target_parameters "
                         f"adapters, which it must load as, have none); set dropout to 0, or leave them out "
                         f"of target_modules, got dropout={dropout}")
    if use_dora:
        raise ValueError(f"{name}: DoRA on MoE experts and routers is not supported (nor by PEFT); leave them "
                         "out of target_modules")
    if init == "pissa":
        raise ValueError(f"{name}: PiSSA init on MoE experts and routers is not supported; use init='default' or "
                         "'gaussian'")


def add_lora(model: nn.Module, r: int = 16, alpha: float = 16, dropout: float = 0.0,
             target_modules: TargetSpec = "all-linear", *, use_rslora: bool = False, use_dora: bool = False,
             init: str = "default", rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None,
             modules_to_save: Optional[Iterable[str]] = None, adapter_name: str = "default") -> LoRAReport:
    """Add adapter ``adapter_name`` to the layers ``target_modules`` selects, in place.

    ``target_modules``: ``"all-linear"`` (every linear layer but the output head, and the fused
    weights of MoE experts, e.g. ``mlp.experts.gate_up_proj``, which PEFT targets as
    ``target_parameters``; an MoE router is no linear layer: its LoRA, PEFT's ``gate.weight``
    target parameter, only when named, e.g. ``"mlp.gate"``), a preset of the
    model's family (``"attention"``, ``"mlp"``; see ``PRESETS``), or a name / list of names, each
    an exact module name, a dotted suffix, or a regex matching whole names. LoRA on MoE experts has
    PEFT's layout and limits: no dropout, no DoRA, no PiSSA (see :class:`LoRAExpertLinears`), and
    so has a router's (:class:`LoRARouter`). ``rank_pattern`` /
    ``alpha_pattern`` override r / alpha per layer by PEFT's rule (regex on the name's end).
    ``init``: ``"default"`` | ``"gaussian"`` | ``"pissa"`` (see :meth:`LoRALinear.reset_adapter`).
    ``modules_to_save``: modules (e.g. a new head) trained in full alongside. Everything but the
    new adapter (and its modules_to_save copies) is frozen. Returns which layers were adapted and
    the parameter counts.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    for name, value in (rank_pattern or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"rank_pattern[{name!r}] must be a positive integer, got {value!r}")
    check_adapter_name(adapter_name)
    if init not in LORA_INITS:
        raise ValueError(f"init must be one of {LORA_INITS}, got {init!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if any(adapter_name in layer.lora_A for _, layer in lora_layers(model)):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    names = resolve_targets(model, target_modules)
    for name in names:  # every check before the model is changed
        module = model.get_submodule(name)
        if isinstance(module, AdaLoRALinear):
            raise ValueError(f"{name}: cannot mix LoRA and AdaLoRA adapters on one layer")
        if isinstance(module, LoRALinear) and isinstance(module, DoRALinear) != use_dora:
            raise ValueError(f"{name}: cannot mix DoRA and plain LoRA adapters on one layer")
        if is_parameter_layer(module):
            _check_parameter_lora(name, dropout, use_dora, init)
    to_save = {target: modules_to_save_names(model, target) for target in modules_to_save or ()}
    lora_class = DoRALinear if use_dora else LoRALinear
    conv1d = _conv1d_class()
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        layer_r = pattern_value(name, rank_pattern, r)
        layer_alpha = pattern_value(name, alpha_pattern, alpha)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, layer_r, layer_alpha, dropout, use_rslora, init)
        elif isinstance(module, (LoRAExpertLinears, LoRARouter)):
            module.add_adapter(adapter_name, layer_r, layer_alpha, use_rslora, init)
        elif isinstance(module, ExpertLinears4bit):
            _set_module(model, name, LoRAExpertLinears(module, layer_r, layer_alpha, adapter_name, use_rslora, init))
        elif is_router(module):
            _set_module(model, name, LoRARouter(module, layer_r, layer_alpha, adapter_name, use_rslora, init))
        else:
            if isinstance(module, conv1d):
                module = _dense_from_conv1d(module)
            _set_module(model, name, lora_class(module, layer_r, layer_alpha, dropout, adapter_name,
                                                use_rslora, init=init))
    for hits in to_save.values():
        for name in hits:
            _add_module_to_save(model, name, adapter_name)
    for _, layer in all_lora_layers(model):
        for module in layer.children():
            if isinstance(module, nn.ModuleDict) and adapter_name in module:
                module[adapter_name].requires_grad_(True)
    configs = model.__dict__.setdefault("qlora_adapter_configs", {})
    configs[adapter_name] = {
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": peft_target_modules(model, names),
        "target_parameters": peft_target_parameters(model, names),
        "use_rslora": use_rslora, "use_dora": use_dora, "init": init,
        "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {}),
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "fan_in_fan_out": any(getattr(model.get_submodule(n).base_layer, "fan_in_fan_out", False) for n in names),
    }
    return LoRAReport(adapter_name, names, trainable_parameters(model))


def add_adalora(model: nn.Module, init_r: int = 12, alpha: float = 8, dropout: float = 0.0,
                target_modules: TargetSpec = "all-linear", *, adapter_name: str = "default") -> LoRAReport:
    """Add AdaLoRA adapter ``adapter_name`` at rank ``init_r`` to the linear layers ``target_modules``
    selects (as in :func:`add_lora`, but never fused MoE experts: PEFT's AdaLoRA cannot target
    parameters), in place; everything else is frozen. The ranks then shrink
    under :class:`qlora.adalora.allocator.RankAllocator` during training. Returns which layers were
    adapted and the parameter counts."""
    if isinstance(init_r, bool) or not isinstance(init_r, int) or init_r <= 0:
        raise ValueError(f"AdaLoRA init_r must be a positive integer, got {init_r!r}")
    check_adapter_name(adapter_name)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    names = resolve_targets(model, target_modules, parameters=False)  # PEFT's AdaLoRA has no MoE form
    for name in names:  # every check before the model is changed
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name}: cannot mix AdaLoRA and LoRA adapters on one layer")
        if isinstance(module, AdaLoRALinear) and adapter_name in module.lora_A:
            raise ValueError(f"{name}: the layer already has an AdaLoRA adapter named {adapter_name!r}")
    conv1d = _conv1d_class()
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, AdaLoRALinear):
            module.add_adapter(adapter_name, init_r, alpha, dropout)
        else:
            if isinstance(module, conv1d):
                module = _dense_from_conv1d(module)
            _set_module(model, name, AdaLoRALinear(module, r=init_r, lora_alpha=alpha, lora_dropout=dropout,
                                                   adapter_name=adapter_name))
        layer = model.get_submodule(name)
        for factors in (layer.lora_A, layer.lora_E, layer.lora_B):
            factors[adapter_name].requires_grad_(True)
    configs = model.__dict__.setdefault("qlora_adapter_configs", {})
    configs[adapter_name] = {
        "peft_type": "ADALORA", "init_r": init_r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": peft_target_modules(model, names),
        "fan_in_fan_out": any(getattr(model.get_submodule(n).base_layer, "fan_in_fan_out", False) for n in names),
    }
    return LoRAReport(adapter_name, names, trainable_parameters(model))


def modules_to_save_names(model: nn.Module, target: str) -> list[str]:
    hits = [n for n, _ in model.named_modules()
            if (n == target or n.endswith("." + target))
            and not {"original_module", "modules_to_save"} & set(n.split("."))]
    if not hits:
        raise ValueError(f"modules_to_save entry {target!r} matches no module of the model")
    for name in hits:
        if isinstance(model.get_submodule(name), LoRALinear):
            raise ValueError(f"modules_to_save entry {target!r}: {name} already carries LoRA adapters")
    return hits


def _add_module_to_save(model: nn.Module, name: str, adapter_name: str) -> None:
    module = model.get_submodule(name)
    if not isinstance(module, ModulesToSaveWrapper):
        module = ModulesToSaveWrapper(module)
        _set_module(model, name, module)
    module.add_adapter(adapter_name)
