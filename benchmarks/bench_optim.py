"""Optimizer step time and memory: PagedAdamW (fp32 / 8-bit, resident / spilled) against
torch AdamW (fused on CUDA) and bitsandbytes PagedAdamW32bit (CUDA only).

The parameters mimic LoRA adapters: for each of ``layers x modules`` adapted linears, an A
[r, hidden] and a B [hidden, r] matrix. "spill" rows force every page to host memory
(``gpu_budget_bytes=0``), so each step streams all states through the double buffer.

    python benchmarks/bench_optim.py            # full size, on CUDA when available
    python benchmarks/bench_optim.py --quick    # small CPU run, under 30 s

Rows (one per provider) go to ``<out>/bench_optim.json`` and ``.csv`` with the date, device,
versions and config. Step times are the 0.5 / 0.2 / 0.8 quantiles in milliseconds.
"""
import argparse
import csv
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from qlora.optim import PagedAdamW

QUANTILES = (0.5, 0.2, 0.8)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="small CPU run (< 30 s)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--modules", type=int, default=7, help="adapted linears per layer")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--page-bytes", type=int, default=8 << 20)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (CPU timing loop)")
    parser.add_argument("--out", default="runs/bench", help="output directory")


def make_params(args, device):
    gen = torch.Generator().manual_seed(0)
    shapes = [(args.rank, args.hidden), (args.hidden, args.rank)] * (args.layers * args.modules)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return params


def providers(args, device):
    """name -> constructor(params); only the ones that can run on ``device``."""
    cuda = device.type == "cuda"
    out = {"torch_adamw" + ("_fused" if cuda else ""):
           lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=cuda or None)}
    for state_dtype, tag in ((torch.float32, "paged_adamw"), ("8bit", "paged_adamw8bit")):
        for budget, suffix in ((None, ""), (0, "_spill")):
            out[tag + suffix] = (lambda ps, s=state_dtype, b=budget: PagedAdamW(
                ps, lr=1e-4, page_bytes=args.page_bytes, gpu_budget_bytes=b, state_dtype=s))
    if cuda:
        try:
            import bitsandbytes as bnb
            out["bnb_paged_adamw32bit"] = lambda ps: bnb.optim.PagedAdamW32bit(ps, lr=1e-4)
        except ImportError:
            pass
    return out


def time_ms(fn, device, steps):
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, quantiles=list(QUANTILES))
    fn()  # warm-up: allocates the states
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - start))
    cuts = statistics.quantiles(samples, n=10, method="inclusive")  # deciles
    return [statistics.median(samples), cuts[1], cuts[7]]


def state_bytes(opt):
    """(device bytes, host bytes) of the optimizer's states."""
    if isinstance(opt, PagedAdamW):
        report = opt.memory_report()
        return report["device_bytes"], report["host_bytes"]
    total = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return total, 0


def versions():
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def run(args) -> list:
    if args.quick:
        args.layers, args.modules, args.hidden, args.rank = 2, 2, 1024, 8
        args.page_bytes, args.steps = 64 << 10, 5
        args.device = args.device or "cpu"
        # One thread: on a small shared CPU box, OpenMP threads spinning against other
        # processes made step times swing 100x (measured on the 2-core CI machine).
        torch.set_num_threads(1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    params = make_params(args, device)
    numel = sum(p.numel() for p in params)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or "cpu"
    config = dict(layers=args.layers, modules=args.modules, hidden=args.hidden, rank=args.rank,
                  n_params=len(params), numel=numel, page_bytes=args.page_bytes,
                  cpu_threads=torch.get_num_threads())
    rows = []
    for name, make in providers(args, device).items():
        opt = make(params)
        peak_mib = None
        if device.type == "cuda":
            # Peak over a few plain steps, before do_bench allocates its L2-flush buffer.
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
            for _ in range(3):
                opt.step()
            torch.cuda.synchronize(device)
            peak_mib = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
        p50, p20, p80 = time_ms(opt.step, device, args.steps)
        on_device, on_host = state_bytes(opt)
        report = opt.memory_report() if isinstance(opt, PagedAdamW) else {}
        rows.append(dict(
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            device=device_name, **{f"version_{k}": v for k, v in versions().items()},
            provider=name, **config, step_ms_p50=p50, step_ms_p20=p20, step_ms_p80=p80,
            peak_device_mib=peak_mib,
            state_device_mib=on_device / 2**20, state_host_mib=on_host / 2**20,
            pages_moved_per_step=report.get("pages_moved_last_step"),
            wait_ms_last_step=(1000 * report["wait_seconds_last_step"] if report else None)))
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write(rows, Path(args.out))
    return rows


def write(rows, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_optim.json").write_text(json.dumps(rows, indent=2))
    with open(out_dir / "bench_optim.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None):
    rows = run(parse_args(argv))
    for row in rows:
        print(f"{row['provider']:>24}  step {row['step_ms_p50']:9.3f} ms "
              f"[{row['step_ms_p20']:.3f}, {row['step_ms_p80']:.3f}]  "
              f"state device {row['state_device_mib']:8.2f} MiB  "
              f"host {row['state_host_mib']:8.2f} MiB")


if __name__ == "__main__":
    main()
