"""Presets: every shipped config loads, is complete, and has the published parameter count."""
import pytest
import torch
import transformers

from qlora.model.presets import list_presets, load_preset

REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_theta",
            "tie_word_embeddings", "model_type")
NAMED_IN_ISSUE = ("llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama-2-7b", "llama-2-13b",
                  "llama-2-70b", "llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2.5-7b",
                  "qwen2.5-72b")
# Parameter counts the model cards / papers publish, in billions, to the digits they give.
PUBLISHED_BILLIONS = {"llama-7b": 6.74, "llama-13b": 13.0, "llama-33b": 32.5, "llama-65b": 65.2,
                      "llama-2-7b": 6.74, "llama-2-70b": 69.0, "llama-3.1-8b": 8.03,
                      "mistral-7b": 7.24, "qwen2.5-7b": 7.61, "qwen2.5-72b": 72.7, "smollm-135m": 0.135,
                      "mixtral-8x7b": 46.7, "qwen3-30b-a3b": 30.5}  # MoE: total, not active, parameters


def test_every_preset_in_the_issue_is_shipped_and_complete():
    names = list_presets()
    assert set(NAMED_IN_ISSUE) <= set(names)
    for name in names:
        cfg = load_preset(name)
        missing = [k for k in REQUIRED if k not in cfg]
        assert not missing, f"{name}: missing {missing}"
        assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0
        assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model preset 'llama-8b'.*llama-2-7b"):
        load_preset("llama-8b")


def test_load_returns_a_fresh_copy():
    load_preset("llama-7b")["hidden_size"] = 1
    assert load_preset("llama-7b")["hidden_size"] == 4096


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_published_parameter_count(name):
    """The meta-device model built from the preset has the published size (rounded as published)."""
    config = transformers.AutoConfig.for_model(**load_preset(name))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    digits = len(str(PUBLISHED_BILLIONS[name]).split(".")[1])
    # Publishers round (Llama: 6.738 -> 6.74) or truncate (Qwen2.5: 7.6156 -> 7.61) to their last
    # digit, so the exact count lies within one unit of that digit of the published figure.
    assert abs(billions - PUBLISHED_BILLIONS[name]) < 10**-digits, billions
