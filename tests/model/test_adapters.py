"""save_adapter / load_adapter in PEFT's format, checked against the installed peft both ways."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora import add_lora, load_adapter, load_model, save_adapter
from qlora.model.inject import lora_layers
from qlora.nn import Linear4bit

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402

TINY = dict(vocab_size=80, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=80, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                                         eos_token_id=0, bos_token_id=0)).save_pretrained(path)
    return path


def _randomize(model, adapter="default", seed=1):
    """Give B (zero at init) and the DoRA magnitude values, so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if adapter in layer.lora_B:
                b = layer.lora_B[adapter].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
                if hasattr(layer, "lora_magnitude_vector"):
                    m = layer.lora_magnitude_vector[adapter].weight
                    m.mul_(1 + 0.1 * torch.rand(m.shape, generator=g))


def _dense_twin(ours, path):
    """The dense transformers model whose linear weights are exactly our NF4 weights dequantized,
    so it and ours compute the same function (up to fp32 summation order)."""
    config = transformers.AutoConfig.from_pretrained(path)
    dense = getattr(transformers, config.architectures[0]).from_pretrained(path).float().eval()
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, Linear4bit):
                name = name.removesuffix(".base_layer")
                w = module.weight.dequantize(torch.float32)
                target = dense.get_submodule(name)
                target.weight.copy_(w.t() if isinstance(target, Conv1D) else w)
    return dense


def _ids(vocab=80):
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("options", [
    dict(r=4, alpha=8, target_modules="all-linear"),
    dict(r=3, alpha=5, target_modules=["q_proj", "v_proj"], use_rslora=True, rank_pattern={"v_proj": 5},
         alpha_pattern={"q_proj": 2}),
    dict(r=2, alpha=4, target_modules="attention", use_dora=True),
    dict(r=2, alpha=4, target_modules=["down_proj"], modules_to_save=["lm_head"]),
])
def test_our_adapter_loads_in_peft_with_the_same_outputs(tmp_path, llama_path, options):
    ours = load_model(llama_path, compute_dtype=torch.float32)
    add_lora(ours, **options)
    _randomize(ours)
    if options.get("modules_to_save"):
        with torch.no_grad():
            ours.lm_head.modules_to_save["default"].weight.mul_(1.5)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == options["r"]
    assert config["base_model_name_or_path"] == str(llama_path)
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in keys)

    theirs = peft.PeftModel.from_pretrained(_dense_twin(ours, llama_path), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits, rtol=1e-4, atol=1e-5)


def test_peft_adapter_loads_into_ours_with_the_same_outputs(tmp_path, llama_path):
    ours = load_model(llama_path, compute_dtype=torch.float32)
    dense = _dense_twin(ours, llama_path)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj"], use_dora=True,
                             rank_pattern={"up_proj": 2}, modules_to_save=["lm_head"])
    theirs = peft.get_peft_model(dense, config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.save_pretrained(tmp_path / "peft")
    report = load_adapter(ours, tmp_path / "peft", adapter_name="mine")
    assert len(report.layers) == 3 * TINY["num_hidden_layers"]
    assert not any(p.requires_grad for p in ours.parameters())  # trainable=False
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_adapter_round_trips_with_peft(tmp_path, gpt2_path):
    ours = load_model(gpt2_path, compute_dtype=torch.float32)
    add_lora(ours, r=3, alpha=6, target_modules="attention")
    _randomize(ours)
    save_adapter(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    dense = _dense_twin(ours, gpt2_path)
    theirs = peft.PeftModel.from_pretrained(dense, tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits, rtol=1e-4, atol=1e-5)
    again = load_model(gpt2_path, compute_dtype=torch.float32)
    load_adapter(again, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()).logits, ours(_ids()).logits, rtol=0, atol=0)


def test_round_trip_is_exact_and_trainable_flag_works(tmp_path, llama_path):
    ours = load_model(llama_path, compute_dtype=torch.float32)
    add_lora(ours, r=5, alpha=7, target_modules="mlp", adapter_name="task")
    _randomize(ours, "task")
    save_adapter(ours, tmp_path / "a", adapter_name="task")
    save_adapter(ours, tmp_path / "a", adapter_name="task")  # overwriting in place is fine
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    other = load_model(llama_path, compute_dtype=torch.float32)
    load_adapter(other, tmp_path / "a", trainable=True)
    trainable = [n for n, p in other.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 3 * TINY["num_hidden_layers"]
    with torch.no_grad():
        assert torch.equal(ours(_ids()).logits, other(_ids()).logits)


def _saved(tmp_path, llama_path, **options):
    model = load_model(llama_path, compute_dtype=torch.float32)
    add_lora(model, **options)
    save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def test_mismatches_are_refused_naming_the_first_offending_key(tmp_path, llama_path):
    path = _saved(tmp_path, llama_path, r=4, target_modules=["q_proj", "v_proj"])
    weights_file = path / "adapter_model.safetensors"
    weights = load_file(weights_file)
    fresh = lambda: load_model(llama_path, compute_dtype=torch.float32)  # noqa: E731

    config = json.loads((path / "adapter_config.json").read_text())
    config["r"] = 8
    (path / "adapter_config.json").write_text(json.dumps(config))
    model = fresh()
    with pytest.raises(ValueError, match=r"key 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' "
                                         r"has shape \(4, 96\), the model needs \(8, 96\)"):
        load_adapter(model, path)
    assert not list(lora_layers(model))  # the model was not touched
    config["r"] = 4
    (path / "adapter_config.json").write_text(json.dumps(config))

    extra = dict(weights)
    extra["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 96)
    save_file(extra, weights_file)
    with pytest.raises(ValueError, match="'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight' has no matching"):
        load_adapter(fresh(), path)

    fewer = dict(weights)
    del fewer["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(fewer, weights_file)
    with pytest.raises(ValueError, match="missing key 'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight'"):
        load_adapter(fresh(), path)

    config["target_modules"] = ["qkv_proj"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="target_modules do not fit the model.*'qkv_proj'"):
        load_adapter(fresh(), path)


def test_only_safetensors_and_valid_configs_are_read(tmp_path, llama_path):
    path = _saved(tmp_path, llama_path, r=2, target_modules=["q_proj"])
    model = load_model(llama_path, compute_dtype=torch.float32)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="found adapter_model.bin, but only safetensors"):
        load_adapter(model, path)
    (path / "adapter_model.safetensors").write_bytes(b"garbage, not a safetensors header")
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(model, path)
    (path / "adapter_config.json").write_text('{"peft_type": "LORA",\n "r": 2,,}')
    with pytest.raises(ValueError, match="adapter_config.json: line 2: not valid JSON"):
        load_adapter(model, path)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 2}))
    with pytest.raises(ValueError, match="peft_type is 'IA3'"):
        load_adapter(model, path)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                          "target_modules": ["q_proj"], "bias": "all"}))
    with pytest.raises(ValueError, match="bias='all' is not supported"):
        load_adapter(model, path)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)


@pytest.mark.parametrize("key, value, expected", [
    ("r", "8", "r must be a positive integer, got '8'"),
    ("r", 0, "r must be a positive integer, got 0"),
    ("r", True, "r must be a positive integer, got True"),
    ("target_modules", 5, "target_modules must be a module name or a list of names, got 5"),
    ("target_modules", ["q_proj", 5], "target_modules must be a module name or a list of names"),
    ("lora_alpha", "16", "lora_alpha must be a finite number, got '16'"),
    ("lora_dropout", 1.5, r"lora_dropout must be a number in \[0, 1\), got 1.5"),
    ("use_rslora", "yes", "use_rslora must be true or false, got 'yes'"),
    ("modules_to_save", "lm_head", "modules_to_save must be a list of module names"),
])
def test_adapter_config_values_of_the_wrong_type_are_named(tmp_path, llama_path, key, value, expected):
    path = _saved(tmp_path, llama_path, r=2, target_modules=["q_proj"])
    config = json.loads((path / "adapter_config.json").read_text())
    config[key] = value
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"adapter_config.json: {expected}"):
        load_adapter(load_model(llama_path, compute_dtype=torch.float32), path)


def test_adapter_config_that_is_not_utf8_is_named(tmp_path, llama_path):
    path = _saved(tmp_path, llama_path, r=2, target_modules=["q_proj"])
    text = (path / "adapter_config.json").read_bytes()
    (path / "adapter_config.json").write_bytes(text.replace(b'"LORA"', b'"LORA\xe9"'))
    with pytest.raises(ValueError, match=r"adapter_config.json: line \d+: not UTF-8 text \(byte 0xe9"):
        load_adapter(load_model(llama_path, compute_dtype=torch.float32), path)


def test_modules_to_save_on_an_nf4_layer_round_trips(tmp_path, llama_path):
    ours = load_model(llama_path, compute_dtype=torch.float32)
    add_lora(ours, r=2, target_modules=["q_proj"], modules_to_save=["mlp.down_proj"])
    copy = ours.model.layers[0].mlp.down_proj.modules_to_save["default"]
    assert type(copy) is torch.nn.Linear and copy.weight.requires_grad  # NF4 cannot train: a dense copy
    with torch.no_grad():
        copy.weight.mul_(2)
    save_adapter(ours, tmp_path / "a")
    again = load_model(llama_path, compute_dtype=torch.float32)
    load_adapter(again, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(_ids()).logits, ours(_ids()).logits)


def test_loading_a_second_adapter_leaves_the_first_trainable(tmp_path, llama_path):
    model = load_model(llama_path, compute_dtype=torch.float32)
    add_lora(model, r=2, target_modules=["q_proj"], adapter_name="trained")
    save_adapter(model, tmp_path / "a", adapter_name="trained")
    load_adapter(model, tmp_path / "a", adapter_name="reference")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["trained"].weight.requires_grad and not layer.lora_A["reference"].weight.requires_grad


def test_a_peft_adapter_on_moe_experts_loads_and_computes_as_in_peft(tmp_path, tiny_mixtral_checkpoint):
    """PEFT targets Mixtral's fused experts and its router as target_parameters (nested ParamWrapper
    keys); such an adapter loads onto the NF4 experts and the dense router and computes what PEFT
    computes on the dequantized weights."""
    from qlora.nn.experts import ExpertLinears4bit

    tiny_mixtral_checkpoint(tmp_path / "base", vocab_size=80)
    ours = load_model(tmp_path / "base", compute_dtype=torch.float32)
    dense = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():  # the dense model gets our dequantized weights
        for name, module in ours.named_modules():
            if isinstance(module, ExpertLinears4bit):
                owner, _, param = name.rpartition(".")
                getattr(dense.get_submodule(owner), param).copy_(module.dequantized())
            elif isinstance(module, Linear4bit) and ".experts." not in name:
                dense.get_submodule(name).weight.copy_(module.weight.dequantize(torch.float32))
    adapted = peft.get_peft_model(dense, peft.LoraConfig(
        r=3, lora_alpha=5, lora_dropout=0.0, target_modules=["q_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B is zero at init: give it values so the adapter changes the output
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapted.save_pretrained(tmp_path / "adapter")
    load_adapter(ours, tmp_path / "adapter")
    ids = torch.randint(0, 80, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = ours.eval()(ids).logits, adapted.eval()(ids).logits
        with adapted.disable_adapter():
            base = adapted(ids).logits
    assert (want - base).abs().max() > 0.01 * want.abs().max()  # the adapter matters
    # fp32, the same weights and LoRA factors on both sides: only the summation order differs
    # (dot products of <= 128 terms, two layers), far inside 1e-4 of the largest logit
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # and back: our save of it is PEFT's file
    save_adapter(ours, tmp_path / "again")
    ours_state, peft_state = load_file(tmp_path / "again" / "adapter_model.safetensors"), \
        load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert ours_state.keys() == peft_state.keys() and all(torch.equal(ours_state[k], peft_state[k]) for k in ours_state)
