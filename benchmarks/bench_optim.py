"""Optimizer step time and memory (``qlora bench optim``; the code is qlora.bench.optim).

    python benchmarks/bench_optim.py            # full size, on CUDA when available
    python benchmarks/bench_optim.py --quick    # small CPU run, under 30 s
"""
import sys

from qlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "optim", *sys.argv[1:]]))
