"""`qlora train` under `accelerate launch` with examples/accelerate-fsdp2.yaml on 2 CPU processes
(FSDP2 over gloo): it trains like one process on the same global batch, saves the adapter once in
PEFT's format, and a run killed after a checkpoint resumes to a bit-identical adapter. A launch
asking for FSDP in a way that cannot be honoured is an error."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.cli.train import resolve_config
from qlora.train.config import BUILTIN_RUN
from qlora.train.fsdp import fsdp_settings

ROOT = Path(__file__).resolve().parents[2]
STEPS, LR = 4, 2e-3
SETTINGS = ["train.gradient_accumulation_steps=1", f"train.max_steps={STEPS}", "checkpoint.every=2",
            "train.eval_every=0", "optim.name=adamw", "lora.dropout=0", "data.max_seq_len=48",
            "logging.progress_bar=false", "logging.sample_max_new_tokens=1", "logging.exact_match_examples=0",
            # the setting the tolerance below was worked out for (as in test_ddp.py)
            "lora.r=16", "lora.alpha=16", f"optim.lr={LR}"]


def _train(out: Path, micro_batch: int, *extra) -> list[str]:
    return ["-m", "qlora", "train", BUILTIN_RUN, *extra, "--set", f"train.output_dir={out}",
            f"train.micro_batch_size={micro_batch}", *SETTINGS]


def _launch(out: Path, port: int, *extra) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ROOT / "examples" / "accelerate-fsdp2.yaml"),
            "--mixed_precision=no", f"--main_process_port={port}", *_train(out, 2, *extra)]


def _adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_fsdp2_run_trains_like_one_process_and_resumes_exactly(tmp_path, free_port):
    # HF_HOME: no accelerate config file of the user's may change the launch
    env = {**os.environ, "QLORA_BACKEND": "torch", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    one = subprocess.run([sys.executable, *_train(tmp_path / "one", 4)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    full = subprocess.run(_launch(tmp_path / "full", free_port()), capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "2 process(es)" in full.stdout
    plan = [line for line in full.stdout.splitlines() if line.strip().startswith("rank ")]
    assert len(plan) == 2 and all("nf4 base 0.61 of 1.19" in line for line in plan), full.stdout
    assert sorted(p.name for p in (tmp_path / "full" / "adapter").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors"]

    # As in test_ddp.py (same lr, rank and data): only the fp32 summation order differs, and
    # Adam can move an entry whose gradient is at rounding level by up to lr a step, so isolated
    # entries may differ by the 4 steps' total movement (8e-3), no more than 0.1% of a tensor;
    # every other entry agrees to 1e-5. A wrong loss normalization or a missing gradient
    # reduction would move most entries.
    single, sharded = _adapter(tmp_path / "one"), _adapter(tmp_path / "full")
    assert single.keys() == sharded.keys() and single
    for key in single:
        close = torch.isclose(sharded[key], single[key], rtol=1e-4, atol=1e-5)
        assert (~close).float().mean() <= 1e-3, key
        torch.testing.assert_close(sharded[key], single[key], rtol=0, atol=STEPS * LR)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_launch(killed, free_port()), env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step-2").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both training processes
    proc.wait()
    assert not (killed / "adapter").exists()
    resumed = subprocess.run(_launch(killed, free_port(), "--resume"), capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    got = _adapter(killed)
    for key in sharded:
        assert got[key].equal(sharded[key]), key


@pytest.mark.parametrize("env, overrides, world, message", [
    ({"FSDP_VERSION": "1"}, [], 2, "fsdp_version: 1"),
    ({"FSDP_VERSION": "2"}, [], 1, "at least 2"),
    ({"FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, [], 2, "per decoder layer"),
    ({"FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
      "FSDP_TRANSFORMER_CLS_TO_WRAP": "GPT2Block"}, [], 2, "LlamaDecoderLayer"),
    ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, [], 2, "fsdp_offload_params"),
    ({"FSDP_VERSION": "2"}, ["optim.name=paged_adamw"], 2, "optim.name: paged_adamw"),
    ({"FSDP_VERSION": "2"}, ["lora.type=dora"], 2, "lora.type: dora"),
])
def test_fsdp_requests_that_cannot_be_honoured_are_errors(monkeypatch, env, overrides, world, message):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = resolve_config(None, ["optim.name=adamw", *overrides])
    with pytest.raises(ValueError, match=message):
        fsdp_settings(cfg, world, "LlamaDecoderLayer")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for key in ("FSDP_AUTO_WRAP_POLICY", "FSDP_TRANSFORMER_CLS_TO_WRAP", "FSDP_OFFLOAD_PARAMS"):
        monkeypatch.delenv(key, raising=False)
    if not overrides and world == 2:  # the same request, made honourable, is accepted
        assert fsdp_settings(resolve_config(None, ["optim.name=adamw"]), 2, "LlamaDecoderLayer").reshard_after_forward


def test_the_70b_example_is_an_fsdp_run(monkeypatch):
    import yaml

    from qlora.train.config import load_config

    accelerate_config = yaml.safe_load((ROOT / "examples" / "accelerate-fsdp2.yaml").read_text())
    fsdp = accelerate_config["fsdp_config"]
    assert accelerate_config["distributed_type"] == "FSDP" and fsdp["fsdp_version"] == 2
    # what accelerate launch exports from that file
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", str(fsdp["fsdp_version"]))
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", fsdp["fsdp_auto_wrap_policy"])
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", fsdp["fsdp_transformer_layer_cls_to_wrap"])
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", str(fsdp["fsdp_offload_params"]).lower())
    cfg = load_config(str(ROOT / "examples" / "llama-2-70b-fsdp.yaml"))
    assert cfg.lora.r == 16 and cfg.data.max_seq_len == 2048
    assert fsdp_settings(cfg, 2, "LlamaDecoderLayer").reshard_after_forward
