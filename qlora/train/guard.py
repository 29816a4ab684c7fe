"""The non-finite guard: no update that leaves a trainable weight NaN or infinite is ever saved.

The loop skips an optimizer step whose loss or gradient norm is not finite (and stops after
``train.max_bad_steps`` of them in a row). That does not catch an update that is itself bad: a
finite gradient times an lr of 1e39 overflows fp32, and a weight decay or an optimizer state can
do the same. So after every optimizer step :func:`all_finite` checks the trainable parameters,
and on failure the run stops before anything of that step (metrics, checkpoint, adapter) is
written; the checkpoints already written hold finite weights and are left alone.

The check is one reduction on the device: the largest |entry| over all parameters (per-tensor
maxima by ``torch._foreach_norm`` through ``torch.nn.utils.get_total_norm``, then their max),
which is NaN if any entry is NaN and inf if any is infinite, and never overflows on finite
values (a 2-norm of finite fp32 values can). Reading it back is the step's only extra host sync
(under FSDP, after one all-reduce of that maximum, so that every process stops together).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


class TrainingStopped(RuntimeError):
    """The run stopped because training went wrong; the message says what and what to do."""


class NonFiniteLossError(TrainingStopped):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class NonFiniteUpdateError(TrainingStopped):
    """An optimizer step left a trainable parameter NaN or infinite."""


@torch.no_grad()
def all_finite(params: Iterable[torch.Tensor]) -> bool:
    """Whether every entry of every tensor in ``params`` is finite."""
    # an empty tensor has no largest entry (vector_norm refuses it) and nothing to check
    largest = torch.nn.utils.get_total_norm([p for p in params if p.numel()], norm_type=math.inf)
    if hasattr(largest, "full_tensor"):  # FSDP: each process's shards; the max over all of them
        largest = largest.full_tensor()
    return bool(torch.isfinite(largest))


def non_finite_update_message(step: int, loss: float, grad_norm: float, lr: float,
                              last_checkpoint: Optional[str]) -> str:
    kept = f"the last checkpoint, {last_checkpoint}, holds finite weights" if last_checkpoint \
        else "no checkpoint had been written"
    return (f"step {step}: the optimizer update made trainable weights non-finite (loss {loss:.4g}, "
            f"gradient norm {grad_norm:.4g}, lr {lr:.3g}); stopped before saving anything of "
            f"this step ({kept}); lower optim.lr (or optim.weight_decay) and train again")
