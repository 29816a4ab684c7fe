"""A module trained in full next to LoRA adapters (PEFT's ``modules_to_save``), e.g. a new head."""
from __future__ import annotations

import copy

import torch
from torch import nn

from qlora.nn.linear4bit import Linear4bit
from qlora.nn.lora import check_adapter_name


class ModulesToSaveWrapper(nn.Module):
    """Keeps the frozen ``original_module`` and one trainable copy per adapter in
    ``modules_to_save[name]`` (PEFT's attribute names), and runs the copy of the first active
    adapter that has one, or the original when adapters are disabled."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    def add_adapter(self, name: str) -> None:
        check_adapter_name(name)
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        self.modules_to_save[name] = _trainable_copy(self.original_module)
        self.active_adapters.append(name)

    def set_adapter(self, names) -> None:
        self.active_adapters = [names] if isinstance(names, str) else list(names)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def forward(self, *args, **kwargs):
        if not self.disable_adapters:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name](*args, **kwargs)
        return self.original_module(*args, **kwargs)


def _trainable_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients on; an NF4 layer is copied as a dense ``nn.Linear`` (NF4 weights
    cannot be trained)."""
    if isinstance(module, Linear4bit):
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(module.weight.dequantize())
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        copied = dense
    else:
        copied = copy.deepcopy(module)
    for p in copied.parameters():
        p.requires_grad_(True)
    return copied
