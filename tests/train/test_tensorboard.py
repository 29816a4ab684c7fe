"""TensorBoard logging through accelerate's tracker: the same numbers as metrics.jsonl, the
config as hyperparameters, and a resumed run that does not show the interrupted steps twice."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlora.cli.train import resolve_config
from qlora.train.config import BUILTIN_RUN
from qlora.train import train
from qlora.train.checkpoint import list_checkpoints
from qlora.train.metrics import read_metrics

SMALL = ["logging.progress_bar=false", "logging.sample_max_new_tokens=2", "data.max_seq_len=48",
         "logging.exact_match_examples=2", "train.max_steps=4", "train.eval_every=2",
         "checkpoint.every=2", "logging.report_to=[tensorboard]"]


def _events(out_dir) -> EventAccumulator:
    events = EventAccumulator(str(out_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _scalars(events, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_has_the_metrics_and_the_config(tmp_path):
    train(resolve_config(BUILTIN_RUN, [f"train.output_dir={tmp_path}", *SMALL]))
    records = read_metrics(tmp_path / "metrics.jsonl")
    events = _events(tmp_path)
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "train/trained_tokens", "eval/loss", "eval/ppl", "eval/exact_match"} <= set(tags["scalars"])
    # TensorBoard stores scalars as float32
    train_loss = [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records if "loss" in r]
    assert _scalars(events, "train/loss") == train_loss
    eval_loss = [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6))
                 for r in records if "eval_loss" in r]
    assert [step for step, _ in eval_loss] == [2, 4]
    assert _scalars(events, "eval/loss") == eval_loss
    samples = events.Tensors("eval/sample/text_summary")
    assert [e.step for e in samples] == [2]
    sample = next(r["sample"] for r in records if "sample" in r)
    assert samples[0].tensor_proto.string_val[0].decode() == sample
    # the config, flattened, as hyperparameters (accelerate also writes it as hparams.yml)
    hparams = list((tmp_path / "tensorboard").glob("*/hparams.yml"))
    assert len(hparams) == 1 and "lora.r: 64" in hparams[0].read_text()


def test_resumed_run_shows_each_step_once(tmp_path):
    overrides = [f"train.output_dir={tmp_path}", *SMALL]
    train(resolve_config(BUILTIN_RUN, overrides))
    first = _scalars(_events(tmp_path), "train/loss")
    # steps 3 and 4 were logged after the step-2 checkpoint: the resumed run logs them again
    step2 = next(p for p in list_checkpoints(str(tmp_path)) if p.name == "step-2")
    train(resolve_config(BUILTIN_RUN, overrides), resume=str(step2))
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    again = _scalars(_events(tmp_path), "train/loss")
    assert [step for step, _ in again] == [1, 2, 3, 4]
    # resume is exact, so the re-logged steps carry the same losses
    assert again == first


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(ValueError, match=r"logging\.report_to: tensorboard needs its package: "
                                         r"pip install 'qlora\[tensorboard\]'"):
        train(resolve_config(BUILTIN_RUN, [f"train.output_dir={tmp_path}", *SMALL]))
