"""The input embedding in host memory gives the device-resident embedding's output, bit for bit."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora.model.host_embedding import HostEmbedding, move_embedding_to_host

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def llama(tie=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).to(DEVICE).eval()
    model.requires_grad_(False)
    return model


def test_same_output_and_state_dict_keys():
    model = llama()
    ids = torch.randint(0, 50, (2, 9)).to(DEVICE)
    want = model(input_ids=ids).logits
    keys = set(model.state_dict())
    assert move_embedding_to_host(model) == 50 * 16 * 4
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, HostEmbedding) and embedding.weight.device.type == "cpu"
    assert torch.equal(model(input_ids=ids).logits, want)
    assert set(model.state_dict()) == keys
    assert all(p.device.type == DEVICE for p in model.parameters())
    model.to(torch.bfloat16)  # follows the dtype, stays in host memory
    assert embedding.weight.dtype == torch.bfloat16 and embedding.weight.device.type == "cpu"
    assert move_embedding_to_host(model) == 0


def test_refuses_a_tied_or_trained_embedding():
    with pytest.raises(ValueError, match="tied to the output layer"):
        move_embedding_to_host(llama(tie=True))
    model = llama()
    model.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="is trained"):
        move_embedding_to_host(model)
