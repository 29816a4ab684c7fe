"""Tiled MLP, tiled input norm + q/k/v + RoPE and compact norms on a QLoRA Llama: the same loss
and LoRA gradients as without them, alone, together and under checkpointing with the input
embedding in host memory, at a long sequence for the model's size. The tiled q/k/v on each
attention it patches (Llama, Mistral, Qwen2; eager and SDPA): the attention function gets what
the unpatched forward gives it, and generation with a KV cache is unchanged.

Tolerance (the flash-attention way): every run is compared with the same model evaluated in
fp64 (its RMSNorms still upcast to fp32 internally, as Hugging Face writes them), and a run with
the memory options may be at most twice as far from it as the plain fp32 run, plus 2^-24 of
the largest value. The options change only the order of additions (the MLP's token sums, the
norm's closed-form backward), so their rounding error is of the same size as the plain run's.
"""
import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora.model.activation_memory import (disable_activation_patches, enable_compact_norms,
                                           enable_tiled_mlp, enable_tiled_qkv)
from qlora.model.host_embedding import move_embedding_to_host
from qlora.model.inject import add_lora
from qlora.model.loading import quantize_model
from qlora.ops.offload import disable_checkpointing, enable_checkpointing

SEQ = 640  # 20 chunks of the tiled MLP below


def qlora_llama(dtype):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(config)
    quantize_model(model)
    model.requires_grad_(False)
    add_lora(model, r=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():  # B away from 0, so that every LoRA gradient is exercised
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model.to(dtype).train()


def loss_and_grads(model, dtype):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (1, SEQ), generator=gen)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": loss.detach().double().reshape(1), **grads}


@pytest.fixture(scope="module")
def reference():
    return loss_and_grads(qlora_llama(torch.float64), torch.float64)


@pytest.fixture(scope="module")
def plain():
    return loss_and_grads(qlora_llama(torch.float32), torch.float32)


# 48 tokens per q/k/v chunk: 13 whole chunks and one of 16
OPTIONS = {"tiled": dict(tiled=32), "tiled q/k/v": dict(qkv=48), "compact": dict(compact=True),
           "tiled+tiled q/k/v+compact+checkpointing+host embedding":
               dict(tiled=32, qkv=48, compact=True, checkpointing=True, host_embedding=True)}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_memory_options_give_the_plain_gradients(name, reference, plain):
    options = OPTIONS[name]
    model = qlora_llama(torch.float32)
    if options.get("tiled"):
        assert enable_tiled_mlp(model, options["tiled"]) == 2
    if options.get("qkv"):
        assert enable_tiled_qkv(model, options["qkv"]) == 2
    if options.get("compact"):
        # two per layer and the final norm, but the input norms a tiled q/k/v runs itself
        assert enable_compact_norms(model) == (3 if options.get("qkv") else 5)
    if options.get("checkpointing"):
        enable_checkpointing(model, offload=False)
    if options.get("host_embedding"):
        assert move_embedding_to_host(model) == 64 * 32 * 4
    got = loss_and_grads(model, torch.float32)
    assert got.keys() == reference.keys() and len(got) == 1 + 2 * 7 * 2
    for key, exact in reference.items():
        err_plain = (plain[key] - exact).abs().max().item()
        err = (got[key] - exact).abs().max().item()
        assert err <= 2 * err_plain + 2**-24 * exact.abs().max().item(), (key, err, err_plain)
    disable_activation_patches(model)
    disable_checkpointing(model)
    again = loss_and_grads(model, torch.float32)
    for key in plain:  # unpatched (the host embedding is exact): the plain run, bit for bit
        assert torch.equal(again[key], plain[key]), key


def test_patches_need_a_supported_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        enable_compact_norms(model)
    with pytest.raises(ValueError, match="tiled q/k/v: model_type 'gpt2' is not supported"):
        enable_tiled_qkv(model, 8)
    with pytest.raises(ValueError, match="tiled q/k/v: chunk must be a positive number of tokens"):
        enable_tiled_qkv(qlora_llama(torch.float32), 0)
    with pytest.raises(ValueError, match="no decoder layer with a token-wise MLP"):
        enable_tiled_mlp(torch.nn.Sequential(torch.nn.Linear(4, 4)), 8)
    with pytest.raises(ValueError, match="chunk must be a positive number of tokens"):
        enable_tiled_mlp(qlora_llama(torch.float32), 0)


def _attention_models():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    # windows shorter than the sequence, so that the window argument matters
    return {"llama": (LlamaForCausalLM, LlamaConfig(**common)),
            "mistral": (MistralForCausalLM, MistralConfig(sliding_window=8, **common)),
            "qwen2": (Qwen2ForCausalLM, Qwen2Config(use_sliding_window=True, sliding_window=8,
                                                    max_window_layers=1, **common))}


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_tiled_qkv_calls_the_attention_as_the_unpatched_forward(arch, implementation, monkeypatch):
    """A recording attention function sees the same q, k, v, mask and keyword arguments with
    and without the patch (fp64: the chunks compute each row with the same ops as the whole; a
    GEMM on fewer rows may order a row's dot product differently, 1e-12 covers that), the loss
    and LoRA gradients agree, and a KV-cached generation (the unpatched path, the norm applied
    first) is token for token the same."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    calls = []

    def recording(module, q, k, v, mask, **kwargs):
        calls.append((q, k, v, mask, kwargs))
        inner = sdpa_attention_forward if implementation == "sdpa" else eager_attention_forward
        return inner(module, q, k, v, mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "qlora_test_recording", recording)
    model_cls, config = _attention_models()[arch]
    config._attn_implementation = "qlora_test_recording"
    torch.manual_seed(0)
    model = model_cls(config).double()
    model.requires_grad_(False)
    add_lora(model, r=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.double().train()
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))

    def run():
        calls.clear()
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, \
            list(calls)

    plain_loss, plain_grads, plain_calls = run()
    assert enable_tiled_qkv(model, 5) == 2
    loss, grads, tiled_calls = run()
    assert len(tiled_calls) == len(plain_calls) == 2
    for (q0, k0, v0, m0, kw0), (q1, k1, v1, m1, kw1) in zip(plain_calls, tiled_calls):
        for a, b in ((q0, q1), (k0, k1), (v0, v1)):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=0)
        assert kw0.keys() == kw1.keys()
        for a, b in [(m0, m1)] + [(kw0[key], kw1[key]) for key in kw0]:
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    if arch != "llama":
        assert any(kw.get("sliding_window") == 8 for *_, kw in tiled_calls)
    assert torch.allclose(loss, plain_loss, rtol=1e-12, atol=0)
    for name, g in plain_grads.items():
        # each is a sum over the 42 tokens, in another order: an fp64 reordering moves it by at
        # most 41·2^-53 (4.6e-15) of the sum of its terms' magnitudes; 1e-12 of the largest entry
        # leaves room for terms that cancel
        assert (grads[name] - g).abs().max() <= 1e-12 * g.abs().max(), name
    model.eval()
    config._attn_implementation = implementation
    with torch.no_grad():
        tiled_tokens = model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False)
        disable_activation_patches(model)
        plain_tokens = model.generate(ids[:1, :6], max_new_tokens=5, do_sample=False)
    assert torch.equal(tiled_tokens, plain_tokens)
    assert "forward" not in vars(model.model.layers[0].self_attn)
