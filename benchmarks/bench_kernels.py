"""The QLoRA linear layer of every provider, side by side (``qlora bench kernels``; the code is
qlora.bench.kernels).

    python benchmarks/bench_kernels.py --shapes llama-2-7b --mode fwd,bwd,full --out benchmarks/results/DIR
    python benchmarks/bench_kernels.py --quick    # tiny shapes on CPU, under a minute
"""
from qlora.bench.kernels import add_arguments, main, parse_args, run

__all__ = ["add_arguments", "main", "parse_args", "run"]

if __name__ == "__main__":
    raise SystemExit(main())
