"""The run's training and held-out sequences, built from ``cfg.data``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora.data.batching import Sequence, pack, single
from qlora.data.formats import IGNORE_INDEX, Example, ReadStats, load_examples
from qlora.train.config import Config


@dataclass
class RunData:
    train: list[Sequence]
    eval: list[Example]
    stats: ReadStats
    eval_stats: ReadStats

    def summary(self) -> str:
        s = self.stats
        text = (f"data: {len(self.train)} training sequences from {s.records} records, "
                f"{len(self.eval)} held out")
        if s.truncated:
            text += f", {s.truncated} truncated"
        if s.no_trained_tokens:
            text += f", {s.no_trained_tokens} dropped (no response token left after truncation)"
        bad = s.bad_lines + self.eval_stats.bad_lines
        if bad:
            text += f", {len(bad)} bad lines skipped (first: {bad[0]})"
        return text


def _load(path: str, cfg: Config, tokenizer, stats: ReadStats) -> list[Example]:
    d = cfg.data
    return load_examples(path, d.format, tokenizer, max_seq_len=d.max_seq_len,
                         train_on_prompt=d.train_on_prompt, skip_bad_lines=d.skip_bad_lines,
                         stats=stats)


def build_data(cfg: Config, tokenizer) -> RunData:
    stats, eval_stats = ReadStats(), ReadStats()
    examples = _load(cfg.data.path, cfg, tokenizer, stats)
    if not examples:
        raise ValueError(f"{cfg.data.path}: no usable training examples")
    if cfg.data.eval_path is not None:
        held_out = _load(cfg.data.eval_path, cfg, tokenizer, eval_stats)
        train = examples
    else:
        generator = torch.Generator().manual_seed(cfg.train.seed)
        order = torch.randperm(len(examples), generator=generator).tolist()
        n_eval = int(len(examples) * cfg.data.eval_fraction)
        held_out = [examples[i] for i in sorted(order[:n_eval])]
        train = [examples[i] for i in sorted(order[n_eval:])]
    rows = pack(train, cfg.data.max_seq_len) if cfg.data.packing else [single(e) for e in train]
    return RunData(rows, held_out, stats, eval_stats)


def prompt_and_answer(example: Example) -> tuple[list[int], list[int]]:
    """The example's prompt ids (up to its first trained token) and the trained ids after it."""
    first = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
    return example.input_ids[:first + 1], [t for t in example.labels[first:] if t != IGNORE_INDEX]
