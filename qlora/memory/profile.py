"""`qlora memory profile`: run real training steps, measure memory per phase, compare to the estimate.

A step has three phases, each measured: forward (loss), backward, optimizer step (and zero_grad).
``StepPhases`` holds one callable per phase so the training loop can hand in its own step; until
it does, ``lora_step`` is a minimal real step: causal-LM loss of a random byte batch on a Llama
whose decoder projections are NF4 ``Linear4bit`` under ``LoRALinear``, then AdamW.

Measurement
  CUDA: ``torch.cuda.memory._record_memory_history`` traces every allocation (the timeline, and a
        snapshot for https://pytorch.org/memory_viz); ``memory_allocated`` /
        ``max_memory_allocated`` per phase; the CUDA context is (total - free) - reserved.
  CPU:  the resident set size (/proc/self/statm) sampled every millisecond by a thread, and the
        exact peak per phase from VmHWM after resetting it (``echo 5 > /proc/self/clear_refs``).
        glibc is told to serve every allocation >= 64 KiB with mmap, so freed tensors leave the
        RSS at once instead of staying in the heap. tracemalloc reports the Python heap's share.
  Both: the bytes of each component counted from the live tensors (weights, adapters, grads,
        optimizer states) and from ``saved_tensors_hooks`` (what autograd keeps for backward,
        split at lm_head into activations and logits/loss).

Steady state is measured on the last step: the first one allocates the optimizer states and, on
CPU, maps code pages of the kernels it runs for the first time.
"""
import ctypes
import json
import os
import threading
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from qlora.memory import estimate as est
from qlora.memory import report

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MMAP_THRESHOLD_BYTES = 64 * 1024
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number (malloc.h)


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
    seed: int = 0
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")


def settings_from_yaml(path: str) -> ProfileSettings:
    """The profile of the run a ``qlora train`` YAML describes (validated as ``qlora train`` does):
    its architecture with random weights, data.max_seq_len x train.micro_batch_size, the LoRA rank,
    alpha and targets, the optimizer and lr, checkpointing and the seed."""
    from importlib import resources

    from qlora.train.config import BUILTIN_MODEL, load_config
    from qlora.train.model import BUILTIN_CONFIG_FILE

    cfg = load_config(path)
    model = cfg.model.name_or_path
    if model == BUILTIN_MODEL:
        model = str(resources.files("qlora.train").joinpath(BUILTIN_CONFIG_FILE))
    targets = cfg.lora.target_modules
    if isinstance(targets, list):
        targets = tuple(targets)
    else:
        presets = {"attention": est.ATTENTION_PROJECTIONS, "mlp": est.MLP_PROJECTIONS}
        targets = presets.get(targets) or est.parse_targets(targets)
    if cfg.optim.name not in est.OPTIMIZERS:
        raise ValueError(f"{path}: optim.name {cfg.optim.name!r}: the profile runs one of "
                         f"{', '.join(est.OPTIMIZERS)}")
    return ProfileSettings(model=model, seq_len=cfg.data.max_seq_len, batch_size=cfg.train.micro_batch_size,
                           rank=cfg.lora.r, alpha=cfg.lora.alpha, targets=targets, optimizer=cfg.optim.name,
                           lr=cfg.optim.lr, grad_checkpointing=cfg.model.gradient_checkpointing,
                           seed=cfg.train.seed)


# ---- the model and the step --------------------------------------------------------------------
def build_model(config: dict, settings: ProfileSettings, dtype: torch.dtype):
    """transformers model from ``config`` with random weights, decoder projections replaced by
    LoRALinear(Linear4bit) (NF4, blocksize 64, double quant); everything else frozen."""
    import transformers

    from qlora.quant.nf4 import quantize
    from qlora.nn import Linear4bit, LoRALinear

    torch.manual_seed(settings.seed)
    hf_config = transformers.AutoConfig.for_model(**config)
    hf_config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.requires_grad_(False)
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name, linear in list(block.named_children()):
                if name not in settings.targets:
                    continue
                base = Linear4bit.from_weight(quantize(linear.weight.data), linear.bias)
                setattr(block, name, LoRALinear(base, r=settings.rank, lora_alpha=settings.alpha))
    model.to(settings.device)
    if settings.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def build_optimizer(params, settings: ProfileSettings):
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr)
    from qlora.optim import PagedAdamW

    state_dtype = "8bit" if settings.optimizer == "paged_adamw_8bit" else torch.float32
    return PagedAdamW(params, lr=settings.lr, state_dtype=state_dtype)


@dataclass
class StepPhases:
    """One training step as three phases. forward() -> loss; backward(loss); optimizer_step()."""

    forward: Callable[[], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    optimizer_step: Callable[[], None]


def lora_step(model, optimizer, input_ids: torch.Tensor) -> StepPhases:
    """Causal-LM step on ``input_ids`` [b, s] (labels = inputs, shifted inside the model)."""
    def forward():
        return model(input_ids=input_ids, labels=input_ids).loss

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return StepPhases(forward, lambda loss: loss.backward(), optimizer_step)


# ---- meters ------------------------------------------------------------------------------------
class CpuMeter:
    """RSS of this process: a sampled timeline and exact per-phase peaks."""

    def __init__(self):
        _prefer_mmap()
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._hwm_resettable = _reset_peak_rss()
        tracemalloc.start()

    def start(self):
        self.t0 = time.perf_counter()
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, _rss()))
            time.sleep(0.001)

    def current(self) -> int:
        return _rss()

    def reset_peak(self):
        if self._hwm_resettable:
            _reset_peak_rss()
        tracemalloc.reset_peak()
        self._phase_start = time.perf_counter() - self.t0

    def peak(self) -> int:
        """Peak RSS since reset_peak(): VmHWM where it can be reset, else the sampled maximum."""
        if self._hwm_resettable:
            return _peak_rss()
        start = self._phase_start
        return max([b for t, b in self.samples if t >= start] + [_rss()])

    def python_heap(self) -> tuple:
        """(current, peak) bytes of the Python heap (tracemalloc), peak since reset_peak()."""
        return tracemalloc.get_traced_memory()

    def stop(self):
        self._stop.set()
        self._thread.join()
        tracemalloc.stop()


class CudaMeter:
    """PyTorch's CUDA allocator: allocated bytes, per-phase peaks, and the allocation trace."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.samples = []
        self.snapshot = None

    def start(self):
        self.t0 = time.perf_counter()
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)

    def current(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

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


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _prefer_mmap() -> None:
    """glibc: serve allocations >= 64 KiB with mmap so that free() returns them to the OS (the
    default threshold grows up to 32 MiB, keeping freed tensors resident)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


# ---- accounting --------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def weight_bytes(model) -> dict:
    """Bytes of the NF4 codes, the NF4 constants, the other base params and the LoRA params."""
    from qlora.nn import Linear4bit

    out = {"nf4 base weights": 0, "nf4 quant constants": 0, "16-bit params": 0, "lora params": 0}
    for module in model.modules():
        if isinstance(module, Linear4bit):
            w = module.weight
            out["nf4 base weights"] += _nbytes(w.packed)
            out["nf4 quant constants"] += sum(
                _nbytes(t) for t in (w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map,
                                     w.offset) if t is not None)
    for p in model.parameters():
        if p.requires_grad:
            out["lora params"] += _nbytes(p)
        elif p.dtype.is_floating_point:
            out["16-bit params"] += _nbytes(p)
    return out


def optimizer_bytes(optimizer) -> int:
    if hasattr(optimizer, "memory_report"):
        r = optimizer.memory_report()
        return r["device_bytes"] + r["host_bytes"]
    return sum(_nbytes(v) for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


class SavedTensorCounter:
    """Bytes of the distinct storages autograd saves for backward during a forward, split into
    those saved before lm_head runs (activations) and from lm_head on (logits and loss, which
    also counts the logits tensor lm_head returns). Parameters and buffers are excluded: they
    are counted as weights."""

    def __init__(self, model):
        self.model = model
        self.exclude = {_ptr(t) for t in list(model.parameters()) + list(model.buffers())}
        from qlora.nn import Linear4bit

        for module in model.modules():
            if isinstance(module, Linear4bit):
                w = module.weight
                self.exclude |= {_ptr(t) for t in (w.packed, w.absmax, w.nested_absmax)}
        self.bytes = {"activations": 0, "logits and loss": 0}
        self._seen = set()
        self._region = "activations"

    def _pack(self, t):
        ptr = _ptr(t)
        if ptr not in self.exclude and ptr not in self._seen and t.device.type != "meta":
            self._seen.add(ptr)
            self.bytes[self._region] += _nbytes(t)
        return t

    def __enter__(self):
        head = self.model.get_output_embeddings()
        self._hooks = [head.register_forward_pre_hook(self._enter_head),
                       head.register_forward_hook(self._count_logits)]
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved.__enter__()
        return self

    def __exit__(self, *exc):
        self._saved.__exit__(*exc)
        for hook in self._hooks:
            hook.remove()

    def _enter_head(self, *_):
        self._region = "logits and loss"

    def _count_logits(self, module, args, output):
        self._pack(output)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


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
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import transformers  # noqa: F401  (imported before the meter starts: library load is not the model's)

    meter = CudaMeter(device) if device.type == "cuda" else CpuMeter()
    meter.start()
    phases, records = [], []

    def phase(name, fn, *args):
        meter.reset_peak()
        before = meter.current()
        start = time.perf_counter() - meter.t0
        value = fn(*args)
        after = meter.current()
        phases.append((name, start, time.perf_counter() - meter.t0))
        records.append({"phase": name, "before": before, "after": after, "peak": meter.peak()})
        return value

    baseline = meter.current()
    model = phase("load", build_model, config, settings, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = config["vocab_size"]
    input_ids = torch.randint(0, vocab, (settings.batch_size, settings.seq_len),
                              generator=generator).to(device)
    step = make_step(model, optimizer, input_ids)

    measured = weight_bytes(model)
    for k in range(steps):
        step_start = meter.current()
        with SavedTensorCounter(model) as saved:
            loss = phase(f"forward {k}", step.forward)
        phase(f"backward {k}", step.backward, loss)
        grads = sum(_nbytes(p.grad) for p in trainable if p.grad is not None)
        phase(f"optimizer {k}", step.optimizer_step)
        del loss
        step_records = records[-3:]
    step_peak_rise = max(r["peak"] for r in step_records) - step_start
    measured["lora grads"] = grads
    measured["optimizer states"] = optimizer_bytes(optimizer)
    measured.update(saved.bytes)
    python_heap = meter.python_heap() if device.type == "cpu" else None
    meter.stop()

    setup = est.TrainSetup(seq_len=settings.seq_len, batch_size=settings.batch_size,
                           rank=settings.rank, targets=settings.targets,
                           optimizer=settings.optimizer,
                           grad_checkpointing=settings.grad_checkpointing,
                           compute_bytes=dtype.itemsize,
                           lora_bytes=trainable[0].dtype.itemsize, device=device.type)
    estimate = est.estimate(config, setup, source)
    persistent = ("nf4 base weights", "nf4 quant constants", "16-bit params", "lora params",
                  "optimizer states")
    rows = [{"name": n, "estimate": estimate.bytes_of(n), "measured": measured[n]}
            for n in persistent + ("lora grads", "activations", "logits and loss")]
    # What one step adds on top of the persistent state, at its peak: measured as the rise of
    # the meter over the step's start; estimated as every other GPU row.
    step_estimate = sum(c.bytes for c in estimate.components
                        if c.device == "gpu" and c.name not in persistent + ("cuda context",))
    rows.append({"name": "step peak rise", "estimate": step_estimate, "measured": step_peak_rise})
    measured_total = sum(measured[n] for n in persistent) + step_peak_rise
    context = 0
    if device.type == "cuda":
        context = meter.context_bytes()
        rows.append({"name": "cuda context", "estimate": estimate.bytes_of("cuda context"),
                     "measured": context})
    rows.append({"name": "total peak", "estimate": estimate.gpu_bytes,
                 "measured": measured_total + context})
    for row in rows:
        row["relative_error"] = report.relative_error(row["estimate"], row["measured"])

    files = [os.path.join(out_dir, n) for n in
             ("memory_report.json", "memory_timeline.png", "memory_breakdown.png")]
    title = f"{settings.model} seq {settings.seq_len} x batch {settings.batch_size} on {device.type}"
    meter_name = "CUDA allocator (allocated)" if device.type == "cuda" else "process RSS"
    data = {
        "settings": {**asdict(settings), "targets": list(settings.targets)},
        "device": device.type, "dtype": str(dtype), "meter": meter_name,
        "baseline_bytes": baseline, "phases": records,
        "components": rows, "estimate_components": [vars(c) for c in estimate.components],
    }
    if python_heap is not None:
        data["python_heap_bytes"] = {"current": python_heap[0], "peak": python_heap[1]}
    with open(files[0], "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    # The plot starts at the first step; on the CPU, RSS is drawn relative to the RSS there.
    first = phases[1][1]
    origin = records[1]["before"] if device.type == "cpu" else 0
    timeline = [(t, b - origin) for t, b in meter.samples if t >= first]
    report.plot_timeline(timeline, phases[1:], files[1], f"{meter_name}: {title}")
    report.plot_breakdown(rows, files[2], f"estimate vs measured: {title}")
    if device.type == "cuda":
        import pickle

        files.append(os.path.join(out_dir, "memory_snapshot.pickle"))
        with open(files[-1], "wb") as f:
            pickle.dump(meter.snapshot, f)
    table = report.comparison_table(rows)
    return {**data, "table": table, "files": files}
