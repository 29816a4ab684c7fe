"""`qlora bench optim`: optimizer step time and memory: PagedAdamW (fp32 / 8-bit, resident /
spilled) against torch AdamW (fused on CUDA) and bitsandbytes PagedAdamW32bit (CUDA only).

The parameters mimic LoRA adapters: for each of ``layers x modules`` adapted linears, an A
[r, hidden] and a B [hidden, r] matrix. "spill" rows force every page to host memory
(``gpu_budget_bytes=0``), so each step streams all states through the double buffer.

Every optimizer steps the same parameters; their steps are timed interleaved
(``qlora.bench.harness``). The peak device memory of each is measured over its first plain steps,
before any timing allocates buffers.

Files in ``--out``: bench_optim.json / .csv (one row per provider, with the environment) and
bench_optim.md. Step times are the 0.5 / 0.2 / 0.8 quantiles in milliseconds.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qlora.bench import harness
from qlora.optim import PagedAdamW



def add_arguments(parser):
    harness.add_run_arguments(parser, "small CPU run (< 30 s)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--modules", type=int, default=7, help="adapted linears per layer")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--page-bytes", type=int, default=8 << 20)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")


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


def state_bytes(opt):
    """(device bytes, host bytes) of the optimizer's states."""
    if isinstance(opt, PagedAdamW):
        report = opt.memory_report()
        return report["device_bytes"], report["host_bytes"]
    total = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return total, 0


def _first_steps_peak_mib(opt, device) -> float | None:
    """Peak device memory (MiB) over three plain steps, which allocate the states."""
    if device.type != "cuda":
        opt.step()  # allocates the states before timing
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def run(args) -> list:
    threads = torch.get_num_threads()
    if args.quick:
        args.layers, args.modules, args.hidden, args.rank = 2, 2, 1024, 8
        args.page_bytes, args.rounds = 64 << 10, 3
        args.device = args.device or "cpu"
        # One thread: on a small shared CPU box, OpenMP threads spinning against other
        # processes made step times swing 100x (measured on the 2-core CI machine).
        torch.set_num_threads(1)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> list:
    device = harness.resolve_device(args.device)
    params = make_params(args, device)
    config = dict(layers=args.layers, modules=args.modules, hidden=args.hidden, rank=args.rank,
                  n_params=len(params), numel=sum(p.numel() for p in params), page_bytes=args.page_bytes,
                  rounds=args.rounds)
    command = harness.command_line("qlora bench optim", dict(
        layers=args.layers, modules=args.modules, hidden=args.hidden, rank=args.rank, page_bytes=args.page_bytes,
        rounds=args.rounds, device=str(device), quick=args.quick, out=args.out))
    env = harness.environment(device, command)
    optimizers = {name: make(params) for name, make in providers(args, device).items()}
    peaks = {name: _first_steps_peak_mib(opt, device) for name, opt in optimizers.items()}
    budget_ms = 100.0 if device.type == "cuda" else (30.0 if args.quick else 200.0)
    timed = harness.time_interleaved({name: opt.step for name, opt in optimizers.items()}, device,
                                     args.rounds, budget_ms)
    rows = []
    for name, opt in optimizers.items():
        p50, p20, p80, count = timed[name]
        on_device, on_host = state_bytes(opt)
        report = opt.memory_report() if isinstance(opt, PagedAdamW) else {}
        rows.append(dict(
            **env, provider=name, **config, step_ms_p50=p50, step_ms_p20=p20, step_ms_p80=p80, samples=count,
            peak_device_mib=peaks[name], state_device_mib=on_device / 2**20, state_host_mib=on_host / 2**20,
            pages_moved_per_step=report.get("pages_moved_last_step"),
            wait_ms_last_step=(1000 * report["wait_seconds_last_step"] if report else None)))
    write(rows, Path(args.out))
    return rows


def markdown(rows: list) -> str:
    header = ["provider", "step ms", "× torch AdamW", "peak device MiB", "states device MiB", "states host MiB",
              "pages moved/step"]
    torch_ms = next(row["step_ms_p50"] for row in rows if row["provider"].startswith("torch_adamw"))
    table = [[row["provider"], f"{row['step_ms_p50']:.4g} [{row['step_ms_p20']:.4g}, {row['step_ms_p80']:.4g}]",
              harness.fmt(torch_ms / row["step_ms_p50"]), harness.fmt(row["peak_device_mib"]),
              harness.fmt(row["state_device_mib"]), harness.fmt(row["state_host_mib"]),
              harness.fmt(row["pages_moved_per_step"])] for row in rows]
    first = rows[0]
    lines = ["# qlora bench optim", "", *harness.environment_lines(first),
             f"- parameters: {first['n_params']} LoRA matrices ({first['layers']} layers x {first['modules']} "
             f"modules, hidden {first['hidden']}, rank {first['rank']}), {first['numel']} values", "",
             "step ms: median [20th, 80th percentile]; × torch AdamW: its step time / this one "
             "(> 1: faster). _spill rows keep every state page in host memory.", "",
             harness.markdown_table(header, table), ""]
    return "\n".join(lines)


def write(rows, out_dir: Path) -> list[Path]:
    files = harness.write_rows(rows, out_dir, "bench_optim")
    (out_dir / "bench_optim.md").write_text(markdown(rows), encoding="utf-8")
    return files + [out_dir / "bench_optim.md"]


def main_from_args(args) -> int:
    rows = run(args)
    for row in rows:
        print(f"{row['provider']:>24}  step {row['step_ms_p50']:9.3f} ms "
              f"[{row['step_ms_p20']:.3f}, {row['step_ms_p80']:.3f}]  "
              f"state device {row['state_device_mib']:8.2f} MiB  "
              f"host {row['state_host_mib']:8.2f} MiB")
    print(f"wrote {Path(args.out) / 'bench_optim'}.json, .csv, .md")
    return 0

