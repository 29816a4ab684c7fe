"""Optimizer step time and memory (``qlora bench optim``; the code is qlora.bench.optim).

    python benchmarks/bench_optim.py            # full size, on CUDA when available
    python benchmarks/bench_optim.py --quick    # small CPU run, under 30 s
"""
from qlora.bench.optim import add_arguments, main, parse_args, run

__all__ = ["add_arguments", "main", "parse_args", "run"]

if __name__ == "__main__":
    raise SystemExit(main())
