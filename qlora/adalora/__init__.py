"""AdaLoRA on the NF4 base: the layer (``layer``), the rank masks (``ranks``), the importance-driven
rank allocator (``allocator``), PEFT-format adapter files (``adapter``) and the training hook
(``training``).

Only the layer is imported here: ``qlora.model.inject`` imports it, and ``adapter`` imports
``qlora.model``.
"""
from qlora.adalora.layer import AdaLoRALinear

__all__ = ["AdaLoRALinear"]
