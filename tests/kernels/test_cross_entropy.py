"""Chunked lm_head + cross-entropy (kernels/cross_entropy.py, qlora/ops/losses.py) against PyTorch.

The reference is the unfused computation Hugging Face runs: logits = hidden @ W.T, upcast to
fp32, F.cross_entropy, autograd for every gradient. Without CUDA, tests/conftest.py sets
TRITON_INTERPRET=1 and the kernel runs on CPU tensors.
"""
import pytest
import torch
import torch.nn.functional as F

from qlora.ops.losses import LogitTransform, causal_lm_loss, chunked_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
U_BF16 = 2.0 ** -8  # bf16 unit roundoff (8 significand bits)


def make_inputs(T, H, V, dtype, seed, ignore=(), train_head=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H ** 0.5).to(dtype).to(DEVICE)
    weight.requires_grad_(train_head)
    labels = torch.randint(0, V, (T,), generator=gen)
    labels[list(ignore)] = -100
    return hidden, weight, labels.to(DEVICE)


def reference(hidden, weight, labels, *, upcast_first, label_smoothing=0.0, reduction="mean",
              divisor=1.0, transform=LogitTransform()):
    """(loss, dhidden, dweight) of the unfused path.

    upcast_first=True: everything in fp32 from the (rounded) inputs: the exact reference.
    upcast_first=False: Hugging Face's order: logits in the input dtype, then .float().
    """
    h = hidden.detach().clone()
    w = weight.detach().clone()
    if upcast_first:
        h, w = h.float(), w.float()
    h.requires_grad_()
    w.requires_grad_(weight.requires_grad)
    logits = transform((h @ w.t()).float())
    loss = F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=label_smoothing,
                           reduction=reduction) / divisor
    loss.backward()
    return loss.detach(), h.grad, w.grad


def assert_close_as_torch(ours, theirs, exact, name):
    """Flash-attention rule: our error against the fp32 reference is at most twice PyTorch's own
    error in the same precision, plus one bf16 ulp (2u = 2^-7 relative) of the largest
    reference value: where PyTorch happens to land exactly its error is 0, and ours is then one
    rounding of dL/dz to bf16, which a GPU does to nearest (half an ulp) but the
    TRITON_INTERPRET=1 fp32 -> bf16 cast does by truncation (up to a full ulp; seen on dL/dW
    for a single token)."""
    err_ours = (ours.float() - exact.float()).abs().max().item()
    err_torch = (theirs.float() - exact.float()).abs().max().item()
    bound = 2 * err_torch + 2 * U_BF16 * exact.float().abs().max().item()
    assert err_ours <= bound, \
        f"{name}: error {err_ours:.3g} > bound {bound:.3g} (torch {err_torch:.3g})"


# T = 1 and odd token counts; V = 1000 (one masked block of 1024) and 2500 (a full block of 2048
# plus a masked tail); chunk sizes that do and do not divide T.
@pytest.mark.parametrize("T,V,chunk_size", [(1, 1000, 16), (37, 1000, 16), (37, 2500, 8),
                                            (37, 2500, None)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("train_head", [False, True])
def test_bf16_loss_and_grads_match_torch(T, V, chunk_size, label_smoothing, train_head):
    hidden, weight, labels = make_inputs(T, 48, V, torch.bfloat16, seed=T + V,
                                         ignore=[0, 5] if T > 5 else [], train_head=train_head)
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk_size,
                                 label_smoothing=label_smoothing)
    loss.backward()
    exact = reference(hidden, weight, labels, upcast_first=True, label_smoothing=label_smoothing)
    torch_bf16 = reference(hidden, weight, labels, upcast_first=False,
                           label_smoothing=label_smoothing)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close_as_torch(loss, torch_bf16[0], exact[0], "loss")
    assert_close_as_torch(hidden.grad, torch_bf16[1], exact[1], "dhidden")
    if train_head:
        assert_close_as_torch(weight.grad, torch_bf16[2], exact[2], "dweight")
    else:
        assert weight.grad is None


def test_fp32_matches_torch_tightly():
    hidden, weight, labels = make_inputs(13, 16, 300, torch.float32, seed=1, ignore=[2],
                                         train_head=True)
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=5, label_smoothing=0.2)
    loss.backward()
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, upcast_first=True,
                                         label_smoothing=0.2)
    # fp32 throughout: a sum over V = 300 exponentials and an H = 16 dot product, each term
    # rounded at u = 2^-24; 1e-5 relative covers ~100 accumulated roundings.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, ref_dw, rtol=1e-5, atol=1e-6)


# Gemma-2's soft cap (30), Cohere's scale (1/16), Granite's (1/8) under a cap, and a scale above
# one; hidden states are scaled so the logits reach ~±100, where the cap bends them hard.
TRANSFORMS = [LogitTransform(softcap=30.0), LogitTransform(scale=0.0625), LogitTransform(scale=0.125, softcap=5.0),
              LogitTransform(scale=2.5)]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=str)
def test_final_logit_transform_fp32_matches_torch_tightly(transform):
    hidden, weight, labels = make_inputs(13, 16, 300, torch.float32, seed=7, ignore=[2], train_head=True)
    hidden = (hidden.detach() * 25).requires_grad_()
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=5, label_smoothing=0.1,
                                 transform=transform)
    loss.backward()
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, upcast_first=True,
                                         label_smoothing=0.1, transform=transform)
    # fp32 as in test_fp32_matches_torch_tightly; tanh as 2·sigmoid(2a) - 1 adds a few roundings
    # of values <= 1 times the cap, inside the same 1e-5 relative
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, ref_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, ref_dw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transform", TRANSFORMS[:3], ids=str)
def test_final_logit_transform_bf16_matches_torch(transform):
    hidden, weight, labels = make_inputs(37, 48, 2500, torch.bfloat16, seed=8, ignore=[0, 5])
    hidden = (hidden.detach().float() * 25).to(torch.bfloat16).requires_grad_()
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=8, transform=transform)
    loss.backward()
    exact = reference(hidden, weight, labels, upcast_first=True, transform=transform)
    torch_bf16 = reference(hidden, weight, labels, upcast_first=False, transform=transform)
    assert_close_as_torch(loss, torch_bf16[0], exact[0], "loss")
    assert_close_as_torch(hidden.grad, torch_bf16[1], exact[1], "dhidden")


def test_num_items_in_batch_divides_the_sum_and_grad_output_scales():
    hidden, weight, labels = make_inputs(21, 16, 200, torch.float32, seed=2, ignore=[1, 2, 3])
    loss = chunked_cross_entropy(hidden, weight, labels, num_items_in_batch=torch.tensor(50),
                                 chunk_size=8)
    (3.0 * loss).backward()
    ref_loss, ref_dh, _ = reference(hidden, weight, labels, upcast_first=True, reduction="sum",
                                    divisor=50.0 / 3.0)
    # same fp32 bound as test_fp32_matches_torch_tightly
    torch.testing.assert_close(3.0 * loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_dh, rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_grad():
    hidden, weight, labels = make_inputs(5, 16, 100, torch.float32, seed=3, ignore=range(5))
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=2)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(hidden.grad) == 0


def test_no_grad_forward_gives_the_same_loss():
    hidden, weight, labels = make_inputs(9, 16, 100, torch.bfloat16, seed=4)
    with torch.no_grad():
        evaluated = chunked_cross_entropy(hidden, weight, labels, chunk_size=4)
    trained = chunked_cross_entropy(hidden, weight, labels, chunk_size=4)
    assert evaluated.item() == trained.item()
    assert not evaluated.requires_grad


def test_out_of_range_label_is_a_clear_error():
    hidden, weight, labels = make_inputs(4, 16, 100, torch.float32, seed=5)
    labels[2] = 100
    with pytest.raises(ValueError, match="label 100 outside the vocabulary"):
        chunked_cross_entropy(hidden, weight, labels)


def test_causal_lm_loss_matches_hugging_face():
    from transformers.loss.loss_utils import ForCausalLMLoss

    gen = torch.Generator().manual_seed(6)
    B, S, H, V = 2, 11, 16, 150
    hidden = torch.randn(B, S, H, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / 4).to(DEVICE)
    labels = torch.randint(0, V, (B, S), generator=gen).to(DEVICE)
    labels[0, :4] = -100  # a prompt that is not trained on

    for num_items in (None, 17):
        loss = causal_lm_loss(hidden, weight, labels, num_items_in_batch=num_items, chunk_size=7)
        (dh,) = torch.autograd.grad(loss, hidden)
        h = hidden.detach().clone().requires_grad_()
        ref = ForCausalLMLoss(h @ weight.t(), labels, V, num_items_in_batch=num_items)
        (ref_dh,) = torch.autograd.grad(ref, h)
        # fp32: same bound as test_fp32_matches_torch_tightly
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dh, ref_dh, rtol=1e-5, atol=1e-6)


def test_causal_lm_forward_loss_matches_the_model_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.ops.losses import causal_lm_forward_loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(DEVICE)
    input_ids = torch.randint(0, 120, (2, 9), device=DEVICE)
    labels = input_ids.clone()
    labels[:, :3] = -100

    # the head is trained here (requires_grad), so it gets a gradient too
    params = [model.lm_head.weight, model.model.norm.weight,
              model.model.layers[0].mlp.up_proj.weight]
    loss = causal_lm_forward_loss(model, input_ids, labels, chunk_size=5)
    grads = torch.autograd.grad(loss, params)
    ref = model(input_ids=input_ids, labels=labels, use_cache=False).loss
    ref_grads = torch.autograd.grad(ref, params)
    # fp32: same bound as test_fp32_matches_torch_tightly
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_check_final_logits_refuses_a_logit_transform_it_does_not_know():
    """qlora train's guard: a model whose forward does something to its logits that
    final_logit_transform does not know (here a factor 1.5 after Gemma-2's soft cap) is refused,
    naming the model class; the known transform alone passes, and the model's mode is restored."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from qlora.ops.losses import check_final_logits

    class RescaledGemma2(Gemma2ForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 1.5
            return out

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5)
    ids = torch.arange(16)[None]
    known = Gemma2ForCausalLM(config).train()
    check_final_logits(known, ids)
    assert known.training
    with pytest.raises(ValueError, match="RescaledGemma2: its logits are not those of its head"):
        check_final_logits(RescaledGemma2(config), ids)
