"""The longest sequence that fits a device at batch 1, and what each memory option buys.

    rows = ladder(config, gpu_bytes, rank=16)

Starting from gradient checkpointing with the optimizer states on the device, the options are
added one at a time in ``OPTIONS`` order; each row gives the longest sequence with the options
so far (``max_seq_len``), the tokens that option added, and the longest sequence with every
option but that one (``without``). The last row is the best setup. Options qlora cannot apply to
the model (``estimate.unavailable_options``) are left out.
"""
from dataclasses import replace

from qlora.memory import estimate as est
from qlora.ops.tiled import DEFAULT_CHUNK_TOKENS

# (what it is, the TrainSetup change it makes), in the order they are added
OPTIONS = (
    ("optimizer pages spill to host memory", {"gpu_budget_bytes": "budget"}),
    ("chunked loss (no [tokens, vocab] logits)", {"chunked_loss": True}),
    ("checkpoints offloaded to host memory", {"offload_checkpoints": True}),
    (f"tiled MLP ({DEFAULT_CHUNK_TOKENS} tokens per chunk)", {"tiled_mlp": DEFAULT_CHUNK_TOKENS}),
    ("compact RMSNorms", {"compact_norms": True}),
    (f"tiled norm + q/k/v + RoPE ({DEFAULT_CHUNK_TOKENS} tokens per chunk)",
     {"tiled_qkv": DEFAULT_CHUNK_TOKENS}),
    ("input embedding in host memory", {"embedding_on_host": True}),
    ("16-bit LoRA weights, fp32 masters in the optimizer", {"lora_bytes": 2}),
)


def _with(setup: est.TrainSetup, changes: dict, budget: int) -> est.TrainSetup:
    return replace(setup, **{k: budget if v == "budget" else v for k, v in changes.items()})


def longest(config: dict, setup: est.TrainSetup, budget: int) -> int:
    """Longest seq_len at batch 1 whose estimate fits ``budget`` bytes (0: not even one token).
    Without the spilling option the optimizer's pages all count on the device."""
    placed = setup.gpu_budget_bytes is not None
    probe = setup if placed else replace(setup, gpu_budget_bytes=None)

    def fits(seq_len):
        e = est.estimate(config, replace(probe, seq_len=seq_len, batch_size=1))
        return e.fits if placed else e.gpu_bytes <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def ladder(config: dict, budget: int, base: est.TrainSetup) -> list:
    """Rows {option, max_seq_len, gained, without} (see the module docstring); ``base`` gives
    rank, targets, optimizer and dtypes; its memory options are ignored."""
    start = replace(base, grad_checkpointing=True, offload_checkpoints=False, chunked_loss=False,
                    tiled_mlp=0, tiled_qkv=0, compact_norms=False, embedding_on_host=False,
                    gpu_budget_bytes=None, lora_bytes=4)
    rows = [{"option": "gradient checkpointing (the start)", "max_seq_len": longest(config, start, budget),
             "gained": None, "without": None}]
    setup = start
    unavailable = est.unavailable_options(est.Architecture.from_config(config))
    options = [(name, changes) for name, changes in OPTIONS if not unavailable & set(changes)]
    for name, changes in options:
        setup = _with(setup, changes, budget)
        best = longest(config, setup, budget)
        all_but = start
        for other_name, other in options:
            if other_name != name:
                all_but = _with(all_but, other, budget)
        rows.append({"option": name, "max_seq_len": best, "gained": best - rows[-1]["max_seq_len"],
                     "without": longest(config, all_but, budget)})
    return rows
