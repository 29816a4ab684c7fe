"""AdaLoRA's rank allocator: importance scores, the cubic budget schedule and masking of λ.

Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", §3.2-3.3, with
the step conventions of PEFT's ``AdaLoraConfig`` / ``RankAllocator`` so configs carry over:

* ``tinit`` warm-up steps at the initial budget b₀ = Σ r_init; ``tfinal`` *final* steps at the target
  budget b_T = target_r · (number of adapted layers); in between, every ``deltaT`` steps, the budget
  b(t) = ⌊(b₀ − b_T)·(1 − (t − tinit)/(total_step − tfinal − tinit))³ + b_T⌋.
* Sensitivity of every entry of P, λ, Q: I = |θ·∂L/∂θ|, smoothed Ī ← β1·Ī + (1 − β1)·I, uncertainty
  Ū ← β2·Ū + (1 − β2)·|I − Ī|, score s = Ī·Ū. A triplet's score is s(λᵢ) + mean_j s(Q_ij) + mean_k s(P_ki).
* Masking keeps the b(t) highest-scoring triplets over all layers and sets the others' λ to 0
  (they may be re-activated by later updates until the final phase). At step total_step − tfinal
  the final pattern is fixed; afterwards it is re-applied every step.

Unlike PEFT, which masks every triplet whose score is ≤ the k-th smallest (more than asked on
ties), exactly b(t) triplets are kept, ties broken by position, so the total rank equals the budget.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from qlora.adalora.layer import adalora_layers

_FACTORS = ("lora_A", "lora_E", "lora_B")


class RankAllocator:
    """Call :meth:`update_and_allocate` once per optimizer step, after ``optimizer.step()`` and
    before ``zero_grad()`` (it reads the gradients: with accumulation, the accumulated ones; under
    DDP they are all-reduced, so every rank computes the same masks), with ``global_step`` the
    0-based index of the step just taken, as in PEFT.

    ``rank_pattern`` is ``{"<module>.lora_E": [bool] * r_init}``, the key format of PEFT's
    ``adapter_config.json``; module names are relative to the ``model`` given here, so pass the
    transformers model (PEFT's ``base_model.model``) for the keys to match PEFT's.
    """

    def __init__(self, model: nn.Module, *, target_r: int, total_step: int, tinit: int = 0, tfinal: int = 0,
                 deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85, adapter_name: str = "default"):
        if total_step <= 0:
            raise ValueError(f"AdaLoRA total_step must be positive, got {total_step}")
        if tinit < 0 or tfinal < 0:
            raise ValueError(f"AdaLoRA tinit and tfinal must be >= 0, got tinit={tinit}, tfinal={tfinal}")
        if tinit >= total_step - tfinal:
            raise ValueError(f"AdaLoRA schedule leaves no budgeting phase: tinit={tinit} >= "
                             f"total_step - tfinal = {total_step} - {tfinal}")
        if deltaT < 1:
            raise ValueError(f"AdaLoRA deltaT must be >= 1, got {deltaT}")
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 < beta < 1.0:
                raise ValueError(f"AdaLoRA {name} must be in (0, 1), got {beta}")
        layers = adalora_layers(model, adapter_name)
        if not layers:
            raise ValueError(f"RankAllocator: the model has no AdaLoRA layer with adapter {adapter_name!r}")
        self.adapter_name = adapter_name
        self.target_r, self.total_step, self.deltaT = target_r, total_step, deltaT
        self.tinit, self.tfinal = tinit, tfinal
        self.beta1, self.beta2 = beta1, beta2
        self.initial_ranks = {name: layer.r[adapter_name] for name, layer in layers}
        self.init_budget = sum(self.initial_ranks.values())
        self.target_budget = target_r * len(layers)
        if not 0 <= self.target_budget <= self.init_budget:
            raise ValueError(f"AdaLoRA target_r={target_r} must be between 0 and the layers' initial ranks "
                             f"(total initial rank {self.init_budget} over {len(layers)} layers)")
        self.rank_pattern: Optional[dict[str, list[bool]]] = None
        self.final_pattern_fixed = False
        self._reset_importance()

    def _reset_importance(self) -> None:
        self._smoothed: dict[str, torch.Tensor] = {}
        self._uncertainty: dict[str, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank budget at ``step``, whether ``step`` is a masking step)."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total_step - self.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining ** 3 + self.target_budget)
        return budget, step % self.deltaT == 0

    def _layers(self, model: nn.Module):
        layers = adalora_layers(model, self.adapter_name)
        ranks = {name: layer.r[self.adapter_name] for name, layer in layers}
        if ranks != self.initial_ranks:
            raise ValueError(f"RankAllocator: the model's AdaLoRA layers/ranks {ranks} are not the ones it was "
                             f"created for {self.initial_ranks}")
        return layers

    @torch.no_grad()
    def update_importance(self, model: nn.Module) -> None:
        for name, layer in self._layers(model):
            for factor in _FACTORS:
                key = f"{name}.{factor}"
                p = getattr(layer, factor)[self.adapter_name]
                if p.grad is None:
                    raise ValueError(f"RankAllocator: {key}.{self.adapter_name} has no gradient; call "
                                     "update_and_allocate after backward() and before zero_grad()")
                sensitivity = (p * p.grad).abs().float()
                if key not in self._smoothed:
                    self._smoothed[key] = torch.zeros_like(sensitivity)
                    self._uncertainty[key] = torch.zeros_like(sensitivity)
                smoothed = self.beta1 * self._smoothed[key] + (1 - self.beta1) * sensitivity
                self._smoothed[key] = smoothed
                self._uncertainty[key] = (self.beta2 * self._uncertainty[key]
                                          + (1 - self.beta2) * (sensitivity - smoothed).abs())

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{module name: fp32 [r_init]} importance of each (P column, λ, Q row) triplet."""
        if not self._smoothed:
            raise ValueError("RankAllocator: no importance scores yet (update_importance was never called, or "
                             "the allocator state was not restored on resume)")
        scores = {}
        for name in self.initial_ranks:
            s = {f: self._smoothed[f"{name}.{f}"] * self._uncertainty[f"{name}.{f}"] for f in _FACTORS}
            # Summed in PEFT's order, so equal scores rank equally in both.
            scores[name] = s["lora_E"].view(-1) + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))
        return scores

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Keep the ``budget`` highest-scoring triplets, zero λ of the rest; returns the rank pattern."""
        scores = self.triplet_scores()
        flat = torch.cat([s.cpu() for s in scores.values()])
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.argsort(flat, descending=True, stable=True)[:budget]] = True
        pattern, offset = {}, 0
        for name, score in scores.items():
            pattern[f"{name}.lora_E"] = keep[offset: offset + score.numel()].tolist()
            offset += score.numel()
        self.apply_rank_pattern(model, pattern)
        return pattern

    @torch.no_grad()
    def apply_rank_pattern(self, model: nn.Module, pattern: dict[str, list[bool]]) -> None:
        for name, layer in self._layers(model):
            lam = layer.lora_E[self.adapter_name]
            keep = torch.tensor(pattern[f"{name}.lora_E"], dtype=torch.bool, device=lam.device)
            lam.masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, model: nn.Module, global_step: int) -> int:
        """One step of AdaLoRA's schedule (PEFT's ``AdaLoraModel.update_and_allocate``); returns the
        budget now in force."""
        final_start = self.total_step - self.tfinal
        if global_step < final_start:
            self.update_importance(model)
            budget, mask_now = self.budget(global_step)
            if mask_now:
                self.rank_pattern = self.mask_to_budget(model, budget)
            return budget
        if not self.final_pattern_fixed:
            self.rank_pattern = self.mask_to_budget(model, self.target_budget)
            self.final_pattern_fixed = True
            self._reset_importance()
        else:
            self.apply_rank_pattern(model, self.rank_pattern)
        return self.target_budget

    def finish(self, model: nn.Module) -> dict[str, list[bool]]:
        """The final rank pattern, fixing it at the target budget now if training ended before the
        final phase began (``tfinal = 0``, or a run stopped early); call once training is over."""
        if not self.final_pattern_fixed:
            self.update_and_allocate(model, self.total_step)
        return self.rank_pattern

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: smoothed scores, uncertainties, the rank pattern.
        Holds only tensors, lists, bools and strings, so it loads with ``torch.load(weights_only=True)``."""
        return {"smoothed": dict(self._smoothed), "uncertainty": dict(self._uncertainty),
                "rank_pattern": self.rank_pattern, "final_pattern_fixed": self.final_pattern_fixed}

    def load_state_dict(self, state: dict) -> None:
        expected = {f"{name}.{f}" for name in self.initial_ranks for f in _FACTORS}
        for part in ("smoothed", "uncertainty"):
            keys = set(state[part])
            if keys and keys != expected:
                bad = sorted(keys ^ expected)[0]
                raise ValueError(f"RankAllocator state {part!r}: key {bad!r} does not match the model's AdaLoRA layers")
        self._smoothed = dict(state["smoothed"])
        self._uncertainty = dict(state["uncertainty"])
        self.rank_pattern = state["rank_pattern"]
        self.final_pattern_fixed = bool(state["final_pattern_fixed"])
