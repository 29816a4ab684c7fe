"""The QLoRA linear layer of every provider, side by side (``qlora bench kernels``; the code is
qlora.bench.kernels).

    python benchmarks/bench_kernels.py --shapes llama-2-7b --mode fwd,bwd,full --out benchmarks/results/DIR
    python benchmarks/bench_kernels.py --quick    # tiny shapes on CPU, under a minute
"""
import sys

from qlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", *sys.argv[1:]]))
