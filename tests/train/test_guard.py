"""The non-finite guard: an update that makes a weight NaN or infinite stops the run before
anything of it is saved, the last good checkpoint survives, and the user gets a message, not a
traceback."""
import math

import pytest
import torch
from safetensors.torch import load_file

from qlora.cli import main
from qlora.cli.train import resolve_config
from qlora.train.config import BUILTIN_RUN
from qlora.train.checkpoint import list_checkpoints
from qlora.train.guard import NonFiniteUpdateError, all_finite
from qlora.train.loop import LossModule, train
from qlora.train.metrics import read_metrics

SMALL = ["logging.progress_bar=false", "logging.sample_max_new_tokens=2", "train.micro_batch_size=4",
         "data.max_seq_len=48", "logging.exact_match_examples=4"]


def test_all_finite_sees_any_nan_or_inf_and_never_overflows():
    finite = [torch.randn(3, 5), torch.full((7,), 3e38), torch.randn(4, dtype=torch.bfloat16),
              torch.zeros(0)]
    # the 2-norm of these is inf in float32; the largest |entry| is not
    assert torch.linalg.vector_norm(finite[1]).isinf() and all_finite(finite)
    for bad in (math.nan, math.inf, -math.inf):
        for dtype in (torch.float32, torch.bfloat16):
            poisoned = torch.randn(11).to(dtype)
            poisoned[4] = bad
            assert not all_finite([*finite, poisoned]), (bad, dtype)
    assert all_finite([])


def _poison_the_third_update(monkeypatch):
    """AdamW whose third step leaves one weight infinite, as an fp16 overflow or a faulty
    optimizer could: the loss and the gradient norm of that step are finite."""
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        self.test_steps = getattr(self, "test_steps", 0) + 1
        if self.test_steps == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = math.inf
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


RUN = ["optim.name=adamw", "train.max_steps=5", "checkpoint.every=1", "checkpoint.keep=1"]


def test_a_poisoning_update_stops_the_run_before_anything_of_it_is_saved(tmp_path, monkeypatch):
    _poison_the_third_update(monkeypatch)
    cfg = resolve_config(BUILTIN_RUN, [f"train.output_dir={tmp_path}", *SMALL, *RUN])
    step2 = tmp_path / "checkpoints" / "step-2"
    with pytest.raises(NonFiniteUpdateError, match=(
            r"^step 3: the optimizer update made trainable weights non-finite \(loss [\d.]+, "
            r"gradient norm [\d.]+, lr 0.001\); stopped before saving anything of this step \(the "
            rf"last checkpoint, {step2}, holds finite weights\); lower optim.lr")):
        train(cfg)
    # the old loop went on: step 3 was logged as fine, its checkpoint held inf, and keep=1 then
    # deleted step-2, the last good one
    assert list_checkpoints(str(tmp_path)) == [step2]
    assert all(t.isfinite().all() for t in
               load_file(str(step2 / "adapter" / "adapter_model.safetensors")).values())
    assert not (tmp_path / "adapter").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_the_cli_says_why_training_stopped_without_a_traceback(tmp_path, monkeypatch, capsys):
    _poison_the_third_update(monkeypatch)
    args = ["train", BUILTIN_RUN, *[a for o in [f"train.output_dir={tmp_path / 'update'}", *SMALL, *RUN]
                                    for a in ("--set", o)]]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("qlora train: stopped: step 3: the optimizer update made trainable "
                          "weights non-finite") and "Traceback" not in err

    forward = LossModule.forward
    monkeypatch.setattr(LossModule, "forward", lambda self, *a, **k: forward(self, *a, **k) * math.nan)
    args = ["train", BUILTIN_RUN, *[a for o in [f"train.output_dir={tmp_path / 'loss'}", *SMALL,
                                                "train.max_steps=5", "train.max_bad_steps=2"]
                                    for a in ("--set", o)]]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("qlora train: stopped: 2 non-finite steps in a row (train.max_bad_steps=2)")
    assert "Traceback" not in err
