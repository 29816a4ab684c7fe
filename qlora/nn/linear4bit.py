"""A frozen linear layer whose weight is stored in NF4 (bitsandbytes' Linear4bit layout)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from qlora.ops.functional import nf4_linear
from qlora.quant.nf4 import NF4Tensor, quantize

_WEIGHT_KEYS = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


class Linear4bit(nn.Module):
    """y = x·W0ᵀ + bias with W0 an :class:`~qlora.quant.nf4.NF4Tensor` [out_features, in_features].

    The state dict has bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``),
    so checkpoints move between this and ``bitsandbytes.nn.Linear4bit`` unchanged. ``.to(dtype)``
    never touches the NF4 constants: they stay fp32, as dequantization needs them bit-exact.
    """

    def __init__(self, weight: NF4Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_weight(cls, weight: NF4Tensor, bias: Optional[torch.Tensor] = None) -> "Linear4bit":
        return cls(weight, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "Linear4bit":
        return cls(quantize(linear.weight.data, blocksize, double_quant), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def _apply(self, fn, recurse=True):
        # fn may change dtype as well as device; apply it to the uint8 codes (which it cannot cast)
        # only to learn the target device, and move the NF4 tensors there unchanged.
        device = fn(self.weight.packed).device
        if device != self.weight.device:
            self.weight = self.weight.to(device)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.weight.state_dict(prefix + "weight").items():
            destination[key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        keys = [prefix + "weight" + suffix for suffix in _WEIGHT_KEYS]
        if prefix + "weight" in state_dict:
            try:
                loaded = NF4Tensor.from_state_dict(state_dict, prefix + "weight")
            except (KeyError, ValueError) as err:
                error_msgs.append(f"{prefix}weight: {err}")
            else:
                if tuple(loaded.shape) != tuple(self.weight.shape):
                    error_msgs.append(f"{prefix}weight: shape {tuple(loaded.shape)} in the checkpoint, "
                                      f"{tuple(self.weight.shape)} in the model")
                else:
                    self.weight = loaded.to(self.weight.device)
        elif strict:
            missing_keys.append(prefix + "weight")
        rest = {k: v for k, v in state_dict.items() if k not in keys}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.weight.blocksize}, double_quant={self.weight.double_quant}")
