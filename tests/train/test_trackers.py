"""logging.report_to: accelerate's trackers get the metrics.jsonl numbers; wandb in offline mode
(no network) keeps its run under train.output_dir/wandb."""
import json

import pytest

from qlora.cli.train import resolve_config
from qlora.train import train
from qlora.train.config import BUILTIN_RUN, load_config
from qlora.train.metrics import read_metrics

SMALL = ["logging.progress_bar=false", "logging.sample_max_new_tokens=2", "data.max_seq_len=48",
         "logging.exact_match_examples=2", "train.max_steps=3", "train.eval_every=2",
         "checkpoint.every=0"]


def test_wandb_offline_logs_the_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'qlora[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network traffic, no login
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    train(resolve_config(BUILTIN_RUN, [f"train.output_dir={tmp_path}", *SMALL,
                                       "logging.report_to=[wandb]", "logging.project=qlora-test"]))
    # run.finish() returns once wandb's service has the exit record; the service writes the run
    # file on its own schedule and closes it when shut down (at process exit, or here). CI once
    # read it before that on a loaded machine: 8 bytes, the header alone.
    wandb.teardown()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    # the run file `wandb sync` uploads later: its records hold each logged value as JSON text
    (run_file,) = run.glob("run-*.wandb")
    raw = run_file.read_bytes()
    assert raw.startswith(b":W&B") and b"qlora-test" in raw
    records = read_metrics(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r] + [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(losses) == 5 and b"train/loss" in raw and b"eval/loss" in raw
    for value in losses:
        assert json.dumps(value).encode() in raw, value


def test_unknown_or_repeated_tracker_is_named():
    with pytest.raises(ValueError, match=r"--set: logging.report_to: 'wandbb' is not one of "
                                         r"tensorboard, wandb, mlflow"):
        load_config(None, ["logging.report_to=[wandbb]"])
    with pytest.raises(ValueError, match=r"logging.report_to: names a tracker twice"):
        load_config(None, ["logging.report_to=[wandb, wandb]"])
