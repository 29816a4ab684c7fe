"""Load Hugging Face checkpoints with NF4 linear layers, reading one tensor at a time.

The model is built with its parameters on the meta device (no memory); transformers' own key
mapping and weight conversions say where each checkpoint tensor goes (see :class:`_Plan`); then
every tensor (or every target a conversion fuses, such as one layer's MoE experts) is read on its
own: a linear weight is quantized to NF4 in slices of ``QUANT_CHUNK_ELEMENTS`` elements, a fused
MoE expert weight likewise expert by expert, and the dense copy dropped before the next tensor is
read; any other tensor is cast to the compute dtype and put in place. A checkpoint already saved
in bitsandbytes' 4-bit format (transformers + ``BitsAndBytesConfig``) is taken over as it is.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from qlora.quant.nf4 import NF4Tensor, quantize
from qlora.nn.experts import fused_expert_parameters, quantize_experts
from qlora.nn.linear4bit import Linear4bit
from qlora.model.hf_config import check_remote_code, read_config_json

# Elements of a weight quantized at once: the fp32 copy and the int64 codes of a slice cost about
# 24 bytes per element, 6 MiB here, independent of the layer's size.
QUANT_CHUNK_ELEMENTS = 1 << 18

_NF4_META_SUFFIX = ".quant_state.bitsandbytes__nf4"


def quantize_chunked(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                     dtype: Optional[torch.dtype] = None,
                     chunk_elements: int = QUANT_CHUNK_ELEMENTS) -> NF4Tensor:
    """``qlora.quant.nf4.quantize(w)`` bit for bit, with temporaries bounded by ``chunk_elements``
    (see its ``chunk_elements``). ``dtype`` is what the result dequantizes to (default ``w.dtype``)."""
    return quantize(w, blocksize, double_quant, dtype=dtype, chunk_elements=chunk_elements)


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def linear_module_names(model: nn.Module, skip_modules: Iterable[str] = ()) -> list[str]:
    """Names of the dense ``nn.Linear`` and GPT-2 ``Conv1D`` layers, minus those matching
    ``skip_modules`` (exact name or dotted suffix) and any whose weight is tied to another module
    (an output head sharing the input embedding cannot be quantized on its own)."""
    conv1d = _conv1d_class()
    tied = _tied_weight_ids(model)
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, conv1d)) and not _matches(name, skip_modules)
            and id(module.weight) not in tied]


def _tied_weight_ids(model: nn.Module) -> set[int]:
    seen, tied = set(), set()
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                (tied if id(p) in seen else seen).add(id(p))
    return tied


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _replace_with_nf4(model: nn.Module, name: str, weight: NF4Tensor) -> Linear4bit:
    """Swap the dense layer ``name`` for a :class:`Linear4bit` holding ``weight``; its bias (loaded
    or still meta) moves over. A Conv1D's [in, out] weight arrives here already transposed."""
    old = model.get_submodule(name)
    new = Linear4bit(weight)
    if old.bias is not None:
        new.bias = nn.Parameter(old.bias.data, requires_grad=False)
    new.fan_in_fan_out = isinstance(old, _conv1d_class())  # export writes the weight back transposed
    _set_module(model, name, new)
    return new


@torch.no_grad()
def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                   skip_modules: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Replace, in place, every dense linear layer of an in-memory model (see
    :func:`linear_module_names`) by a :class:`Linear4bit` with its weight in NF4, and every fused
    MoE expert weight by an :class:`~qlora.nn.experts.ExpertLinears4bit` (NF4 per expert). Each
    dense weight is freed as soon as it is quantized; the NF4 weights dequantize to the layer's
    dtype and stay on the layer's device. Returns ``model``."""
    for name in linear_module_names(model, skip_modules):
        old = model.get_submodule(name)
        w = old.weight.t() if isinstance(old, _conv1d_class()) else old.weight
        _replace_with_nf4(model, name, quantize_chunked(w, blocksize, double_quant))
    for owner, param in expert_parameter_names(model, skip_modules).values():
        module = model.get_submodule(owner)
        quantize_experts(module, param, module._parameters[param],
                         lambda w: quantize_chunked(w, blocksize, double_quant))
    return model


class _Checkpoint:
    """The safetensors files of a local Hugging Face checkpoint: key -> file, headers only."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from err
            files = sorted({path / f for f in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            raise FileNotFoundError(f"{path}: no *.safetensors weights (only safetensors are read"
                                    + (f"; found {', '.join(found)}" if found else "") + ")")
        from safetensors import safe_open

        self.handles = {}
        self.file_of: dict[str, Path] = {}
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index}: lists shard {f.name}, which does not exist")
            try:
                self.handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"{f}: not a readable safetensors file ({err})") from err
            for key in self.handles[f].keys():
                self.file_of[key] = f

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.file_of[key]].get_tensor(key)


def _build(config, trust_remote_code: bool) -> nn.Module:
    """The class config.json's ``architectures`` names, else the bare ``AutoModel`` of its type;
    with ``trust_remote_code``, the checkpoint's own causal-LM class where ``auto_map`` has one."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls(config)
    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    return transformers.AutoModel.from_config(config, trust_remote_code=trust_remote_code)


def _prequantized_weights(ckpt: _Checkpoint) -> set[str]:
    """Keys of the weights stored in bitsandbytes' NF4 layout (they carry a quant-state blob)."""
    return {k[: -len(_NF4_META_SUFFIX)] for k in ckpt.file_of if k.endswith(_NF4_META_SUFFIX)}


class _Plan:
    """Where each checkpoint tensor goes, by transformers' own rules for this model class.

    ``from_pretrained`` renames checkpoint keys and merges or splits tensors by the model's weight
    conversions (``transformers.conversion_mapping.get_model_conversion_mapping``: e.g. GPT-NeoX's
    ``embed_out`` -> ``lm_head``, Mixtral's per-expert ``block_sparse_moe.experts.<e>.w1/w3`` ->
    the fused ``mlp.experts.gate_up_proj``, legacy ``LayerNorm.gamma`` -> ``.weight``), then adds
    or strips the base-model prefix. The same functions decide here
    (``transformers.core_model_loading.rename_source_key``, ``WeightConverter.convert``), so every
    checkpoint ``AutoModelForCausalLM`` loads is read the same way. A key that maps to a parameter
    on its own is a ``direct`` entry (read when placed); keys a converter combines are gathered
    under their target as deferred reads, so a converter holds the tensors of one target at a time.
    """

    def __init__(self, model: nn.Module, keys: Iterable[str], read):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming, dot_natural_key,
                                                     rename_source_key)

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        meta = model.state_dict()
        prefix = model.base_model_prefix
        self.direct: dict[str, str] = {}        # model name -> checkpoint key
        self.converted: dict[str, object] = {}  # first target name -> WeightConverter holding its reads
        self.sources: dict[str, list[str]] = {}  # first target name -> its checkpoint keys (for errors)
        self.unexpected: list[str] = []
        self._rename = lambda key, r, c: rename_source_key(key, r, c, prefix, meta)
        for key in sorted(keys, key=dot_natural_key):
            name, pattern = self._rename(key, renamings, converters)
            if name not in meta and key in meta:  # as transformers: a key the model already has stays
                name, pattern = self._rename(key, [], [])
            if name not in meta:
                self.unexpected.append(key)
            elif pattern is None:
                self.direct[name] = key
            else:
                converter = self.converted.setdefault(name, copy.deepcopy(by_pattern[pattern]))
                converter.add_tensor(name, key, pattern, functools.partial(read, key))  # read at convert
                self.sources.setdefault(name, []).append(key)
        self.renamings = renamings

    def rename(self, key: str) -> str:
        """The model's name for a key read as it is (renamings and the base-model prefix only)."""
        return self._rename(key, self.renamings, [])[0]


def _put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def expert_parameter_names(model: nn.Module, skip_modules: Iterable[str] = ()) -> dict[str, tuple[str, str]]:
    """``{full parameter name: (experts module name, parameter name)}`` of every fused MoE expert
    weight (see :mod:`qlora.nn.experts`) not in a module matching ``skip_modules``."""
    return {f"{module_name}.{p}": (module_name, p) for module_name, module in model.named_modules()
            if not _matches(module_name, skip_modules) for p in fused_expert_parameters(module)}


@torch.no_grad()
def load_model(path: Union[str, os.PathLike], *, compute_dtype: torch.dtype = torch.bfloat16,
               device: Union[str, torch.device, None] = None, blocksize: int = 64, double_quant: bool = True,
               skip_modules: Iterable[str] = ("lm_head",), trust_remote_code: bool = False):
    """A transformers model from the local checkpoint ``path`` with its linear layers in NF4.

    Reads ``config.json`` and the safetensors weights (one file, or shards with
    ``model.safetensors.index.json``), naming and converting them as ``from_pretrained`` does (see
    :class:`_Plan`). Every ``nn.Linear`` (and GPT-2 ``Conv1D``) weight not named in
    ``skip_modules`` (exact name or dotted suffix) and not tied to another module becomes a
    :class:`~qlora.nn.Linear4bit`, and every fused MoE expert weight an
    :class:`~qlora.nn.experts.ExpertLinears4bit` (NF4 per expert); everything else is cast to
    ``compute_dtype``. Weights already in bitsandbytes' 4-bit format are kept as they are. The
    model is in eval mode with no gradients. Python code shipped in ``path`` (``auto_map``) is
    run only with ``trust_remote_code=True`` (see :mod:`qlora.model.hf_config`); transformers is
    never left to ask.

    Memory bound: the model is built on the meta device and materialized one checkpoint tensor at a
    time, so peak host memory (and device memory, on ``device``) is the loaded model — NF4 weights
    (4.127 bits/param) plus the other tensors in ``compute_dtype`` — plus one checkpoint tensor as
    stored (twice that on ``device`` when its dtype changes) plus ``QUANT_CHUNK_ELEMENTS`` × 24
    bytes (6 MiB) of quantization temporaries. Where transformers combines tensors (an MoE layer's
    per-expert weights into one fused tensor), "one tensor" is one fused target: its sources and
    the result of the conversion (at most twice the fused tensor, as stored). The safetensors files
    are memory-mapped (the pages read count as file cache, not as process memory); every tensor
    kept is a copy, so the model never refers to the files.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(path)
    check_remote_code(path, read_config_json(path), trust_remote_code)
    device = torch.device(device if device is not None else "cpu")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    ckpt = _Checkpoint(path)
    prequantized = _prequantized_weights(ckpt)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the layers are ours; transformers must not quantize again
    with init_empty_weights(include_buffers=False):
        model = _build(config, trust_remote_code)
    model.config._name_or_path = str(path)
    to_quantize = {f"{n}.weight" for n in linear_module_names(model, skip_modules)}
    experts = expert_parameter_names(model, skip_modules)
    nf4_constants = {k for k in ckpt.file_of for w in prequantized if k.startswith(w + ".")}
    plan = _Plan(model, [k for k in ckpt.file_of if k not in prequantized and k not in nf4_constants], ckpt.get)

    def place(name: str, tensor: torch.Tensor, source: str) -> None:
        """Put the checkpoint tensor for model parameter/buffer ``name`` (from ``source``) in place."""
        module_name = name.rpartition(".")[0]
        if name in to_quantize:
            module = model.get_submodule(module_name)
            _check_shape(source, tuple(tensor.shape), tuple(module.weight.shape))
            if isinstance(module, _conv1d_class()):
                tensor = tensor.t()
            _replace_with_nf4(model, module_name, quantize_chunked(tensor.to(device), blocksize, double_quant,
                                                                  dtype=compute_dtype))
        elif name in experts:
            owner, param = experts[name]
            module = model.get_submodule(owner)
            _check_shape(source, tuple(tensor.shape), tuple(module._parameters[param].shape))
            quantize_experts(module, param, tensor, lambda w: quantize_chunked(
                w.to(device), blocksize, double_quant, dtype=compute_dtype))
        else:
            current = model.get_parameter(name) if _is_parameter(model, name) else model.get_buffer(name)
            _check_shape(source, tuple(tensor.shape), tuple(current.shape))
            dtype = compute_dtype if tensor.is_floating_point() else tensor.dtype
            _put(model, name, _owned(tensor, device, dtype))

    for key in sorted(prequantized, key=lambda k: (str(ckpt.file_of[k]), k)):
        state = {k: ckpt.get(k) for k in ckpt.file_of if k == key or k.startswith(key + ".")}
        try:
            weight = NF4Tensor.from_state_dict(state, key)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{ckpt.file_of[key]}: {err}") from err
        _replace_with_nf4(model, plan.rename(key).rpartition(".")[0], _owned_nf4(weight, device))
    for name, key in sorted(plan.direct.items(), key=lambda item: (str(ckpt.file_of[item[1]]), item[1])):
        tensor = ckpt.get(key)
        place(name, tensor, f"{ckpt.file_of[key]}: tensor {key!r}")
        del tensor
    for first, converter in plan.converted.items():
        sources = plan.sources[first]
        where = f"{ckpt.file_of[sources[0]]}: tensors {sources[0]!r} .. {sources[-1]!r} ({len(sources)})"
        try:
            produced = converter.convert(first, model=model, config=model.config)
        except Exception as err:  # transformers' conversion ops raise plain errors on shape mismatches
            raise ValueError(f"{where}: transformers' conversion to {first!r} failed ({err})") from err
        for name in list(produced):
            tensor = produced.pop(name)
            place(name, tensor[0] if isinstance(tensor, list) else tensor, where)
            del tensor
    if plan.unexpected:
        import warnings

        warnings.warn(f"{path}: {len(plan.unexpected)} checkpoint tensor(s) the model has no place for were "
                      f"ignored, e.g. {plan.unexpected[:3]}", stacklevel=2)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: the checkpoint has no tensor for {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for module in model.modules():  # buffers computed at construction (rotary inv_freq, position ids)
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)
    return model.eval()


def _owned(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` on ``device`` in ``dtype``, in memory of its own: safetensors hands out views of
    the memory-mapped file, which must not stay inside the model (the file may change later)."""
    out = tensor.to(device=device, dtype=dtype)
    return out.clone() if out.data_ptr() == tensor.data_ptr() else out


def _owned_nf4(weight: NF4Tensor, device: torch.device) -> NF4Tensor:
    own = lambda t: None if t is None else _owned(t, device, t.dtype)  # noqa: E731
    return NF4Tensor(packed=own(weight.packed), shape=weight.shape, dtype=weight.dtype, blocksize=weight.blocksize,
                     absmax=own(weight.absmax), quant_map=own(weight.quant_map),
                     nested_absmax=own(weight.nested_absmax), nested_quant_map=own(weight.nested_quant_map),
                     offset=own(weight.offset), nested_blocksize=weight.nested_blocksize)


def _is_parameter(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    return attr in (model.get_submodule(module_name) if module_name else model)._parameters


def _check_shape(source: str, got: tuple, want: tuple) -> None:
    if got != want:
        raise ValueError(f"{source} has shape {got}, the model built from config.json expects {want}")
