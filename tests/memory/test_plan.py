"""The memory plan of `qlora train`: "auto" options decided cheapest first until the estimate
fits the budget, the optimizer's device budget, the choices a resumed run inherits."""
from pathlib import Path

import pytest
import yaml

from qlora.cli.train import resolve_config
from qlora.memory import estimate as est
from qlora.memory.plan import LADDER, adopt_checkpoint_choices, plan_for_run, plan_run
from qlora.train.config import BUILTIN_RUN

# Llama-3.1-8B's architecture (a preset name is enough to estimate) at 64k tokens, where each
# option of the ladder saves memory
LONG = ["model.name_or_path=llama-3.1-8b", "data.max_seq_len=65536", "train.micro_batch_size=1",
        "model.gradient_checkpointing=true", "model.offload_activations=true"]


def test_without_a_budget_every_auto_option_is_off():
    cfg = resolve_config(None, LONG)
    plan = plan_run(cfg, None, "cpu")
    assert plan.choices == {key: off for key, _, off in LADDER}
    assert plan.optimizer_budget_bytes is None and "no device budget" in plan.text()


def test_options_turn_on_cheapest_first_until_it_fits():
    """The estimate of a CUDA run (bf16 compute; no GPU needed to estimate it). Optimizer pages
    spill before any option turns on, so what a set of options needs is its estimate with every
    page in host memory (a budget of 0). Each option saves memory here, so a budget of exactly
    what the first n need turns on exactly those n."""
    cfg = resolve_config(None, LONG)
    needs = []
    for n_on in range(len(LADDER) + 1):
        trial = resolve_config(None, LONG + [
            f"{key}={(on if on != 'compute dtype' else 'bfloat16') if k < n_on else off}"
            for k, (key, on, off) in enumerate(LADDER)])
        needs.append(plan_run(trial, 0, "cuda").estimate.gpu_bytes)
    assert needs == sorted(needs, reverse=True) and len(set(needs)) == len(needs)
    for n_on, need in enumerate(needs):
        plan = plan_run(cfg, need, "cuda", "a test")
        on = [key for key, _, off in LADDER if plan.choices[key] != off]
        assert on == [key for key, _, _ in LADDER[:n_on]], (n_on, plan.choices)
        assert plan.estimate.fits
        assert plan.optimizer_budget_bytes == est.optimizer_device_budget(plan.estimate)


def test_a_budget_nothing_fits_turns_everything_on_and_says_so():
    plan = plan_run(resolve_config(None, LONG), 10**6, "cuda", "a test")
    assert all(plan.choices[key] != off for key, _, off in LADDER)
    assert "does NOT fit in 0.001 GB" in plan.text()


def test_an_option_that_does_not_help_stays_off():
    # the built-in model, checkpointed, at 4096 tokens: a tiled MLP chunk of 4096 tokens is the
    # whole sequence and only adds its buffers (612.2 MB without it, 614.3 MB with it)
    cfg = resolve_config(BUILTIN_RUN, ["data.max_seq_len=4096", "train.micro_batch_size=1",
                                       "model.gradient_checkpointing=true"])
    plan = plan_run(cfg, 10**6, "cuda", "a test")
    assert plan.choices["model.tiled_mlp"] == 0 and plan.estimate.setup.tiled_mlp == 0
    assert plan.choices["lora.dtype"] == "bfloat16"


def test_set_options_are_not_auto():
    cfg = resolve_config(None, LONG + ["model.tiled_mlp=0", "lora.dtype=float32"])
    plan = plan_run(cfg, 10**6, "cuda")
    assert set(plan.choices) == {"model.embedding_on_host", "model.compact_norms", "model.tiled_qkv"}


def test_plan_for_run_writes_the_choices_and_a_resume_inherits_them(tmp_path):
    # without a GPU the run is planned as a CPU run (fp32 compute): a budget nothing fits turns
    # on what helps there, the host embedding and 16-bit adapters
    cfg = resolve_config(None, LONG + [f"train.output_dir={tmp_path}", "train.gpu_memory_gb=0.001"])
    plan = plan_for_run(cfg)
    assert plan.budget_bytes == 10**6 and "train.gpu_memory_gb" in plan.text()
    assert cfg.model.embedding_on_host is True and cfg.lora.dtype == "bfloat16"
    step = Path(tmp_path) / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    saved = {"model": {"tiled_mlp": 0, "compact_norms": True, "embedding_on_host": False},
             "lora": {"dtype": "float32"}}
    (step / "config.yaml").write_text(yaml.safe_dump(saved))
    resumed = resolve_config(None, LONG + [f"train.output_dir={tmp_path}"])
    adopt_checkpoint_choices(resumed, step)
    assert (resumed.model.tiled_mlp, resumed.model.compact_norms, resumed.lora.dtype) == \
        (0, True, "float32")
    again = resolve_config(None, LONG + [f"train.output_dir={tmp_path}", "train.gpu_memory_gb=0.001"])
    plan_for_run(again, resume="latest")
    assert again.lora.dtype == "float32"   # the checkpoint's decision, not a new one


@pytest.mark.parametrize("targets,expected", [("all-linear", est.ALL_LINEAR),
                                              ("mlp", est.MLP_PROJECTIONS),
                                              (["self_attn.q_proj", "v_proj", "lm_head"],
                                               ("q_proj", "v_proj"))])
def test_estimate_targets(targets, expected):
    from qlora.memory.plan import estimate_targets

    assert estimate_targets(targets) == expected


def test_adalora_keeps_fp32_adapters():
    cfg = resolve_config(None, LONG + ["lora.type=adalora", "train.max_steps=100"])
    plan = plan_run(cfg, 10**6, "cuda", "a test")
    assert plan.choices["lora.dtype"] == "float32"


def test_adapters_stay_fp32_without_paged_adamw():
    """Only paged_adamw keeps fp32 masters, so with another optimizer the plan leaves the
    adapters in fp32 however short the budget (and the estimate stays valid)."""
    cfg = resolve_config(None, LONG + ["optim.name=adamw"])
    plan = plan_run(cfg, 10**6, "cuda", "a test")
    assert plan.choices["lora.dtype"] == "float32" and plan.estimate.setup.lora_bytes == 4
    assert plan.optimizer_budget_bytes is None


def test_an_moe_model_gets_no_option_qlora_cannot_apply_to_it():
    """Mixtral: no compact norms and no tiled q/k/v (qlora.model.patch supports neither its
    RMSNorm nor its attention) and no tiled MLP (every layer's MLP is an MoE block); with a budget
    nothing fits, the plan turns on every other option and leaves those three off, as the ladder
    of --max-context leaves them out."""
    from qlora.memory.max_context import ladder

    cfg = resolve_config(None, ["model.name_or_path=mixtral-8x7b", "data.max_seq_len=65536",
                                "train.micro_batch_size=1", "model.gradient_checkpointing=true"])
    plan = plan_run(cfg, 10**6, "cuda", "a test")
    assert plan.choices["model.compact_norms"] is False and plan.choices["model.tiled_mlp"] == 0
    assert plan.choices["model.tiled_qkv"] == 0
    assert plan.choices["model.embedding_on_host"] is True and plan.choices["lora.dtype"] == "bfloat16"
    assert est.unavailable_options(est.Architecture.from_config(est.load_preset("mixtral-8x7b"))) == \
        {"compact_norms", "tiled_mlp", "tiled_qkv"}
    options = [row["option"] for row in ladder(est.load_preset("mixtral-8x7b"), 48 * est.GB, est.TrainSetup())]
    assert not any("tiled" in o or "compact" in o for o in options) and len(options) == 6


def test_an_fsdp_launch_is_planned_per_gpu(monkeypatch, tmp_path):
    """Under `accelerate launch` with FSDP over 2 processes, the plan is the estimate of one
    process's share (`qlora memory estimate --gpus 2`), with the AdamW FSDP trains with: a 70B
    model at 2048 tokens needs about half the weights per GPU, and 16-bit adapters are not
    chosen (their fp32 masters live in the paged optimizer, which FSDP does not run)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = resolve_config(None, ["model.name_or_path=llama-2-70b", "data.max_seq_len=2048",
                                "train.micro_batch_size=1", "model.gradient_checkpointing=true",
                                "optim.name=adamw", f"train.output_dir={tmp_path}",
                                "train.gpu_memory_gb=24"])
    plan = plan_for_run(cfg)
    setup = plan.estimate.setup
    assert (setup.gpus, setup.optimizer) == (2, "adamw")
    assert plan.choices["lora.dtype"] == "float32" and cfg.lora.dtype == "float32"
    assert "per GPU, FSDP2 over 2 GPUs" in plan.text()
    assert plan.estimate.gpu_bytes == est.estimate(est.load_preset("llama-2-70b"), setup).gpu_bytes
    one_process = plan_run(cfg, 24 * est.GB, setup.device, "a test")
    assert one_process.estimate.setup.gpus == 1
    assert plan.estimate.bytes_of("nf4 base weights") < \
        0.51 * one_process.estimate.bytes_of("nf4 base weights")
