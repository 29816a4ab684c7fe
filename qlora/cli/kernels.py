"""`qlora kernels inspect [--arch sm_80|sm_90] [--json]`: compile every Triton kernel config ahead
of time for a GPU architecture (no GPU needed) and report registers, spills, shared memory, MMA."""
import dataclasses
import json
import sys


def register(subparsers):
    parser = subparsers.add_parser("kernels", help="inspect the Triton kernels")
    actions = parser.add_subparsers(dest="kernels_command", required=True)
    inspect = actions.add_parser("inspect", help="compile every kernel and autotune config for an arch")
    inspect.add_argument("--arch", choices=["sm_80", "sm_90"], action="append",
                         help="architecture(s) to compile for (default: both)")
    inspect.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    inspect.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from qlora.bench.kernel_inspect import inspect_kernels, problems

    results = [r for arch in (args.arch or ["sm_80", "sm_90"]) for r in inspect_kernels(arch)]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    else:
        header = ("kernel", "config", "arch", "regs", "spills", "smem", "mma")
        rows = [(r.kernel, r.config, r.arch, str(r.registers), str(r.spill_bytes), str(r.shared_bytes),
                 r.mma if r.ok else f"ERROR {r.error}") for r in results]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    found = problems(results)
    for line in found:
        print(f"problem: {line}", file=sys.stderr)
    return 1 if found else 0
