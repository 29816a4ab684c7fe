"""`qlora eval`: the held-out scores of a trained adapter without training, equal to what the
run itself measured at its end; train.num_epochs sets the run's length; with
data.train_on_prompt the samples still show the prompt and the expected answer."""
import json

import pytest

from qlora.cli import main
from qlora.cli.train import resolve_config
from qlora.train import train
from qlora.train.config import BUILTIN_RUN, load_config
from qlora.train.evaluation import run_eval


def test_eval_of_a_run_matches_its_final_evaluation(tmp_path, capsys):
    # 1140 training sequences, 16 a step: 71 steps an epoch, so 0.05 epochs is ceil(3.55) = 4 steps
    cfg = resolve_config(BUILTIN_RUN, [f"train.output_dir={tmp_path}", "train.num_epochs=0.05",
                                       "data.train_on_prompt=true", "logging.progress_bar=false",
                                       "logging.exact_match_examples=6", "checkpoint.every=0",
                                       "logging.sample_max_new_tokens=4"])
    result = train(cfg)
    assert result.steps == 4 and "train.num_epochs=0.05: 4 optimizer steps" in capsys.readouterr().out

    scores = run_eval(load_config(str(tmp_path / "config.yaml")), str(result.adapter_dir), log=lambda _: None)
    # the same adapter on a freshly quantized base: the same numbers as the run's last evaluation
    assert scores.examples == 60 and scores.scored == 6
    assert scores.loss == pytest.approx(result.eval_loss, rel=1e-6)
    assert scores.exact_match == result.exact_match_after
    # the prompt is trained too, yet the prompt and the expected answer are told apart
    sample = scores.samples[0]
    assert sample["prompt"].startswith("### Instruction:\n") and sample["prompt"].endswith("### Response:\n")
    assert sample["expected"] and "###" not in sample["expected"]

    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "config.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"adapter: {tmp_path / 'adapter'}" in printed and "expected answer:" in printed
    assert json.loads(out.read_text())["loss"] == pytest.approx(scores.loss, rel=1e-6)
    assert main(["eval", str(tmp_path / "config.yaml"), "--adapter", str(tmp_path / "none")]) == 2
    assert "no adapter at" in capsys.readouterr().err
