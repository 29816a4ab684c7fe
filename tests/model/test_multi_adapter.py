"""Several adapters on one model: set_adapter, disable_adapters, delete_adapter, combine_adapters."""
import re

import pytest
import torch
from torch import nn

from qlora import (add_lora, combine_adapters, delete_adapter, disable_adapters, load_adapter, merge,
                   quantize_model, save_adapter, set_adapter, unmerge)
from qlora.model.inject import lora_layers
from qlora.model.multi_adapter import adapter_names
from qlora.nn import Linear4bit

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=80, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
IDS = torch.randint(0, 80, (2, 8), generator=torch.Generator().manual_seed(3))


def _model():
    torch.manual_seed(0)
    return quantize_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval())


def _randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.lora_B:
                b = layer.lora_B[name].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _two_adapters():
    model = _model()
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"], adapter_name="a")
    add_lora(model, r=2, alpha=2, target_modules=["q_proj", "down_proj"], adapter_name="b")
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    return model


def test_set_adapter_and_disable():
    model = _two_adapters()
    both = _logits(model)
    with disable_adapters(model):
        base = _logits(model)
    assert torch.equal(_logits(model), both)  # restored on exit
    set_adapter(model, "a")
    only_a = _logits(model)
    assert model.model.layers[0].mlp.down_proj.active_adapters == []  # b-only layer runs its base
    set_adapter(model, ["a", "b"])
    assert torch.equal(_logits(model), both)
    delete_adapter(model, "b")
    assert torch.equal(_logits(model), only_a)
    delete_adapter(model, "a")
    assert torch.equal(_logits(model), base)
    assert not list(lora_layers(model)) and isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['a'\]"):
        set_adapter(model, "a")


def test_disable_restores_after_an_exception_and_refuses_merged():
    model = _two_adapters()
    with pytest.raises(ZeroDivisionError):
        with disable_adapters(model):
            1 / 0
    assert not any(layer.disable_adapters for _, layer in lora_layers(model))
    merge(model)
    with pytest.raises(RuntimeError, match="unmerge before disabling"):
        with disable_adapters(model):
            pass
    unmerge(model)


def test_two_loaded_adapters_by_name(tmp_path):
    model = _two_adapters()
    save_adapter(model, tmp_path / "a", adapter_name="a")
    save_adapter(model, tmp_path / "b", adapter_name="b")
    expected_a = (set_adapter(model, "a"), _logits(model))[1]
    fresh = _model()
    load_adapter(fresh, tmp_path / "a", adapter_name="first")
    load_adapter(fresh, tmp_path / "b", adapter_name="second")
    set_adapter(fresh, "first")
    assert torch.equal(_logits(fresh), expected_a)


def _delta(model, layer_name, names, weights):
    layer = model.get_submodule(layer_name)
    return sum(w * layer.delta_weight(n) for n, w in zip(names, weights) if n in layer.lora_A)


def test_cat_is_exactly_the_weighted_sum_of_deltas():
    model = _two_adapters()
    layers = combine_adapters(model, ["a", "b"], [0.7, -1.3], method="cat", adapter_name="mix")
    assert set(layers) == {n for n, _ in lora_layers(model)}
    q = model.model.layers[0].self_attn.q_proj
    assert q.r["mix"] == 6 and q.scaling["mix"] == 1.0 and q.active_adapters == ["a", "b"]
    assert model.model.layers[0].mlp.down_proj.r["mix"] == 2
    for name in layers:
        # B·A of the stacked factors is Σ w_i·s_i·B_i·A_i: the same products, summed over the
        # rank index in one fp32 matmul instead of per adapter
        torch.testing.assert_close(model.get_submodule(name).delta_weight("mix"),
                                   _delta(model, name, ["a", "b"], [0.7, -1.3]), rtol=1e-5, atol=1e-7)


def test_linear_needs_a_shared_lora_a_and_is_then_exact():
    model = _model()
    add_lora(model, r=4, alpha=8, target_modules=["q_proj"], adapter_name="a")
    add_lora(model, r=4, alpha=4, target_modules=["q_proj"], adapter_name="b")
    with pytest.raises(ValueError, match="share lora_A"):
        combine_adapters(model, ["a", "b"], [0.5, 0.5], method="linear")
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A["b"].weight.copy_(layer.lora_A["a"].weight)
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    combine_adapters(model, ["a", "b"], [0.25, 2.0], method="linear", adapter_name="lin")
    for name, layer in lora_layers(model):
        assert layer.r["lin"] == 4
        torch.testing.assert_close(layer.delta_weight("lin"), _delta(model, name, ["a", "b"], [0.25, 2.0]),
                                   rtol=1e-5, atol=1e-7)


def test_svd_is_the_best_rank_k_approximation():
    model = _two_adapters()
    combine_adapters(model, ["a", "b"], [1.0, 0.5], method="svd", rank=3, adapter_name="low")
    name = "model.layers.1.self_attn.q_proj"  # has both: rank up to 6
    layer = model.get_submodule(name)
    assert layer.r["low"] == 3
    target = _delta(model, name, ["a", "b"], [1.0, 0.5])
    sigma = torch.linalg.svdvals(target)
    residual = torch.linalg.matrix_norm(target - layer.delta_weight("low"))
    # Eckart–Young: the best rank-3 Frobenius error is sqrt(Σ_{i>3} σ_i²); fp32 SVD to ~1e-6 relative
    torch.testing.assert_close(residual, sigma[3:].square().sum().sqrt(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight("low"))[:3], sigma[:3], rtol=1e-4, atol=1e-7)


def test_combined_adapter_saves_in_peft_format_and_reloads(tmp_path):
    model = _two_adapters()
    combine_adapters(model, ["a", "b"], [1.0, 1.0], method="cat", adapter_name="mix")
    save_adapter(model, tmp_path / "mix", adapter_name="mix")
    import json
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert config["r"] in (2, 4, 6) and all(re.fullmatch(r"[\w\\.]+", k) for k in config["rank_pattern"])
    set_adapter(model, "mix")
    expected = _logits(model)
    fresh = _model()
    load_adapter(fresh, tmp_path / "mix")
    assert torch.equal(_logits(fresh), expected)


def test_combine_errors():
    model = _two_adapters()
    with pytest.raises(ValueError, match="method must be one of"):
        combine_adapters(model, ["a"], [1.0], method="ties")
    with pytest.raises(ValueError, match="one weight per adapter"):
        combine_adapters(model, ["a", "b"], [1.0])
    with pytest.raises(KeyError, match="unknown adapter"):
        combine_adapters(model, ["a", "zzz"], [1.0, 1.0], method="cat")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        combine_adapters(model, ["a", "b"], [1.0, 1.0], method="cat", adapter_name="a")
    with pytest.raises(ValueError, match="rank applies to method='svd' only"):
        combine_adapters(model, ["a", "b"], [1.0, 1.0], method="cat", rank=2)
    assert all("combined" not in layer.lora_A for _, layer in lora_layers(model))
    assert isinstance(model.lm_head, nn.Linear)


def test_adalora_adapters_are_selected_disabled_and_deleted():
    from qlora import add_adalora
    from qlora.adalora.layer import adalora_layers

    model = _model()
    base = _logits(model)
    add_adalora(model, init_r=4, alpha=8, target_modules=["k_proj", "up_proj"], adapter_name="ada")
    add_lora(model, r=4, alpha=8, target_modules=["q_proj"], adapter_name="a")
    _randomize(model, "a", 1)
    with torch.no_grad():
        for _, layer in adalora_layers(model, "ada"):
            layer.lora_E["ada"].normal_(generator=torch.Generator().manual_seed(4))
    both = _logits(model)
    assert adapter_names(model) == ["a", "ada"]
    with disable_adapters(model):
        assert torch.equal(_logits(model), base)
    set_adapter(model, "a")
    only_a = _logits(model)
    assert not torch.allclose(only_a, both)
    set_adapter(model, ["a", "ada"])
    assert torch.equal(_logits(model), both)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj: AdaLoRA adapters "
                                         r"cannot be combined"):
        combine_adapters(model, ["a", "ada"], [1.0, 1.0], method="cat")
    delete_adapter(model, "ada")
    assert adapter_names(model) == ["a"] and isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
    assert torch.equal(_logits(model), only_a)
