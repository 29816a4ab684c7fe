"""The optimizer and learning-rate schedule of a run."""
from __future__ import annotations

import math

import torch

from qlora.optim import PagedAdamW, lora_plus_param_groups
from qlora.train.config import Config


def param_groups(model, cfg: Config) -> list:
    o = cfg.optim
    if o.lora_plus_ratio is not None:
        return lora_plus_param_groups(model, o.lr, o.lora_plus_ratio, o.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: check lora.target_modules")
    return [dict(params=params, lr=o.lr, weight_decay=o.weight_decay)]


def build_optimizer(model, cfg: Config, gpu_budget_bytes=None) -> torch.optim.Optimizer:
    """The configured optimizer. Trained weights stored in 16 bits (lora.dtype) get fp32 master
    weights in PagedAdamW's pages; ``gpu_budget_bytes``: the device bytes its pages may take
    (the rest spill to pinned host memory; None: all on the device)."""
    o = cfg.optim
    groups = param_groups(model, cfg)
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    sixteen_bit = any(p.dtype != torch.float32 for g in groups for p in g["params"])
    if o.name == "paged_adamw":
        return PagedAdamW(groups, **kwargs, master_weights=sixteen_bit,
                          gpu_budget_bytes=gpu_budget_bytes)
    if sixteen_bit:
        raise ValueError(f"lora.dtype {cfg.lora.dtype}: 16-bit trained weights need optim.name "
                         f"paged_adamw, which keeps their fp32 masters ({o.name} would round "
                         f"every update to 16 bits)")
    if o.name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError(f"optim.name: 'bnb_paged_adamw' needs bitsandbytes ({err})") from None
    return bnb.optim.PagedAdamW(groups, **kwargs)


def warmup_steps(cfg: Config) -> int:
    return math.ceil(cfg.optim.warmup_ratio * cfg.train.max_steps)


def lr_factor(step: int, cfg: Config) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup from
    1/(warmup+1), then constant, linear decay to 0, or cosine decay to 0."""
    warmup = warmup_steps(cfg)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.optim.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, cfg.train.max_steps - warmup)
    if cfg.optim.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
