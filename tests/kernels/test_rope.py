"""Fused RoPE on Q and K (kernels/rope.py via qlora.ops.fused_layers.rope_) against Hugging Face's
``apply_rotary_pos_emb``, with cos/sin from ``LlamaRotaryEmbedding`` (so the positions, packed
ones included, reach the kernel exactly as they do in the model).
"""
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from qlora.ops.fused_layers import rope_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cos_sin(position_ids, head_dim, dtype):
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                         max_position_embeddings=256)
    rotary = LlamaRotaryEmbedding(config).to(DEVICE)
    return rotary(torch.zeros(1, dtype=dtype, device=DEVICE), position_ids.to(DEVICE))


def projections(B, S, Hq, Hk, D, dtype, seed):
    """q [B, Hq, S, D] and k [B, Hk, S, D] as the attention layer makes them: transposed views
    of [B, S, H, D] projection outputs."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hq, D, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
    k = torch.randn(B, S, Hk, D, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
    return q, k


def unfused(q, k, cos, sin, grad_q, grad_k, dtype):
    q = q.detach().to(dtype).requires_grad_()
    k = k.detach().to(dtype).requires_grad_()
    q_out, k_out = apply_rotary_pos_emb(q, k, cos.to(dtype), sin.to(dtype))
    torch.autograd.backward((q_out, k_out), (grad_q.to(dtype), grad_k.to(dtype)))
    return q_out.detach(), k_out.detach(), q.grad, k.grad


# head_dim 64 with an odd number of heads (5 query, 1 key: GQA) and S = 7; a batch of 2 with
# its own cos/sin row per sequence; packed sequences (positions restart at 0 inside the row).
CASES = {
    "odd_heads": dict(B=1, S=7, Hq=5, Hk=1, D=64, positions=[list(range(7))]),
    "batch": dict(B=2, S=5, Hq=3, Hk=3, D=64, positions=[[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]]),
    "packed": dict(B=1, S=9, Hq=4, Hk=2, D=32, positions=[[0, 1, 2, 3, 0, 1, 0, 1, 2]]),
}


@pytest.mark.parametrize("case", CASES)
def test_bf16_output_and_grads_match_torch(case, assert_close_as_torch):
    c = CASES[case]
    position_ids = torch.tensor(c["positions"])
    q, k = projections(c["B"], c["S"], c["Hq"], c["Hk"], c["D"], torch.bfloat16, seed=c["S"])
    # fp32 cos/sin for the exact reference; the model hands the kernel the bf16 rounding of it
    cos32, sin32 = cos_sin(position_ids, c["D"], torch.float32)
    cos, sin = cos32.to(torch.bfloat16), sin32.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    grad_q = torch.randn(q.shape, generator=gen).to(torch.bfloat16).to(DEVICE)
    grad_k = torch.randn(k.shape, generator=gen).to(torch.bfloat16).to(DEVICE)

    # as in the model: the kernel rotates, in place, [B, H, S, D] views of [B, S, H, D]
    # projection outputs (here leaf * 1, so the leaves collect the gradients)
    q_leaf = q.transpose(1, 2).detach().clone().requires_grad_()
    k_leaf = k.transpose(1, 2).detach().clone().requires_grad_()
    q_out, k_out = rope_((q_leaf * 1).transpose(1, 2), (k_leaf * 1).transpose(1, 2), cos, sin)
    torch.autograd.backward((q_out, k_out), (grad_q, grad_k))

    exact = unfused(q, k, cos.float(), sin.float(), grad_q, grad_k, torch.float32)
    torch_bf16 = unfused(q, k, cos, sin, grad_q, grad_k, torch.bfloat16)
    ours = (q_out, k_out, q_leaf.grad.transpose(1, 2), k_leaf.grad.transpose(1, 2))
    for name, o, t, e in zip(("q", "k", "dq", "dk"), ours, torch_bf16, exact):
        assert_close_as_torch(o, t, e, name)


def test_in_place_on_the_projection_views():
    q, k = projections(2, 3, 3, 1, 64, torch.float32, seed=2)
    cos, sin = cos_sin(torch.arange(3)[None], 64, torch.float32)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    q_out, k_out = rope_(q, k, cos, sin)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    # fp32, two products and a sum per element rounded differently (u = 2^-24): 1e-6
    torch.testing.assert_close(q, ref_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, ref_k, rtol=1e-6, atol=1e-6)


def test_cos_sin_shape_mismatch_is_a_clear_error():
    q, k = projections(1, 4, 2, 2, 8, torch.float32, seed=3)
    cos = torch.ones(1, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cos and sin must both be"):
        rope_(q, k, cos, cos)
