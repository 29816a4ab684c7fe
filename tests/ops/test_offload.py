"""Checkpointed / offloaded decoder layers (qlora/ops/offload.py) against the plain model.

Recomputation replays the same fp32 operations in the same order on the same inputs, so on CPU
the loss and every gradient must be bit-identical to the unwrapped model.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora.ops.offload import (OffloadedCheckpointFunction, OffloadSchedule, disable_checkpointing,
                           enable_checkpointing)


def tiny_llama(dropout=0.0):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attention_dropout=dropout)
    model = LlamaForCausalLM(config).train()
    model.get_input_embeddings().weight.requires_grad_(False)  # frozen, as under LoRA
    return model


def loss_and_grads(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 64, (2, 9), generator=gen)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks in both runs
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(result, reference):
    assert torch.equal(result[0], reference[0])
    assert result[1].keys() == reference[1].keys()
    for name, grad in reference[1].items():
        assert torch.equal(result[1][name], grad), name


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointing_gives_the_same_loss_and_grads(offload):
    model = tiny_llama()
    reference = loss_and_grads(model)
    assert enable_checkpointing(model, offload=offload) == 3
    assert_same(loss_and_grads(model), reference)
    disable_checkpointing(model)
    assert_same(loss_and_grads(model), reference)


def test_checkpointing_saves_only_layer_inputs():
    """Count the tensors autograd saves: wrapped layers keep (at most) their input."""
    model = tiny_llama()
    input_ids = torch.randint(0, 64, (1, 8))

    def saved_count():
        count = 0

        def pack(t):
            nonlocal count
            count += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=input_ids, use_cache=False).logits.sum()
        return count

    plain = saved_count()
    enable_checkpointing(model, offload=False)
    assert saved_count() < plain / 3


def test_offloaded_function_recomputes_with_the_same_dropout_and_reaches_frozen_input():
    """Two chained layers through OffloadedCheckpointFunction on CPU tensors (the host copy is
    synchronous there): the input does not require grad, so the parameters only get gradients
    because they are passed to the Function; dropout must replay the forward's mask."""
    torch.manual_seed(3)
    layers = [torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.5))
              for _ in range(2)]
    x = torch.randn(5, 16)

    torch.manual_seed(4)
    y = layers[1](layers[0](x))
    y.square().sum().backward()
    reference = [p.grad.clone() for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.zero_grad(set_to_none=True)

    schedule = OffloadSchedule()
    torch.manual_seed(4)
    h = x
    for index, layer in enumerate(layers):
        h = OffloadedCheckpointFunction.apply(layer, schedule, index, h, *layer.parameters())
    torch.testing.assert_close(h, y, rtol=0, atol=0)
    h.square().sum().backward()
    for got, want in zip((p.grad for layer in layers for p in layer.parameters()), reference):
        assert torch.equal(got, want)
    assert schedule.inputs == {}  # every saved input was consumed


@pytest.mark.parametrize("offload", [False, True])
def test_a_kv_cache_is_not_written_by_checkpointed_layers(offload):
    """A training forward that leaves use_cache at the config's default (True) hands every layer
    a cache; checkpointed, the layers would fill it in the forward and again in the recompute, and
    it would hold every layer's keys and values until the step ends. The layers get none: the
    cache comes back empty and the gradients are the uncached ones."""
    model = tiny_llama()
    reference = loss_and_grads(model)
    enable_checkpointing(model, offload=offload)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 64, (2, 9), generator=gen)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 0
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert_same((out.loss.detach(), grads), reference)


def test_no_grad_runs_the_layers_unchanged():
    model = tiny_llama().eval()
    input_ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        reference = model(input_ids=input_ids).logits
        enable_checkpointing(model, offload=True)
        assert torch.equal(model(input_ids=input_ids).logits, reference)


# gradient_checkpointing_enable is deprecated (renamed) in recent transformers
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_refuses_to_stack_on_transformers_checkpointing():
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing is on"):
        enable_checkpointing(model, offload=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_on_cuda_matches_and_keeps_activations_off_the_device():
    model = tiny_llama().cuda()
    reference = loss_and_grads(model)
    enable_checkpointing(model, offload=True)
    result = loss_and_grads(model)
    # the same kernels on the same inputs, but cuBLAS may pick different reduction orders
    # between calls: fp32 (u = 2^-24) sums of ~100 terms, 1e-5 relative
    torch.testing.assert_close(result[0], reference[0], rtol=1e-5, atol=1e-6)
    for name, grad in reference[1].items():
        torch.testing.assert_close(result[1][name], grad, rtol=1e-5, atol=1e-6)
