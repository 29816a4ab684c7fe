"""merge / unmerge / export_merged."""
import json

import pytest
import torch
from torch import nn

from qlora import add_lora, export_merged, load_model, merge, unmerge
from qlora.model.inject import lora_layers
from qlora.nn import Linear4bit

transformers = pytest.importorskip("transformers")

# Widths are multiples of 64 so transformers + bitsandbytes on CPU can load the re-quantized export
# (bitsandbytes 0.50.2's CPU dequantize is wrong otherwise, see tests/conftest.py).
TINY = dict(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    return path


def _adapted(path, dtype=torch.float32, **options):
    model = load_model(path, compute_dtype=dtype)
    add_lora(model, **{"r": 4, "alpha": 8, **options})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.lora_B:
                b = layer.lora_B[name].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))


def test_merge_matches_the_adapted_model_and_unmerge_restores_nf4_exactly(llama_path):
    model = _adapted(llama_path)
    layer = model.model.layers[0].self_attn.q_proj
    w0 = layer.base_layer.weight
    with torch.no_grad():
        before = model(IDS).logits
    merged = merge(model)
    assert len(merged) == 7 * TINY["num_hidden_layers"]
    assert type(layer.base_layer) is nn.Linear and layer.base_layer.weight.dtype == torch.float32
    expected = w0.dequantize(torch.float32) + layer.delta_weight("default")
    assert torch.equal(layer.base_layer.weight, expected)  # W0 + s·B·A formed in fp32
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=1e-4, atol=1e-5)  # fp32: order of sums only
    assert merge(model) == []  # nothing active is left unmerged
    with pytest.raises(RuntimeError, match="already merged; unmerge first"):
        merge(model, adapter_names=["default"])
    unmerge(model)
    assert isinstance(layer.base_layer, Linear4bit) and layer.base_layer.weight is w0
    assert layer.active_adapters == ["default"]
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)


def test_merged_weight_is_16_bit_when_computing_in_bf16(llama_path):
    model = _adapted(llama_path, dtype=torch.bfloat16)
    merge(model, adapter_names=["default"])
    layer = model.model.layers[1].mlp.down_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    exact = layer.unmerged_base.weight.dequantize(torch.float32) + layer.delta_weight("default")
    assert torch.equal(layer.base_layer.weight, exact.to(torch.bfloat16))  # one rounding, from fp32
    with pytest.raises(KeyError, match="unknown adapter"):
        unmerge(model) or merge(model, adapter_names=["nope"])


def test_export_merged_loads_in_transformers(tmp_path, llama_path):
    model = _adapted(llama_path, target_modules=["q_proj", "up_proj"])
    with torch.no_grad():
        expected = model(IDS).logits
    report = export_merged(model, tmp_path / "out", dtype=torch.float32)
    assert report.quantization_errors == {}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert dense.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(dense(IDS).logits, expected, rtol=1e-4, atol=1e-5)
    # bf16 export: every weight is the fp32 merged weight rounded once to bf16
    export_merged(model, tmp_path / "bf16")
    from safetensors.torch import load_file
    state = load_file(tmp_path / "bf16" / "model.safetensors")
    layer = model.model.layers[0].self_attn.q_proj
    exact = layer.base_layer.weight.dequantize(torch.float32) + layer.delta_weight("default")
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], exact.to(torch.bfloat16))
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" not in state and not any("lora" in k for k in state)


def test_export_merged_requantized_reports_its_error(tmp_path, llama_path):
    pytest.importorskip("bitsandbytes")
    model = _adapted(llama_path, dtype=torch.bfloat16)
    report = export_merged(model, tmp_path / "q", dtype=torch.bfloat16, quantize_merged=True)
    assert len(report.quantization_errors) == 7 * TINY["num_hidden_layers"]
    layer = model.model.layers[1].self_attn.v_proj
    w = (layer.base_layer.weight.dequantize(torch.float32) + layer.delta_weight("default")).to(torch.bfloat16)
    reloaded = load_model(tmp_path / "q", compute_dtype=torch.bfloat16)
    err = reloaded.model.layers[1].self_attn.v_proj.weight.dequantize(torch.float32) - w.float()
    max_abs, rel = report.quantization_errors["model.layers.1.self_attn.v_proj"]
    assert max_abs == err.abs().max().item() and rel == pytest.approx((err.norm() / w.float().norm()).item())
    # NF4 rounds each weight to the nearest of 16 levels times its block's absmax: the widest gap
    # between levels is 0.3038 (-1.0 -> -0.6962), so no weight moves more than half of that times
    # the absmax, give or take the double-quantized absmax's own error (8-bit code of the centred
    # scale: allow 5%).
    assert 0 < max_abs <= 0.5 * 0.3039 * w.float().abs().max().item() * 1.05
    assert report.worst_relative_error == max(r for _, r in report.quantization_errors.values())
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    theirs = bnb_model.model.layers[1].self_attn.v_proj.weight  # transformers + bnb read the same bytes
    ours = reloaded.model.layers[1].self_attn.v_proj.weight
    assert type(bnb_model.model.layers[1].self_attn.v_proj).__name__ == "Linear4bit"
    assert torch.equal(theirs.data.view(-1), ours.packed.view(-1)) and torch.equal(theirs.quant_state.absmax, ours.absmax)
    assert type(bnb_model.lm_head) is nn.Linear


def test_export_of_a_merged_dora_model_equals_the_unmerged_export(tmp_path, llama_path):
    model = _adapted(llama_path, target_modules=["v_proj", "o_proj"], use_dora=True)
    export_merged(model, tmp_path / "unmerged", dtype=torch.float32)
    merge(model)
    export_merged(model, tmp_path / "merged", dtype=torch.float32)
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "unmerged" / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert type(model.model.layers[0].self_attn.v_proj.base_layer) is nn.Linear  # still merged afterwards


def test_gpt2_export_writes_conv1d_layout(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                     eos_token_id=0, bos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    model = _adapted(tmp_path / "gpt2", target_modules="attention")
    ids = IDS % 96
    with torch.no_grad():
        expected = model(ids).logits
    export_merged(model, tmp_path / "out", dtype=torch.float32)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_sharded_export_and_refusal_to_overwrite(tmp_path, llama_path):
    model = _adapted(llama_path, target_modules=["k_proj"])
    with torch.no_grad():
        expected = model(IDS).logits
    export_merged(model, tmp_path / "sharded", dtype=torch.float32, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == sorted(
        shards + ["config.json", "generation_config.json", "model.safetensors.index.json"])
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(IDS).logits, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_merged(model, tmp_path / "sharded")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_export_merged_adalora_loads_in_transformers(tmp_path, llama_path):
    from qlora import add_adalora
    from qlora.adalora.layer import adalora_layers

    model = load_model(llama_path, compute_dtype=torch.float32)
    add_adalora(model, init_r=6, alpha=8, target_modules=["v_proj", "down_proj"])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in adalora_layers(model):
            layer.lora_E["default"].copy_(torch.randn(6, 1, generator=g))  # λ = 0 would be W0 alone
        expected = model(IDS).logits
        plain = load_model(llama_path, compute_dtype=torch.float32)(IDS).logits
    assert not torch.allclose(expected, plain, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"merge: model\.layers\.0\.self_attn\.v_proj \(and 3 more\) "
                                         r"holds AdaLoRA adapters"):
        merge(model)
    export_merged(model, tmp_path / "out", dtype=torch.float32)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        # fp32 throughout: the merged weight and the adapter path differ only in summation order
        torch.testing.assert_close(dense(IDS).logits, expected, rtol=1e-4, atol=1e-5)


def test_moe_experts_merge_unmerge_and_export(tmp_path, tiny_mixtral_checkpoint):
    """LoRA on NF4 MoE experts: merge runs W_e + s·B_e·A_e, unmerge restores the NF4 experts exactly,
    and export_merged writes the fused expert tensors that transformers loads as they are."""
    model = load_model(tiny_mixtral_checkpoint(tmp_path / "base", vocab_size=96), compute_dtype=torch.float32)
    add_lora(model, r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = torch.randint(0, 96, (2, 9), generator=g)
    with torch.no_grad():
        adapted = model.eval()(ids).logits
        merge(model)
        merged = model(ids).logits
        unmerge(model)
        assert torch.equal(model(ids).logits, adapted)
    export_merged(model, tmp_path / "merged", dtype=torch.float32)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        reloaded = exported(ids).logits
    # fp32, W + ΔW against W·x + B·(A·x): summation order only (dot products of <= 128 terms)
    for got in (merged, reloaded):
        assert (got - adapted).abs().max() <= 1e-4 * adapted.abs().max()


def test_nf4_export_keeps_unchanged_layers_bit_for_bit_and_loads_in_transformers(tmp_path, llama_path,
                                                                                bnb_lookup_dequantize):
    """quantize_merged: a layer no adapter touches keeps its NF4 codes and scales bit for bit (they
    were once quantized again from their dequantized values, which moves the scales); a merged one
    is quantized again and its error printed. transformers + bitsandbytes load the same bytes."""
    from safetensors.torch import load_file

    model = load_model(llama_path, compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = tmp_path / "plain"
    assert export_merged(model, plain, dtype=torch.float32, quantize_merged=True, log=None).quantization_errors == {}
    saved = load_file(plain / "model.safetensors")
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in saved)

    model = _adapted(llama_path, target_modules=["q_proj"])
    lines = []
    report = export_merged(model, tmp_path / "q", dtype=torch.float32, quantize_merged=True, log=lines.append)
    assert sorted(report.quantization_errors) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert all(any(line.strip().startswith(name + ":") for line in lines) for name in report.quantization_errors)
    saved = load_file(tmp_path / "q" / "model.safetensors")
    untouched = [k for k in saved if "q_proj" not in k]
    assert all(torch.equal(saved[k], before[k]) for k in untouched)

    # transformers + bitsandbytes read the same codes and scales
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    ours = load_model(tmp_path / "q", compute_dtype=torch.float32)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        theirs, mine = bnb_model.get_submodule(name).weight, ours.get_submodule(name).weight
        assert torch.equal(theirs.data.view(-1), mine.packed.view(-1))
        assert torch.equal(theirs.quant_state.absmax, mine.absmax)
        assert torch.equal(theirs.quant_state.state2.absmax, mine.nested_absmax)
    # bitsandbytes' CPU 4-bit matmul is off by percents, so the logits are checked on a dense
    # model built from the saved codes by explicit table lookup: it must compute what qlora's
    # reload of the file does (both dequantize the same bytes exactly; fp32 matmuls)
    dense = transformers.LlamaForCausalLM(bnb_model.config).eval()
    state = {k: v for k, v in bnb_model.state_dict().items() if "weight." not in k}
    for name, module in bnb_model.named_modules():
        if type(module).__name__ == "Linear4bit":
            state[f"{name}.weight"] = bnb_lookup_dequantize(module.weight.data, module.weight.quant_state)
    dense.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(dense(IDS).logits, ours(IDS).logits, rtol=1e-5, atol=1e-5)


def test_trained_head_of_a_tied_model_is_written_untied(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=True)).save_pretrained(tmp_path / "tied")
    model = _adapted(tmp_path / "tied", target_modules=["v_proj"], modules_to_save=["lm_head"])
    head = model.get_output_embeddings().modules_to_save["default"].weight
    with torch.no_grad():
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(4)) * 0.1)
        expected = model(IDS).logits
    export_merged(model, tmp_path / "out", dtype=torch.float32, log=None)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(dense.lm_head.weight, head) and not torch.equal(dense.model.embed_tokens.weight, head)
    with torch.no_grad():
        torch.testing.assert_close(dense(IDS).logits, expected, rtol=1e-4, atol=1e-5)
    # untrained, the head stays tied
    model = _adapted(tmp_path / "tied", target_modules=["v_proj"])
    export_merged(model, tmp_path / "still-tied", dtype=torch.float32, log=None)
    assert json.loads((tmp_path / "still-tied" / "config.json").read_text())["tie_word_embeddings"] is True
