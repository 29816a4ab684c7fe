"""The memory plan of a run: which memory options it needs to fit the device, and what lives where.

    plan = plan_for_run(cfg, resume)     # `qlora train`, before the model is loaded
    plan.choices                          # {"lora.dtype": "bfloat16", ...}: the "auto" keys decided
    plan.optimizer_budget_bytes           # PagedAdamW's gpu_budget_bytes: where its pages go
    print(plan.text())

The budget is ``train.gpu_memory_gb`` or the device's free memory when the run starts. The
estimate (``qlora.memory.estimate``) of the run's setup is computed with every "auto" option
off; while it does not fit, the next option of ``LADDER`` is turned on (and kept if it lowers
the estimate), cheapest first: the
input embedding to host memory (exact, one gather per batch), compact norms, the tiled MLP and
the tiled input norm + q/k/v + RoPE (the same gradients up to the order of additions, some
recomputation), then 16-bit LoRA weights
with fp32 masters (rounds the forward's adapters to 16 bits). Optimizer pages that do not fit
beside the rest stay in pinned host memory whatever the options: the plan tells PagedAdamW its
device budget, so the run places them as the estimate did. Without a budget (a CPU run that does
not set train.gpu_memory_gb) every "auto" option is off.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

from qlora.memory import estimate as est
from qlora.ops.tiled import DEFAULT_CHUNK_TOKENS
from qlora.train.config import AUTO, BUILTIN_MODEL, Config, read_yaml

# (config key, value when the plan turns it on, value when off), cheapest first
LADDER = (("model.embedding_on_host", True, False),
          ("model.compact_norms", True, False),
          ("model.tiled_mlp", DEFAULT_CHUNK_TOKENS, 0),
          ("model.tiled_qkv", DEFAULT_CHUNK_TOKENS, 0),
          ("lora.dtype", "compute dtype", "float32"))
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg: Config, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def estimate_targets(target_modules) -> tuple:
    """The projections of ``lora.target_modules`` the estimator knows (by their last name)."""
    if isinstance(target_modules, str):
        presets = {"attention": est.ATTENTION_PROJECTIONS, "mlp": est.MLP_PROJECTIONS}
        return presets.get(target_modules) or est.parse_targets(target_modules)
    names = {t.rsplit(".", 1)[-1] for t in target_modules}
    return tuple(t for t in est.ALL_LINEAR if t in names)


def model_config(name_or_path: str) -> tuple:
    """(config dict, source) of the run's model: the built-in tiny Llama or a checkpoint dir."""
    if name_or_path == BUILTIN_MODEL:
        from qlora.train.model import BUILTIN_CONFIG_FILE

        path = resources.files("qlora.train").joinpath(BUILTIN_CONFIG_FILE)
        return est.load_config(str(path))
    return est.load_config(name_or_path)


def train_setup(cfg: Config, device: str, budget: Optional[int], gpus: int = 1) -> est.TrainSetup:
    """The estimator's setup of the run ``cfg`` describes ("auto" options counted as off), per GPU
    when FSDP2 shards it over ``gpus`` processes (which train with AdamW: the run refuses the
    paged optimizers under FSDP, qlora.train.fsdp)."""
    from qlora.ops.backend import get_backend

    def value(key):
        v = _get(cfg, key)
        return dict((k, off) for k, _, off in LADDER)[key] if v == AUTO else v

    compute = DTYPE_BYTES[cfg.quant.compute_dtype] if device == "cuda" else 4
    lora_dtype = value("lora.dtype")
    optimizer = "adamw" if gpus > 1 else \
        {"paged_adamw": "paged_adamw", "adamw": "adamw"}.get(cfg.optim.name, "adamw")
    backend = "torch"
    if device == "cuda":
        import torch

        backend = "triton" if get_backend(torch.device("cuda")) in ("triton", "cuda") else "torch"
    return est.TrainSetup(
        seq_len=cfg.data.max_seq_len, batch_size=cfg.train.micro_batch_size,
        rank=cfg.lora.init_r if cfg.lora.type == "adalora" else cfg.lora.r,
        targets=estimate_targets(cfg.lora.target_modules), optimizer=optimizer,
        grad_checkpointing=cfg.model.gradient_checkpointing,
        offload_checkpoints=cfg.model.gradient_checkpointing and cfg.model.offload_activations
        and device == "cuda",
        chunked_loss=backend == "triton", compute_bytes=compute,
        lora_bytes=compute if lora_dtype == "compute dtype" else DTYPE_BYTES[lora_dtype],
        tiled_mlp=value("model.tiled_mlp"), tiled_qkv=value("model.tiled_qkv"), compact_norms=value("model.compact_norms"),
        embedding_on_host=value("model.embedding_on_host"), gpu_budget_bytes=budget,
        device=device, backend=backend, gpus=gpus)


@dataclass
class MemoryPlan:
    estimate: est.Estimate
    choices: dict                       # "auto" key -> the value decided
    budget_bytes: Optional[int]
    budget_source: str
    optimizer_budget_bytes: Optional[int]

    def text(self) -> str:
        e, s = self.estimate, self.estimate.setup
        lines = [f"memory plan: {e.architecture.model_type}, seq_len {s.seq_len} x batch "
                 f"{s.batch_size}, rank {s.rank}, {s.optimizer}"
                 + (f"; per GPU, FSDP2 over {s.gpus} GPUs" if s.gpus > 1 else "")]
        if self.budget_bytes is None:
            lines.append(f"  {self.budget_source}: no device budget; 'auto' options off")
        else:
            lines.append(f"  device budget {self.budget_bytes / est.GB:.3f} GB "
                         f"({self.budget_source})")
        for key, value in self.choices.items():
            lines.append(f"  {key}: {value} (auto)")
        for device in ("gpu", "host"):
            rows = [c for c in e.components if c.device == device and c.bytes]
            if rows:
                where = "on the device" if device == "gpu" else "in host memory"
                items = ", ".join(f"{c.name} {c.bytes / est.GB:.3f}" for c in rows)
                lines.append(f"  {where} (GB): {items}")
        verdict = "fits" if e.fits else "does NOT fit"
        lines.append(f"  peak on the device {e.gpu_bytes / est.GB:.3f} GB ({e.peak_phase}); "
                     f"{verdict}" + ("" if self.budget_bytes is None else
                                     f" in {self.budget_bytes / est.GB:.3f} GB"))
        return "\n".join(lines)


def plan_run(cfg: Config, budget: Optional[int], device: str, budget_source: str = "",
             gpus: int = 1) -> MemoryPlan:
    """Decide the config's "auto" memory options (see the module docstring) for one of ``gpus``
    FSDP2 processes; ``cfg`` is left as it is (``apply`` writes the decisions into it)."""
    config, source = model_config(cfg.model.name_or_path)
    unavailable = est.unavailable_options(est.Architecture.from_config(config, source))
    auto = [(key, on, off) for key, on, off in LADDER if _get(cfg, key) == AUTO
            and key.split(".")[1] not in unavailable
            # AdaLoRA trains in fp32 (qlora.train.memory_options.lora_dtype), and only
            # paged_adamw, which FSDP does not run, keeps the fp32 masters of 16-bit adapters
            # (qlora.train.optimizer)
            and not (key == "lora.dtype" and (cfg.lora.type == "adalora" or gpus > 1
                                              or cfg.optim.name != "paged_adamw"))]
    choices = {key: off for key, _, off in LADDER if _get(cfg, key) == AUTO}
    trial = replace_config(cfg, choices)
    e = est.estimate(config, train_setup(trial, device, budget, gpus), source)
    if budget is not None:
        for key, on, off in auto:
            if e.fits:
                break
            choices[key] = cfg.quant.compute_dtype if on == "compute dtype" else on
            tried = est.estimate(config, train_setup(replace_config(cfg, choices), device, budget,
                                                     gpus), source)
            if tried.gpu_bytes < e.gpu_bytes:
                e = tried
            else:  # no help at this size (a tiled MLP whose chunk is most of the sequence)
                choices[key] = off
    optimizer_budget = est.optimizer_device_budget(e) \
        if budget is not None and e.setup.optimizer != "adamw" else None
    return MemoryPlan(e, choices, budget, budget_source or device, optimizer_budget)


def replace_config(cfg: Config, values: dict) -> Config:
    """A copy of ``cfg`` with the given "section.key" values."""
    import copy

    out = copy.deepcopy(cfg)
    for key, value in values.items():
        _set(out, key, value)
    return out


def adopt_checkpoint_choices(cfg: Config, checkpoint: Path) -> list:
    """Resuming: the "auto" keys take the values the checkpoint's run decided, so the resumed
    run computes what the interrupted one did. Returns the keys that run left "auto": it was
    started by ``qlora.train.train`` without a plan, which runs them off."""
    saved = read_yaml(str(checkpoint / "config.yaml"))
    left_auto = []
    for key, _, _ in LADDER:
        section, name = key.split(".")
        value = saved.get(section, {}).get(name, AUTO)
        if _get(cfg, key) == AUTO:
            if value == AUTO:
                left_auto.append(key)
            else:
                _set(cfg, key, value)
    return left_auto


def plan_for_run(cfg: Config, resume: Optional[str] = None) -> MemoryPlan:
    """The plan of ``qlora train``: the device and its free memory (or train.gpu_memory_gb), the
    choices of the checkpoint it resumes, per GPU under an FSDP launch (WORLD_SIZE processes);
    writes the decisions into ``cfg``."""
    import os

    import torch

    from qlora.train import checkpoint as ckpt
    from qlora.train.fsdp import fsdp_requested

    left_auto = []
    if resume is not None:
        path = ckpt.latest_checkpoint(cfg.train.output_dir) if resume == "latest" else Path(resume)
        if path is not None and (path / "config.yaml").is_file():
            left_auto = adopt_checkpoint_choices(cfg, path)
    off = {key: value for key, _, value in LADDER}
    for key in left_auto:  # planned off, as the interrupted run ran them
        _set(cfg, key, off[key])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    budget, source = None, "CPU run"
    if cfg.train.gpu_memory_gb is not None:
        budget, source = int(cfg.train.gpu_memory_gb * est.GB), "train.gpu_memory_gb"
    elif device == "cuda":
        budget, source = torch.cuda.mem_get_info()[0], "free device memory"
    gpus = int(os.environ.get("WORLD_SIZE", "1")) if fsdp_requested() else 1
    plan = plan_run(cfg, budget, device, source, gpus)
    for key, value in plan.choices.items():
        _set(cfg, key, value)
    for key in left_auto:  # and kept "auto", as the checkpoint's config says
        _set(cfg, key, AUTO)
    return plan
