"""The memory targets of issue 23, measured: each run profiled (``qlora memory profile``'s code)
under a device budget enforced with ``torch.cuda.set_per_process_memory_fraction``.

    python benchmarks/memory_targets.py --out $OUT                  # on a GPU: every target
    python benchmarks/memory_targets.py --out DIR --only 65b 8b-24
    python benchmarks/memory_targets.py --out DIR --dry-run         # CPU: a scaled-down check

Targets (the estimator's figures in the README's Memory section): llama-65b and llama-2-70b,
r = 64, seq 512, batch 1, 16-bit adapters, in 48 GB; llama-3.1-8b, r = 16, at the estimator's
longest sequence for 24 GB and for 80 GB, every memory option on. Writes memory_targets.json
(settings, per-component estimate against measurement, peak allocated and reserved bytes, or the
out-of-memory error) and memory_targets.md into --out.
"""
import argparse
import json
import os
import sys

import torch

from qlora.memory import estimate as est
from qlora.memory import profile
from qlora.memory.max_context import ladder
from qlora.model.presets import load_preset
from qlora.ops.tiled import DEFAULT_CHUNK_TOKENS

BEST = dict(grad_checkpointing=True, offload_checkpoints=True, tiled_mlp=DEFAULT_CHUNK_TOKENS,
            tiled_qkv=DEFAULT_CHUNK_TOKENS, compact_norms=True, embedding_on_host=True,
            lora_dtype="bfloat16")


def targets(dry_run: bool) -> dict:
    if dry_run:
        return {"tiny": (dict(model="tiny-llama", seq_len=512, batch_size=1, rank=8, **BEST), 1.0)}
    out = {}
    for key, name in (("65b", "llama-65b"), ("70b", "llama-2-70b")):
        out[key] = (dict(model=name, seq_len=512, batch_size=1, rank=64, grad_checkpointing=True,
                         lora_dtype="bfloat16"), 48.0)
    for gb in (24, 80):
        longest = ladder(load_preset("llama-3.1-8b"), gb * est.GB, est.TrainSetup())[-1]["max_seq_len"]
        out[f"8b-{gb}"] = (dict(model="llama-3.1-8b", seq_len=longest, batch_size=1, rank=16, **BEST),
                           float(gb))
    return out


def run_one(settings_kwargs: dict, budget_gb: float, out_dir: str) -> dict:
    settings = profile.ProfileSettings(**settings_kwargs, gpu_budget_gb=budget_gb)
    record = {"settings": settings_kwargs, "budget_gb": budget_gb}
    if settings.device == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * est.GB / total))
        torch.cuda.reset_peak_memory_stats()
    try:
        result = profile.run_profile(settings, steps=2, out_dir=out_dir)
        record.update(components=result["components"], table=result["table"])
    except torch.OutOfMemoryError as err:
        record["error"] = f"out of memory: {err}"
    if settings.device == "cuda":
        record["max_allocated"] = torch.cuda.max_memory_allocated()
        record["max_reserved"] = torch.cuda.max_memory_reserved()
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", help="targets to run (65b 70b 8b-24 8b-80)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on CPU")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for key, (kwargs, budget) in targets(args.dry_run).items():
        if args.only and key not in args.only:
            continue
        results[key] = run_one(kwargs, budget, os.path.join(args.out, key))
        print(f"== {key}: {results[key].get('error') or results[key]['table']}", flush=True)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)
           if torch.cuda.is_available() else "cpu"}
    with open(os.path.join(args.out, "memory_targets.json"), "w", encoding="utf-8") as f:
        json.dump({"env": env, "results": results}, f, indent=2)
    with open(os.path.join(args.out, "memory_targets.md"), "w", encoding="utf-8") as f:
        for key, record in results.items():
            f.write(f"## {key} ({record['budget_gb']} GB)\n\n```\n"
                    f"{record.get('error') or record['table']}\n```\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
