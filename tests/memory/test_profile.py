"""`qlora memory profile` on the tiny default: real steps, all files, estimate vs measured."""
import json

import pytest
import torch

from qlora.memory import profile


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    return profile.run_profile(profile.ProfileSettings(), steps=2, out_dir=str(out)), out


def test_writes_every_file(tiny_profile):
    result, out = tiny_profile
    for name in ("memory_report.json", "memory_timeline.png", "memory_breakdown.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    data = json.loads((out / "memory_report.json").read_text())
    phases = [p["phase"] for p in data["phases"]]
    assert phases == ["load", "forward 0", "backward 0", "optimizer 0",
                      "forward 1", "backward 1", "optimizer 1"]
    assert "rel. error" in result["table"]


def test_estimate_within_25_percent(tiny_profile):
    """The issue's bound on CPU: the RSS meter sees allocator and library noise the closed form
    does not model; the GPU issue tightens this to 5% with the CUDA allocator's own counts."""
    result, _ = tiny_profile
    rows = {r["name"]: r for r in result["components"]}
    assert abs(rows["total peak"]["relative_error"]) <= 0.25, result["table"]
    # Counted from live tensors: the weight and adapter formulas are exact.
    for name in ("nf4 base weights", "16-bit params", "lora params", "lora grads",
                 "optimizer states"):
        assert rows[name]["estimate"] == rows[name]["measured"], name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the exact count is for the fp32 CPU path")
def test_saved_activations_match_the_formula_exactly(tiny_profile):
    """estimate.layer_activation_bytes_per_token lists every tensor autograd saves; on fp32 CPU
    the saved-tensor hooks must find exactly those bytes."""
    result, _ = tiny_profile
    rows = {r["name"]: r for r in result["components"]}
    assert rows["activations"]["estimate"] == rows["activations"]["measured"]
    assert rows["logits and loss"]["estimate"] == rows["logits and loss"]["measured"]


def test_profile_reads_a_qlora_train_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  max_seq_len: 64\ntrain:\n  micro_batch_size: 2\n  seed: 3\n"
                      "lora:\n  r: 4\n  alpha: 8\n  target_modules: attention\n"
                      "optim:\n  name: adamw\n  lr: 0.001\nmodel:\n  gradient_checkpointing: true\n")
    settings = profile.settings_from_yaml(str(config))
    assert settings.model.endswith("tiny-llama-bytes.json")  # the built-in model's architecture
    assert (settings.seq_len, settings.batch_size, settings.rank, settings.alpha) == (64, 2, 4, 8.0)
    assert settings.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (settings.optimizer, settings.lr, settings.grad_checkpointing, settings.seed) == ("adamw", 1e-3, True, 3)
    config.write_text("lora:\n  rank: 4\n")
    with pytest.raises(ValueError, match="lora.r"):  # validated as `qlora train` validates it
        profile.settings_from_yaml(str(config))
    config.write_text("optim:\n  name: bnb_paged_adamw\n")
    with pytest.raises(ValueError, match="optim.name 'bnb_paged_adamw'"):
        profile.settings_from_yaml(str(config))
