"""The dynamic 8-bit quantization map of Dettmers et al. (8-bit Optimizers via Block-wise
Quantization, 2021; "8-bit approximations", 2015), shared by the NF4 format's double quantization
(signed) and the 8-bit optimizer states (signed and unsigned).

Decade e in 0..6 covers magnitudes [10^(e-6) * 0.1, 10^(e-6)] with 2^e (signed) or 2^(e+1)
(unsigned) evenly spaced values, the midpoints of an even split of [0.1, 1]; plus 0 and 1. The
signed map mirrors the decades to negative values (254 + 2 = 256 values either way); the unsigned
one spends the sign bit on a finer fraction. The values equal bitsandbytes'
``create_dynamic_map(signed)`` bit for bit: the scaling is done in fp32 tensor arithmetic, as there
(scaling float64 midpoints instead changes the last bit of 30 entries).
"""
import torch


def dynamic_map(signed: bool) -> torch.Tensor:
    """Sorted fp32 [256] dynamic quantization map (see the module docstring)."""
    values = [0.0, 1.0]
    for decade in range(7):
        steps = 2 ** decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1.0, steps + 1)  # fp32, as the reference map is built
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        magnitudes = (10.0 ** (decade - 6)) * midpoints
        values += magnitudes.tolist()
        if signed:
            values += (-magnitudes).tolist()
    qmap = torch.tensor(sorted(values), dtype=torch.float32)
    assert qmap.numel() == 256
    return qmap
