"""AdaLoRA's outcome: the final rank of every layer (a table and a bar plot) and pruning to it.

All functions take the allocator's ``rank_pattern``, ``{"<module>.lora_E": [bool] * r_init}``,
which is also what PEFT's ``adapter_config.json`` stores under ``rank_pattern``.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Union

from torch import nn

from qlora.adalora.layer import AdaLoRALinear
from qlora.util.atomic import write_atomic

_SUFFIX = ".lora_E"


def _module_name(key: str) -> str:
    if not key.endswith(_SUFFIX):
        raise ValueError(f"rank pattern key {key!r} does not end with {_SUFFIX!r}")
    return key[: -len(_SUFFIX)]


def final_ranks(rank_pattern: dict[str, list[bool]]) -> dict[str, tuple[int, int]]:
    """{module name: (initial rank, final rank)}."""
    return {_module_name(k): (len(mask), sum(bool(v) for v in mask)) for k, mask in rank_pattern.items()}


def rank_table(rank_pattern: dict[str, list[bool]]) -> str:
    """A plain-text table of initial and final rank per layer, with totals."""
    ranks = final_ranks(rank_pattern)
    width = max([len("layer"), len("total")] + [len(n) for n in ranks])
    lines = [f"{'layer':<{width}}  initial r  final r", "-" * (width + 20)]
    lines += [f"{name:<{width}}  {init:>9}  {final:>7}" for name, (init, final) in ranks.items()]
    total_init = sum(i for i, _ in ranks.values())
    total_final = sum(f for _, f in ranks.values())
    lines += ["-" * (width + 20), f"{'total':<{width}}  {total_init:>9}  {total_final:>7}"]
    return "\n".join(lines)


def plot_ranks(rank_pattern: dict[str, list[bool]], path: Union[str, Path]) -> Path:
    """A bar plot (PNG) of the final rank per layer, the initial rank dashed; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = final_ranks(rank_pattern)
    names = list(ranks)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(names) + 2), 4))
    ax.bar(range(len(names)), [f for _, f in ranks.values()], color="tab:blue", label="final rank")
    ax.step(range(len(names)), [i for i, _ in ranks.values()], where="mid", color="gray", linestyle="--",
            label="initial rank")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("rank")
    ax.set_title("AdaLoRA: final rank per layer")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=120)
    finally:
        plt.close(fig)
    write_atomic(path, lambda f: f.write(png.getvalue()))
    return path


def prune_to_rank_pattern(model: nn.Module, rank_pattern: dict[str, list[bool]], adapter_name: str = "default") -> None:
    """Drop the masked triplets of every AdaLoRA layer named in ``rank_pattern`` (in place), so that a
    saved adapter holds only the final ranks. Layers must still have their initial rank; this is
    also how a pruned adapter is loaded: build the layers at ``init_r``, prune, then load the tensors.
    Replaces the adapter's parameters, so do it after training (an optimizer would keep the old ones)."""
    for key, mask in rank_pattern.items():
        name = _module_name(key)
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"rank pattern key {key!r}: the model has no module {name!r}") from err
        if not isinstance(layer, AdaLoRALinear) or adapter_name not in layer.lora_E:
            raise ValueError(f"rank pattern key {key!r}: {name!r} is not an AdaLoRA layer with adapter {adapter_name!r}")
        try:
            layer.prune(adapter_name, mask)
        except ValueError as err:
            raise ValueError(f"rank pattern key {key!r}: {err}") from err
