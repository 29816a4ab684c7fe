"""A frozen linear layer whose weight is stored in NF4 (bitsandbytes' Linear4bit layout)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from qlora.nn.nf4_param import NF4Param
from qlora.ops.functional import nf4_linear
from qlora.quant.nf4 import NF4Tensor, quantize

_WEIGHT_KEYS = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


class Linear4bit(nn.Module):
    """y = x·W0ᵀ + bias with W0 an :class:`~qlora.quant.nf4.NF4Tensor` [out_features, in_features].

    The state dict has bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``),
    so checkpoints move between this and ``bitsandbytes.nn.Linear4bit`` unchanged. ``.to(dtype)``
    never touches the NF4 constants: they stay fp32, as dequantization needs them bit-exact.

    ``weight`` is a plain attribute until :meth:`register_weight_parameter` makes it a frozen
    :class:`~qlora.nn.nf4_param.NF4Param` parameter, which FSDP2 shards by rows; :attr:`nf4` is the
    NF4 weight either way (inside FSDP's forward and backward, the gathered one).
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

    @property
    def nf4(self) -> NF4Tensor:
        """The NF4 weight, whether stored as an attribute or as the parameter FSDP2 shards."""
        weight = self.weight
        if isinstance(weight, NF4Param):
            return weight.nf4
        if isinstance(weight, NF4Tensor):
            return weight
        raise RuntimeError(f"the NF4 weight is sharded ({type(weight).__name__} of shape {tuple(weight.shape)}); "
                           "it is whole only inside FSDP's forward and backward")

    def register_weight_parameter(self) -> None:
        """Store the weight as a frozen :class:`NF4Param` parameter, so that FSDP2 shards it."""
        if "weight" not in self._parameters:
            nf4 = self.__dict__.pop("weight")
            self.register_parameter("weight", nn.Parameter(NF4Param(nf4), requires_grad=False))

    def _set_nf4(self, nf4: NF4Tensor) -> None:
        if "weight" in self._parameters:
            self._parameters["weight"] = nn.Parameter(NF4Param(nf4), requires_grad=False)
        else:
            self.weight = nf4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.nf4, self.bias)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self.nf4.dequantize(dtype)

    def _apply(self, fn, recurse=True):
        # fn may change dtype as well as device; apply it to the uint8 codes (which it cannot cast)
        # only to learn the target device, and move the NF4 tensors there unchanged.
        weight = self._parameters.pop("weight", None)
        if weight is not None and not isinstance(weight, NF4Param):  # FSDP's sharded DTensor: FSDP moves it
            self._parameters["weight"] = weight
            return super()._apply(fn, recurse)
        nf4 = self.__dict__["weight"] if weight is None else weight.nf4
        device = fn(nf4.packed).device
        result = super()._apply(fn, recurse)
        if weight is not None:
            self._parameters["weight"] = weight
        if device != nf4.device:
            self._set_nf4(nf4.to(device))
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self.weight
        # Under FSDP2 the parameter at rest is a DTensor whose local tensor holds this rank's rows:
        # the state dict then has this rank's shard in bitsandbytes' keys (its JSON names its shape).
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        nf4 = local.nf4 if isinstance(local, NF4Param) else local
        for key, value in nf4.state_dict(prefix + "weight").items():
            destination[key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        keys = [prefix + "weight" + suffix for suffix in _WEIGHT_KEYS]
        if prefix + "weight" in state_dict:
            try:
                loaded = NF4Tensor.from_state_dict(state_dict, prefix + "weight")
            except (KeyError, ValueError) as err:
                error_msgs.append(f"{prefix}weight: {err}")
            else:
                if tuple(loaded.shape) != tuple(self.nf4.shape):
                    error_msgs.append(f"{prefix}weight: shape {tuple(loaded.shape)} in the checkpoint, "
                                      f"{tuple(self.nf4.shape)} in the model")
                else:
                    self._set_nf4(loaded.to(self.nf4.device))
        elif strict:
            missing_keys.append(prefix + "weight")
        rest = {k: v for k, v in state_dict.items() if k not in keys}
        if "weight" in self._parameters:  # already loaded above; nn.Module must not look for it again
            rest[prefix + "weight"] = self._parameters["weight"]
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.nf4.blocksize}, double_quant={self.nf4.double_quant}")
