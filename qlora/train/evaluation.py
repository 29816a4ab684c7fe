"""An evaluation-only run: the held-out data of a config scored on its model, with an adapter
or without: loss per answer token, perplexity, exact match, and a few answers to read.

The held-out set is the training run's (``data.eval_path``, or the same seeded
``data.eval_fraction`` split), so a run's adapter is scored on examples it did not train on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from qlora.train.config import Config
from qlora.train.dataset import build_data, locate_data, prompt_and_answer
from qlora.train.loop import evaluate, exact_match, generate, scored_examples
from qlora.train.model import base_model, checked_model_path, compute_dtype, load_tokenizer

SAMPLES = 3  # answers printed next to the expected ones


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    examples: int                       # held-out examples in the loss
    scored: int                         # of them answered and scored for exact match
    exact_match: Optional[float]        # fraction of the scored ones; None if none scored
    samples: list[dict] = field(default_factory=list)  # {prompt, expected, answer}

    def lines(self) -> list[str]:
        text = f"held-out loss {self.loss:.4f}, perplexity {self.perplexity:.2f} ({self.examples} examples)"
        if self.exact_match is not None:
            hits = round(self.exact_match * self.scored)
            text += f", exact match {hits}/{self.scored} ({100 * self.exact_match:.0f}%)"
        out = [text]
        for sample in self.samples:
            out += [f"prompt:          {sample['prompt']!r}", f"expected answer: {sample['expected']!r}",
                    f"answer:          {sample['answer']!r}"]
        return out


@torch.no_grad()
def run_eval(cfg: Config, adapter_dir: Optional[str], log=print) -> EvalResult:
    """Score ``cfg``'s model (with the PEFT adapter in ``adapter_dir``, if given) on its held-out
    data; the data is read and checked before the model loads."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checked_model_path(cfg)
    sources = locate_data(cfg)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    data = build_data(cfg, tokenizer, sources)
    if not data.eval:
        raise ValueError("no held-out data: set data.eval_path, or data.eval_fraction above 0")
    log(data.summary())
    model = base_model(cfg, device)
    if adapter_dir is not None:
        from qlora.model.adapters import load_adapter

        load_adapter(model, adapter_dir)
        model.to(device)
    dtype = compute_dtype(cfg, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = evaluate(model, data.eval, cfg.train.micro_batch_size, tokenizer.pad_id, device)
        scored = scored_examples(data.eval, cfg.logging.exact_match_examples)
        hits = exact_match(model, tokenizer, scored) if scored else 0
        samples = []
        for example in scored[:SAMPLES]:
            prompt, answer = prompt_and_answer(example)
            samples.append(dict(prompt=tokenizer.decode(prompt), expected=tokenizer.decode(answer),
                                answer=generate(model, tokenizer, prompt, len(answer) + 1)))
    return EvalResult(loss, math.exp(min(loss, 50.0)), len(data.eval), len(scored),
                      hits / len(scored) if scored else None, samples)
