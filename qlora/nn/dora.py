"""DoRA (weight-decomposed LoRA, Liu et al. 2024) on a frozen NF4 or dense base, with PEFT's names.

W' = m · (W0 + s·B·A) / ‖W0 + s·B·A‖, the norm taken per output row (PEFT's "column-wise" norm of
the [in, out] view). The norm is computed one slab of W0's rows at a time, so an NF4 base is never
dequantized whole for it, and it is treated as a constant in backward (the paper's §4.3
memory-saving variant, which PEFT implements with ``.detach()``).
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from qlora.ops.functional import nf4_lora_linear
from qlora.quant.nf4 import NF4Tensor
from qlora.nn.linear4bit import Linear4bit
from qlora.nn.lora import LoRALinear

# Elements of W0 per tile of the norm computation: 16 MiB in fp32, i.e. 2048 rows of an 8192-wide
# layer. Small against the activations of one step, and large enough that the loop is a few
# hundred iterations for the biggest (28672-wide) Llama projections.
NORM_TILE_ELEMENTS = 1 << 22


def _nf4_block_scales(weight: NF4Tensor, first: int, stop: int) -> torch.Tensor:
    """fp32 absmax of blocks [first, stop), by the same operations as ``NF4Tensor.absmax_fp32``."""
    if not weight.double_quant:
        return weight.absmax[first:stop].float()
    nb = weight.nested_blocksize
    nested_first, nested_stop = first // nb, (stop - 1) // nb + 1
    nested = weight.nested_absmax[nested_first:nested_stop].repeat_interleave(nb)
    nested = nested[first - nested_first * nb: stop - nested_first * nb]
    return weight.nested_quant_map[weight.absmax[first:stop].long()] * nested + weight.offset


def nf4_rows(weight: NF4Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a 2-D NF4 weight in fp32, bit-identical to the same rows of
    ``weight.dequantize(torch.float32)``, touching only the bytes and scales of those rows."""
    k = weight.shape[1]
    first, last = start * k, stop * k  # flat element range; it may start in the low nibble of a byte
    packed = weight.packed.reshape(-1)[first // 2: (last + 1) // 2]
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    codes = codes[first % 2: first % 2 + last - first]
    bs = weight.blocksize
    block_first, block_stop = first // bs, (last - 1) // bs + 1
    scales = _nf4_block_scales(weight, block_first, block_stop).repeat_interleave(bs)
    scales = scales[first - block_first * bs: last - block_first * bs]
    return (weight.quant_map[codes.long()] * scales).view(stop - start, k)


def _base_rows(weight: Union[NF4Tensor, torch.Tensor], start: int, stop: int) -> torch.Tensor:
    if isinstance(weight, NF4Tensor):
        return nf4_rows(weight, start, stop)
    return weight[start:stop].float()


def _tile_row_norms(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    start: int, stop: int) -> torch.Tensor:
    # A function of its own so the fp32 tile is freed on return, before the next one is made.
    tile = _base_rows(weight, start, stop)
    tile.addmm_(lora_B[start:stop].float(), lora_A.float(), alpha=scaling)
    return torch.linalg.vector_norm(tile, dim=1)


@torch.no_grad()
def dora_weight_norm(weight: Union[NF4Tensor, torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float, tile_rows: int) -> torch.Tensor:
    """‖W0 + s·B·A‖₂ of every output row, fp32 [out], with W0 [out, in] read ``tile_rows`` rows
    at a time. No gradient: DoRA treats the norm as a constant in backward."""
    if tile_rows <= 0:
        raise ValueError(f"tile_rows must be positive, got {tile_rows}")
    out_features = weight.shape[0]
    norms = torch.empty(out_features, dtype=torch.float32, device=lora_A.device)
    # fp32 even inside a bf16 autocast region: the norm divides every output of the layer.
    with torch.autocast(lora_A.device.type, enabled=False):
        for start in range(0, out_features, tile_rows):
            stop = min(start + tile_rows, out_features)
            norms[start:stop] = _tile_row_norms(weight, lora_A, lora_B, scaling, start, stop)
    return norms


class DoRAMagnitude(nn.Module):
    """The magnitude vector m [out] of one adapter, held as ``weight`` so that its state-dict key is
    PEFT's ``lora_magnitude_vector.<adapter>.weight``."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class DoRALinear(LoRALinear):
    """y = x·W0ᵀ + b + Σ_a [(m_a/n_a − 1) ⊙ x_a·W0ᵀ + (m_a/n_a) ⊙ s_a·B_a(A_a(x_a))], where x_a is
    dropout_a(x), n_a = ‖W0 + s_a·B_a·A_a‖ per output row (detached) and m_a = ``lora_magnitude_vector[a]``.

    For one adapter this is PEFT's DoRA layer: y = (m/n) ⊙ (W0 + s·B·A)·x + b without dropout. With
    several, each adds its own term against W0 alone (PEFT instead feeds the output of the
    previous adapters into the next one's base term), so merging is the sum of :meth:`delta_weight`.
    Constructor, adapter management and the ``lora_A``/``lora_B`` names are :class:`LoRALinear`'s.
    """

    norm_tile_elements = NORM_TILE_ELEMENTS

    def reset_adapter(self, name: str) -> None:
        """A and B as :class:`LoRALinear` initialises them (B = 0 by default), then m = ‖W0 + s·B·A‖
        per row: m/n = 1, so the layer starts out computing exactly W0·x + s·B·A·x (= W0·x)."""
        super().reset_adapter(name)
        norm = self.weight_norm(name)
        if "lora_magnitude_vector" not in self._modules:
            # LoRALinear.__init__ adds (and resets) the first adapter before a DoRALinear body could run.
            self.lora_magnitude_vector = nn.ModuleDict()
        if name in self.lora_magnitude_vector:
            with torch.no_grad():
                self.lora_magnitude_vector[name].weight.copy_(norm)
        else:
            self.lora_magnitude_vector[name] = DoRAMagnitude(norm)

    def weight_norm(self, name: str) -> torch.Tensor:
        """‖W0 + s·B·A‖ per output row for adapter ``name``, fp32 [out], detached."""
        tile_rows = max(1, self.norm_tile_elements // self.in_features)
        return dora_weight_norm(self.base_layer.weight, self.lora_A[name].weight, self.lora_B[name].weight,
                                self.scaling[name], tile_rows)

    def _base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x·W0ᵀ without bias."""
        if isinstance(self.base_layer, Linear4bit):
            return nf4_lora_linear(x, self.base_layer.weight, None, [], self.training)
        return F.linear(x, self.base_layer.weight.to(x.dtype))

    def _dora_term(self, x: torch.Tensor, base_out: torch.Tensor, name: str) -> torch.Tensor:
        dropout = self.lora_dropout[name]
        if self.training and isinstance(dropout, nn.Dropout):
            # The direction's W0 part must see the same dropped-out x as B·A (as in PEFT).
            x = dropout(x)
            base_out = self._base_matmul(x)
        scale = (self.lora_magnitude_vector[name].weight / self.weight_norm(name)).to(x.dtype)
        lora = F.linear(F.linear(x, self.lora_A[name].weight.to(x.dtype)), self.lora_B[name].weight.to(x.dtype))
        return (scale - 1) * base_out + scale * (self.scaling[name] * lora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self._base_matmul(x)
        y = base_out
        if not self.disable_adapters:
            for name in self.active_adapters:
                y = y + self._dora_term(x, base_out, name)
        bias = self.base_layer.bias
        return y if bias is None else y + bias.to(y.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """What merging adapter ``name`` adds to W0, fp32 [out, in]: (m/n)·(W0 + s·B·A) − W0.

        Needs the whole W0 in fp32, as merging does anyway."""
        w0 = self._base_weight_fp32()
        scale = self.lora_magnitude_vector[name].weight.float() / self.weight_norm(name)
        return scale[:, None] * (w0 + super().delta_weight(name)) - w0
