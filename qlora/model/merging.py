"""Fold LoRA adapters into the base weights, and export the result as a plain Hugging Face checkpoint."""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from qlora.util.atomic import make_temp_dir, write_atomic
from qlora.model.inject import all_lora_layers
from qlora.quant.nf4 import quantize
from qlora.nn.linear4bit import Linear4bit
from qlora.adalora.layer import AdaLoRALinear
from qlora.nn.experts import ExpertLinears4bit, LoRAExpertLinears, LoRARouter
from qlora.nn.lora import LoRALinear
from qlora.nn.modules_to_save import ModulesToSaveWrapper


def _names_for(layer: Union[LoRALinear, AdaLoRALinear],
               adapter_names: Optional[Iterable[str]]) -> list[str]:
    if adapter_names is None:
        return list(layer.active_adapters)
    return [n for n in adapter_names if n in layer.lora_A]


def merge(model: nn.Module, adapter_names: Optional[Iterable[str]] = None,
          dtype: Optional[torch.dtype] = None) -> list[str]:
    """Merge adapters (default: the active ones) into every LoRA layer: W = W0 + Σ s·B·A, formed in
    fp32 from the dequantized W0 and kept dense in ``dtype`` (default: the dtype W0 dequantizes
    to, i.e. the compute dtype). It is never re-quantized to NF4 — that would add a second
    rounding error on top of W0's; use ``export_merged(quantize_merged=True)`` for that, which
    reports the error. Returns the names of the merged layers."""
    adalora = [name for name, module in model.named_modules() if isinstance(module, AdaLoRALinear)]
    if adalora:
        raise ValueError(f"merge: {adalora[0]} (and {len(adalora) - 1} more) holds AdaLoRA adapters, "
                         "which are not merged in place; export_merged writes them merged")
    names = None if adapter_names is None else list(adapter_names)
    layers = list(all_lora_layers(model))
    if names is not None:
        known = {n for _, layer in layers for n in layer.lora_A}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; the model has {sorted(known)}")
    merged = []
    for name, layer in layers:
        chosen = _names_for(layer, names)
        if chosen:
            layer.merge(chosen, dtype)
            merged.append(name)
    return merged


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge` everywhere: the original (NF4) base weights come back bit for bit."""
    for _, layer in all_lora_layers(model):
        layer.unmerge()


@dataclass
class ExportReport:
    """Where the checkpoint went and, with ``quantize_merged``, the NF4 error per re-quantized layer:
    (max |Q(W) − W|, ‖Q(W) − W‖_F / ‖W‖_F) against the merged weight W in the export dtype."""

    path: Path
    quantization_errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def worst_relative_error(self) -> float:
        return max((rel for _, rel in self.quantization_errors.values()), default=0.0)


def _merged_weight(layer: LoRALinear, adapter_names: Optional[list[str]]) -> torch.Tensor:
    """fp32 W0 + Σ ΔW from the original W0, over the adapters already merged and those chosen.

    A merged layer is unmerged for this and merged again after: a DoRA delta is computed from W0,
    so it must see the original base, not the merged one."""
    merged = list(layer.merged_adapters)
    merged_dtype = layer.base_layer.weight.dtype if merged else None
    layer.unmerge()
    w = layer._base_weight_fp32()
    for name in dict.fromkeys(merged + _names_for(layer, adapter_names)):
        w = w + layer.delta_weight(name)
    if merged:
        layer.merge(merged, merged_dtype)
    return w


class _ShardWriter:
    """Collects tensors into safetensors shards of about ``max_shard_bytes`` and writes each as soon
    as it is full, so only one shard is held in memory. Shards get their final names (and the
    index) in :meth:`finish`, once their number is known."""

    def __init__(self, path: Path, max_shard_bytes: int):
        self.path, self.max_shard_bytes = path, max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.keys: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.keys.add(key)
        self.current[key] = tensor
        self.current_bytes += tensor.numel() * tensor.element_size()
        if self.current_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save

        if not self.current:
            return
        file = self.path / f"shard-{len(self.shards):05d}.safetensors"
        state = self.current
        write_atomic(file, lambda f: f.write(save(state, metadata={"format": "pt"})))
        self.shards.append((file, list(state)))
        self.total_bytes += self.current_bytes
        self.current, self.current_bytes = {}, 0

    def finish(self) -> None:
        self._flush()
        if len(self.shards) == 1:
            os.replace(self.shards[0][0], self.path / "model.safetensors")
            return
        weight_map = {}
        for i, (file, keys) in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(file, self.path / name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        write_atomic(self.path / "model.safetensors.index.json",
                     lambda f: f.write(json.dumps(index, indent=2, sort_keys=True).encode()))


class _Exporter:
    def __init__(self, dtype: torch.dtype, quantize_merged: bool, adapter_names: Optional[list[str]],
                 sink: _ShardWriter):
        self.dtype, self.quantize_merged, self.adapter_names, self.sink = dtype, quantize_merged, adapter_names, sink
        self.errors: dict[str, tuple[float, float]] = {}
        self.dense_linear: list[str] = []
        self.nf4_template: Optional[Linear4bit] = None
        self.seen: set[int] = set()

    def tensor(self, key: str, t: torch.Tensor, owned: bool = True) -> None:
        """``owned``: ``t`` lives in the model (so its id is stable and may repeat for tied weights)."""
        if owned:
            if id(t) in self.seen:
                return  # a tied weight is written once, under its first name (transformers re-ties it)
            self.seen.add(id(t))
        t = t.detach()
        self.sink.add(key, (t.to(self.dtype) if t.is_floating_point() else t).contiguous().cpu())

    def linear(self, name: str, w: torch.Tensor, bias: Optional[torch.Tensor], source: Optional[Linear4bit],
               fan_in_fan_out: bool) -> None:
        prefix = f"{name}." if name else ""
        if self.quantize_merged and source is not None and not fan_in_fan_out:
            target = w.to(self.dtype)  # the weight a dense export would store
            q = quantize(target, source.weight.blocksize, source.weight.double_quant)
            err = q.dequantize(torch.float32) - target.float()
            self.errors[name] = (err.abs().max().item(), (err.norm() / target.float().norm().clamp(min=1e-30)).item())
            self.nf4(name, q, source)
        else:
            if self.quantize_merged:
                self.dense_linear.append(name)
            self.tensor(prefix + "weight", w.t() if fan_in_fan_out else w, owned=False)
        if bias is not None:
            self.tensor(prefix + "bias", bias)

    def experts(self, name: str, module) -> None:
        """A fused MoE expert weight, written as the 3-D parameter transformers loads: [E, out, in]
        (or [E, in, out] for a transposed experts class), merged with its adapters in fp32."""
        base = module.base_layer if isinstance(module, LoRAExpertLinears) else module
        w = base.dequantized(torch.float32)
        if isinstance(module, LoRAExpertLinears):
            for adapter in dict.fromkeys(module.merged_adapters + _names_for(module, self.adapter_names)):
                w = w + module.delta_weight(adapter)
        # dense even with quantize_merged: transformers' bitsandbytes loading keeps fused experts dense
        self.tensor(name, w.transpose(1, 2) if base.transposed else w, owned=False)

    def router(self, name: str, module: LoRARouter) -> None:
        """An MoE router with LoRA: its weight W + Σ s·B·A (fp32, from the unmerged W), the rest of
        the router as it is."""
        base = module.base_layer
        w = (module.unmerged_weight if module.merged_adapters else base.weight).float()
        for adapter in dict.fromkeys(module.merged_adapters + _names_for(module, self.adapter_names)):
            w = w + module.delta_weight(adapter)
        self.tensor(f"{name}.weight", w, owned=False)
        self.own_tensors(base, f"{name}.", skip=("weight",))

    def own_tensors(self, module: nn.Module, prefix: str, skip=()) -> None:
        """The parameters and persistent buffers of ``module`` itself (not its children)."""
        for key, p in module._parameters.items():
            if p is not None and key not in skip:
                self.tensor(prefix + key, p)
        for key, b in module._buffers.items():
            if b is not None and key not in module._non_persistent_buffers_set:
                self.tensor(prefix + key, b)

    def nf4(self, name: str, weight, source: Linear4bit) -> None:
        prefix = f"{name}." if name else ""
        for key, value in weight.state_dict(prefix + "weight").items():
            self.sink.add(key, value.cpu().clone())  # quant maps are shared tables; safetensors wants each stored once
        self.nf4_template = source

    def unchanged_nf4(self, name: str, layer: Linear4bit) -> None:
        """A layer no adapter changes, stored as it is: the same codes and scales, bit for bit."""
        self.nf4(name, layer.weight, layer)
        if layer.bias is not None:
            self.tensor(f"{name}.bias", layer.bias)

    def walk(self, module: nn.Module, name: str) -> None:
        prefix = f"{name}." if name else ""
        if isinstance(module, (ExpertLinears4bit, LoRAExpertLinears)):
            self.experts(name, module)
            return
        if isinstance(module, LoRARouter):
            self.router(name, module)
            return
        if isinstance(module, LoRALinear):
            if self.quantize_merged and not module.merged_adapters and isinstance(module.base_layer, Linear4bit) \
                    and not getattr(module.base_layer, "fan_in_fan_out", False) \
                    and not _names_for(module, self.adapter_names):
                self.unchanged_nf4(name, module.base_layer)
                return
            w = _merged_weight(module, self.adapter_names)
            base = module.unmerged_base if module.merged_adapters else module.base_layer
            self.linear(name, w, module.base_layer.bias, base if isinstance(base, Linear4bit) else None,
                        getattr(base, "fan_in_fan_out", False))
            return
        if isinstance(module, AdaLoRALinear):
            base = module.base_layer
            w = base.weight.dequantize(torch.float32) if isinstance(base, Linear4bit) else base.weight.float()
            for adapter in _names_for(module, self.adapter_names):
                w = w + module.delta_weight(adapter)
            self.linear(name, w, base.bias, base if isinstance(base, Linear4bit) else None,
                        getattr(base, "fan_in_fan_out", False))
            return
        if isinstance(module, Linear4bit):
            if self.quantize_merged and not getattr(module, "fan_in_fan_out", False):
                self.unchanged_nf4(name, module)
            else:
                self.linear(name, module.weight.dequantize(torch.float32), module.bias, module,
                            getattr(module, "fan_in_fan_out", False))
            return
        if isinstance(module, ModulesToSaveWrapper):
            active = [n for n in module.active_adapters if n in module.modules_to_save]
            self.walk(module.modules_to_save[active[0]] if active else module.original_module, name)
            return
        if isinstance(module, nn.Linear) and getattr(module, "fan_in_fan_out", False):
            self.linear(name, module.weight.float(), module.bias, None, True)  # a GPT-2 Conv1D, transposed
            return
        if isinstance(module, nn.Linear) and self.quantize_merged:
            self.dense_linear.append(name)
        self.own_tensors(module, prefix)
        for child_name, child in module._modules.items():
            if child is not None:
                self.walk(child, prefix + child_name)


def _output_embedding_key(model: nn.Module) -> Optional[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((f"{name}.weight" for name, module in model.named_modules() if module is head), None)


def export_merged(model: nn.Module, dir: Union[str, os.PathLike], dtype: torch.dtype = torch.bfloat16,
                  quantize_merged: bool = False, adapter_names: Optional[Iterable[str]] = None,
                  max_shard_bytes: int = 2 << 30, tokenizer=None,
                  log: Optional[Callable[[str], None]] = print) -> ExportReport:
    """Write ``model`` with its adapters (default: the active ones) merged as a standard Hugging Face
    checkpoint (config.json + safetensors, sharded above ``max_shard_bytes`` with
    ``model.safetensors.index.json``) that ``AutoModelForCausalLM.from_pretrained`` loads without
    qlora: W = W0 + Σ ΔW in fp32 (LoRA s·B·A, DoRA, AdaLoRA c·P·diag(λ)·Q), stored in ``dtype``;
    NF4 layers without adapters are dequantized; ``modules_to_save`` copies replace their originals.
    Beside the weights go the model's generation config and, given a Hugging Face ``tokenizer``,
    its files (chat template included), so the export serves as it is. A model with tied input
    and output embeddings whose head was trained (``modules_to_save``) is written untied, and its
    config says so.

    ``quantize_merged=True`` keeps every layer that was NF4 in NF4 (bitsandbytes' format, so
    transformers loads it with ``BitsAndBytesConfig``; GPT-2 Conv1D layers stay dense): a layer
    that no adapter changes keeps its codes and scales bit for bit, a merged one is quantized again,
    and the error that introduced is reported per layer (and written with ``log``).

    Memory: one shard plus one layer's fp32 weight. The checkpoint is written into a temporary
    directory beside ``dir`` and renamed to ``dir`` at the end, so ``dir`` never holds a partial
    export; an existing non-empty ``dir`` is refused rather than overwritten.
    """
    path = Path(dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory; export into a new one")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config_dict = config.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, f".{path.name}.")
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        exporter = _Exporter(dtype, quantize_merged, None if adapter_names is None else list(adapter_names), writer)
        exporter.walk(model, "")
        writer.finish()
        if config_dict.get("tie_word_embeddings") and _output_embedding_key(model) in writer.keys:
            config_dict["tie_word_embeddings"] = False  # the head was written apart: transformers must not re-tie it
        if quantize_merged and exporter.nf4_template is not None:
            config_dict["quantization_config"] = {
                "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": exporter.nf4_template.weight.double_quant,
                "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": exporter.dense_linear or None,
            }
        write_atomic(tmp / "config.json", lambda f: f.write(json.dumps(config_dict, indent=2, sort_keys=True).encode()))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)  # atomic; replaces nothing or an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ExportReport(path, exporter.errors)
    if log is not None and report.quantization_errors:
        log("NF4 re-quantization error of the merged layers (max |Q(W) - W|, ||Q(W) - W|| / ||W||):")
        for name, (max_abs, rel) in report.quantization_errors.items():
            log(f"  {name}: {max_abs:.3e}, {rel:.3e}")
        log(f"  worst relative error: {report.worst_relative_error:.3e}")
    return report
