"""Triton kernels (imported as ``qlora.kernels``): compute only, one file per op."""
from .dequant import nf4_dequantize
from .nf4_gemv import nf4_gemv_lora
from .nf4_lora_linear import lora_a, lora_dropout, nf4_lora_linear_fwd
from .nf4_lora_linear_bwd import nf4_lora_linear_bwd_dx

__all__ = ["nf4_dequantize", "nf4_gemv_lora", "lora_a", "lora_dropout", "nf4_lora_linear_fwd",
           "nf4_lora_linear_bwd_dx"]
