"""Whole QLoRA training steps, ours against transformers + bitsandbytes + PEFT (``qlora bench
train``; the code is qlora.bench.train).

    python benchmarks/bench_train.py --model llama-2-7b --seq-len 2048 --out benchmarks/results/DIR
    python benchmarks/bench_train.py --quick    # tiny-llama on CPU
"""
import sys

from qlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
