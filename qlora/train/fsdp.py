"""FSDP2 for a run started by ``accelerate launch`` with an FSDP config (``fsdp_version: 2``).

The run shards the model itself, the same way on CPU (gloo) and GPU (NCCL): every NF4 base weight
becomes a row-sharded :class:`~qlora.nn.nf4_param.NF4Param` (``make_nf4_shardable``), each decoder
layer is one ``fully_shard`` unit and the root model another; the LoRA parameters and the dense
layers (embeddings, norms, ``lm_head``) shard as ordinary tensors. accelerate itself never wraps
the model (its FSDP2 path would set the 4-bit weights aside, unsharded, and does not run on CPU).
A launch that asks for FSDP in a way this cannot honour raises here; it never falls back to DDP.

Checkpoints hold the full (gathered) adapter and optimizer state, so a resumed run reshards them.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from qlora.model.fsdp import make_nf4_shardable, nf4_bytes_held
from qlora.nn.linear4bit import Linear4bit
from qlora.train.config import Config

_MIB = 2**20
# The name under which the sharded model carries the training loss as an FSDP forward method: the
# loss reads the embeddings and lm_head, which belong to the root unit, without calling forward().
FSDP_LOSS_METHOD = "qlora_token_loss"


@dataclass
class FSDPSettings:
    reshard_after_forward: bool


def fsdp_requested() -> bool:
    """Whether the launch asked for FSDP (``accelerate launch --use_fsdp`` or a config with
    ``distributed_type: FSDP`` sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_settings(cfg: Config, world_size: int, decoder_layer: str) -> FSDPSettings:
    """The FSDP2 settings of accelerate's plugin, or a ValueError naming what cannot be honoured."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    errors = []
    if plugin.fsdp_version != 2:
        errors.append(f"fsdp_version: {plugin.fsdp_version}; only 2 can shard the NF4 base (FSDP1 flattens "
                      "parameters into one float buffer, which NF4 bytes cannot join)")
    if world_size < 2:
        errors.append(f"{world_size} process: FSDP needs at least 2 (accelerate launch --num_processes 2)")
    policy = (plugin.auto_wrap_policy or "TRANSFORMER_BASED_WRAP")
    policy = policy if isinstance(policy, str) else getattr(policy, "__name__", str(policy))
    if policy.upper() not in ("TRANSFORMER_BASED_WRAP", "TRANSFORMER_AUTO_WRAP_POLICY"):
        errors.append(f"fsdp_auto_wrap_policy: {policy}; qlora shards per decoder layer: use TRANSFORMER_BASED_WRAP")
    names = plugin.transformer_cls_names_to_wrap or []
    names = [names] if isinstance(names, str) else list(names)
    if names and names != [decoder_layer]:
        errors.append(f"fsdp_transformer_layer_cls_to_wrap: {names}; this model's decoder layer is {decoder_layer}")
    if type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy":  # FSDP2's plugin holds a policy object
        errors.append("fsdp_offload_params: true is not supported with the NF4 base")
    if plugin.activation_checkpointing:
        errors.append("fsdp_activation_checkpointing: use the run's model.gradient_checkpointing instead")
    if cfg.lora.type != "lora":
        errors.append(f"lora.type: {cfg.lora.type}; FSDP supports lora only")
    if cfg.optim.name != "adamw":
        errors.append(f"optim.name: {cfg.optim.name}; FSDP needs adamw (the paged optimizers keep state for a "
                      "whole tensor, not a shard)")
    if errors:
        raise ValueError("cannot run FSDP as requested: " + "; ".join(errors))
    return FSDPSettings(reshard_after_forward=bool(plugin.reshard_after_forward))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def shard_model(model: nn.Module, world_size: int, settings: FSDPSettings, loss) -> None:
    """Shard ``model`` in place with ``fully_shard``: one unit per decoder layer, then the root; and
    attach ``loss`` (a function of the batch) as the forward method ``FSDP_LOSS_METHOD``."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    make_nf4_shardable(model, world_size)
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(model, reshard_after_forward=settings.reshard_after_forward)
    setattr(model, FSDP_LOSS_METHOD, loss)
    register_fsdp_forward_method(model, FSDP_LOSS_METHOD)


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def held_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters this process holds (its shards once sharded): the NF4 base, the other
    frozen parameters, and the trainable ones."""
    frozen = trainable = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, Linear4bit) and name == "weight":
                continue
            if p.requires_grad:
                trainable += _local_bytes(p)
            else:
                frozen += _local_bytes(p)
    return dict(nf4_base=nf4_bytes_held(model), other_frozen=frozen, trainable=trainable)


def memory_plan_lines(before: dict[str, int], after: list[dict[str, int]], layer_bytes: int) -> list[str]:
    """What each rank holds of the model, from ``held_bytes`` before sharding and on each rank after."""
    lines = [f"FSDP2 over {len(after)} processes, one unit per decoder layer; parameters per rank (MiB, measured):"]
    for rank, held in enumerate(after):
        parts = ", ".join(f"{key.replace('_', ' ')} {held[key] / _MIB:.2f} of {before[key] / _MIB:.2f}"
                          for key in before)
        lines.append(f"  rank {rank}: {parts}")
    lines.append(f"  while a decoder layer runs it is gathered whole: {layer_bytes / _MIB:.2f} MiB, twice that "
                 "with the next layer prefetched; AdamW state: 2 x trainable")
    return lines


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every parameter whole on every process (a collective: all processes enter), e.g. to save."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer state dict with every tensor whole, on process 0 (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """Inverse of :func:`full_optimizer_state`: each process keeps its shard of ``state``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
