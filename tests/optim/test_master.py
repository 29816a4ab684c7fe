"""fp32 master weights of 16-bit parameters: kept in the pages, updated there, saved from there."""
import io

import pytest
import torch

from qlora.optim import PagedAdamW
from qlora.optim.master import master_weights_in_place
from qlora.optim.update import _adamw_math_, adamw_scalars

PAGE_BYTES = 4096
SHAPES = [(1,), (33, 17), (1300,)]   # a parameter larger than a page: its master spans pages


def bf16_params(value=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.full(s, value) if value is not None else torch.randn(s, generator=gen))
            .to(torch.bfloat16).requires_grad_() for s in SHAPES]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)


@pytest.mark.parametrize("budget", [None, 0])
def test_updates_below_bf16_resolution_move_the_master(budget):
    """Adam's step is lr·m̂/(√v̂ + eps), so with one gradient repeated it is lr (1 - 1e-8
    relative) at every step. At 1.0 a bf16 step is 2^-7 (2^-8 just below 1): ten steps of 1e-4 (a
    total of 1e-3 < 2^-9) round back to 1.0 every time, and a bf16 AdamW never moves; the fp32
    master moves by 1e-3, as the fp64 reference does, to within fp32 rounding (10 steps of
    2^-24 relative each)."""
    lr, steps = 1e-4, 10
    with_master, without = bf16_params(1.0), bf16_params(1.0)
    opt = PagedAdamW(with_master, lr=lr, weight_decay=0.0, page_bytes=PAGE_BYTES,
                     gpu_budget_bytes=budget, master_weights=True)
    plain = PagedAdamW(without, lr=lr, weight_decay=0.0, page_bytes=PAGE_BYTES)
    reference = [torch.ones(s, dtype=torch.float64) for s in SHAPES]
    moments = [(torch.zeros(s, dtype=torch.float64), torch.zeros(s, dtype=torch.float64))
               for s in SHAPES]
    for step in range(1, steps + 1):
        for params in (with_master, without):
            for p in params:
                p.grad = torch.ones_like(p)
        opt.step()
        plain.step()
        scalars = adamw_scalars(lr=lr, beta1=0.9, beta2=0.999, weight_decay=0.0, step=step)
        for ref, (m, v) in zip(reference, moments):
            _adamw_math_(ref, torch.ones_like(ref), m, v, beta1=0.9, beta2=0.999, eps=1e-8,
                         **scalars)
    masters = opt.master_weights_cpu()
    for p, q, ref in zip(with_master, without, reference):
        master = masters[p]
        assert master.dtype == torch.float32 and master.shape == p.shape
        assert torch.allclose(master.double(), ref, rtol=0, atol=steps * 2**-24)
        assert (1.0 - master).min().item() == pytest.approx(steps * lr, abs=steps * 2**-24)
        assert torch.equal(p.detach(), master.to(torch.bfloat16))   # still 1.0
        assert torch.equal(q.detach(), torch.ones_like(q))          # the plain bf16 run: stuck


@pytest.mark.parametrize("state_dtype", [torch.float32, "8bit"])
@pytest.mark.parametrize("budget", [None, 0])
def test_the_master_takes_the_update_an_fp32_parameter_would(state_dtype, budget):
    """With masters, the update runs on the fp32 master with the gradient upcast: the same
    kernel on the same numbers as a run whose parameters are fp32 from the start, so the master
    equals that run's parameter bit for bit and the 16-bit parameter is its rounding."""
    ours = bf16_params()
    theirs = [p.detach().float().requires_grad_() for p in ours]
    opt = PagedAdamW(ours, lr=1e-2, page_bytes=PAGE_BYTES, state_dtype=state_dtype,
                     gpu_budget_bytes=budget, master_weights=True)
    fp32 = PagedAdamW(theirs, lr=1e-2, page_bytes=PAGE_BYTES, state_dtype=state_dtype)
    for seed in range(4):
        set_grads(ours, seed)
        for p, q in zip(ours, theirs):
            q.grad = p.grad.float()
        opt.step()
        fp32.step()
    masters = opt.master_weights_cpu()
    for p, q in zip(ours, theirs):
        assert torch.equal(masters[p], q.detach())
        assert torch.equal(p.detach(), q.detach().to(torch.bfloat16))


def test_resume_from_the_state_dict_is_exact():
    ours, again = bf16_params(), bf16_params()
    opt = PagedAdamW(ours, lr=1e-2, page_bytes=PAGE_BYTES, master_weights=True)
    for seed in range(3):
        set_grads(ours, seed)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    with torch.no_grad():
        for p, q in zip(again, ours):
            p.copy_(q)
    resumed = PagedAdamW(again, lr=1e-2, page_bytes=PAGE_BYTES, gpu_budget_bytes=0,
                         master_weights=True)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for seed in range(3, 6):
        set_grads(ours, seed)
        set_grads(again, seed)
        opt.step()
        resumed.step()
    for p, q in zip(ours, again):
        assert torch.equal(p, q)
    for p, q in zip(ours, again):
        assert torch.equal(opt.master_weights_cpu()[p], resumed.master_weights_cpu()[q])


def test_a_state_without_masters_starts_them_from_the_parameters():
    params = bf16_params()
    plain = PagedAdamW(params, lr=1e-2, page_bytes=PAGE_BYTES)
    set_grads(params, 0)
    plain.step()
    opt = PagedAdamW(params, lr=1e-2, page_bytes=PAGE_BYTES, master_weights=True)
    opt.load_state_dict(plain.state_dict())
    for p, master in opt.master_weights_cpu().items():
        assert torch.equal(master, p.detach().float())


def test_master_weights_in_place_swaps_and_restores():
    params = bf16_params()
    opt = PagedAdamW(params, lr=1e-2, page_bytes=PAGE_BYTES, master_weights=True)
    set_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    masters = opt.master_weights_cpu()
    with master_weights_in_place(opt):
        for p in params:
            assert p.dtype == torch.float32 and torch.equal(p.detach(), masters[p])
    for p, b in zip(params, before):
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), b)
    with master_weights_in_place(torch.optim.AdamW(params)):  # no masters: nothing changes
        assert all(p.dtype == torch.bfloat16 for p in params)
