"""`qlora kernels inspect [--arch sm_80|sm_90] [--kernel NAME] [--json]`: compile every Triton kernel config and the
csrc/ CUDA kernels ahead of time for a GPU architecture (no GPU needed) and report registers,
spills, shared memory, MMA and, for the NF4 kernels, the static speed model's prediction."""
import dataclasses
import json
import sys
import warnings

MIX_CLASSES_SHOWN = 4


def register(subparsers):
    parser = subparsers.add_parser("kernels", help="inspect the Triton kernels")
    actions = parser.add_subparsers(dest="kernels_command", required=True)
    inspect = actions.add_parser("inspect", help="compile every kernel and autotune config for an arch")
    inspect.add_argument("--arch", choices=["sm_80", "sm_90"], action="append",
                         help="architecture(s) to compile for (default: both)")
    inspect.add_argument("--kernel", action="append",
                         help="only this kernel (as named in the table's kernel column); repeatable")
    inspect.add_argument("--json", action="store_true",
                         help="print JSON (machine constants and one row per kernel config) instead of a table")
    inspect.add_argument("--write-table", nargs="?", const="", default=None, metavar="PATH",
                         help="also write the NF4 kernels' predictions for the ops-layer dispatcher "
                              "(default: qlora/ops/path_times_predicted.json; needs both archs)")
    inspect.set_defaults(func=run_inspect)


def _row(r) -> tuple:
    if not r.ok:
        return (r.kernel, r.config, r.arch, "", "", "", f"ERROR {r.error}", "", "", "", "")
    model = r.model or {}
    mix = ", ".join(f"{cls} {n}" for cls, n in list(model.get("mix", {}).items())[:MIX_CLASSES_SHOWN])
    return (r.kernel, r.config, r.arch, str(r.registers), str(r.spill_bytes), str(r.shared_bytes), r.mma,
            str(model.get("loop_instructions", "")),
            f"{model['instructions_per_weight']:.1f}" if model else "", mix,
            _predicted(r, model))


def _predicted(r, model: dict) -> str:
    from qlora.bench.speed_model import summary

    if r.model_error:
        return "no main loop found"
    return summary(model) if model else ""


def _write_table(results, archs, path: str) -> None:
    from pathlib import Path

    from qlora.bench.path_table import build
    from qlora.ops.path_times import PREDICTED_FILE
    from qlora.util.atomic import write_atomic

    target = Path(path) if path else PREDICTED_FILE
    text = json.dumps(build(results, archs), indent=1) + "\n"  # built before the file is touched
    write_atomic(target, lambda f: f.write(text.encode("utf-8")))
    print(f"wrote {target}", file=sys.stderr)


def run_inspect(args) -> int:
    # Triton 3.9 warns that its fp-fusion default will change; the kernels are compiled with the
    # default a launch in this Triton gets, so the note is not about this report
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")
    from qlora.bench.csrc_inspect import inspect_csrc, nvcc
    from qlora.bench.kernel_inspect import inspect_kernels, problems
    from qlora.bench.speed_model import DEFAULT_MACHINE, table

    archs = args.arch or ["sm_80", "sm_90"]
    if args.write_table is not None and sorted(archs) != ["sm_80", "sm_90"]:
        print("error: --write-table needs both archs (leave out --arch)", file=sys.stderr)
        return 2
    results = [r for arch in archs for r in inspect_kernels(arch, kernels=args.kernel)]
    if nvcc() is None:
        print("note: nvcc not found: the csrc/ kernels are not inspected", file=sys.stderr)
    else:
        results += [r for arch in archs for r in inspect_csrc(arch, kernels=args.kernel)]
    unknown = sorted(set(args.kernel or ()) - {r.kernel for r in results})
    if unknown:
        print(f"error: no kernel named {', '.join(unknown)} (see the kernel column of `qlora kernels inspect`)",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(table([dataclasses.asdict(r) for r in results]), indent=2))
    else:
        machines = ", ".join(f"{arch} on {DEFAULT_MACHINE[arch]}" for arch in archs)
        print(f"speed model ({machines}): a lower bound from instruction issue, tensor cores and HBM "
              "bytes per main-loop tile step; latency, stalls and occupancy come on top")
        header = ("kernel", "config", "arch", "regs", "spills", "smem", "mma", "loop instrs", "per weight",
                  "main-loop mix (top classes)", "predicted")
        rows = [_row(r) for r in results]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    found = problems(results)
    if args.write_table is not None:
        try:
            _write_table(results, archs, args.write_table)
        except ValueError as exc:  # an NF4 config without a prediction
            found.append(f"--write-table: {exc}")
    for line in found:
        print(f"problem: {line}", file=sys.stderr)
    return 1 if found else 0
