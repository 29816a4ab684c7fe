"""Writes ``tasks.jsonl``, the shipped dataset of the built-in run (``python -m
qlora.data.make_tasks``; the same seed gives the same file, which a test checks).

Three kinds of task for LoRA adapters on a frozen, randomly initialized 4-layer byte-level
Llama, learned in a few hundred steps on a CPU: uppercasing and reversing a random 3-letter
word (copying bytes from positions the fixed-length prompt pins down: attention work) and
adding two digits (a lookup the MLPs can hold). Measured with the built-in run (600 steps),
held-out exact match: uppercase 16/16, add 16/22, reverse 1/22 — reversal is the slow one.
Harder tasks (sorting, two-digit sums, 3-5 letter words) only lowered the loss without the
answers becoming right in that budget. There are only 100 digit pairs, so the held-out sums
were also seen in training; the held-out words are new.
"""
from __future__ import annotations

import json
import random
import string
from importlib import resources

SEED = 7
PER_KIND = 400


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(3))


def make_records(seed: int = SEED, per_kind: int = PER_KIND) -> list[dict]:
    """``per_kind`` records of each task, interleaved."""
    rng = random.Random(seed)
    records = []
    for _ in range(per_kind):
        word = _word(rng)
        records.append({"instruction": f"Reverse: {word}", "output": word[::-1]})
        word = _word(rng)
        records.append({"instruction": f"Uppercase: {word}", "output": word.upper()})
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        records.append({"instruction": f"Add: {a}+{b}", "output": str(a + b)})
    return records


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def main() -> None:
    path = resources.files("qlora.data").joinpath("tasks.jsonl")
    with open(str(path), "w", encoding="utf-8") as f:
        f.write(render(make_records()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
