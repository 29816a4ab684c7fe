"""A run's memory options applied to its model ("auto" undecided means off)."""
import pytest
import torch

from qlora.cli.train import resolve_config
from qlora.train.config import BUILTIN_RUN
from qlora.model.host_embedding import HostEmbedding
from qlora.train.memory_options import apply_memory_options, lora_dtype, memory_options
from qlora.train.model import build_model


def test_auto_is_off_and_set_values_apply():
    assert memory_options(resolve_config(None, [])) == dict(
        lora_dtype=torch.float32, embedding_on_host=False, tiled_mlp=0, tiled_qkv=0,
        compact_norms=False)
    cfg = resolve_config(BUILTIN_RUN, ["lora.dtype=bfloat16", "model.embedding_on_host=true",
                                       "model.tiled_mlp=16", "model.tiled_qkv=24",
                                       "model.compact_norms=true"])
    model = build_model(cfg, torch.device("cpu"))
    done = apply_memory_options(model, **memory_options(cfg))
    layers = model.model.layers
    assert len(done) == 5, done
    # the input norms run inside the tiled q/k/v; the others, and the final one, are compact
    assert done[-1] == f"compact RMSNorms ({len(layers) + 1})"
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.bfloat16 for p in trained)
    assert isinstance(model.get_input_embeddings(), HostEmbedding)
    assert all(layer.mlp.tiled_mlp_chunk == 16 for layer in layers)
    assert all(layer.self_attn.tiled_qkv_chunk == 24 for layer in layers)
    assert all(vars(layer.input_layernorm)["forward"].__name__ == "_pass_through" and
               vars(layer.post_attention_layernorm)["forward"].__name__ == "_compact_norm_forward"
               for layer in layers)


def test_adalora_trains_in_fp32():
    with pytest.raises(ValueError, match="adalora trains in float32"):
        lora_dtype(resolve_config(BUILTIN_RUN, ["lora.type=adalora", "lora.dtype=bfloat16"]))
