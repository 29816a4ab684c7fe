"""`qlora bench kernels`: the QLoRA linear layer of each provider, side by side, per shape and M.

For every weight shape [N, K] of the chosen model (q/k/v/o/gate/up/down, deduplicated), rank r,
row count M and mode (fwd: inference forward under no_grad; bwd: backward alone, dX, dA, dB; full:
forward + backward), all available providers (``qlora.bench.linear_providers``) are timed in one
process, interleaved (``qlora.bench.harness``), and checked against an fp32 reference.

Columns: time (ms, quantiles 0.5 / 0.2 / 0.8); throughput: TFLOP/s for M > 16, GB/s for M <= 16
(decode is bound by reading the weight); % of the peak measured in the same run (bf16 GEMM or
copy bandwidth); the speedup over every other provider (their time / this time); the error of the
output (fwd) or of dX (bwd, full) relative to the reference's largest magnitude.

On CPU, Triton providers can only run in Triton's interpreter (TRITON_INTERPRET=1): they are run
once there and checked, never timed, since the interpreter's time says nothing about the kernels.

Predictions: every row of ``qlora-fused`` / ``qlora-dequant-cublas`` carries the static speed
model's predicted time of the path it ran (``qlora.ops.path_times``: a lower bound, for the GPU
arch's model machine), and the report has a table of every path's predicted time per shape, so a
GPU run puts measured beside predicted. ``--predicted`` prints only that table (no kernel runs;
works without a GPU).

Files in ``--out``: bench_kernels.json / .csv (one row per measurement, with the environment),
bench_kernels.md, bench_kernels_<mode>_r<rank>.png (time against M, one panel per shape, one line
per provider) and, on a GPU, path_times_measured.json: the measured time of each path in the
format ``qlora.ops.path_times.MEASURED_FILE`` reads (copy it there to make the dispatcher use it).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora.bench import harness
from qlora.bench.linear_providers import BUILDERS, DTYPE, PROVIDERS, LinearProblem, interpreted, unavailable_reason

MODES = ("fwd", "bwd", "full")
DEFAULT_M = (1, 16, 512, 4096, 16384)
DEFAULT_RANKS = (16, 64)
QUICK_SHAPES = "256x128,128x256"
QUICK_M = (1, 64)
QUICK_RANKS = (8,)
SMALL_M = 16  # at or below: report GB/s against the copy peak (reading W0 bounds the time)
BASELINES = ("dense-bf16", "unsloth-style", "hf-stack")  # the speedup columns of the Markdown table
PROVIDER_PATH = {"qlora-fused": "fused", "qlora-dequant-cublas": "dense"}  # the layer's path each provider pins


@dataclass
class Settings:
    shapes: str
    nk: list  # [(n, k, modules)]
    m: list
    rank: list
    mode: list
    provider: list
    rounds: int
    budget_ms: float
    device: str
    quick: bool
    out: str
    arch: str  # whose predictions the report shows


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choice_list(choices):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return values
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from qlora.model.presets import list_presets

    parser.add_argument("--shapes", default=None, choices=[*list_presets(), "custom"],
                        help="model whose linear shapes to use (default llama-2-7b), or custom (--nk)")
    parser.add_argument("--nk", default=None,
                        help="with --shapes custom: comma-separated NxK weight shapes, e.g. 4096x4096,11008x4096")
    parser.add_argument("--m", type=_int_list, default=None,
                        help=f"rows of X (default {','.join(map(str, DEFAULT_M))})")
    parser.add_argument("--rank", type=_int_list, default=None,
                        help=f"LoRA ranks (default {','.join(map(str, DEFAULT_RANKS))})")
    parser.add_argument("--mode", type=_choice_list(MODES), default=None,
                        help="fwd, bwd, full, or a comma-separated list (default fwd)")
    parser.add_argument("--provider", type=_choice_list(PROVIDERS), default=None,
                        help=f"comma-separated subset of {', '.join(PROVIDERS)} (default: all available)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds per comparison (default 5, --quick 3)")
    harness.add_run_arguments(parser, f"tiny shapes ({QUICK_SHAPES}) on CPU, all modes, in under a minute")
    parser.add_argument("--predicted", action="store_true",
                        help="print only the static speed model's predicted time of each path per shape "
                             "(no kernel runs; works without a GPU)")
    parser.add_argument("--arch", choices=["sm_80", "sm_90"], default=None,
                        help="arch of the predictions (default: this GPU's; sm_90 without one)")


def preset_shapes(name: str) -> list:
    """[(N, K, 'module,...')] of the decoder projections of preset ``name``, deduplicated."""
    from qlora.model.presets import load_preset

    cfg = load_preset(name)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads") or heads
    modules = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden),
               "v_proj": (kv * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
               "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    shapes = {}
    for module, nk in modules.items():
        shapes.setdefault(nk, []).append(module.removesuffix("_proj"))
    return [(n, k, ",".join(names)) for (n, k), names in shapes.items()]


def parse_nk(text: str) -> list:
    shapes = []
    for item in text.split(","):
        try:
            n, k = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--nk: {item!r} is not NxK (e.g. 4096x11008)") from None
        if n < 1 or k < 1 or k % 64:
            raise ValueError(f"--nk: {item!r}: N must be positive and K a multiple of the NF4 blocksize 64")
        shapes.append((n, k, "custom"))
    return shapes


def resolve(args) -> Settings:
    """Fill what was left out: the --quick values, or the full-size defaults."""
    quick = args.quick
    shapes = args.shapes or ("custom" if quick else "llama-2-7b")
    if shapes == "custom":
        nk_text = args.nk or (QUICK_SHAPES if quick else None)
        if not nk_text:
            raise ValueError("--shapes custom needs --nk NxK[,NxK...]")
        nk = parse_nk(nk_text)
    else:
        if args.nk:
            raise ValueError(f"--nk only applies with --shapes custom, not --shapes {shapes}")
        nk = preset_shapes(shapes)
    rounds = args.rounds or (3 if quick else 5)
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    device = harness.run_device(args)
    # Per measurement: do_bench's `rep` on CUDA; the CPU timer's minimum run time.
    budget_ms = 50.0 if device.type == "cuda" else (20.0 if quick else 100.0)
    return Settings(shapes=shapes, nk=nk, m=args.m or list(QUICK_M if quick else DEFAULT_M),
                    rank=args.rank or list(QUICK_RANKS if quick else DEFAULT_RANKS),
                    mode=args.mode or (list(MODES) if quick else ["fwd"]),
                    provider=args.provider or list(PROVIDERS), rounds=rounds, budget_ms=budget_ms,
                    device=str(device), quick=quick, out=args.out,
                    arch=args.arch or (_gpu_arch() if device.type == "cuda" else "sm_90"))


def _gpu_arch() -> str:
    from qlora.kernels.configs import current_arch

    return current_arch()


def provider_path(provider: str, m: int, mode: str) -> str | None:
    """The path of the layer that ``provider`` runs (None: not our layer)."""
    from qlora.kernels.configs import GEMV_MAX_M

    path = PROVIDER_PATH.get(provider)
    return "gemv" if path == "fused" and mode == "fwd" and m <= GEMV_MAX_M else path


def predictions(settings: Settings) -> list:
    """One row per shape, rank, M and mode: every path's predicted ms on ``settings.arch`` and the
    path the dispatcher takes there."""
    from qlora.ops import path_times

    rows = []
    for n, k, modules in settings.nk:
        for r in settings.rank:
            for m in settings.m:
                for mode in settings.mode:
                    ms = _predicted_ms(settings.arch, mode, m, n, k, r)
                    rows.append(dict(n=n, k=k, modules=modules, rank=r, m=m, mode=mode, arch=settings.arch,
                                     **{f"predicted_ms_{p}": ms.get(p) for p in path_times.PATHS},
                                     chosen=path_times.best_path(settings.arch, m, n, k, r, mode != "fwd")))
    return rows


def predicted_markdown(rows: list, arch: str) -> str:
    from qlora.ops import path_times

    machine = path_times.predicted_table()["archs"][arch]["machine"]["name"]
    table = [[f"{row['n']}x{row['k']} ({row['modules']})", str(row["rank"]), str(row["m"]), row["mode"],
              *[harness.fmt(row[f"predicted_ms_{p}"]) for p in path_times.PATHS], row["chosen"]] for row in rows]
    header = ["N×K", "r", "M", "mode", *[f"{p} ms" for p in path_times.PATHS], "dispatcher takes"]
    return "\n".join([
        f"## Predicted time of each path: {arch} on {machine} (static speed model)", "",
        "A lower bound from the SASS of each kernel's main loop (`qlora kernels inspect`) and cuBLAS at "
        "the rated bf16 peak / HBM bandwidth; latency, launch overhead and stalls come on top. "
        "mode bwd / full: the fused path's forward is the fused kernel (the GEMV serves inference only). "
        "The dispatcher takes measured times over these where a GPU run filled its table.", "",
        harness.markdown_table(header, table), ""])


def work(n: int, k: int, m: int, r: int, mode: str, lora: bool, weight_bytes: int) -> tuple[int, int]:
    """(FLOPs, minimum bytes moved) of one call. fwd: X·W0ᵀ plus the LoRA pair X·Aᵀ, S·Bᵀ. bwd: dX
    = dY·W0 plus dY·B, G·A, dA = Gᵀ·X, dB = dYᵀ·S. Bytes: W0 read once per pass in its stored
    format, activations and adapters (and their gradients) read or written once, 2 bytes each."""
    fwd_flops, bwd_flops = 2 * m * n * k, 2 * m * n * k
    fwd_bytes = weight_bytes + 2 * (m * k + m * n)
    bwd_bytes = weight_bytes + 2 * (m * n + 2 * m * k)
    if lora:
        fwd_flops += 2 * m * r * (k + n)
        bwd_flops += 4 * m * r * (k + n)
        fwd_bytes += 2 * r * (k + n)
        bwd_bytes += 4 * r * (k + n)
    flops = {"fwd": fwd_flops, "bwd": bwd_flops, "full": fwd_flops + bwd_flops}[mode]
    moved = {"fwd": fwd_bytes, "bwd": bwd_bytes, "full": fwd_bytes + bwd_bytes}[mode]
    return flops, moved


def _mode_call(layer, x: torch.Tensor, dy: torch.Tensor, mode: str):
    """(timed callable, tensors whose .grad it fills, check) for one mode; ``check()`` runs it once
    from zeroed gradients and returns what is compared with the reference (Y, or dX)."""
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return layer.forward(x)
        return forward, [], forward
    x_req = x.detach().requires_grad_()
    grads = [x_req, *layer.params]
    if mode == "bwd":
        y = layer.forward(x_req)  # the graph stays alive; only backward is timed

        def call():
            y.backward(dy, retain_graph=True)
    else:
        def call():
            layer.forward(x_req).backward(dy)

    def check():
        for t in grads:
            t.grad = None
        call()
        return x_req.grad
    return call, grads, check


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run(args) -> dict:
    """Run the comparison; returns {"rows", "skipped", "files", "markdown"}."""
    settings = resolve(args)
    device = torch.device(settings.device)
    with harness.quick_threads(settings.quick):
        return _run(settings, device)


def _run(settings: Settings, device: torch.device) -> dict:
    skipped = {name: reason for name in settings.provider
               if (reason := unavailable_reason(name, device)) is not None}
    present = [name for name in settings.provider if name not in skipped]
    if not present:
        raise ValueError(f"no provider can run on {device}: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    command = harness.command_line("qlora bench kernels", dict(
        shapes=settings.shapes, **_nk_option(settings), m=settings.m, rank=settings.rank, mode=settings.mode,
        provider=present, rounds=settings.rounds, device=settings.device, quick=settings.quick, out=settings.out))
    env = harness.environment(device, command)
    peak = harness.measure_peak(device, settings.quick)
    timer_name = "triton.testing.do_bench" if device.type == "cuda" else "torch.utils.benchmark"
    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    for n, k, modules in settings.nk:
        for r in settings.rank:
            problem = LinearProblem.random(n, k, r, device)
            layers = {name: BUILDERS[name](problem) for name in present}
            for m in settings.m:
                x = torch.randn(m, k, generator=gen, device=device, dtype=DTYPE)
                dy = torch.randn(m, n, generator=gen, device=device, dtype=DTYPE)
                for mode in settings.mode:
                    rows += _compare(problem, layers, x, dy, mode, settings, device, dict(
                        **env, **peak, timer=timer_name, rounds=settings.rounds, shapes=settings.shapes,
                        modules=modules, n=n, k=k, m=m, rank=r, mode=mode, dtype=str(DTYPE).removeprefix("torch.")))
            del layers, problem
    out_dir = Path(settings.out)
    files = harness.write_rows(rows, out_dir, "bench_kernels")
    if device.type == "cuda":
        measured = out_dir / "path_times_measured.json"
        measured.write_text(json.dumps(measured_path_times(rows, settings.arch), indent=1) + "\n", encoding="utf-8")
        files.append(measured)
    text = markdown(rows, env, peak, skipped) + "\n" + predicted_markdown(predictions(settings), settings.arch)
    (out_dir / "bench_kernels.md").write_text(text, encoding="utf-8")
    files.append(out_dir / "bench_kernels.md")
    files += plot(rows, out_dir)
    return {"rows": rows, "skipped": skipped, "files": files, "markdown": text}


def _nk_option(settings: Settings) -> dict:
    if settings.shapes != "custom":
        return {}
    return {"nk": ",".join(f"{n}x{k}" for n, k, _ in settings.nk)}


def _compare(problem, layers, x, dy, mode, settings, device, base: dict) -> list:
    """Rows of one comparison: every layer checked once, the non-interpreted ones timed together."""
    m, n, k, r = x.shape[0], problem.shape[0], problem.shape[1], problem.rank
    refs = {lora: problem.reference(x, dy, lora) for lora in (True, False)}
    calls, grads, contexts, errors = {}, {}, {}, {}
    for name, layer in layers.items():
        with layer.context():
            call, grads[name], check = _mode_call(layer, x, dy, mode)
            out = check()
        ref_y, ref_dx = refs[layer.has_lora]
        errors[name] = _rel_err(out, ref_y if mode == "fwd" else ref_dx)
        if not interpreted(name, device):
            calls[name], contexts[name] = call, layer.context
    timed = harness.time_interleaved(calls, device, settings.rounds, settings.budget_ms, grads, contexts)
    predicted = _predicted_ms(settings.arch, mode, m, n, k, r)
    small = m <= SMALL_M
    peak = base["peak_copy_gb_per_s"] if small else base["peak_gemm_bf16_tflops"]
    rows = []
    for name, layer in layers.items():
        weight_bytes = 2 * n * k if name == "dense-bf16" else problem.weight.nbytes()
        flops, moved = work(n, k, m, r, mode, layer.has_lora, weight_bytes)
        path = provider_path(name, m, mode)
        row = dict(base, provider=name, lora=layer.has_lora, flops=flops, bytes=moved,
                   metric="GB/s" if small else "TFLOP/s", max_rel_err=errors[name], path=path,
                   predicted_ms=predicted.get(path), predicted_arch=settings.arch)
        if name in timed:
            p50, p20, p80, count = timed[name]
            row.update(timing="timed", ms_p50=p50, ms_p20=p20, ms_p80=p80, samples=count,
                       tflops=flops / p50 / 1e9, gb_per_s=moved / p50 / 1e6)
            row["pct_peak"] = 100 * (row["gb_per_s"] if small else row["tflops"]) / peak
            row.update({f"speedup_vs_{other}": timed[other][0] / p50 for other in timed if other != name})
        else:
            row.update(timing="not timed: Triton interpreter on CPU (checked for correctness only)",
                       ms_p50=None, ms_p20=None, ms_p80=None, samples=0, tflops=None, gb_per_s=None,
                       pct_peak=None)
        rows.append(row)
    return rows


def _predicted_ms(arch: str, mode: str, m: int, n: int, k: int, r: int) -> dict:
    from qlora.ops import path_times

    return {p: 1e3 * path_times.predicted_seconds(arch, p, mode, m, n, k, r)
            for p in path_times.candidates(m, training=mode != "fwd")}


def measured_path_times(rows: list, arch: str) -> list:
    """The timed rows of our layer's providers as ``qlora.ops.path_times`` measured-table rows."""
    return [dict(arch=arch, gpu=row["device"], m=row["m"], n=row["n"], k=row["k"], r=row["rank"], mode=row["mode"],
                 path=row["path"], seconds=row["ms_p50"] / 1e3, date=row["date"])
            for row in rows if row["path"] and row["lora"] and row["timing"] == "timed"]


def markdown(rows: list, env: dict, peak: dict, skipped: dict) -> str:
    lines = ["# qlora bench kernels", "", *harness.environment_lines(env),
             f"- measured peak: {peak['peak_gemm_bf16_tflops']:.3g} TFLOP/s bf16 GEMM "
             f"({peak['peak_gemm_shape']}), {peak['peak_copy_gb_per_s']:.4g} GB/s copy", ""]
    if env["device_type"] != "cuda":
        lines += ["**CPU run**: these times show that the harness and every provider work; they say "
                  "nothing about GPU kernel performance.", ""]
    if any(row["timing"] != "timed" for row in rows):
        lines += ["Providers marked *interpreter* ran their Triton kernels in Triton's interpreter: "
                  "checked against the reference, not timed.", ""]
    for name, reason in skipped.items():
        lines.append(f"- left out: {name}: {reason}")
    if skipped:
        lines.append("")
    lines += ["Time: ms, median [20th, 80th percentile]. Throughput: TFLOP/s, or GB/s for M <= "
              f"{SMALL_M}; % of the measured peak. `×X`: X's time / this time (> 1: faster than X). "
              "dense-bf16 computes X·W0ᵀ alone (no LoRA). err: max |out - ref| / max |ref| of Y (fwd) "
              "or dX (bwd, full) against an fp32 reference. predicted ms (path): the static speed model's "
              f"lower bound for the path the provider ran, on {rows[0]['predicted_arch']} (table at the end).", ""]
    groups = {}
    for row in rows:
        groups.setdefault((row["mode"], row["rank"]), []).append(row)
    baselines = [b for b in BASELINES if any(row["provider"] == b and row["timing"] == "timed" for row in rows)]
    for (mode, rank), group in groups.items():
        table = []
        for row in group:
            if row["timing"] == "timed":
                cells = [f"{row['ms_p50']:.4g} [{row['ms_p20']:.4g}, {row['ms_p80']:.4g}]",
                         f"{harness.fmt(row['gb_per_s'] if row['metric'] == 'GB/s' else row['tflops'])} "
                         f"{row['metric']}", harness.fmt(row["pct_peak"])]
            else:
                cells = ["*interpreter*", "-", "-"]
            speedups = [harness.fmt(row.get(f"speedup_vs_{b}")) for b in baselines]
            predicted = f"{harness.fmt(row['predicted_ms'])} ({row['path']})" if row["predicted_ms"] else "-"
            table.append([f"{row['n']}x{row['k']} ({row['modules']})", str(row["m"]), row["provider"], *cells,
                          predicted, *speedups, f"{row['max_rel_err']:.2e}"])
        header = ["N×K", "M", "provider", "ms", "throughput", "% peak", "predicted ms (path)",
                  *[f"×{b}" for b in baselines], "err"]
        lines += [f"## mode {mode}, rank {rank}", "", harness.markdown_table(header, table), ""]
    return "\n".join(lines)


def plot(rows: list, out_dir: Path) -> list[Path]:
    """One PNG per (mode, rank): a panel per weight shape, time against M, a line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [row for row in rows if row["timing"] == "timed"]
    files = []
    for mode, rank in dict.fromkeys((row["mode"], row["rank"]) for row in timed):
        group = [row for row in timed if row["mode"] == mode and row["rank"] == rank]
        shapes = list(dict.fromkeys((row["n"], row["k"], row["modules"]) for row in group))
        fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
        for ax, (n, k, modules) in zip(axes[0], shapes):
            for provider in dict.fromkeys(row["provider"] for row in group):
                points = sorted((row["m"], row["ms_p50"], row["ms_p20"], row["ms_p80"]) for row in group
                                if row["provider"] == provider and (row["n"], row["k"]) == (n, k))
                ms, p50, p20, p80 = zip(*points)
                color = f"C{PROVIDERS.index(provider)}"  # one color per provider in every figure
                ax.plot(ms, p50, marker="o", color=color, label=provider)
                ax.fill_between(ms, p20, p80, color=color, alpha=0.2)
            ax.set(xscale="log", yscale="log", xlabel="M (rows of X)", ylabel="ms (median)",
                   title=f"{n}x{k} ({modules})")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize="small")
        fig.suptitle(f"{group[0]['device']}: mode {mode}, rank {rank}")
        fig.tight_layout()
        path = out_dir / f"bench_kernels_{mode}_r{rank}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files



def main_from_args(args) -> int:
    if args.predicted:
        settings = resolve(args)
        print(predicted_markdown(predictions(settings), settings.arch))
        return 0
    return harness.print_report(run(args))

