"""The storage format: NF4 with double-quantized absmax, byte for byte bitsandbytes' 4-bit format."""
from qlora.quant.nf4 import NF4Tensor, dequantize, quantize

__all__ = ["NF4Tensor", "dequantize", "quantize"]
