"""Modules: the NF4 base layer and LoRA, DoRA and AdaLoRA on top of it."""
from qlora.nn.adalora import AdaLoRALinear
from qlora.nn.dora import DoRALinear
from qlora.nn.linear4bit import Linear4bit
from qlora.nn.lora import LoRALinear

__all__ = ["AdaLoRALinear", "DoRALinear", "Linear4bit", "LoRALinear"]
