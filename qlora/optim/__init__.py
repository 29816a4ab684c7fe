"""Optimizers: paged AdamW with spillable (fp32 or 8-bit) states, LoRA+ param groups."""
from qlora.optim.lora_plus import lora_plus_param_groups
from qlora.optim.paged_adamw import PagedAdamW

__all__ = ["PagedAdamW", "lora_plus_param_groups"]
