"""Every checkpoint records size, mtime and SHA-256 of the data files; a resume on changed data is
refused naming the file, unless --allow-changed-data asks to continue."""
import hashlib
import io
import json
import os
import re

import pytest

from qlora.cli import main
from qlora.cli.train import resolve_config
from qlora.train.config import BUILTIN_RUN, load_config
from qlora.train.fingerprint import DataChangedError, fingerprint
from qlora.train.loop import train

SMALL = ["logging.progress_bar=false", "logging.sample_max_new_tokens=2", "train.micro_batch_size=4",
         "data.max_seq_len=48", "logging.exact_match_examples=4", "lora.r=8", "lora.alpha=8"]


def _records(n):
    return "".join(json.dumps({"instruction": f"Uppercase: {chr(97 + i % 26) * 3}",
                               "output": chr(65 + i % 26) * 3}) + "\n" for i in range(n))


def test_a_resume_on_changed_data_is_refused_naming_the_file(tmp_path, capsys):
    data = tmp_path / "tasks.jsonl"
    data.write_text(_records(200))
    out = tmp_path / "run"
    overrides = [f"train.output_dir={out}", f"data.path={data}", "train.max_steps=4",
                 "checkpoint.every=2", *SMALL]
    cfg = resolve_config(BUILTIN_RUN, overrides)
    train(cfg)
    step2 = out / "checkpoints" / "step-2"
    stat = data.stat()
    assert json.loads((step2 / "data_files.json").read_text()) == {"data.path": {
        "file": str(data), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}}

    # the same content with a new modification time is the same data
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert train(cfg, resume=str(step2)).steps == 4

    # the case: 190 training sequences became 48, and the resume went on silently
    data.write_text(_records(50))
    message = (f"cannot resume from {step2}: data.path {data} is not the file trained on: "
               f"{stat.st_size} -> {data.stat().st_size} bytes")
    with pytest.raises(DataChangedError, match=f"^{re.escape(message)}.*pass --allow-changed-data "
                                               f"to continue anyway$"):
        train(cfg, resume=str(step2))
    capsys.readouterr()
    args = ["train", BUILTIN_RUN, *[a for o in overrides for a in ("--set", o)], "--resume", str(step2)]
    assert main(args) == 2 and message in capsys.readouterr().err

    log = io.StringIO()
    assert train(cfg, resume=str(step2), out=log, allow_changed_data=True).steps == 4
    assert f"resuming on changed data (--allow-changed-data): data.path {data} is not the file " \
           f"trained on" in log.getvalue()
    assert "data: 48 training sequences" in log.getvalue()
    # the new checkpoints describe the data they were trained on
    assert json.loads((step2.parent / "step-4" / "data_files.json").read_text())["data.path"][
        "size"] == data.stat().st_size
    # the CLI flag reaches the loop, and is refused without --resume
    assert main([*args, "--allow-changed-data"]) == 0
    assert main(args[:-2] + ["--allow-changed-data"]) == 2
    assert "--allow-changed-data only applies with --resume" in capsys.readouterr().err


def test_every_dataset_of_a_mix_that_is_a_file_is_fingerprinted(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(_records(3))
    second.write_text(_records(5))
    cfg = load_config(None, [f"data.datasets=[{{path: {first}}}, {{path: someone/cached-dataset}}, "
                             f"{{path: {second}, weight: 2}}]", f"data.eval_path={first}"])
    prints = fingerprint(cfg)
    # the hub id is no file: left out (the cache's files are read by the datasets library)
    assert sorted(prints) == ["data.datasets[0].path", "data.datasets[2].path", "data.eval_path"]
    for key, path in (("data.datasets[0].path", first), ("data.datasets[2].path", second),
                      ("data.eval_path", first)):
        assert prints[key]["file"] == str(path) and prints[key]["size"] == path.stat().st_size
        assert prints[key]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
