"""How far a merged export is from the adapted model it came from, measured on real batches.

Merging stores W0 + ΔW rounded to the export dtype (and, for an NF4 export, quantized again), so
the export computes slightly different logits than base + adapter did. This compares the two on
a few batches of the training data: the largest and the mean absolute logit difference, and the
mean per-token KL(adapted ‖ merged) of the next-token distributions (in nats).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPORT_FILE = "merge_report.json"


@dataclass
class MergeError:
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    mean_kl: float          # nats per token, KL(adapted || merged)
    tokens: int             # compared positions (padding left out)
    batches: int

    def line(self) -> str:
        return (f"merged vs adapted model on {self.tokens} tokens of the training data: max |logit diff| "
                f"{self.max_abs_logit_diff:.4g}, mean {self.mean_abs_logit_diff:.4g}, "
                f"KL {self.mean_kl:.3g} nats/token")

    def write(self, dir) -> Path:
        path = Path(dir) / REPORT_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path


@torch.no_grad()
def merge_error(adapted, merged, batches: list[dict]) -> MergeError:
    """Compare ``adapted`` (base + adapter) with ``merged`` on ``batches`` ({input_ids,
    attention_mask} on each model's device); logits compared in fp32."""
    max_abs, abs_sum, kl_sum, tokens = 0.0, 0.0, 0.0, 0
    for batch in batches:
        keep = batch["attention_mask"].bool()
        ours = adapted(**batch).logits.float()[keep]
        theirs = merged(**{k: v.to(merged.device) for k, v in batch.items()}).logits.float().to(ours.device)[keep]
        diff = (ours - theirs).abs()
        max_abs = max(max_abs, diff.max().item())
        abs_sum += diff.mean(dim=-1).sum().item()
        log_p, log_q = ours.log_softmax(-1), theirs.log_softmax(-1)
        kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        tokens += ours.shape[0]
    return MergeError(max_abs, abs_sum / max(tokens, 1), kl_sum / max(tokens, 1), tokens, len(batches))
