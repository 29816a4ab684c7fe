"""Modules: the NF4 base layer and LoRA and DoRA on top of it (AdaLoRA's layer is in qlora.adalora)."""
from qlora.nn.dora import DoRALinear
from qlora.nn.linear4bit import Linear4bit
from qlora.nn.lora import LoRALinear

__all__ = ["DoRALinear", "Linear4bit", "LoRALinear"]
