"""Packing, batch order and collation.

Order: one epoch is a seeded permutation of the sequences, cut into global micro-batches of
``global_batch`` sequences (the last, partial one is dropped so every step sees the same number
of sequences). With ``group_by_length`` the permutation is sorted by length inside windows of
64 micro-batches and the micro-batches shuffled again, so padding stays small but the order
stays random. The position in the stream (micro-batches consumed) is all a resume needs: the
order is a pure function of (seed, epoch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from qlora.data.formats import IGNORE_INDEX, Example

GROUP_WINDOW = 64  # micro-batches sorted together by length


@dataclass
class Sequence:
    """One training row: one example, or several packed with positions restarting per example."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def single(example: Example) -> Sequence:
    return Sequence(list(example.input_ids), list(example.labels), list(range(len(example))))


def pack(examples: list[Example], max_seq_len: int) -> list[Sequence]:
    """Concatenate examples, in order, into rows of at most ``max_seq_len`` tokens (an example
    never spans two rows). Each example's position ids start at 0, which is how the model tells
    the examples apart: transformers builds a block-diagonal causal mask from them when given
    no attention mask and no KV cache (``use_cache=False``)."""
    rows, current = [], Sequence([], [], [])
    for example in examples:
        if current.input_ids and len(current) + len(example) > max_seq_len:
            rows.append(current)
            current = Sequence([], [], [])
        current.input_ids += example.input_ids
        current.labels += example.labels
        current.position_ids += range(len(example))
    if current.input_ids:
        rows.append(current)
    return rows


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """The micro-batches (lists of sequence indices) of one epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        window = global_batch * GROUP_WINDOW
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start:start + window], key=lambda i: -lengths[i])]
    n_batches = len(order) // global_batch
    batches = [order[b * global_batch:(b + 1) * global_batch] for b in range(n_batches)]
    if group_by_length:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches


def steps_for_epochs(n_sequences: int, global_batch: int, accumulation: int, epochs: float) -> int:
    """Optimizer steps that make ``epochs`` passes over ``n_sequences``: an epoch is
    n_sequences // global_batch micro-batches (the partial last one is dropped, as
    :func:`epoch_batches` does), an optimizer step ``accumulation`` of them; rounded up."""
    return max(1, math.ceil(epochs * (n_sequences // global_batch) / accumulation))


class BatchStream:
    """Endless stream of global micro-batches over epochs; ``position`` counts those taken."""

    def __init__(self, lengths: list[int], global_batch: int, seed: int, group_by_length: bool,
                 position: int = 0):
        if len(lengths) < global_batch:
            raise ValueError(f"the training set has {len(lengths)} sequences, fewer than one "
                             f"global micro-batch ({global_batch}); lower train.micro_batch_size "
                             f"or add data")
        self.lengths = lengths
        self.global_batch = global_batch
        self.seed = seed
        self.group_by_length = group_by_length
        self.batches_per_epoch = len(lengths) // global_batch
        self.position = position
        self._epoch: Optional[int] = None
        self._batches: list[list[int]] = []

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def next(self) -> list[int]:
        if self._epoch != self.epoch:
            self._epoch = self.epoch
            self._batches = epoch_batches(self.lengths, self.global_batch, self.seed, self.epoch,
                                          self.group_by_length)
        batch = self._batches[self.position % self.batches_per_epoch]
        self.position += 1
        return batch


def collate(rows: list[Sequence], pad_id: int, packed: bool) -> dict:
    """Right-padded tensors. Unpacked rows get an attention mask; packed rows get position ids
    and no mask (padding forms its own position-0 segment, attending only to itself)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row.input_ids)
        labels[i, :len(row)] = torch.tensor(row.labels)
    batch = {"input_ids": input_ids, "labels": labels}
    if packed:
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            position_ids[i, :len(row)] = torch.tensor(row.position_ids)
            position_ids[i, len(row):] = torch.arange(width - len(row))
        batch["position_ids"] = position_ids
    else:
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            attention_mask[i, :len(row)] = 1
        batch["attention_mask"] = attention_mask
    return batch
