"""The NF4 weight as a ``torch.Tensor`` parameter that FSDP2's ``fully_shard`` shards by output rows.

An :class:`~qlora.quant.nf4.NF4Tensor` [N, K] is a plain object, so FSDP2 would leave it whole on
every rank. :class:`NF4Param` wraps it in a tensor of the logical shape [N, K] and dtype (no storage
of its own) so that it can be a module parameter, and implements

* the few aten ops ``fully_shard`` applies to a parameter while sharding it (``split`` along dim 0,
  ``new_zeros``, ``slice``, ``copy_``, ``view``, ``as_strided``, ``detach``, a device move);
* FSDP2's all-gather extension: ``fsdp_pre_all_gather`` hands over this rank's rows as raw bytes —
  the packed codes, the absmax codes and the double-quant ``nested_absmax`` (fp32 viewed as uint8,
  never converted) — and ``fsdp_post_all_gather`` rebuilds the NF4 weight from the gathered bytes.

Row slicing is exact because a row of K weights is K/2 packed bytes, K/blocksize absmax codes and
K/(blocksize·256) nested scales, provided the counts are whole: K must be a multiple of the
blocksize, and a shard's rows·K a multiple of blocksize·256 (the double-quant group). The quant maps
and the double-quant offset are per-weight constants; every shard keeps them (1,092 bytes).
The gathered weight is therefore bit-identical to the unsharded one, and the kernels take it as is.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from qlora.quant.nf4 import NF4Tensor

aten = torch.ops.aten


def _row_layout(nf4: NF4Tensor, rows: int) -> tuple[int, int, int]:
    """(packed bytes, absmax codes, nested scales) held by ``rows`` rows of ``nf4``; raises if a count
    is not whole, naming the shape and blocksize."""
    k = nf4.shape[1]
    if k % nf4.blocksize:
        raise ValueError(f"cannot shard an NF4 weight of shape {tuple(nf4.shape)} by rows: in_features {k} "
                         f"is not a multiple of the blocksize {nf4.blocksize}")
    blocks = rows * k // nf4.blocksize
    nested = 0
    if nf4.double_quant:
        if blocks % nf4.nested_blocksize:
            raise ValueError(f"cannot shard an NF4 weight of shape {tuple(nf4.shape)} into {rows}-row shards: a "
                             f"shard holds {blocks} absmax blocks, not a multiple of the double-quant group "
                             f"{nf4.nested_blocksize}")
        nested = blocks // nf4.nested_blocksize
    return rows * k // 2, blocks, nested


def shard_rows_check(nf4: NF4Tensor, world_size: int) -> None:
    """Raise unless ``nf4`` splits into ``world_size`` equal row shards of whole blocks (FSDP2 pads an
    uneven last shard, which the byte layout cannot represent)."""
    if nf4.shape[0] % world_size:
        raise ValueError(f"cannot shard an NF4 weight of shape {tuple(nf4.shape)} over {world_size} processes: "
                         f"out_features {nf4.shape[0]} is not a multiple of {world_size}")
    _row_layout(nf4, nf4.shape[0] // world_size)


def _rows(nf4: NF4Tensor, start: int, stop: int) -> NF4Tensor:
    """Rows [start, stop) of ``nf4`` as views of its tensors (the constants are shared)."""
    p0, b0, n0 = _row_layout(nf4, start)
    p1, b1, n1 = _row_layout(nf4, stop)
    return replace(
        nf4, packed=nf4.packed.view(-1)[p0:p1].view(-1, 1), shape=torch.Size((stop - start, nf4.shape[1])),
        absmax=nf4.absmax[b0:b1], nested_absmax=nf4.nested_absmax[n0:n1] if nf4.double_quant else None,
    )


def _byte_fields(nf4: NF4Tensor) -> list[torch.Tensor]:
    """The tensors that are sliced by rows, each as a 1-D uint8 view of its bytes."""
    fields = [nf4.packed.view(-1), nf4.absmax.view(-1).view(torch.uint8)]
    if nf4.double_quant:
        fields.append(nf4.nested_absmax.view(-1).view(torch.uint8))
    return fields


class NF4Param(torch.Tensor):
    """A frozen NF4 weight [N, K] as a tensor: ``.nf4`` is the :class:`NF4Tensor` it stands for.

    Only the ops that FSDP2 and ``nn.Module`` bookkeeping need are implemented; anything else (math
    on the weight itself) raises, because the layer computes with ``.nf4`` through the kernels.
    """

    nf4: NF4Tensor

    @staticmethod
    def __new__(cls, nf4: NF4Tensor):
        if len(nf4.shape) != 2:
            raise ValueError(f"NF4Param needs a 2-D NF4 weight, got shape {tuple(nf4.shape)}")
        return torch.Tensor._make_wrapper_subclass(cls, nf4.shape, dtype=nf4.dtype, device=nf4.device,
                                                   requires_grad=False)

    def __init__(self, nf4: NF4Tensor):
        self.nf4 = nf4

    def __repr__(self) -> str:
        return f"NF4Param(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.nf4.blocksize})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _OPS.get(func)
        if handler is None:
            raise NotImplementedError(f"NF4Param does not implement {func}; compute with the layer's NF4 weight")
        return handler(*args, **kwargs)

    # --- FSDP2 all-gather extension -------------------------------------------------------------

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """This rank's rows as 1-D uint8 views of each field's bytes, and what rebuilding needs."""
        return tuple(_byte_fields(self.nf4)), self.nf4

    def fsdp_post_all_gather(self, all_gather_outputs, metadata: NF4Tensor, param_dtype, *, out=None):
        """Rebuild the full NF4 weight from the gathered bytes (views of FSDP's buffers, no copy)."""
        packed, absmax = all_gather_outputs[0], all_gather_outputs[1]
        k = metadata.shape[1]
        gathered = replace(
            metadata, packed=packed.view(-1, 1), shape=torch.Size((2 * packed.numel() // k, k)), dtype=param_dtype,
            absmax=absmax.view(metadata.absmax.dtype),
            nested_absmax=all_gather_outputs[2].view(torch.float32).view(-1) if metadata.double_quant else None,
        )
        if out is not None:
            # FSDP re-gathers into the same buffers after freeing them; `out` already views them.
            for have, new in zip(_byte_fields(out.nf4), all_gather_outputs):
                if have.data_ptr() != new.data_ptr():
                    have.copy_(new)
            return None
        return NF4Param(gathered), tuple(all_gather_outputs)


def _split(param: NF4Param, split_size: int, dim: int = 0):
    if dim != 0:
        raise NotImplementedError(f"NF4Param splits only along the output dimension 0, not dim {dim}")
    n = param.shape[0]
    return [NF4Param(_rows(param.nf4, start, min(start + split_size, n))) for start in range(0, n, split_size)]


def _new_zeros(param: NF4Param, size, **kwargs):
    rows = size[0]
    if len(size) != 2 or size[1] != param.shape[1]:
        raise NotImplementedError(f"NF4Param.new_zeros({list(size)}) from shape {tuple(param.shape)}: only whole rows")
    nf4 = param.nf4
    p, b, n = _row_layout(nf4, rows)
    return NF4Param(replace(
        nf4, packed=nf4.packed.new_zeros(p, 1), shape=torch.Size((rows, nf4.shape[1])), absmax=nf4.absmax.new_zeros(b),
        nested_absmax=nf4.nested_absmax.new_zeros(n) if nf4.double_quant else None,
    ))


def _slice(param: NF4Param, dim: int = 0, start=None, end=None, step: int = 1):
    n = param.shape[0]
    start = 0 if start is None else start
    end = n if end is None else min(end, n)
    if dim != 0 or step != 1:
        raise NotImplementedError(f"NF4Param slices only whole rows (dim 0, step 1), got dim={dim} step={step}")
    return NF4Param(_rows(param.nf4, start, end))


def _copy(dst: NF4Param, src, non_blocking: bool = False):
    if not isinstance(src, NF4Param) or tuple(src.shape) != tuple(dst.shape) or src.nf4.blocksize != dst.nf4.blocksize:
        raise NotImplementedError("NF4Param.copy_ needs an NF4Param of the same shape and blocksize")
    for have, new in zip(_byte_fields(dst.nf4), _byte_fields(src.nf4)):
        have.copy_(new)
    return dst


def _view(param: NF4Param, size):
    if tuple(size) in ((-1,), (param.numel(),)):
        # FSDP keeps a 1-D alias of the sharded parameter; it only ever reads it back through the
        # extension, so the alias is the same weight.
        return NF4Param(param.nf4)
    if tuple(size) == tuple(param.shape):
        return NF4Param(param.nf4)
    raise NotImplementedError(f"NF4Param.view({list(size)}) from shape {tuple(param.shape)}")


def _as_strided(param: NF4Param, size, stride, storage_offset=0):
    if tuple(size) != tuple(param.shape) or storage_offset:
        raise NotImplementedError(f"NF4Param.as_strided({list(size)}) from shape {tuple(param.shape)}")
    return NF4Param(param.nf4)


def _to_copy(param: NF4Param, *, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None):
    # A dtype change (model.to(bf16)) leaves the codes and fp32 scales alone, as Linear4bit does.
    return NF4Param(param.nf4.to(device) if device is not None else param.nf4)


_OPS = {
    aten.detach.default: lambda param: NF4Param(param.nf4),
    aten.alias.default: lambda param: NF4Param(param.nf4),
    aten.split.Tensor: _split,
    aten.new_zeros.default: _new_zeros,
    aten.slice.Tensor: _slice,
    aten.copy_.default: _copy,
    aten.view.default: _view,
    aten.as_strided.default: _as_strided,
    aten._to_copy.default: _to_copy,
    aten.is_pinned.default: lambda param, device=None: param.nf4.packed.is_pinned(),
}
