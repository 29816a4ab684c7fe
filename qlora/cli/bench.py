"""`qlora bench kernels|optim|train`: benchmarks against the baselines users would pick; each writes
rows (JSON, CSV) and a Markdown report to --out (see qlora.bench)."""
from qlora.bench import kernels, optim, train


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark kernels, optimizers and training steps")
    actions = parser.add_subparsers(dest="bench_command", required=True)
    for name, module, help_text in (
            ("kernels", kernels, "the QLoRA linear layer of every provider, per shape, M, rank and mode"),
            ("optim", optim, "optimizer step time and memory"),
            ("train", train, "whole training steps: ours against transformers + bitsandbytes + PEFT")):
        sub = actions.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(sub)
        sub.set_defaults(func=module.main_from_args)
