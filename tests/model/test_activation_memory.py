"""Tiled MLP and compact norms on a QLoRA Llama: the same loss and LoRA gradients as without
them, alone, together and under checkpointing with the input embedding in host memory, at a
long sequence for the model's size.

Tolerance (the flash-attention way): every run is compared with the same model evaluated in
fp64 (its RMSNorms still upcast to fp32 internally, as Hugging Face writes them), and a run with
the memory options may be at most twice as far from it as the plain fp32 run, plus 2^-24 of
the largest value. The options change only the order of additions (the MLP's token sums, the
norm's closed-form backward), so their rounding error is of the same size as the plain run's.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora.model.activation_memory import (disable_activation_patches, enable_compact_norms,
                                           enable_tiled_mlp)
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


OPTIONS = {"tiled": dict(tiled=32), "compact": dict(compact=True),
           "tiled+compact+checkpointing+host embedding": dict(tiled=32, compact=True,
                                                              checkpointing=True,
                                                              host_embedding=True)}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_memory_options_give_the_plain_gradients(name, reference, plain):
    options = OPTIONS[name]
    model = qlora_llama(torch.float32)
    if options.get("tiled"):
        assert enable_tiled_mlp(model, options["tiled"]) == 2
    if options.get("compact"):
        assert enable_compact_norms(model) == 5  # two per layer and the final norm
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
    with pytest.raises(ValueError, match="no decoder layer with a token-wise MLP"):
        enable_tiled_mlp(torch.nn.Sequential(torch.nn.Linear(4, 4)), 8)
    with pytest.raises(ValueError, match="chunk must be a positive number of tokens"):
        enable_tiled_mlp(qlora_llama(torch.float32), 0)
