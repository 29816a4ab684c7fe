"""The fused Triton AdamW kernels (fp32 and 8-bit states) against the PyTorch update.

Without CUDA, tests/conftest.py sets TRITON_INTERPRET=1 and the kernels run on CPU tensors.
"""
import pytest
import torch

from qlora.quant.dynamic_map import dynamic_map
from qlora.kernels.adamw import QUANT_BLOCK, adamw8bit_update, adamw_update
from qlora.optim.quant8 import dequantize_blockwise, quantize_blockwise
from qlora.optim.update import adamw8bit_update_torch, adamw_scalars, adamw_update_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Awkward sizes: one element, one short of a block, a block plus one, several blocks plus a tail.
SIZES = [1, QUANT_BLOCK - 1, 1025, 3 * 1024 + 7]


def scalars(step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1):
    out = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, step=step)
    out.update(beta1=beta1, beta2=beta2, eps=eps)
    return out


def adamw_reference_fp64(p, g, m, v, *, decay, beta1, beta2, eps, step_size,
                         bias_correction2_sqrt):
    """The AdamW step written out in float64: (p, m, v) after one step."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    p = p * decay
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - step_size * m / (v.sqrt() / bias_correction2_sqrt + eps)
    return p, m, v


def random_state(n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(n, generator=gen).to(dtype)
    m = 0.1 * torch.randn(n, generator=gen)
    v = 0.01 * torch.rand(n, generator=gen)
    return p, g, m, v


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("step", [1, 7])
def test_fp32_kernel_matches_torch(n, weight_decay, step):
    p, g, m, v = random_state(n, torch.float32, seed=n + step)
    sc = scalars(step, weight_decay=weight_decay)
    ref = adamw_reference_fp64(p, g, m, v, **sc)

    ours = [t.clone().to(DEVICE) for t in (p, g, m, v)]
    adamw_update(*ours, **sc)
    theirs = [p.clone(), g, m.clone(), v.clone()]
    adamw_update_torch(*theirs, **sc)

    for name, r, o, t in zip("pmv", ref, [ours[0], ours[2], ours[3]], [theirs[0], *theirs[2:]]):
        # Flash-attention rule: both fp32 paths round a handful of operations (unit roundoff
        # 2^-24 each) differently; ours may be at most 2x PyTorch's own error against the fp64
        # reference, plus one fp32 ulp of the largest value for elements PyTorch gets exact.
        err_ours = (o.cpu().double() - r).abs().max().item()
        err_torch = (t.double() - r).abs().max().item()
        assert err_ours <= 2 * err_torch + 2.0 ** -24 * r.abs().max().item(), name


@pytest.mark.parametrize("n", [1, 1025])
def test_bf16_param_kernel_matches_torch(n):
    p, g, m, v = random_state(n, torch.bfloat16, seed=3)
    sc = scalars(step=2)
    ref_p = adamw_reference_fp64(p, g, m, v, **sc)[0]

    ours = [t.clone().to(DEVICE) for t in (p, g, m, v)]
    adamw_update(*ours, **sc)
    theirs = [p.clone(), g, m.clone(), v.clone()]
    adamw_update_torch(*theirs, **sc)

    # The parameter is rounded to bf16 at the end (unit roundoff 2^-8): PyTorch's own error
    # against the fp64 reference is that final rounding; ours may be 2x it, plus 2^-8 * max|p|
    # for elements whose fp32 value sits on a rounding boundary and PyTorch happens to hit.
    err_ours = (ours[0].cpu().double() - ref_p).abs().max().item()
    err_torch = (theirs[0].double() - ref_p).abs().max().item()
    assert err_ours <= 2 * err_torch + 2.0 ** -8 * ref_p.abs().max().item()
    assert ours[0].dtype == torch.bfloat16


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("step", [1, 5])
def test_8bit_kernel_matches_torch(n, step):
    p, g, m, v = random_state(n, torch.float32, seed=10 + n)
    signed, unsigned = dynamic_map(signed=True), dynamic_map(signed=False)
    codes_m, absmax_m = quantize_blockwise(m, signed)
    codes_v, absmax_v = quantize_blockwise(v, unsigned)
    sc = scalars(step)

    ours = [t.clone().to(DEVICE) for t in (p, g, codes_m, codes_v, absmax_m, absmax_v,
                                           signed, unsigned)]
    adamw8bit_update(*ours, **sc)
    theirs = [t.clone() for t in (p, g, codes_m, codes_v, absmax_m, absmax_v)]
    adamw8bit_update_torch(*theirs, signed, unsigned, **sc)
    ours = [t.cpu() for t in ours]

    # fp32 parts: same argument as the fp32 kernel test, a few roundings of 2^-24 each.
    torch.testing.assert_close(ours[0], theirs[0], rtol=8 * 2.0 ** -24, atol=8 * 2.0 ** -24)
    torch.testing.assert_close(ours[4], theirs[4], rtol=8 * 2.0 ** -24, atol=0.0)
    torch.testing.assert_close(ours[5], theirs[5], rtol=8 * 2.0 ** -24, atol=0.0)
    # Codes: both paths use the same nearest-code rule, so a code can only differ where the
    # normalized moment lies within a few ulp of the midpoint between two map values; such an
    # element moves by one code. With ~1e-6 of the map's range at stake that should be (and on
    # the runs so far is) no element at all; allow one per 1000 and never more than one step.
    for o, t in ((ours[2], theirs[2]), (ours[3], theirs[3])):
        diff = (o.int() - t.int()).abs()
        assert diff.max().item() <= 1
        assert (diff > 0).sum().item() <= max(1, n // 1000)


def test_8bit_state_decodes_to_the_fp32_update():
    # One step from zero moments: the 8-bit kernel's decoded moments equal the fp32 moments up
    # to the map's resolution. Largest gap between neighbouring map values, relative to the
    # block absmax: signed map 0.9/64 in its top decade, unsigned 0.9/128; nearest rounding
    # halves it.
    n = 2 * QUANT_BLOCK + 3
    p, g, _, _ = random_state(n, torch.float32, seed=5)
    zero_codes = torch.zeros(n, dtype=torch.uint8)
    zero_absmax = torch.zeros(-(-n // QUANT_BLOCK))
    signed, unsigned = dynamic_map(signed=True), dynamic_map(signed=False)
    sc = scalars(step=1)
    args = [t.clone().to(DEVICE) for t in (p, g, zero_codes, zero_codes, zero_absmax,
                                           zero_absmax, signed, unsigned)]
    adamw8bit_update(*args, **sc)
    p8, _, cm, cv, am, av, _, _ = [t.cpu() for t in args]
    _, m_ref, v_ref = adamw_reference_fp64(p, g, torch.zeros(n), torch.zeros(n), **sc)
    m8 = dequantize_blockwise(cm, am, signed).double()
    v8 = dequantize_blockwise(cv, av, unsigned).double()
    block_m = m_ref.abs().max().item()
    block_v = v_ref.abs().max().item()
    assert (m8 - m_ref).abs().max().item() <= 0.5 * 0.9 / 64 * block_m * (1 + 1e-6)
    assert (v8 - v_ref).abs().max().item() <= 0.5 * 0.9 / 128 * block_v * (1 + 1e-6)


def test_launcher_rejects_bad_input():
    p = torch.zeros(10, device=DEVICE)
    with pytest.raises(ValueError, match="grad"):
        adamw_update(p, torch.zeros(9, device=DEVICE), torch.zeros(10, device=DEVICE),
                     torch.zeros(10, device=DEVICE), **scalars(1))
    with pytest.raises(ValueError, match="exp_avg_sq"):
        adamw_update(p, torch.zeros(10, device=DEVICE), torch.zeros(10, device=DEVICE),
                     torch.zeros(10, device=DEVICE, dtype=torch.float16), **scalars(1))
