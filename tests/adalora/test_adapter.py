"""add_adalora on a quantized tiny Llama, trained with the rank allocator, saved and loaded in PEFT's
AdaLoRA format and checked against the installed peft both ways."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora import add_adalora, add_lora, load_adalora_adapter, load_adapter, quantize_model, save_adalora_adapter, \
    save_adapter
from qlora.adalora.allocator import RankAllocator
from qlora.adalora.ranks import prune_to_rank_pattern
from qlora.adalora import AdaLoRALinear
from qlora.nn import Linear4bit
from qlora.adalora.layer import adalora_layers, orthogonal_regularization

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = dict(vocab_size=80, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
TARGETS = ["q_proj", "v_proj", "down_proj"]
INIT_R, TARGET_R, ALPHA = 4, 2, 8
SCHEDULE = dict(target_r=TARGET_R, total_step=6, tinit=1, tfinal=2, deltaT=1)
# Same function computed two ways in fp32 (our NF4 layer dequantizes to exactly the dense twin's
# weight); only the summation order of matmuls over <= 160 terms differs: ~1e-6 relative per layer,
# so rtol 1e-4 / atol 1e-5 on O(1) logits leaves a wide margin yet is far below the adapter's effect.
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).float().eval()


def _quantized(dense):
    return quantize_model(copy.deepcopy(dense)).eval()


def _dense_twin(ours, dense):
    """``dense`` with our NF4 weights dequantized into its linear layers: PEFT's view of ``ours``."""
    twin = copy.deepcopy(dense)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, Linear4bit):
                w = module.weight.dequantize(torch.float32)
                twin.get_submodule(name.removesuffix(".base_layer")).weight.copy_(w)
    return twin


def _ids(seed=7):
    return torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(seed))


def _enlarge(model, adapter="default", seed=1):
    """Give the kept triplets values large enough that the adapter moves the logits far beyond TOL
    (a few training steps leave λ near its zero init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adalora_layers(model, adapter):
            for factors in (layer.lora_A, layer.lora_E, layer.lora_B):
                p = factors[adapter]
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def trained(dense, tmp_path_factory):
    """Our quantized model after AdaLoRA training with pruning, pruned, and saved (plus a save
    taken before pruning)."""
    torch.manual_seed(1)
    ours = _quantized(dense)
    report = add_adalora(ours, init_r=INIT_R, alpha=ALPHA, target_modules=TARGETS)
    allocator = RankAllocator(ours, **SCHEDULE)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ours.train()
    for step in range(SCHEDULE["total_step"]):
        ids = _ids(seed=100 + step)
        loss = ours(ids, labels=ids).loss + 0.1 * orthogonal_regularization(ours)
        loss.backward()
        optimizer.step()
        allocator.update_and_allocate(ours, step)
        optimizer.zero_grad()
    ours.eval()
    pattern = allocator.finish(ours)
    _enlarge(ours)
    allocator.apply_rank_pattern(ours, pattern)  # λ of the masked triplets back to 0 (unpruned save)
    root = tmp_path_factory.mktemp("adalora")
    save_adalora_adapter(ours, root / "unpruned", allocator, orth_reg_weight=0.1)
    prune_to_rank_pattern(ours, pattern)
    save_adalora_adapter(ours, root / "adapter", allocator, orth_reg_weight=0.1)
    return ours, report, pattern, root


def test_add_adalora_wraps_the_targets_and_starts_from_the_base(dense):
    ours = _quantized(dense)
    with torch.no_grad():
        before = ours(_ids()).logits
    report = add_adalora(ours, init_r=INIT_R, alpha=ALPHA, target_modules=TARGETS)
    assert report.layers == [f"model.layers.{i}.{m}" for i in range(2)
                             for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert all(isinstance(ours.get_submodule(n), AdaLoRALinear) for n in report.layers)
    trainable = {n.rsplit(".", 2)[1] for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_E", "lora_B"}
    # r·(in + out + 1) per layer: q and v are 96 -> 96 / 96 -> 48 (2 KV heads of 24), down 160 -> 96
    assert report.parameters.trainable == 2 * INIT_R * ((96 + 96 + 1) + (96 + 48 + 1) + (160 + 96 + 1))
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, before, rtol=0, atol=0)  # λ = 0 at init
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: cannot mix LoRA and AdaLoRA"):
        add_lora(ours, r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has an AdaLoRA adapter named 'default'"):
        add_adalora(ours, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="save_adalora_adapter"):
        save_adapter(ours, "/nonexistent")


def test_trained_adapter_is_pruned_and_written_in_peft_format(trained):
    ours, report, pattern, root = trained
    assert sorted(pattern) == sorted(f"{n}.lora_E" for n in report.layers)
    kept = {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    assert sum(kept.values()) == TARGET_R * len(report.layers) < INIT_R * len(report.layers)
    assert {n: layer.r["default"] for n, layer in adalora_layers(ours)} == kept

    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == INIT_R and config["lora_alpha"] == ALPHA
    assert {k: config[k] for k in SCHEDULE} == SCHEDULE and config["orth_reg_weight"] == 0.1
    assert config["beta1"] == config["beta2"] == 0.85 and config["target_modules"] == sorted(TARGETS)
    assert config["rank_pattern"] == pattern
    tensors = load_file(root / "adapter" / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(f"base_model.model.{n}.{f}" for n in report.layers
                                     for f in ("lora_A", "lora_E", "lora_B"))
    for name, r in kept.items():
        assert tensors[f"base_model.model.{name}.lora_E"].shape == (r, 1)
    unpruned = load_file(root / "unpruned" / "adapter_model.safetensors")
    assert unpruned.keys() == tensors.keys()
    for key in tensors:  # saving at init_r drops the masked triplets: the same file as after pruning
        torch.testing.assert_close(unpruned[key], tensors[key], rtol=0, atol=0)


def test_our_adapter_loads_in_peft_with_the_same_outputs(trained, dense):
    ours, _, _, root = trained
    twin = _dense_twin(ours, dense)
    with torch.no_grad():
        base_logits = twin(_ids()).logits
    theirs = peft.PeftModel.from_pretrained(twin, root / "adapter").eval()
    with torch.no_grad():
        ours_logits, theirs_logits = ours(_ids()).logits, theirs(_ids()).logits
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapter matters, far beyond TOL
    torch.testing.assert_close(ours_logits, theirs_logits, **TOL)


def test_peft_adapter_loads_into_ours_with_the_same_outputs(tmp_path, dense):
    ours = _quantized(dense)
    config = peft.AdaLoraConfig(init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA, total_step=10,
                                target_modules=TARGETS)
    theirs = peft.get_peft_model(_dense_twin(ours, dense), config).eval()
    g = torch.Generator().manual_seed(3)
    pattern = {}
    with torch.no_grad():
        for i, (name, module) in enumerate((n, m) for n, m in theirs.base_model.model.named_modules()
                                           if isinstance(m, peft.tuners.adalora.SVDLinear)):
            keep = [(i + j) % 3 != 0 for j in range(INIT_R)]  # 2 or 3 of 4 kept, varying by layer
            pattern[f"{name}.lora_E"] = keep
            for factor in (module.lora_A, module.lora_E, module.lora_B):
                factor["default"].add_(torch.randn(factor["default"].shape, generator=g) * 0.3)
            module.lora_E["default"][~torch.tensor(keep)] = 0.0  # what the allocator's masking leaves
    theirs.peft_config["default"].rank_pattern = pattern
    theirs.save_pretrained(tmp_path / "peft")

    report = load_adapter(ours, tmp_path / "peft", adapter_name="mine")  # dispatches on peft_type
    assert len(report.layers) == 6
    flags = {n: p.requires_grad for n, p in ours.named_parameters()}
    assert not any(flag for n, flag in flags.items() if ".lora_" in n)  # trainable=False
    assert flags["model.embed_tokens.weight"]  # the other parameters keep their flags
    assert {f"{n}.lora_E": layer.r["mine"] for n, layer in adalora_layers(ours, "mine")} == \
        {k: sum(v) for k, v in pattern.items()}
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits, **TOL)


def _broken_copy(src, dst, edit_tensors=None, edit_config=None):
    dst.mkdir()
    tensors = load_file(src / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, dst / "adapter_model.safetensors")
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit_tensors, edit_config, message", [
    (lambda t: t.update({f"{Q0}.lora_X": t.pop(f"{Q0}.lora_E")}), None, f"key '{Q0}.lora_X' has no matching layer"),
    (lambda t: t.update({f"{Q0}.lora_A": torch.zeros(7, 96)}), None,
     rf"key '{Q0}.lora_A' has shape \(7, 96\), the model needs \(\d, 96\)"),
    (lambda t: t.pop(f"{Q0}.lora_B"), None, f"missing key '{Q0}.lora_B'"),
    (None, lambda c: c["rank_pattern"].update({"model.layers.0.self_attn.k_proj.lora_E": [True] * INIT_R}),
     "rank_pattern key 'model.layers.0.self_attn.k_proj.lora_E' is not"),
    (None, lambda c: c["rank_pattern"].update({"model.layers.1.mlp.down_proj.lora_E": [True] * 3}),
     r"rank_pattern\['model.layers.1.mlp.down_proj.lora_E'\] must be a list of 4"),
    (None, lambda c: c.pop("init_r"), "missing key 'init_r'"),
])
def test_mismatched_adapter_is_refused_naming_the_key(tmp_path, trained, dense, edit_tensors, edit_config, message):
    broken = _broken_copy(trained[3] / "adapter", tmp_path / "broken", edit_tensors, edit_config)
    ours = _quantized(dense)
    with pytest.raises(ValueError, match=message):
        load_adalora_adapter(ours, broken)
    assert not any(isinstance(m, AdaLoRALinear) for m in ours.modules())  # refused before any change


def test_only_safetensors_is_read(tmp_path, trained, dense):
    adapter = tmp_path / "bin_only"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text((trained[3] / "adapter" / "adapter_config.json").read_text())
    (adapter / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="only safetensors files are read"):
        load_adalora_adapter(_quantized(dense), adapter)


def test_gpt2_conv1d_adapter_saved_before_any_masking_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=80, n_positions=32, n_embd=64, n_layer=2,
                                                                 n_head=4)).float().eval()
    ours = _quantized(gpt2)
    add_adalora(ours, init_r=INIT_R, alpha=ALPHA, target_modules="attention")
    _enlarge(ours)
    save_adalora_adapter(ours, tmp_path / "a", RankAllocator(ours, **SCHEDULE))  # no masking step yet
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert all(len(m) == sum(m) == INIT_R for m in config["rank_pattern"].values())
    twin = copy.deepcopy(gpt2)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, Linear4bit):  # GPT-2's Conv1D stores the weight [in, out]
                w = module.weight.dequantize(torch.float32)
                twin.get_submodule(name.removesuffix(".base_layer")).weight.copy_(w.t())
    theirs = peft.PeftModel.from_pretrained(twin, tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits, **TOL)
