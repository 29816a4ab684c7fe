"""`qlora bench kernels|optim|train|generate`: benchmarks against the baselines users would pick; each
writes rows (JSON, CSV) and a Markdown report to --out (see qlora.bench)."""
from qlora.bench import generate, kernels, optim, train


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark kernels, optimizers, training steps and generation")
    actions = parser.add_subparsers(dest="bench_command", required=True)
    for name, module, help_text in (
            ("kernels", kernels, "the QLoRA linear layer of every provider, per shape, M, rank and mode"),
            ("optim", optim, "optimizer step time and memory"),
            ("train", train, "whole training steps: ours against transformers + bitsandbytes + PEFT"),
            ("generate", generate, "decoding tokens/s: base + adapter against the merged export")):
        sub = actions.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(sub)
        sub.set_defaults(func=module.main_from_args)
