"""On a CUDA machine: the ISSUE's whole correctness grid (M x K x N x r x dtype, full product) through
NF4LoRALinearFunction, output and every gradient, against an fp32 reference. Skipped on CPU (the
interpreter covers a pairwise sample of the grid in tests/ops/test_fused.py and
tests/test_kernels_nf4_lora_linear.py).

Tolerance: ours <= 2x PyTorch's own error of the same formula in the low precision + one output
rounding (2^-8 bf16, 2^-11 fp16 relative to the output's magnitude).
"""
import itertools
import types

import pytest
import torch

from qlora.ops import fused
from qlora.kernels.nf4_lora_linear import lora_dropout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GRID = list(itertools.product([1, 3, 64, 130], [64, 192, 320], [64, 192, 320], [1, 8, 16],
                              [torch.bfloat16, torch.float16]))


@pytest.mark.parametrize("m,k,n,r,dtype", GRID)
def test_grid_on_gpu(m, k, n, r, dtype, bnb_nf4_weight):
    gen = torch.Generator().manual_seed(m * 7 + k + n + r)
    weight, w = bnb_nf4_weight(n, k, dtype, "cuda", gen)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda().requires_grad_()
    a = (torch.randn(r, k, generator=gen) / k**0.5).to(dtype).cuda().requires_grad_()
    b = torch.randn(n, r, generator=gen).to(dtype).cuda().requires_grad_()
    bias = torch.randn(n, generator=gen).to(dtype).cuda().requires_grad_()
    seeds = torch.tensor([99], dtype=torch.int64, device="cuda")
    p, scaling = 0.1, 2.0
    mask = lora_dropout(torch.ones(m, k, dtype=dtype, device="cuda"), p, seeds)
    dy = torch.randn(m, n, generator=gen).to(dtype).cuda()
    unit = 2.0**-11 if dtype == torch.float16 else 2.0**-8

    def run(impl):
        for t in (x, a, b, bias):
            t.grad = None
        y = impl()
        y.backward(dy)
        return [y.detach()] + [t.grad.clone() for t in (x, a, b, bias)]

    ours = run(lambda: fused.NF4LoRALinearFunction.apply(x, weight, bias, a, b * scaling, (0, r), (p,), seeds))
    lowp = run(lambda: x @ w.t() + bias + ((x * mask) @ a.t()) @ b.t() * scaling)
    leaves32 = [t.detach().float().requires_grad_() for t in (x, a, b, bias)]
    x32, a32, b32, bias32 = leaves32
    y32 = x32 @ w.float().t() + bias32 + ((x32 * mask.float()) @ a32.t()) @ b32.t() * scaling
    y32.backward(dy.float())
    ref = [y32.detach()] + [t.grad for t in leaves32]
    for name, o, lo, rf in zip(["y", "dx", "dA", "dB", "dbias"], ours, lowp, ref):
        err = (o.float() - rf).abs().max().item()
        bound = 2 * (lo.float() - rf).abs().max().item() + unit * rf.abs().max().item()
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"
