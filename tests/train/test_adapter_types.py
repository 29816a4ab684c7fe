"""`lora.type: dora | adalora` through the training loop: the saved adapters, AdaLoRA's final
ranks, and an AdaLoRA run resumed from a mid-run checkpoint."""
import json

import pytest
import torch
from safetensors.torch import load_file

from qlora import load_adapter
from qlora.cli.train import resolve_config
from qlora.train.config import BUILTIN_RUN
from qlora.train.loop import Trainer, train
from qlora.train.model import base_model

SMALL = ["logging.progress_bar=false", "logging.sample_max_new_tokens=2", "train.micro_batch_size=4",
         "data.max_seq_len=48", "logging.exact_match_examples=2", "logging.loss_plot=false"]


def _cfg(out, *overrides):
    return resolve_config(BUILTIN_RUN, [f"train.output_dir={out}", *SMALL, *overrides])


def test_dora_run_saves_magnitudes(tmp_path):
    result = train(_cfg(tmp_path, "train.max_steps=2", "lora.type=dora", "checkpoint.every=0"))
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    magnitudes = [k for k in weights if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 4 * 7  # every linear layer of the 4 decoder layers
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["use_dora"] is True


ADALORA = ["lora.type=adalora", "lora.init_r=4", "lora.target_r=2", "lora.tinit=1", "lora.tfinal=2",
           "lora.dropout=0", "train.max_steps=6", "checkpoint.every=3", "checkpoint.keep=2"]


def test_adalora_run_prunes_to_target_reports_and_resumes(tmp_path):
    trainer = Trainer(_cfg(tmp_path / "full", *ADALORA))
    result = trainer.run()
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 6
    ranks = [sum(mask) for mask in config["rank_pattern"].values()]
    assert len(ranks) == 28 and sum(ranks) == 2 * 28 and len(set(ranks)) > 1
    assert (tmp_path / "full" / "adalora_ranks.png").read_bytes()[:4] == b"\x89PNG"

    # the saved (pruned) adapter loads back and computes what the trained model computes
    loaded = base_model(trainer.cfg, torch.device("cpu"))
    load_adapter(loaded, result.adapter_dir)
    ids = torch.tensor([list(b"### Instruction:\nReverse: abc")])
    trainer.model.eval()
    with torch.no_grad():
        # the same fp32 ops on the same weights; only the pruned shapes change summation order
        torch.testing.assert_close(loaded(ids).logits, trainer.model(ids).logits, rtol=1e-5, atol=1e-5)

    # resumed from the mid-run checkpoint (a masked triplet can still come back then, so the
    # checkpoint holds the unpruned adapter and the allocator): the same final adapter
    step3 = tmp_path / "full" / "checkpoints" / "step-3"
    assert {"adalora_weights.safetensors", "adalora_allocator.pt"} <= {p.name for p in step3.iterdir()}
    resumed = train(_cfg(tmp_path / "resumed", *ADALORA), resume=str(step3))
    assert json.loads((resumed.adapter_dir / "adapter_config.json").read_text())["rank_pattern"] \
        == config["rank_pattern"]
    want = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    got = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].equal(got[key]), key


def test_adalora_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="lora.target_r: must be <= lora.init_r"):
        Trainer(_cfg(tmp_path, "lora.type=adalora", "lora.init_r=4", "lora.target_r=8"))
    with pytest.raises(ValueError, match=r"lora.tinit \(3\) \+ lora.tfinal \(1\)"):
        Trainer(_cfg(tmp_path, "lora.type=adalora", "train.max_steps=4", "lora.tinit=3",
                     "lora.tfinal=1"))
    with pytest.raises(ValueError, match="lora.type: 'ada' is not one of lora, dora, adalora"):
        _cfg(tmp_path, "lora.type=ada")


def test_modules_to_save_head_is_trained_and_saved(tmp_path):
    from qlora.train.model import builtin_model

    result = train(_cfg(tmp_path, "train.max_steps=2", "checkpoint.every=0",
                        "lora.modules_to_save=[lm_head]"))
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    head = weights["base_model.model.lm_head.weight"]
    # the loss ran through the trainable copy: it moved away from the base model's head
    assert not head.equal(builtin_model(0).lm_head.weight.detach())
