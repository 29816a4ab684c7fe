"""Modules: the NF4 base layer and LoRA on top of it."""
from qlora.nn.linear4bit import Linear4bit
from qlora.nn.lora import LoRALinear

__all__ = ["Linear4bit", "LoRALinear"]
