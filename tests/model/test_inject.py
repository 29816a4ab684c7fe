"""add_lora targeting, initialisation and freezing; trainable_parameters against r·(d_in + d_out)."""
import math

import pytest
import torch
from torch import nn

from qlora import add_lora, quantize_model, trainable_parameters
from qlora.model.inject import lora_layers, resolve_targets
from qlora.nn import DoRALinear, Linear4bit, LoRALinear
from qlora.nn.modules_to_save import ModulesToSaveWrapper

transformers = pytest.importorskip("transformers")

# Hidden 96 and intermediate 160: not powers of two, and k/v are 48 wide (GQA), so an r·(d_in+d_out)
# count that swapped or reused a dimension would be off.
TINY = dict(vocab_size=80, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def _llama(seed=0, quantized=True):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    return quantize_model(model) if quantized else model


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=80, n_positions=32, n_embd=64, n_layer=2,
                                                                n_head=4, eos_token_id=0, bos_token_id=0)).eval()


def _bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(vocab_size=80, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=96)).eval()


def _short(names):
    return sorted({n.split(".layers.")[-1].split(".h.")[-1].split(".layer.")[-1].split(".", 1)[1] for n in names})


def test_all_linear_adapts_every_linear_but_the_head_and_freezes_the_rest():
    model = _llama()
    report = add_lora(model, r=4, alpha=8)
    assert len(report.layers) == 7 * TINY["num_hidden_layers"] and "lm_head" not in report.layers
    assert type(model.lm_head) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)


@pytest.mark.parametrize("preset,expected", [
    ("attention", ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]),
    ("mlp", ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]),
])
def test_llama_presets(preset, expected):
    assert _short(resolve_targets(_llama(), preset)) == expected


def test_gpt2_presets_and_conv1d_layers():
    model = _gpt2()
    assert _short(resolve_targets(model, "attention")) == ["attn.c_attn", "attn.c_proj"]
    assert _short(resolve_targets(model, "mlp")) == ["mlp.c_fc", "mlp.c_proj"]
    x = torch.randint(0, 80, (2, 7))
    with torch.no_grad():
        before = model(x).logits
    add_lora(model, r=2, target_modules="all-linear")  # dense Conv1D layers become transposed nn.Linear
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.base_layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (64, 192)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before)  # B = 0: the model is unchanged


def test_bert_presets():
    model = _bert()
    assert _short(resolve_targets(model, "attention")) == [
        "attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value"]
    assert _short(resolve_targets(model, "mlp")) == ["intermediate.dense", "output.dense"]
    assert "pooler.dense" in resolve_targets(model, "all-linear")  # BertModel has no output head


def test_target_by_exact_name_suffix_and_regex():
    model = _llama()
    assert resolve_targets(model, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert resolve_targets(model, ["self_attn.v_proj", "q_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert resolve_targets(model, r".*\.0\.mlp\.(up|down)_proj") == ["model.layers.0.mlp.up_proj",
                                                                      "model.layers.0.mlp.down_proj"]


def test_errors():
    model = _llama()
    with pytest.raises(ValueError, match="'qkv_proj' matches no linear layer"):
        add_lora(model, target_modules=["q_proj", "qkv_proj"])
    for r in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="rank r must be a positive integer"):
            add_lora(model, r=r)
    with pytest.raises(ValueError, match="rank_pattern"):
        add_lora(model, rank_pattern={"q_proj": 0})
    with pytest.raises(ValueError, match="no target_modules preset for model_type 'bert_generation'"):
        model.config.model_type = "bert_generation"
        add_lora(model, target_modules="attention")
    assert not list(lora_layers(model))  # nothing half-done by the failures
    for bad in ("train", "a.b", ""):
        with pytest.raises(ValueError, match="invalid adapter name"):
            add_lora(model, adapter_name=bad)
    with pytest.raises(ValueError, match="init must be one of"):
        add_lora(model, init="loftq")
    add_lora(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        add_lora(model, target_modules=["q_proj"])


def test_trainable_parameters_agree_with_the_formula():
    model = _llama()
    total_before = trainable_parameters(model).total
    report = add_lora(model, r=4, alpha=8, rank_pattern={"down_proj": 6}, alpha_pattern={"o_proj": 3})
    expected = 0
    for name in report.layers:
        layer = model.get_submodule(name)
        r = 6 if name.endswith("down_proj") else 4
        assert layer.r["default"] == r
        assert layer.scaling["default"] == (3 / r if name.endswith("o_proj") else 8 / r)
        expected += r * (layer.in_features + layer.out_features)
    counts = trainable_parameters(model)
    assert counts.trainable == expected
    assert counts.total == total_before + expected  # NF4 weights counted by element, adapters added
    assert counts.percent == pytest.approx(100 * expected / counts.total)
    rows = {kind: (layers, n) for kind, layers, n in counts.rows}
    h, i, kv = TINY["hidden_size"], TINY["intermediate_size"], TINY["hidden_size"] // 2
    assert rows["k_proj"] == (2, 2 * 4 * (h + kv))
    assert rows["down_proj"] == (2, 2 * 6 * (i + h))
    assert "k_proj" in counts.table() and f"{expected:,}" in str(counts)


def test_forward_is_base_plus_scaled_lora_and_rslora():
    model = _llama()
    add_lora(model, r=4, alpha=8, use_rslora=True, target_modules=["q_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 8 / math.sqrt(4)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, TINY["hidden_size"])
    w = layer.base_layer.weight.dequantize(torch.float32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), x @ w.t() + 4.0 * (x @ a.t()) @ b.t())


def test_gaussian_init_has_std_one_over_r():
    model = _llama()
    add_lora(model, r=8, init="gaussian", target_modules="mlp")
    a = torch.cat([m.lora_A["default"].weight.flatten() for _, m in lora_layers(model)])
    # ~5000 samples of N(0, 1/64): the sample std is within 5% of 1/8 with overwhelming probability
    assert a.std().item() == pytest.approx(1 / 8, rel=0.05)
    assert all(not m.lora_B["default"].weight.any() for _, m in lora_layers(model))


@pytest.mark.parametrize("quantized", [False, True])
def test_pissa_keeps_the_output_and_takes_the_top_singular_directions(quantized):
    model = _llama(quantized=quantized)
    layer_name = "model.layers.0.mlp.up_proj"
    base = model.get_submodule(layer_name)
    w0 = base.weight.dequantize(torch.float32) if quantized else base.weight.detach().clone()
    x = torch.randn(5, TINY["hidden_size"])
    with torch.no_grad():
        before = base(x)
    add_lora(model, r=4, alpha=8, init="pissa", target_modules=[layer_name])
    layer = model.get_submodule(layer_name)
    delta = layer.delta_weight("default")
    sigma = torch.linalg.svdvals(w0)
    torch.testing.assert_close(torch.linalg.svdvals(delta)[:4], sigma[:4], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        after = layer(x)
    if quantized:
        # W0 - s·B·A is re-quantized: NF4's error is at most half the widest code gap (0.16) of
        # each block's absmax, and the residual's absmax is no larger than W0's here.
        err = (after - before).abs().max().item()
        bound = 0.5 * 0.17 * w0.abs().max().item() * x.abs().sum(dim=1).max().item()
        assert err <= bound
    else:
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)  # fp32 SVD round trip


def test_dora_and_modules_to_save():
    model = _llama()
    add_lora(model, r=2, target_modules=["v_proj"], use_dora=True, modules_to_save=["lm_head"])
    assert isinstance(model.model.layers[0].self_attn.v_proj, DoRALinear)
    assert isinstance(model.lm_head, ModulesToSaveWrapper)
    assert all(p.requires_grad for p in model.lm_head.modules_to_save["default"].parameters())
    assert not model.lm_head.original_module.weight.requires_grad
    with pytest.raises(ValueError, match="cannot mix DoRA"):
        add_lora(model, r=2, target_modules=["v_proj"], adapter_name="plain")


def test_second_adapter_trains_alone():
    model = _llama()
    add_lora(model, r=2, target_modules=["q_proj"])
    add_lora(model, r=3, target_modules=["q_proj", "k_proj"], adapter_name="second")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.active_adapters == ["default", "second"]
    assert not layer.lora_A["default"].weight.requires_grad and layer.lora_A["second"].weight.requires_grad
