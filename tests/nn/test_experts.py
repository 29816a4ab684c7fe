"""NF4 MoE experts (qlora.nn.experts) against transformers' own experts modules on the dequantized
weights, and LoRA on them against PEFT's ParamWrapper math, forward and every gradient."""
import copy

import pytest
import torch

from qlora.nn.experts import (ExpertLinears4bit, LoRAExpertLinears, LoRARouter, fused_expert_parameters, is_router,
                               quantize_experts)
from qlora.quant.nf4 import quantize

transformers = pytest.importorskip("transformers")


def _mixtral_experts(E=3, H=64, I=96):
    config = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    module = MixtralExperts(config)
    torch.nn.init.normal_(module.gate_up_proj, std=0.1)
    torch.nn.init.normal_(module.down_proj, std=0.1)
    return module


def _gpt_oss_experts(E=3, H=64, I=64):
    """Transposed [E, in, out] weights, biases, interleaved gate/up with its own clamped gating."""
    config = transformers.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    module = GptOssExperts(config)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return module


def _routing(T, E, k, seed, sentinel=True):
    """Top-k expert ids per token (distinct per token; expert 0 never chosen, so one expert is
    idle; with ``sentinel``, token 0's last slot is transformers' sentinel E, routed to no local
    expert, which GPT-OSS's own forward does not take) and weights."""
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E - 1, generator=g)[:k] + 1 for _ in range(T)])
    if sentinel:
        index[0, -1] = E
    weights = torch.rand(T, k, generator=g).requires_grad_()
    return index, weights


U_FP32 = 2.0 ** -24


def _assert_as_close_as_torch(ours, torch32, exact, name):
    """Flash-attention rule: our fp32 error against an fp64 reference is at most twice PyTorch's
    own fp32 error on the same computation, plus 4 fp32 roundings (u = 2^-24) of the largest value,
    for where PyTorch happens to be exact."""
    err_ours = (ours.double() - exact).abs().max().item()
    err_torch = (torch32.double() - exact).abs().max().item()
    bound = 2 * err_torch + 4 * U_FP32 * exact.abs().max().item()
    assert err_ours <= bound, f"{name}: {err_ours:.3g} > {bound:.3g} (torch fp32 {err_torch:.3g})"


def _quantized(module):
    """(our module, transformers' module holding our dequantized weights)."""
    ours = copy.deepcopy(module)
    for name in fused_expert_parameters(ours):
        quantize_experts(ours, name, getattr(ours, name).detach(), lambda w: quantize(w, 64, True))
    reference = copy.deepcopy(module)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(ours, name).dequantized(torch.float32)
            getattr(reference, name).copy_(w.transpose(1, 2) if ours.is_transposed else w)
    return ours, reference


@pytest.mark.parametrize("make", [_mixtral_experts, _gpt_oss_experts], ids=["mixtral", "gpt-oss"])
def test_nf4_experts_compute_what_transformers_does_on_the_dequantized_weights(make):
    module = make()
    ours, reference = _quantized(module)
    assert isinstance(ours.gate_up_proj, ExpertLinears4bit) and fused_expert_parameters(ours) == []
    T, E = 7, module.num_experts
    x = torch.randn(T, module.gate_up_proj.shape[1 if module.is_transposed else 2], requires_grad=True)
    index, weights = _routing(T, E, 2, seed=0, sentinel=make is _mixtral_experts)
    reference.config._experts_implementation = "eager"  # transformers' per-expert loop
    results = []
    for model, dtype in ((ours, torch.float32), (reference, torch.float32), (copy.deepcopy(reference).double(), torch.float64)):
        xi, wi = x.detach().to(dtype).requires_grad_(), weights.detach().to(dtype).requires_grad_()
        y = model(xi, index, wi)
        results.append((y, *torch.autograd.grad(y.square().sum(), (xi, wi))))
    for i, name in enumerate(("output", "d input", "d routing weights")):
        _assert_as_close_as_torch(results[0][i], results[1][i], results[2][i], name)


def _peft_delta(lora_a, lora_b, E, r, scaling):
    """PEFT's ParamWrapper.get_delta_weight for a weight stored [E, out, in]: A reshaped to
    (E, r, in), B to (out, r, E), einsum 'o r e, e r i -> e o i'."""
    a = lora_a.reshape(E, r, -1)
    b = lora_b.reshape(lora_b.shape[0], r, E)
    return torch.einsum("o r e, e r i -> e o i", b, a) * scaling


@pytest.mark.parametrize("r", [1, 3])
def test_lora_on_experts_is_pefts_parametrization_forward_and_gradients(r):
    module = _mixtral_experts()
    ours, reference = _quantized(module)
    E = module.num_experts
    for name in ("gate_up_proj", "down_proj"):
        layer = LoRAExpertLinears(getattr(ours, name), r=r, lora_alpha=2 * r + 1)
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
        setattr(ours, name, layer)
    x = torch.randn(9, 64, requires_grad=True)
    index, weights = _routing(9, E, 2, seed=1)
    y = ours(x, index, weights)
    factors = [p for name in ("gate_up_proj", "down_proj")
               for p in (getattr(ours, name).lora_A["default"].weight, getattr(ours, name).lora_B["default"].weight)]
    grads = torch.autograd.grad(y.square().sum(), [x] + factors)

    # reference: transformers' experts on W_e + ΔW_e, ΔW in PEFT's layout, autograd, in fp32 and fp64
    def peft_reference(dtype):
        model = copy.deepcopy(reference).to(dtype)
        leaves = [f.detach().to(dtype).requires_grad_() for f in factors]
        x_ref = x.detach().to(dtype).requires_grad_()
        for i, name in enumerate(("gate_up_proj", "down_proj")):
            base = model._parameters.pop(name).detach()
            delta = _peft_delta(leaves[2 * i], leaves[2 * i + 1], E, r, getattr(ours, name).scaling["default"])
            setattr(model, name, base + delta)
        model.config._experts_implementation = "eager"
        y_ref = model(x_ref, index, weights.detach().to(dtype))
        return (y_ref, *torch.autograd.grad(y_ref.square().sum(), [x_ref] + leaves))

    torch32, exact = peft_reference(torch.float32), peft_reference(torch.float64)
    names = ["output", "d input", "d gate_up A", "d gate_up B", "d down A", "d down B"]
    for got, t32, want, name in zip((y,) + grads, torch32, exact, names):
        _assert_as_close_as_torch(got, t32, want, name)
    for name in ("gate_up_proj", "down_proj"):
        layer = getattr(ours, name)
        torch.testing.assert_close(layer.delta_weight("default"), _peft_delta(
            layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), E, r, layer.scaling["default"]))


def test_merge_runs_the_merged_weights_and_unmerge_restores():
    module = _mixtral_experts()
    ours, _ = _quantized(module)
    layer = LoRAExpertLinears(ours.gate_up_proj, r=2, lora_alpha=4)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    ours.gate_up_proj = layer
    x = torch.randn(5, 64)
    index, weights = _routing(5, module.num_experts, 2, seed=2)
    with torch.no_grad():
        before = ours(x, index, weights)
        layer.merge(["default"])
        merged = ours(x, index, weights)
        layer.unmerge()
        after = ours(x, index, weights)
    # merged: (W + s·B·A)·x against W·x + s·B·(A·x), both fp32: a handful of roundings of dot
    # products of <= 128 terms, each within ~128·u of the sum of magnitudes (|y| < 1 here)
    torch.testing.assert_close(merged, before, rtol=0, atol=128 * U_FP32)
    assert torch.equal(after, before)


def test_expert_lora_refuses_what_peft_cannot_load():
    ours, _ = _quantized(_mixtral_experts())
    with pytest.raises(ValueError, match="init for MoE experts"):
        LoRAExpertLinears(ours.down_proj, r=2, lora_alpha=2, init="pissa")
    with pytest.raises(ValueError, match="fused expert weights are 3-D"):
        quantize_experts(_mixtral_experts(), "down_proj", torch.zeros(4, 4), quantize)


def test_router_lora_runs_the_router_on_w_plus_delta_forward_and_gradients():
    """LoRA on a router (PEFT's target_parameters=['mlp.gate.weight']): the router's own forward
    (softmax, top-k, renormalization) on W + s·B·A, against autograd on that weight in fp64."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    config = transformers.MixtralConfig(hidden_size=64, num_local_experts=5, num_experts_per_tok=2)
    router = MixtralTopKRouter(config)
    torch.nn.init.normal_(router.weight, std=0.2)
    assert is_router(router) and not is_router(torch.nn.Linear(4, 4))
    layer = LoRARouter(copy.deepcopy(router), r=3, lora_alpha=6)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.2)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(7, 64, requires_grad=True)
    logits, scores, index = layer(x)
    grads = torch.autograd.grad(logits.square().sum() + scores.square().sum(), (x, a, b))

    def reference(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, a, b)]
        ref = copy.deepcopy(router).to(dtype)
        del ref._parameters["weight"]
        ref.weight = router.weight.detach().to(dtype) + 2.0 * leaves[2] @ leaves[1]  # s = 6/3
        out = ref(leaves[0])
        return (out[0], out[1], out[2]) + torch.autograd.grad(out[0].square().sum() + out[1].square().sum(), leaves)

    torch32, exact = reference(torch.float32), reference(torch.float64)
    assert torch.equal(index, exact[2])  # the same experts chosen
    for got, t32, want, name in zip((logits, scores) + grads, torch32[:2] + torch32[3:], exact[:2] + exact[3:],
                                    ["router logits", "routing weights", "d input", "d A", "d B"]):
        _assert_as_close_as_torch(got, t32, want, name)
    with torch.no_grad():
        layer.merge(["default"])
        merged = layer(x)[0]
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, router.weight)
    # merged W + s·B·A against the factored product: fp32 summation order only
    torch.testing.assert_close(merged, logits.detach(), rtol=0, atol=128 * U_FP32 * logits.abs().max().item())
