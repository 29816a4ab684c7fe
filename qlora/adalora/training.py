"""AdaLoRA in the training loop (``lora.type: adalora``): the orthogonality penalty added to the
loss, the rank allocator stepped after every optimizer step, its state in checkpoints, and the
final pruning to the learned ranks.

A checkpoint holds, next to the PEFT-format ``adapter/`` (masked triplets left out, as PEFT
saves it), ``adalora_weights.safetensors`` with every triplet at ``init_r`` and
``adalora_allocator.pt`` with the allocator's scores: a masked triplet can come back until the
final phase, so resuming needs the values the PEFT file drops.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qlora.util.files import load_safetensors, load_torch

WEIGHTS_FILE = "adalora_weights.safetensors"
ALLOCATOR_FILE = "adalora_allocator.pt"


class AdaLoRATraining:
    def __init__(self, model: nn.Module, lora, total_step: int):
        """``model``: the transformers model itself (not a DDP wrapper), so the allocator's layer
        names are PEFT's; ``lora``: the run config's ``lora`` section; ``total_step``: the run's
        optimizer steps."""
        from qlora.adalora.allocator import RankAllocator

        self.model = model
        self.orth_reg_weight = lora.orth_reg_weight
        self.allocator = RankAllocator(model, target_r=lora.target_r, total_step=total_step,
                                       tinit=lora.tinit, tfinal=lora.tfinal, deltaT=lora.deltaT,
                                       beta1=lora.beta1, beta2=lora.beta2)

    def regularization(self) -> torch.Tensor:
        """``orth_reg_weight`` · R(P, Q), to add to one optimizer step's loss once."""
        from qlora.adalora.layer import orthogonal_regularization

        return self.orth_reg_weight * orthogonal_regularization(self.model)

    def after_step(self, step: int) -> None:
        """After the finite optimizer step with 0-based index ``step``, before ``zero_grad``."""
        self.allocator.update_and_allocate(self.model, step)

    def save_adapter(self, path: Path) -> None:
        from qlora.adalora.adapter import save_adalora_adapter

        save_adalora_adapter(self.model, str(path), self.allocator, self.orth_reg_weight)

    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def write_state(self, checkpoint_dir: Path) -> None:
        from safetensors.torch import save_file

        save_file({n: p.detach().cpu().contiguous() for n, p in self._trainable().items()},
                  str(checkpoint_dir / WEIGHTS_FILE))
        torch.save(self.allocator.state_dict(), checkpoint_dir / ALLOCATOR_FILE)

    def restore(self, checkpoint_dir: Path) -> None:
        """The unpruned adapter and the allocator of ``checkpoint_dir``, into this run's new
        (same-shaped) adapter, in place (the optimizer keeps its parameters)."""
        file = checkpoint_dir / WEIGHTS_FILE
        weights = load_safetensors(file)
        params = self._trainable()
        if weights.keys() != params.keys():
            bad = sorted(weights.keys() ^ params.keys())[0]
            raise ValueError(f"{file}: tensor {bad!r} does not match this run's AdaLoRA layers")
        with torch.no_grad():
            for name, p in params.items():
                if weights[name].shape != p.shape:
                    raise ValueError(f"{file}: {name} has shape {tuple(weights[name].shape)}, this "
                                     f"run's adapter {tuple(p.shape)}")
                p.copy_(weights[name])
        self.allocator.load_state_dict(load_torch(checkpoint_dir / ALLOCATOR_FILE))

    def fix_final_ranks(self) -> dict[str, list[bool]]:
        """The final rank pattern, applied to the model's λ (training is over)."""
        return self.allocator.finish(self.model)

    def prune(self, output_dir: Path, log: Callable[[str], None], is_main: bool) -> None:
        """Report the final ranks (table, ``adalora_ranks.png``) and drop the masked triplets."""
        from qlora.adalora.ranks import plot_ranks, prune_to_rank_pattern, rank_table

        pattern = self.allocator.finish(self.model)
        log("AdaLoRA final ranks:\n" + rank_table(pattern))
        if is_main:
            log(f"rank plot: {plot_ranks(pattern, output_dir / 'adalora_ranks.png')}")
        prune_to_rank_pattern(self.model, pattern)
