"""NF4 with double quantization, byte-compatible with bitsandbytes.

Format (QLoRA paper, §3; bitsandbytes ``quantize_4bit(quant_type="nf4", compress_statistics=True)``):

* A tensor ``w`` with ``n`` elements, read row-major, is cut into blocks of ``blocksize`` elements
  (the last block may be shorter). Block ``b`` has scale ``absmax[b] = max |w[block b]|``.
* Each element is scaled to ``w · (1 / absmax)`` (fp32) and rounded to the nearest of the 16
  ``NF4_CODE`` values; one exactly on a midpoint takes the lower code.
* Codes are packed two per byte, the first element of a pair in the high nibble:
  ``packed`` is uint8 ``[(n + 1) // 2, 1]``.
* Double quantization: the fp32 ``absmax`` is centred by its mean ``offset`` and quantized blockwise
  (block 256) to 8 bits with bitsandbytes' signed dynamic map ``DYNAMIC_MAP`` (nearest value; one
  exactly on a midpoint takes the code of even index); that leaves the uint8 ``absmax`` codes, one
  fp32 ``nested_absmax`` per 256 blocks, and the scalar ``offset``.

Rounding rule: the one of bitsandbytes' CUDA kernel ``kQuantizeBlockwise`` (csrc/kernels.cu), which
wrote most NF4 checkpoints in the wild. Its NF4 decision tree ``dQuantizeNF4`` compares ``x >
threshold`` against the fp32 midpoints of ``NF4_CODE`` (so a tie goes down); its 8-bit
``dQuantize`` is a binary search of fixed depth 7 from index 127 that always ends on an even index
and compares ``x`` with the fp32 midpoints to that index's two neighbours with strict inequalities,
so it returns the nearest code and, on a tie, the even index. Every block, the trailing partial one
included, is scaled by the reciprocal of its absmax. bitsandbytes' CPU path differs (see
``tests/quant/test_nf4.py``): its 8-bit ``quantize_cpu`` (csrc/cpu_ops.cpp) first snaps
``x`` to a 65536-step grid over [-1, 1] and looks the grid point up in a table of nearest codes,
which moves about 0.1% of the absmax codes by one; its NF4 path (a PyTorch op) divides the
trailing partial block by its absmax instead of multiplying by the reciprocal. An all-zero block:
bitsandbytes' CUDA kernel computes ``0 · (1/0)`` = NaN and the NF4 tree sends NaN to code 0
(-1.0), which under double quantization dequantizes to ``-absmax'`` with the quantized
``absmax' != 0``; here (as on bitsandbytes' CPU) such a block gets the code of 0.0 and stays 0. For
the 8-bit codes both bitsandbytes kernels write code 0 for an all-zero block, as here (it decodes
to ``offset`` whatever the code, its nested absmax being 0).

Dequantization, all in fp32 and cast once at the end (bit-identical to bitsandbytes)::

    absmax_fp32[b] = DYNAMIC_MAP[absmax[b]] * nested_absmax[b // 256] + offset
    w[i]           = NF4_CODE[code[i]] * absmax_fp32[i // blocksize]

Storage per parameter: 4 bits + 8/blocksize bits for the absmax code + 32/(blocksize·256) bits for the
nested absmax = 4.127 bits at blocksize 64 (QLoRA paper: "4 + 0.127").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import torch

from qlora.quant.dynamic_map import dynamic_map

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256

# The 16 NF4 values: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA paper,
# Appendix E). These fp32 values are the ones bitsandbytes stores as `quant_map`.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)


DYNAMIC_MAP = dynamic_map(signed=True)  # double quantization of the absmax


def _blockwise_codes(flat: torch.Tensor, code: torch.Tensor, blocksize: int, *,
                     ties_to_even: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``flat`` (fp32, 1-D) blockwise to the nearest value of the sorted ``code``.

    Returns (codes int32 [n], absmax fp32 [ceil(n / blocksize)]). Each block is scaled by the fp32
    reciprocal of its absmax. A scaled value equal to the midpoint of codes k and k+1 takes k, or
    with ``ties_to_even`` whichever of k, k+1 is even (see the module docstring). An all-zero block
    is scaled by 0, so it takes the code nearest 0.0.
    """
    n = flat.numel()
    full = n - n % blocksize  # full blocks, then a trailing partial one
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().view(1)])
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = (flat[:full].view(-1, blocksize) * inverse[:full // blocksize, None]).view(-1)
    if full < n:
        scaled = torch.cat([scaled, flat[full:] * inverse[-1]])
    midpoints = ((code[:-1] + code[1:]) / 2).to(flat.device)
    codes = torch.bucketize(scaled, midpoints, out_int32=True)  # scaled == midpoints[k] -> k
    if ties_to_even:
        on_midpoint = scaled == midpoints[codes.clamp(max=midpoints.numel() - 1)]
        codes += on_midpoint & (codes % 2 == 1)
    return codes, absmax


def _byte_pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [256] whose entry b holds the two fp32 values (code[b >> 4], code[b & 0xF]) in that
    order, so one 8-byte gather decodes both codes of a packed byte (high nibble first)."""
    high, low = code[:, None].expand(16, 16), code[None, :].expand(16, 16)
    pairs = torch.stack([high, low], dim=-1)  # fp32 [16, 16, 2]: [b >> 4, b & 0xF, nibble]
    return pairs.view(torch.int64).view(256)


def _scale_blocks_(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[i] *= absmax[i // blocksize]`` in place for a flat fp32 ``values``; returns it.

    The full blocks are a [blocks, blocksize] view times absmax broadcast along a column, so no
    per-element scale tensor is ever built; a trailing partial block is scaled by its own absmax.
    """
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < n:
        values[full:].mul_(absmax[full // blocksize])
    return values


@dataclass
class NF4Tensor:
    """A frozen weight in bitsandbytes' NF4 layout (see the module docstring for the math).

    Fields hold exactly what bitsandbytes serializes, so conversion in either direction copies no
    values: ``packed`` uint8 [(n+1)//2, 1]; ``absmax`` uint8 [n_blocks] (double quant) or fp32
    [n_blocks]; ``quant_map`` fp32 [16]; ``nested_absmax`` fp32 [ceil(n_blocks/256)];
    ``nested_quant_map`` fp32 [256]; ``offset`` fp32 scalar.
    """

    packed: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor
    quant_map: torch.Tensor
    nested_absmax: Optional[torch.Tensor] = None
    nested_quant_map: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def n_blocks(self) -> int:
        return self.absmax.numel()

    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Bytes of storage (codes, scales and double-quant constants)."""
        tensors = [self.packed, self.absmax, self.quant_map]
        if self.double_quant:
            tensors += [self.nested_absmax, self.nested_quant_map, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors)

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block scales in fp32, [n_blocks]."""
        if not self.double_quant:
            return self.absmax.float()
        # int32 indices: index_select takes them as they are, where indexing converts to int64
        scales = self.nested_quant_map.index_select(0, self.absmax.to(torch.int32))
        return _scale_blocks_(scales, self.nested_absmax, self.nested_blocksize).add_(self.offset)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense tensor of ``shape`` in ``dtype`` (default: the dtype it was quantized from).

        One gather per packed byte from a 256-entry table of value pairs, then one in-place
        multiply by the block scales: the same fp32 products as the formula, so the result is
        bit-identical to it (and to bitsandbytes).
        """
        table = _byte_pair_table(self.quant_map)
        pairs = table.index_select(0, self.packed.reshape(-1).to(torch.int32))  # int64 [n_bytes]
        values = pairs.view(torch.float32)[: self.numel()]  # fp32 [n], codes in element order
        values = _scale_blocks_(values, self.absmax_fp32(), self.blocksize)
        return values.view(self.shape).to(dtype or self.dtype)

    def to(self, device) -> "NF4Tensor":
        """A copy on ``device``; values are untouched (the scales stay fp32 whatever the model dtype)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Tensor(
            packed=move(self.packed), shape=self.shape, dtype=self.dtype, blocksize=self.blocksize,
            absmax=move(self.absmax), quant_map=move(self.quant_map),
            nested_absmax=move(self.nested_absmax), nested_quant_map=move(self.nested_quant_map),
            offset=move(self.offset), nested_blocksize=self.nested_blocksize,
        )

    # --- bitsandbytes interop -------------------------------------------------------------------

    def to_bnb(self):
        """(packed uint8 [(n+1)//2, 1], ``bitsandbytes.functional.QuantState``) sharing these tensors."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(
                absmax=self.nested_absmax, code=self.nested_quant_map,
                blocksize=self.nested_blocksize, dtype=torch.float32,
            )
        state = QuantState(
            absmax=self.absmax, shape=torch.Size(self.shape), code=self.quant_map, blocksize=self.blocksize,
            quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2,
        )
        return self.packed, state

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Tensor":
        """Wrap bitsandbytes' packed weight and ``QuantState`` (no copy)."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"expected an nf4 QuantState, got quant_type={quant_state.quant_type!r}")
        nested = quant_state.state2 if quant_state.nested else None
        return cls(
            packed=packed.view(torch.uint8).reshape(-1, 1), shape=torch.Size(quant_state.shape),
            dtype=quant_state.dtype, blocksize=quant_state.blocksize, absmax=quant_state.absmax,
            quant_map=quant_state.code.float(),
            nested_absmax=None if nested is None else nested.absmax,
            nested_quant_map=None if nested is None else nested.code,
            offset=None if nested is None else torch.as_tensor(quant_state.offset, dtype=torch.float32),
            nested_blocksize=NESTED_BLOCKSIZE if nested is None else nested.blocksize,
        )

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The keys transformers writes for a bnb 4-bit weight: ``weight``, ``weight.absmax``,
        ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map`` and
        ``weight.quant_state.bitsandbytes__nf4`` (a JSON blob of the non-tensor fields as uint8)."""
        meta = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        out = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.quant_map}
        if self.double_quant:
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=self.offset.item())
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_quant_map
        blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        out[f"{prefix}.quant_state.bitsandbytes__nf4"] = blob
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "weight") -> "NF4Tensor":
        """Inverse of :meth:`state_dict`; a missing or malformed key raises naming that key."""
        meta_key = f"{prefix}.quant_state.bitsandbytes__nf4"
        for key in (prefix, f"{prefix}.absmax", f"{prefix}.quant_map", meta_key):
            if key not in state:
                raise KeyError(f"NF4 state dict is missing key {key!r}")
        try:
            meta = json.loads(bytes(state[meta_key].to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{meta_key}: not a bitsandbytes quant-state JSON blob ({err})") from err
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"{meta_key}: quant_type is {meta.get('quant_type')!r}, only 'nf4' is supported")
        double_quant = "nested_offset" in meta
        if double_quant:
            for key in (f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"):
                if key not in state:
                    raise KeyError(f"NF4 state dict is missing key {key!r}")
        packed = state[prefix]
        return cls(
            packed=packed.view(torch.uint8).reshape(-1, 1), shape=torch.Size(meta["shape"]),
            dtype=getattr(torch, meta["dtype"]), blocksize=int(meta["blocksize"]),
            absmax=state[f"{prefix}.absmax"], quant_map=state[f"{prefix}.quant_map"].float(),
            nested_absmax=state[f"{prefix}.nested_absmax"] if double_quant else None,
            nested_quant_map=state[f"{prefix}.nested_quant_map"] if double_quant else None,
            offset=torch.tensor(float(meta["nested_offset"]), device=packed.device) if double_quant else None,
            nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
        )


def check_quantizable(w: torch.Tensor, blocksize: int) -> None:
    """Raise if ``w`` cannot be NF4-quantized with ``blocksize``."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"can only quantize fp32/fp16/bf16 tensors, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *,
             dtype: Optional[torch.dtype] = None, chunk_elements: Optional[int] = None) -> NF4Tensor:
    """NF4-quantize ``w`` (fp32/fp16/bf16, any shape) blockwise, optionally with double quantization.

    ``dtype``: what the result dequantizes to (default ``w.dtype``). ``chunk_elements``: round at
    most about this many elements at a time (slices start at multiples of the blocksize, so every
    block is scaled and rounded exactly as in one pass), which bounds the fp32 and int64
    temporaries at ~24 bytes per chunk element whatever the size of ``w``; the double quantization
    needs all block scales and runs once at the end (they are 1/blocksize of the weight).
    """
    check_quantizable(w, blocksize)
    flat = w.detach().reshape(-1)
    n = flat.numel()
    step = n if chunk_elements is None else max(blocksize, chunk_elements - chunk_elements % blocksize)
    code = NF4_CODE.to(flat.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    for start in range(0, n, step):  # step is a multiple of the (even) blocksize: pairs never straddle
        stop = min(start + step, n)
        codes, scales = _blockwise_codes(flat[start:stop].float(), code, blocksize, ties_to_even=False)
        if codes.numel() % 2:
            # bitsandbytes pads an odd count with the value 0.0, whose NF4 code is 7
            codes = torch.cat([codes, codes.new_full((1,), 7)])
        codes = codes.to(torch.uint8)
        packed[start // 2: start // 2 + codes.numel() // 2] = (codes[0::2] << 4) | codes[1::2]
        absmax[start // blocksize: start // blocksize + scales.numel()] = scales
    q = NF4Tensor(packed=packed.view(-1, 1), shape=torch.Size(w.shape), dtype=dtype or w.dtype,
                  blocksize=blocksize, absmax=absmax, quant_map=code)
    if double_quant:
        q.offset = absmax.mean()
        q.nested_quant_map = DYNAMIC_MAP.to(flat.device)
        codes, q.nested_absmax = _blockwise_codes(absmax - q.offset, q.nested_quant_map, NESTED_BLOCKSIZE,
                                                  ties_to_even=True)
        # A nested block of zeros (absmax equal to the mean) decodes to the offset whatever its codes;
        # both bitsandbytes kernels write code 0 there.
        zero = (q.nested_absmax == 0).repeat_interleave(NESTED_BLOCKSIZE)[: codes.numel()]
        q.absmax = codes.masked_fill(zero, 0).to(torch.uint8)
    return q


def dequantize(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense tensor ``q`` represents, in ``dtype`` (default: its original dtype)."""
    return q.dequantize(dtype)
