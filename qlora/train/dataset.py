"""The run's training and held-out sequences, built from ``cfg.data``: one dataset or several
mixed with weights, each read from wherever it is (qlora.data.sources).

Without ``data.eval_path`` each dataset gives ``data.eval_fraction`` of its examples to the
held-out set before weighting, so no held-out example is also trained on. A weight w uses each
training example floor(w) times and a seeded random share w - floor(w) of them once more.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from qlora.data.batching import Sequence, pack, single
from qlora.data.formats import Example, ReadStats, tokenize_records
from qlora.data.sources import DatasetSpec, Source, dataset_specs, describe, locate, read_records
from qlora.train.config import Config


@dataclass
class DataSources:
    """The located datasets of a run (nothing read yet)."""

    train: list[Source]
    eval: Optional[Source]


@dataclass
class RunData:
    train: list[Sequence]
    eval: list[Example]
    stats: ReadStats
    eval_stats: ReadStats
    parts: list[str] = field(default_factory=list)  # one line per dataset when several are mixed

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
        return "\n".join([text, *(f"  {part}" for part in self.parts)])


def locate_data(cfg: Config) -> DataSources:
    """Every dataset of ``cfg.data`` located (fast: a misspelt path fails here, before the
    tokenizer or the model is loaded)."""
    d = cfg.data
    specs = dataset_specs(d.path, d.format, d.split, d.datasets)
    held_out = None if d.eval_path is None else locate(DatasetSpec(d.eval_path, d.format, d.eval_split))
    return DataSources([locate(spec) for spec in specs], held_out)


def _tokenized(source: Source, cfg: Config, tokenizer, stats: ReadStats) -> list[Example]:
    d = cfg.data
    records = read_records(source, d.skip_bad_lines, stats)
    return tokenize_records(records, source.spec.format, tokenizer, max_seq_len=d.max_seq_len,
                            train_on_prompt=d.train_on_prompt, skip_bad_lines=d.skip_bad_lines,
                            stats=stats)


def _weighted(examples: list[Example], weight: float, generator: torch.Generator) -> list[Example]:
    whole = math.floor(weight)
    extra = round((weight - whole) * len(examples))
    chosen = sorted(torch.randperm(len(examples), generator=generator)[:extra].tolist())
    return examples * whole + [examples[i] for i in chosen]


def build_data(cfg: Config, tokenizer, sources: Optional[DataSources] = None) -> RunData:
    """Read, tokenize and split the data (``sources`` from :func:`locate_data`, or located here)."""
    sources = sources if sources is not None else locate_data(cfg)
    stats, eval_stats = ReadStats(), ReadStats()
    generator = torch.Generator().manual_seed(cfg.train.seed)
    train, held_out, parts = [], [], []
    for source in sources.train:
        before = stats.records
        examples = _tokenized(source, cfg, tokenizer, stats)
        if not examples:
            raise ValueError(f"{source.spec.path}: no usable training examples")
        if sources.eval is None:
            order = torch.randperm(len(examples), generator=generator).tolist()
            n_eval = int(len(examples) * cfg.data.eval_fraction)
            held_out += [examples[i] for i in sorted(order[:n_eval])]
            examples = [examples[i] for i in sorted(order[n_eval:])]
        weighted = _weighted(examples, source.spec.weight, generator)
        train += weighted
        parts.append(f"{describe(source)} ({source.spec.format}): {stats.records - before} records, "
                     f"{len(examples)} training examples x weight {source.spec.weight:g} = {len(weighted)}")
    if sources.eval is not None:
        held_out = _tokenized(sources.eval, cfg, tokenizer, eval_stats)
    rows = pack(train, cfg.data.max_seq_len) if cfg.data.packing else [single(e) for e in train]
    return RunData(rows, held_out, stats, eval_stats, parts if len(sources.train) > 1 else [])


def prompt_and_answer(example: Example) -> tuple[list[int], list[int]]:
    """The example's prompt ids and the ids of its first answer (whether or not the prompt is
    trained: ``data.train_on_prompt``)."""
    start = example.prompt_len - 1  # labels are shifted: labels[t] follows input_ids[t]
    return example.input_ids[:example.prompt_len], example.labels[start:start + example.answer_len]
