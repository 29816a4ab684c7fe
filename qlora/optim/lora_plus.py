"""LoRA+ parameter groups (Hayou et al., LoRA+: Efficient Low Rank Adaptation of Large Models,
2024): the B matrices learn ``ratio`` times faster than the A matrices, lr_B = ratio * lr_A."""
import torch


def lora_plus_param_groups(model: torch.nn.Module, lr: float, ratio: float = 16.0,
                           weight_decay: float = 0.0) -> list:
    """Optimizer param groups for the trainable parameters of ``model``.

    Parameters whose name has a ``lora_B`` component (PEFT naming, e.g.
    ``...q_proj.lora_B.default.weight``) get ``lr * ratio``; every other trainable parameter
    (``lora_A``, biases, ...) gets ``lr``. Empty groups are left out.
    """
    if ratio <= 0:
        raise ValueError(f"lora_plus_param_groups: ratio must be > 0, got {ratio}")
    lora_b, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (lora_b if "lora_B" in name.split(".") else rest).append(param)
    groups = [dict(params=rest, lr=lr, weight_decay=weight_decay),
              dict(params=lora_b, lr=lr * ratio, weight_decay=weight_decay)]
    return [g for g in groups if g["params"]]
