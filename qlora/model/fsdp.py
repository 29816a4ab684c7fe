"""Preparing a quantized model for FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 shards only registered parameters; :func:`make_nf4_shardable` registers every NF4 base weight
as an :class:`~qlora.nn.nf4_param.NF4Param` (sharded by output rows, gathered as raw bytes) after
checking that it splits into ``world_size`` equal row shards, so that a model that cannot be sharded
fails here, naming the layer, rather than inside a collective.
"""
from __future__ import annotations

from torch import nn

from qlora.nn.linear4bit import Linear4bit
from qlora.nn.nf4_param import NF4Param, shard_rows_check


def make_nf4_shardable(model: nn.Module, world_size: int) -> None:
    """Register each :class:`Linear4bit` weight as a frozen :class:`NF4Param` parameter."""
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            try:
                shard_rows_check(module.nf4, world_size)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
            module.register_weight_parameter()


def nf4_bytes_held(model: nn.Module) -> int:
    """Bytes of NF4 base weights this process holds: its local shards under FSDP2, else all of them."""
    total = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            weight = module.weight
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            total += (local.nf4 if isinstance(local, NF4Param) else local).nbytes()
    return total
