"""Fused forward (S = X_d A^T, Y = X W0^T + S B_s^T + bias) and fused dX kernel vs fp32 references.

Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it when there is no GPU).

Tolerance (flash-attention's rule): the reference is computed in fp32 from the very operands the
kernel sees (W0 dequantized and rounded to the compute dtype, S rounded to it); PyTorch's own error
is that of the same formula in the low precision. Ours must be <= 2x PyTorch's + ``atol``, with
atol = one output rounding at the output's magnitude: 2^-8 (bf16) / 2^-11 (fp16) relative on the
GPU, 2^-7 / 2^-11 under the interpreter, whose fp32 -> bf16 cast truncates instead of rounding.
The kernel's fp32 accumulation adds ~K * 2^-24 relative, negligible next to one bf16 rounding.
"""
import bitsandbytes.functional as bnbf
import pytest
import torch
import triton

from qlora.kernels.nf4_lora_linear import lora_a, lora_dropout, nf4_lora_linear_fwd
from qlora.kernels.nf4_lora_linear_bwd import nf4_lora_linear_bwd_dx, nf4_lora_linear_bwd_dx_kernel

INTERPRET = not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class BnbNF4:
    """NF4Tensor fields from bitsandbytes' quantizer; ``dense`` is the format's fp32 definition."""

    def __init__(self, w, blocksize=64, double_quant=True):
        packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                           quant_type="nf4")
        self.packed, self.shape, self.blocksize = packed, tuple(w.shape), blocksize
        self.absmax, self.quant_map = state.absmax, state.code
        byte = packed.view(-1).long()
        codes = torch.stack([byte >> 4, byte & 0xF], dim=1).view(-1)
        absmax = self.absmax
        if double_quant:
            self.offset = state.offset
            self.nested_absmax, self.nested_quant_map = state.state2.absmax, state.state2.code
            self.nested_blocksize = state.state2.blocksize
            nested = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: self.absmax.numel()]
            absmax = self.nested_quant_map[self.absmax.long()] * nested + self.offset
        self.dense = (self.quant_map[codes] * absmax.repeat_interleave(blocksize)).view(self.shape)


def ulp(dtype):
    if dtype == torch.float16:
        return 2.0**-11
    return 2.0**-7 if INTERPRET else 2.0**-8


def assert_within_torch_error(ours, ref32, torch_lowp, dtype):
    ours_err = (ours.float() - ref32).abs().max().item()
    torch_err = (torch_lowp.float() - ref32).abs().max().item()
    atol = ulp(dtype) * ref32.abs().max().item()
    assert ours_err <= 2 * torch_err + atol, f"error {ours_err:.3g} > 2 * torch {torch_err:.3g} + {atol:.3g}"


# Pairwise cover of M x (K, N) x r x dtype over the ISSUE's grid (every pair of values appears in
# some case), instead of the full product, to keep the interpreter fast.
CASES = [
    (1, 64, 64, 1, torch.bfloat16), (1, 192, 320, 8, torch.float16), (1, 320, 192, 16, torch.bfloat16),
    (3, 64, 192, 16, torch.float16), (3, 192, 64, 1, torch.bfloat16), (3, 320, 320, 8, torch.bfloat16),
    (64, 64, 320, 8, torch.bfloat16), (64, 192, 192, 16, torch.bfloat16), (64, 320, 64, 1, torch.float16),
    (130, 64, 64, 16, torch.bfloat16), (130, 192, 320, 1, torch.bfloat16), (130, 320, 192, 8, torch.float16),
]


def make(m, k, n, r, dtype, seed=0, blocksize=64, double_quant=True):
    g = torch.Generator().manual_seed(seed)
    weight = BnbNF4((torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEVICE), blocksize, double_quant)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    a = (torch.randn(r, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    b = (torch.randn(n, r, generator=g) / r**0.5).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    return weight, x, a, b, bias


@pytest.mark.parametrize("m,k,n,r,dtype", CASES)
def test_forward_and_dx(m, k, n, r, dtype):
    p = 0.1 if r != 1 else 0.0  # dropout on most cases, off for r = 1
    check_forward_and_dx(*make(m, k, n, r, dtype), p, dtype)


# Blocksize 32 with K = 96 or 160: K is not a multiple of the forward's BLOCK_K (its masked K
# loop); blocksize 128 is wider than the tiles; two cases keep fp32 absmax (no double quantization).
@pytest.mark.parametrize("m,k,n,blocksize,double_quant", [(37, 96, 160, 32, True), (37, 256, 128, 128, False),
                                                         (5, 160, 96, 32, False)])
def test_forward_and_dx_other_blocksizes(m, k, n, blocksize, double_quant):
    check_forward_and_dx(*make(m, k, n, 8, torch.bfloat16, blocksize=blocksize, double_quant=double_quant),
                         0.1, torch.bfloat16)


def test_dx_last_column_tile_shifted_back(monkeypatch):
    """K = 96 with 64-column dX tiles: the last tile is shifted back to columns 32..95 instead of
    masked, so it recomputes and stores again the 32 columns it shares with the first tile; they
    must come out as the reference's, dropout included (the mask is a function of row and column)."""
    tile = triton.Config({"BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_N": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)
    monkeypatch.setattr(nf4_lora_linear_bwd_dx_kernel, "configs", [tile])  # one config: no autotuning
    check_forward_and_dx(*make(37, 96, 160, 8, torch.bfloat16, blocksize=32), 0.1, torch.bfloat16)


def check_forward_and_dx(weight, x, a, b, bias, p, dtype):
    m, (n, r) = x.shape[0], b.shape
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    w_lowp = weight.dense.to(dtype)  # what the kernel multiplies with
    b_scaled = (b * 2.0).contiguous()  # scaling 2.0 is exact in any float format

    # ---- S = dropout(X) A^T ----------------------------------------------------------
    s = torch.empty(m, r, dtype=dtype, device=DEVICE)
    lora_a(x, a, p, seed, s)
    x_d = lora_dropout(x, p, seed) if p else x
    s_ref = x_d.float() @ a.float().t()
    assert_within_torch_error(s, s_ref, (x_d @ a.t()), dtype)

    # ---- Y -------------------------------------------------------------------------
    y = nf4_lora_linear_fwd(x, weight, bias, s, b_scaled)
    y_ref = x.float() @ w_lowp.float().t() + s.float() @ b_scaled.float().t() + bias.float()
    y_torch = torch.nn.functional.linear(x, w_lowp, bias) + s @ b_scaled.t()
    assert y.shape == (m, n) and y.dtype == dtype
    assert_within_torch_error(y, y_ref, y_torch, dtype)

    # ---- dX = dY W0 + keep/(1-p) * (G A) --------------------------------------------
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    g = dy @ b_scaled
    meta = (torch.tensor([0, r], dtype=torch.int32, device=DEVICE),
            torch.tensor([p], dtype=torch.float32, device=DEVICE), seed)
    dx = nf4_lora_linear_bwd_dx(dy, weight, g, a, *meta)
    lora_ref = g.float() @ a.float()
    lora_torch = g @ a
    if p:
        keep_scale = lora_dropout(torch.ones_like(x), p, seed).float()  # keep / (1 - p)
        lora_ref = lora_ref * keep_scale
        lora_torch = lora_dropout(lora_torch, p, seed)
    dx_ref = dy.float() @ w_lowp.float() + lora_ref
    assert_within_torch_error(dx, dx_ref, dy @ w_lowp + lora_torch, dtype)


def test_forward_without_lora_or_bias_and_with_large_rank():
    weight, x, a, b, _ = make(5, 128, 64, 256, torch.bfloat16)
    w = weight.dense.to(torch.bfloat16)
    y = nf4_lora_linear_fwd(x, weight, None, None, None)
    assert_within_torch_error(y, x.float() @ w.float().t(), x @ w.t(), torch.bfloat16)
    s = torch.empty(5, 256, dtype=torch.bfloat16, device=DEVICE)
    lora_a(x, a, 0.0, torch.zeros(1, dtype=torch.int64, device=DEVICE), s)
    y = nf4_lora_linear_fwd(x, weight, None, s, b)
    ref = x.float() @ w.float().t() + s.float() @ b.float().t()
    assert_within_torch_error(y, ref, x @ w.t() + s @ b.t(), torch.bfloat16)


def test_forward_of_strided_and_offset_views():
    """A row stride that is not a multiple of 16 or an unaligned base is copied first (the kernel
    is compiled for vectorized X loads): same result as the contiguous X."""
    weight, x, _, _, bias = make(7, 64, 64, 1, torch.bfloat16)
    wide = torch.zeros(7, 72, dtype=torch.bfloat16, device=DEVICE)
    wide[:, :64] = x
    flat = torch.zeros(7 * 64 + 1, dtype=torch.bfloat16, device=DEVICE)
    flat[1:] = x.flatten()
    expected = nf4_lora_linear_fwd(x, weight, bias, None, None)
    for view in (wide[:, :64], flat[1:].view(7, 64)):
        assert torch.equal(nf4_lora_linear_fwd(view, weight, bias, None, None), expected)


def test_dx_two_adapters_with_different_dropout():
    """Adapter 1 (r=8, no dropout) and adapter 2 (r=1, p=0.25) share one kernel launch."""
    weight, x, _, _, _ = make(3, 192, 64, 9, torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(3, 64, generator=gen).bfloat16().to(DEVICE)
    a = torch.randn(9, 192, generator=gen).bfloat16().to(DEVICE)
    g = torch.randn(3, 9, generator=gen).bfloat16().to(DEVICE)
    seeds = torch.tensor([5, 77], dtype=torch.int64, device=DEVICE)
    meta = (torch.tensor([0, 8, 9], dtype=torch.int32, device=DEVICE),
            torch.tensor([0.0, 0.25], device=DEVICE), seeds)
    dx = nf4_lora_linear_bwd_dx(dy, weight, g, a, *meta)
    keep2 = lora_dropout(torch.ones_like(x), 0.25, seeds[1:]).float()
    w = weight.dense.bfloat16()
    ref = dy.float() @ w.float() + g[:, :8].float() @ a[:8].float() + keep2 * (g[:, 8:].float() @ a[8:].float())
    torch_lowp = dy @ w + g[:, :8] @ a[:8] + lora_dropout(g[:, 8:] @ a[8:], 0.25, seeds[1:])
    assert_within_torch_error(dx, ref, torch_lowp, torch.bfloat16)


def test_dropout_mask_is_seeded_and_has_rate_p():
    x = torch.ones(130, 320, dtype=torch.bfloat16, device=DEVICE)
    seed = torch.tensor([42], dtype=torch.int64, device=DEVICE)
    first = lora_dropout(x, 0.3, seed)
    assert torch.equal(first, lora_dropout(x, 0.3, seed))  # regenerated, not stored
    assert not torch.equal(first, lora_dropout(x, 0.3, seed + 1))
    kept = first != 0
    # kept values are 1/(1-p) rounded once (one ulp: the interpreter's cast truncates)
    torch.testing.assert_close(first[kept].float(), torch.full_like(first[kept].float(), 1 / 0.7), rtol=2**-7, atol=0)
    # 41600 Bernoulli(0.7) draws: std of the kept fraction = sqrt(0.21/41600) = 0.0022; 5 sigma
    assert abs(kept.float().mean().item() - 0.7) < 5 * 0.0022


def test_clear_errors():
    weight, x, a, b, bias = make(3, 64, 64, 8, torch.bfloat16)
    with pytest.raises(ValueError, match=r"x must be \[M, K=64\]"):
        nf4_lora_linear_fwd(x[:, :32], weight, bias, None, None)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        nf4_lora_linear_fwd(x.float(), weight, bias, None, None)
    with pytest.raises(ValueError, match="pass both S and B_s"):
        nf4_lora_linear_fwd(x, weight, bias, torch.empty(3, 8, dtype=torch.bfloat16, device=DEVICE), None)
    with pytest.raises(ValueError, match="total LoRA rank R=257"):
        nf4_lora_linear_fwd(x, weight, None, torch.empty(3, 257, dtype=torch.bfloat16, device=DEVICE),
                            torch.empty(64, 257, dtype=torch.bfloat16, device=DEVICE))
    weight.shape = (64, 96)
    with pytest.raises(ValueError, match=r"\[N=64, K=96\]: N and K must be multiples"):
        nf4_lora_linear_fwd(torch.empty(3, 96, dtype=torch.bfloat16, device=DEVICE), weight, None, None, None)
