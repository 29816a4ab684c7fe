"""Blockwise dynamic 8-bit quantization of optimizer moments (the format of 8-bit Adam).

A flat tensor is cut into blocks of 256 elements. Block b keeps one fp32 ``absmax[b]`` and one
uint8 code per element; element i decodes to ``qmap[code_i] * absmax[i // 256]``.

``qmap`` is ``qlora.quant.dynamic_map.dynamic_map(signed)``, bitsandbytes' map, so the states mean the
same thing in both libraries; the unsigned map suits the non-negative second moment.
"""
import torch


QUANT_BLOCK = 256


def nearest_code(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """uint8 index of the value of sorted ``qmap`` nearest to each element of fp32 ``x``.

    Rule (shared with the Triton kernel): lo = largest index with qmap[lo] <= x (0 if none),
    hi = min(lo + 1, 255); take hi only if it is strictly closer.
    """
    lo = (torch.searchsorted(qmap, x, right=True) - 1).clamp_(0, 255)
    hi = (lo + 1).clamp_(max=255)
    take_hi = (qmap[hi] - x) < (x - qmap[lo])
    return torch.where(take_hi, hi, lo).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor):
    """fp32 [n] -> (uint8 codes [n], fp32 absmax [ceil(n / 256)])."""
    n = x.numel()
    n_blocks = -(-n // QUANT_BLOCK)
    padded = torch.zeros(n_blocks * QUANT_BLOCK, dtype=torch.float32, device=x.device)
    padded[:n] = x
    blocks = padded.view(n_blocks, QUANT_BLOCK)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block has absmax 0: its elements normalize to 0 instead of 0/0.
    normalized = torch.where(absmax[:, None] > 0, blocks / absmax.clamp(min=1e-38)[:, None], 0.0)
    codes = nearest_code(normalized.view(-1)[:n].contiguous(), qmap)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor):
    """(uint8 codes [n], fp32 absmax [ceil(n / 256)]) -> fp32 [n]."""
    n = codes.numel()
    scale = absmax.repeat_interleave(QUANT_BLOCK)[:n]
    return qmap[codes.long()] * scale
