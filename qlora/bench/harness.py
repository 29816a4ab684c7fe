"""What every benchmark shares: timing, the run's environment, the device's measured peak, and
writing rows as JSON, CSV and Markdown.

Timing. On CUDA each measurement is ``triton.testing.do_bench`` (L2 flushed before every call,
gradients reset through ``grad_to_none``); on CPU it is ``torch.utils.benchmark``'s
``blocked_autorange``. The providers of one comparison are measured in ``rounds``, each round
timing every provider once in a rotated order, and the samples of all rounds are pooled before the
quantiles 0.5 / 0.2 / 0.8 are taken: a clock change or a noisy neighbour then hits every provider
alike instead of whichever one happened to run at that moment, so the ratios stay stable.

Peak. ``measure_peak`` times a large bf16 GEMM and a device-to-device copy in the same process, so
"% of peak" compares against what this device delivered in this run, not a datasheet number.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import shlex
import subprocess
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)
PACKAGES = ("qlora", "torch", "triton", "bitsandbytes", "transformers", "peft", "accelerate")


def _samples_ms(fn: Callable, device: torch.device, budget_ms: float,
                grad_to_none: Sequence[torch.Tensor]) -> list[float]:
    """Times in ms of one measurement of ``fn`` lasting about ``budget_ms``: one per call on CUDA,
    one per block of calls (its mean) on CPU."""
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=max(1.0, budget_ms / 4), rep=budget_ms,
                                            grad_to_none=list(grad_to_none) or None, return_mode="all"))
    from torch.utils import benchmark

    def call():
        for t in grad_to_none:
            t.grad = None
        fn()

    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    return [1000.0 * t for t in timer.blocked_autorange(min_run_time=budget_ms / 1000.0).times]


def time_interleaved(fns: dict, device: torch.device, rounds: int, budget_ms: float,
                     grad_to_none: Optional[dict] = None, contexts: Optional[dict] = None) -> dict:
    """{name: (p50, p20, p80, n_samples)} in ms for every callable of ``fns``, measured in
    ``rounds`` interleaved rounds (see the module docstring).

    ``grad_to_none[name]``: tensors whose ``.grad`` is reset before each call (backward timings).
    ``contexts[name]``: a factory of the context manager each measurement of ``name`` runs in.
    """
    grad_to_none = grad_to_none or {}
    contexts = contexts or {}
    names = list(fns)
    samples = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            with contexts.get(name, nullcontext)():
                samples[name] += _samples_ms(fns[name], device, budget_ms, grad_to_none.get(name, ()))
    return {name: (*quantiles(times), len(times)) for name, times in samples.items()}


def quantiles(samples: Sequence[float]) -> list[float]:
    """The QUANTILES (0.5, 0.2, 0.8) of ``samples``, linearly interpolated."""
    values = torch.tensor(samples, dtype=torch.float64)
    return torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


def measure_peak(device: torch.device, quick: bool) -> dict:
    """The bf16 GEMM throughput and copy bandwidth this device delivers now.

    GEMM: C = A·B, square bf16 [n, n] (8192 on CUDA: large enough for every SM to be busy and the
    tile waves to even out; 256 for --quick on CPU). Copy: dst.copy_(src) of a buffer (1 GiB on
    CUDA, far beyond any L2; 32 MiB on CPU), counted as read + write.
    """
    cuda = device.type == "cuda"
    n = 8192 if cuda else (256 if quick else 1024)
    copy_bytes = (1 << 30) if cuda else (32 << 20)
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    budget = 200.0 if cuda else (50.0 if quick else 200.0)
    timed = time_interleaved({"gemm": lambda: torch.mm(a, b), "copy": lambda: dst.copy_(src)},
                             device, rounds=3, budget_ms=budget)
    gemm_ms, copy_ms = timed["gemm"][0], timed["copy"][0]
    return dict(peak_gemm_bf16_tflops=2 * n**3 / gemm_ms / 1e9, peak_copy_gb_per_s=2 * copy_bytes / copy_ms / 1e6,
                peak_gemm_shape=f"{n}x{n}x{n}", peak_copy_bytes=copy_bytes)


def add_run_arguments(parser, quick_help: str) -> None:
    """The options every benchmark command takes: --device, --quick (``quick_help`` says what it
    runs) and --out."""
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default="runs/bench", help="output directory")


def option_values(args, quick: dict, defaults: dict) -> dict:
    """Each option of ``defaults``: its command-line value, else with --quick its ``quick`` value
    (when it has one), else its default."""
    return {name: getattr(args, name) or (quick.get(name, default) if args.quick else default)
            for name, default in defaults.items()}


def require_positive(settings: dict, names) -> None:
    for name in names:
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")


def run_device(args) -> torch.device:
    """--device, else the CPU with --quick, else CUDA when there is one."""
    return resolve_device(args.device or ("cpu" if args.quick else None))


def resolve_device(name: Optional[str]) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build or machine has no CUDA device")
    return device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _nvidia_driver() -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def versions() -> dict:
    """Installed version of each package the benchmarks touch (None when absent)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def command_line(prefix: str, options: dict) -> str:
    """The command that reproduces a run: ``prefix`` and every resolved option as a flag."""
    words = prefix.split()
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value not in (None, False):
            words += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return shlex.join(words)


def environment(device: torch.device, command: str) -> dict:
    """Columns every row carries: date, device, driver, versions, command, CPU threads."""
    cuda = device.type == "cuda"
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device_type=device.type,
        device=torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        driver=_nvidia_driver() if cuda else None,
        cuda_runtime=torch.version.cuda if cuda else None,
        triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
        cpu_threads=torch.get_num_threads(),
        command=command,
    )
    env.update({f"version_{k}": v for k, v in versions().items()})
    return env


def write_rows(rows: list, out_dir: Path, stem: str) -> list[Path]:
    """``<stem>.json`` (a list of row objects) and ``<stem>.csv`` (one column per key seen)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def environment_lines(env: dict) -> list[str]:
    """The Markdown bullet list that heads every report."""
    names = ", ".join(f"{k[len('version_'):]} {v}" for k, v in env.items() if k.startswith("version_") and v)
    device = env["device"]
    if env["device_type"] == "cuda":
        device += f" (driver {env['driver'] or 'unknown: no nvidia-smi'}, CUDA runtime {env['cuda_runtime']})"
    return [f"- date: {env['date']}", f"- device: {device}", f"- versions: {names}",
            f"- command: `{env['command']}`", f"- CPU threads: {env['cpu_threads']}"]


def fmt(value, digits: int = 3) -> str:
    """A number for a Markdown cell ('-' for a missing one)."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


@contextmanager
def quick_threads(quick: bool):
    """One torch thread inside a ``--quick`` run: on a small shared CPU box, OpenMP threads spinning
    against other processes made CPU timings swing 100x and the tiny model's steps 25x slower
    (measured on the 2-core CI machine)."""
    threads = torch.get_num_threads()
    if quick:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def print_report(result: dict) -> int:
    """What a benchmark command prints: its Markdown report and the files it wrote."""
    print(result["markdown"])
    print("wrote " + ", ".join(str(f) for f in result["files"]))
    return 0
