"""`qlora memory profile`: run real training steps, measure memory per phase, compare to the estimate.

A step has three phases, each measured: forward (the training loop's loss, ``LossModule``),
backward, optimizer step (and zero_grad). The model is built as ``qlora train`` builds it (NF4
base from random weights, LoRA adapters, gradient checkpointing of ``qlora.ops.offload``) with
the run's memory options (``qlora.train.memory_options``), and trained with PagedAdamW (masters
for 16-bit adapters, a device budget when one is given).

Measurement: the bytes of tensors allocated, over time, as the estimate counts them.
  CUDA: PyTorch's allocator (``memory_allocated``, per-phase ``max_memory_allocated``) and its
        trace (``_record_memory_history``: the timeline, and a snapshot for
        https://pytorch.org/memory_viz).
  CPU:  every allocation and release of PyTorch's CPU allocator, from ``torch.profiler``'s
        memory events, replayed in order: the exact running total and its peak per phase.
  Both: the persistent components counted from the live tensors (weights, adapters, grads,
        optimizer pages on the device and in host memory).

Compared with the estimate, per component: each persistent row; what the forward keeps for the
backward (its net rise: activations and loss); the forward's transients (its peak over that);
the backward's rise at its peak (LoRA gradients, the recomputed layer, the checkpoints in
flight and the backward's transients); the total peak. Steady state is measured on the last
step: the first one allocates the optimizer's pages.
"""
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from qlora.memory import estimate as est
from qlora.memory import report

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ProfileSettings:
    """What to profile. The defaults are a tiny Llama that runs in seconds on a CPU."""

    model: str = "tiny-llama"   # preset name, config.json or checkpoint dir (random weights)
    seq_len: int = 128
    batch_size: int = 8
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = est.ALL_LINEAR
    optimizer: str = "paged_adamw"
    lr: float = 1e-4
    grad_checkpointing: bool = False
    offload_checkpoints: bool = False   # CUDA only (on CPU the checkpoints stay where they are)
    tiled_mlp: int = 0
    tiled_qkv: int = 0
    compact_norms: bool = False
    embedding_on_host: bool = False
    lora_dtype: str = "float32"
    dtype: str = "bfloat16"             # compute dtype
    gpu_budget_gb: Optional[float] = None  # device memory of the run: optimizer pages spill past it
    seed: int = 0
    device: str = ""                    # "": cuda when available, else cpu

    def __post_init__(self):
        if not self.device:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        for name, table in (("dtype", DTYPES), ("lora_dtype", DTYPES)):
            if getattr(self, name) not in table:
                raise ValueError(f"{name} {getattr(self, name)!r} must be one of {list(table)}")


def settings_from_yaml(path: str) -> ProfileSettings:
    """The profile of the run a ``qlora train`` YAML describes (validated as ``qlora train`` does):
    its architecture with random weights, data.max_seq_len x train.micro_batch_size, the LoRA rank,
    alpha and targets, the optimizer and lr, checkpointing, the memory options ("auto" decided by
    the memory plan as ``qlora train`` decides it) and the seed."""
    from qlora.memory.plan import estimate_targets, plan_for_run
    from qlora.train.config import load_config
    from qlora.train.memory_options import memory_options

    cfg = load_config(path)
    if cfg.model.name_or_path is None:
        raise ValueError(f"{path}: model.name_or_path: not set; name the model to profile")
    if cfg.optim.name not in est.OPTIMIZERS:
        raise ValueError(f"{path}: optim.name {cfg.optim.name!r}: the profile runs one of "
                         f"{', '.join(est.OPTIMIZERS)}")
    plan = plan_for_run(cfg)
    options = memory_options(cfg)
    model = cfg.model.name_or_path
    if model == "builtin:tiny-llama":
        from importlib import resources

        from qlora.train.model import BUILTIN_CONFIG_FILE

        model = str(resources.files("qlora.train").joinpath(BUILTIN_CONFIG_FILE))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ProfileSettings(
        model=model, seq_len=cfg.data.max_seq_len, batch_size=cfg.train.micro_batch_size,
        rank=cfg.lora.r, alpha=cfg.lora.alpha, targets=estimate_targets(cfg.lora.target_modules),
        optimizer=cfg.optim.name, lr=cfg.optim.lr,
        grad_checkpointing=cfg.model.gradient_checkpointing,
        offload_checkpoints=cfg.model.offload_activations, tiled_mlp=options["tiled_mlp"],
        tiled_qkv=options["tiled_qkv"],
        compact_norms=options["compact_norms"], embedding_on_host=options["embedding_on_host"],
        lora_dtype={torch.float32: "float32"}.get(options["lora_dtype"], "bfloat16"),
        dtype=cfg.quant.compute_dtype if device == "cuda" else "float32",
        gpu_budget_gb=None if plan.budget_bytes is None else plan.budget_bytes / est.GB,
        seed=cfg.train.seed, device=device)


def train_setup(settings: ProfileSettings) -> est.TrainSetup:
    """The estimator's description of the profiled run."""
    cuda = settings.device == "cuda"
    return est.TrainSetup(
        seq_len=settings.seq_len, batch_size=settings.batch_size, rank=settings.rank,
        targets=settings.targets, optimizer=settings.optimizer,
        grad_checkpointing=settings.grad_checkpointing,
        offload_checkpoints=settings.offload_checkpoints and cuda,
        chunked_loss=_backend(settings) == "triton",
        compute_bytes=DTYPES[settings.dtype].itemsize,
        lora_bytes=DTYPES[settings.lora_dtype].itemsize, tiled_mlp=settings.tiled_mlp,
        tiled_qkv=settings.tiled_qkv,
        compact_norms=settings.compact_norms, embedding_on_host=settings.embedding_on_host,
        gpu_budget_bytes=None if settings.gpu_budget_gb is None
        else int(settings.gpu_budget_gb * est.GB),
        device=settings.device, backend=_backend(settings), cpu_threads=torch.get_num_threads())


def _backend(settings: ProfileSettings) -> str:
    from qlora.ops.backend import get_backend

    return "triton" if get_backend(torch.device(settings.device)) in ("triton", "cuda") else "torch"


# ---- the model and the step --------------------------------------------------------------------
def build_model(config: dict, settings: ProfileSettings):
    """transformers model from ``config`` with random weights, quantized to NF4 and given LoRA
    adapters as ``qlora train`` does, with the settings' memory options and checkpointing. A
    preset on CUDA is built one decoder layer at a time on the device (``qlora bench train``'s
    builder), so a 70B model never exists in 16 bits."""
    import transformers

    from qlora.model.inject import add_lora
    from qlora.model.loading import quantize_model
    from qlora.model.presets import list_presets
    from qlora.ops.offload import enable_checkpointing
    from qlora.train.memory_options import apply_memory_options

    torch.manual_seed(settings.seed)
    dtype = DTYPES[settings.dtype]
    if settings.device == "cuda" and settings.model in list_presets():
        from qlora.bench.train import build_model as random_weights_model

        model = random_weights_model(settings.model, "qlora", torch.device(settings.device), dtype)
    else:
        hf_config = transformers.AutoConfig.for_model(**config)
        hf_config._attn_implementation = "sdpa"
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        quantize_model(model)
    model.requires_grad_(False)
    # every projection as "all-linear", which also names an MoE model's fused expert weights
    targets = "all-linear" if set(settings.targets) == set(est.ALL_LINEAR) else list(settings.targets)
    add_lora(model, r=settings.rank, alpha=settings.alpha, target_modules=targets)
    model.to(settings.device)
    apply_memory_options(model, lora_dtype=DTYPES[settings.lora_dtype],
                         embedding_on_host=settings.embedding_on_host,
                         tiled_mlp=settings.tiled_mlp, tiled_qkv=settings.tiled_qkv,
                         compact_norms=settings.compact_norms)
    if settings.grad_checkpointing:
        enable_checkpointing(model, offload=settings.offload_checkpoints)
    model.train()
    return model


def build_optimizer(params, settings: ProfileSettings, budget: Optional[int] = None):
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr)
    from qlora.optim import PagedAdamW

    state_dtype = "8bit" if settings.optimizer == "paged_adamw_8bit" else torch.float32
    return PagedAdamW(params, lr=settings.lr, state_dtype=state_dtype, gpu_budget_bytes=budget,
                      master_weights=settings.lora_dtype != "float32")


@dataclass
class StepPhases:
    """One training step as three phases. forward() -> loss; backward(loss); optimizer_step()."""

    forward: Callable[[], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    optimizer_step: Callable[[], None]


def lora_step(model, optimizer, input_ids: torch.Tensor) -> StepPhases:
    """Causal-LM step on ``input_ids`` [b, s] through the training loop's ``LossModule`` (labels:
    the inputs shifted by one, as the data pipeline gives them)."""
    from qlora.train.loop import LossModule

    loss_module = LossModule(model)
    labels = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)
    n_items = int((labels != -100).sum())

    def forward():
        return loss_module(input_ids, labels, n_items)

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return StepPhases(forward, lambda loss: loss.backward(), optimizer_step)


# ---- meters ------------------------------------------------------------------------------------
class CpuMeter:
    """PyTorch's CPU allocations over time, from the profiler's memory events."""

    def __init__(self):
        import torch.profiler as tp

        self._profiler = tp.profile(activities=[tp.ProfilerActivity.CPU], profile_memory=True)
        self._phases = []

    def start(self):
        self.t0 = time.perf_counter()
        self._profiler.__enter__()

    def phase(self, name):
        return torch.profiler.record_function(f"phase:{name}")

    def stop(self):
        self._profiler.__exit__(None, None, None)
        from torch._C._profiler import _EventType

        nodes, stack = [], list(self._profiler.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children)
        allocations = sorted((n for n in nodes if n.tag == _EventType.Allocation),
                             key=lambda n: n.start_time_ns)
        phases = sorted((n for n in nodes if n.tag == _EventType.TorchOp
                         and n.name.startswith("phase:")), key=lambda n: n.start_time_ns)
        t_first = phases[0].start_time_ns if phases else 0
        total, k, self.records, self.samples = 0, 0, {}, []
        for ph in phases:
            while k < len(allocations) and allocations[k].start_time_ns < ph.start_time_ns:
                total += allocations[k].extra_fields.alloc_size
                k += 1
            start = peak = total
            while k < len(allocations) and allocations[k].start_time_ns <= ph.end_time_ns:
                total += allocations[k].extra_fields.alloc_size
                peak = max(peak, total)
                self.samples.append(((allocations[k].start_time_ns - t_first) / 1e9, total))
                k += 1
            self.records[ph.name[len("phase:"):]] = {
                "before": start, "after": total, "peak": peak,
                "start_s": (ph.start_time_ns - t_first) / 1e9,
                "end_s": (ph.end_time_ns - t_first) / 1e9}


class CudaMeter:
    """PyTorch's CUDA allocator: allocated bytes, per-phase peaks, and the allocation trace."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.records, self.samples, self.snapshot = {}, [], None

    def start(self):
        self.t0 = time.perf_counter()
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)

    def phase(self, name):
        meter = self

        class Phase:
            def __enter__(self):
                torch.cuda.synchronize(meter.device)
                torch.cuda.reset_peak_memory_stats(meter.device)
                self.before = torch.cuda.memory_allocated(meter.device)
                self.start = time.perf_counter() - meter.t0

            def __exit__(self, *exc):
                torch.cuda.synchronize(meter.device)
                meter.records[name] = {
                    "before": self.before, "after": torch.cuda.memory_allocated(meter.device),
                    "peak": torch.cuda.max_memory_allocated(meter.device),
                    "start_s": self.start, "end_s": time.perf_counter() - meter.t0}

        return Phase()

    def context_bytes(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free - torch.cuda.memory_reserved(self.device)

    def stop(self):
        self.snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        self.samples = _trace_timeline(self.snapshot, self.device.index or 0)


def _trace_timeline(snapshot: dict, device_index: int) -> list:
    """[(t_s, allocated bytes)] from the allocation trace of a memory snapshot."""
    traces = snapshot.get("device_traces", [])
    events = traces[device_index] if device_index < len(traces) else []
    allocated, samples, t_first = 0, [], None
    for ev in events:
        if ev["action"] == "alloc":
            allocated += ev["size"]
        elif ev["action"] == "free_completed":
            allocated -= ev["size"]
        else:
            continue
        t = ev["time_us"] / 1e6
        t_first = t if t_first is None else t_first
        samples.append((t - t_first, allocated))
    return samples


# ---- accounting --------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def weight_bytes(model) -> dict:
    """Bytes of the NF4 codes and constants, the input embedding, the other base params and the
    trained params."""
    from qlora.nn import Linear4bit

    out = {"nf4 base weights": 0, "nf4 quant constants": 0, "input embedding": 0,
           "16-bit params": 0, "lora params": 0}
    for module in model.modules():
        if isinstance(module, Linear4bit):
            w = module.weight
            out["nf4 base weights"] += _nbytes(w.packed)
            out["nf4 quant constants"] += sum(
                _nbytes(t) for t in (w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map,
                                     w.offset) if t is not None)
    embedding = model.get_input_embeddings().weight
    out["input embedding"] = _nbytes(embedding)
    for p in model.parameters():
        if p.requires_grad:
            out["lora params"] += _nbytes(p)
        elif p.dtype.is_floating_point and p is not embedding:
            out["16-bit params"] += _nbytes(p)
    return out


def optimizer_bytes(optimizer) -> dict:
    """{"optimizer states": device bytes, "optimizer states (host)": host bytes}."""
    if hasattr(optimizer, "memory_report"):
        r = optimizer.memory_report()
        return {"optimizer states": r["device_bytes"], "optimizer states (host)": r["host_bytes"]}
    return {"optimizer states": sum(_nbytes(v) for s in optimizer.state.values()
                                    for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0),
            "optimizer states (host)": 0}


def dequant_scratch_bytes(device: torch.device) -> dict:
    """{"dequant scratch": bytes of the dense path's shared buffer on ``device``}."""
    from qlora.ops.fused import dequant_buffer_bytes

    return {"dequant scratch": dequant_buffer_bytes(device) if device.type == "cuda" else 0}


PERSISTENT = ("nf4 base weights", "nf4 quant constants", "input embedding", "16-bit params",
              "lora params", "dequant scratch", "optimizer states", "optimizer states (host)")
BACKWARD_ROWS = ("lora grads", "checkpoint in flight", "recomputed layer", "backward transients")


def compare(estimate: est.Estimate, measured: dict) -> list:
    """Rows {name, estimate, measured, relative_error} of every component measured."""
    def e(*names):
        return sum(estimate.bytes_of(n) for n in names)

    loss = "loss (chunked)" if estimate.setup.chunked_loss else "logits and loss"
    rows = [{"name": n, "estimate": e(n), "measured": measured[n]}
            for n in PERSISTENT + ("lora grads",)]
    rows += [{"name": "saved for backward", "estimate": e("activations", loss),
              "measured": measured["saved for backward"]},
             {"name": "forward transients", "estimate": e("forward transients"),
              "measured": measured["forward transients"]},
             {"name": "backward rise", "estimate": e(*BACKWARD_ROWS),
              "measured": measured["backward rise"]}]
    if "cuda context" in measured:
        rows.append({"name": "cuda context", "estimate": e("cuda context"),
                     "measured": measured["cuda context"]})
    rows.append({"name": "total peak", "estimate": estimate.gpu_bytes,
                 "measured": measured["total peak"]})
    for row in rows:
        row["relative_error"] = report.relative_error(row["estimate"], row["measured"])
    return rows


# ---- the profile -------------------------------------------------------------------------------
def run_profile(settings: ProfileSettings, steps: int = 3, out_dir: str = ".",
                make_step: Callable = lora_step) -> dict:
    """Profile ``steps`` steps; write memory_report.json, memory_timeline.png and
    memory_breakdown.png (and memory_snapshot.pickle on CUDA) into ``out_dir``.

    Returns the report dict plus "table" (the printed comparison) and "files".
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first step warms up), got {steps}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)  # before the steps, so a bad --out fails at once
    config, source = est.load_config(settings.model)
    device = torch.device(settings.device)
    setup = train_setup(settings)
    estimate = est.estimate(config, setup, source)
    budget = est.optimizer_device_budget(estimate) if setup.gpu_budget_bytes is not None else None

    model = build_model(config, settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, settings, budget)
    generator = torch.Generator().manual_seed(settings.seed)
    input_ids = torch.randint(0, config["vocab_size"], (settings.batch_size, settings.seq_len),
                              generator=generator).to(device)
    step = make_step(model, optimizer, input_ids)

    meter = CudaMeter(device) if device.type == "cuda" else CpuMeter()
    meter.start()
    for k in range(steps):
        with meter.phase(f"forward {k}"):
            loss = step.forward()
        with meter.phase(f"backward {k}"):
            step.backward(loss)
        grads = sum(_nbytes(p.grad) for p in trainable if p.grad is not None)
        with meter.phase(f"optimizer {k}"):
            step.optimizer_step()
        del loss
    meter.stop()
    last = steps - 1
    fwd, bwd = meter.records[f"forward {last}"], meter.records[f"backward {last}"]
    measured = {**weight_bytes(model), **dequant_scratch_bytes(device), **optimizer_bytes(optimizer),
                "lora grads": grads,
                "saved for backward": fwd["after"] - fwd["before"],
                "forward transients": fwd["peak"] - fwd["after"],
                "backward rise": bwd["peak"] - bwd["before"]}
    device_rows = {c.name for c in estimate.components if c.device == "gpu"}
    on_device = sum(measured[n] for n in PERSISTENT if n in device_rows)
    measured["total peak"] = on_device + max(fwd["peak"] - fwd["before"],
                                             measured["saved for backward"] + measured["backward rise"])
    if device.type == "cuda":
        measured["cuda context"] = meter.context_bytes()
        measured["total peak"] += measured["cuda context"]
    rows = compare(estimate, measured)

    files = [os.path.join(out_dir, n) for n in
             ("memory_report.json", "memory_timeline.png", "memory_breakdown.png")]
    title = f"{settings.model} seq {settings.seq_len} x batch {settings.batch_size} on {device.type}"
    meter_name = "CUDA allocator (allocated)" if device.type == "cuda" else "CPU allocator (allocated)"
    data = {
        "settings": {**asdict(settings), "targets": list(settings.targets)},
        "device": device.type, "meter": meter_name,
        "phases": [{"phase": name, **record} for name, record in meter.records.items()],
        "components": rows,
        "estimate_components": [{**vars(c), "phases": list(c.phases)} for c in estimate.components],
    }
    with open(files[0], "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    phases = [(name, r["start_s"], r["end_s"]) for name, r in meter.records.items()]
    first = phases[3][1] if len(phases) > 3 else 0.0   # the plot starts at the second step
    origin = meter.records["forward 1"]["before"] if device.type == "cpu" else 0
    timeline = [(t, b - origin) for t, b in meter.samples if t >= first]
    report.plot_timeline(timeline, [p for p in phases if p[1] >= first], files[1],
                         f"{meter_name}: {title}")
    report.plot_breakdown(rows, files[2], f"estimate vs measured: {title}")
    if device.type == "cuda":
        import pickle

        files.append(os.path.join(out_dir, "memory_snapshot.pickle"))
        with open(files[-1], "wb") as f:
            pickle.dump(meter.snapshot, f)
    table = report.comparison_table(rows)
    return {**data, "table": table, "files": files}
