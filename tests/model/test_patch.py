"""Patched Llama / Mistral / Qwen2 (qlora/model/patch.py) against the same model unpatched.

Tiny random models; the fused kernels run under TRITON_INTERPRET=1 without CUDA.
"""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, \
    Qwen2Config, Qwen2ForCausalLM

from qlora.model.patch import patch_model, unpatch_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U_BF16 = 2.0 ** -8  # bf16 unit roundoff
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
MODELS = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny(model_type, dtype=torch.float32):
    config_cls, model_cls = MODELS[model_type]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY)).to(DEVICE, dtype).train()
    # norm weights away from their init of 1 so that dL/dweight is exercised for real
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 7), generator=gen).to(DEVICE)
    # packed positions in row 1: two sequences of 4 and 3 tokens
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 0, 1, 2]]).to(DEVICE)
    return input_ids, position_ids


def loss_and_grads(model):
    input_ids, position_ids = batch()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, position_ids=position_ids, labels=input_ids,
                 use_cache=False).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_type", MODELS)
def test_patch_reports_what_it_patched_and_unpatch_restores(model_type):
    model = tiny(model_type)
    # per layer: 2 norms, 1 MLP, 1 attention; plus the final norm
    assert patch_model(model) == {"rms_norm": 5, "swiglu": 2, "rope": 2}
    unpatch_model(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert patch_model(model, rope=False, swiglu=False) == {"rms_norm": 5, "swiglu": 0, "rope": 0}


@pytest.mark.parametrize("model_type", MODELS)
def test_fp32_patched_matches_unpatched(model_type):
    reference_model = tiny(model_type)
    model = copy.deepcopy(reference_model)
    patch_model(model)
    loss, grads = loss_and_grads(model)
    ref_loss, ref_grads = loss_and_grads(reference_model)  # unaffected by the other's patch
    # fp32 on both sides: each fused op rounds (u = 2^-24) in a different order than the
    # unfused one; through 2 layers and the loss that stays below 1e-5 relative of the largest
    # entry (measured ~1e-7); 1e-5 still fails any wrong formula by orders of magnitude.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5,
                                   atol=1e-5 * grad.abs().max().item(), msg=name)


def test_bf16_patched_llama_within_twice_torch_error():
    exact_model = tiny("llama")
    torch_model = copy.deepcopy(exact_model).to(torch.bfloat16)
    fused_model = copy.deepcopy(torch_model)
    patch_model(fused_model)
    exact = loss_and_grads(exact_model.to(torch.float64).to(torch.float32))
    theirs = loss_and_grads(torch_model)
    ours = loss_and_grads(fused_model)

    def check(name, o, t, e):
        # flash-attention rule: our error against the fp32 model at most twice PyTorch's own
        # bf16 error, plus one bf16 ulp (2u) of the largest value (one rounding where PyTorch
        # happens to be exact; truncating under TRITON_INTERPRET=1).
        err_ours = (o - e).abs().max().item()
        err_torch = (t - e).abs().max().item()
        bound = 2 * err_torch + 2 * U_BF16 * e.abs().max().item()
        assert err_ours <= bound, f"{name}: {err_ours:.3g} > {bound:.3g} (torch {err_torch:.3g})"

    check("loss", ours[0], theirs[0], exact[0])
    for name in exact[1]:
        check(name, ours[1][name], theirs[1][name], exact[1][name])


def test_frozen_norm_weights_get_no_grad():
    model = tiny("llama")
    for name, p in model.named_parameters():
        p.requires_grad_("norm" not in name)
    patch_model(model)
    input_ids, position_ids = batch()
    model(input_ids=input_ids, position_ids=position_ids, labels=input_ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "norm" in n)
    assert model.lm_head.weight.grad is not None


def test_unsupported_model_type_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="model_type None is not supported"):
        patch_model(model)
