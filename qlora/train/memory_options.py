"""A run's memory options applied to its model: ``lora.dtype``, ``model.tiled_mlp``,
``model.tiled_qkv``, ``model.compact_norms``, ``model.embedding_on_host``.

Each may be "auto": ``qlora train`` decides it from the memory plan (``qlora.memory.plan``)
before the run starts and writes the decision into the config. A config that still says
"auto" here (``qlora.train.train`` called directly) runs with the option off.
"""
from __future__ import annotations

import torch

from qlora.train.config import AUTO, Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolved(value, off):
    return off if value == AUTO else value


def lora_dtype(cfg: Config) -> torch.dtype:
    dtype = DTYPES[resolved(cfg.lora.dtype, "float32")]
    if dtype != torch.float32 and cfg.lora.type == "adalora":
        # AdaLoRA masks its singular values in place after each step; the optimizer's masters
        # would put them back
        raise ValueError(f"lora.dtype {cfg.lora.dtype}: lora.type adalora trains in float32")
    return dtype


def memory_options(cfg: Config) -> dict:
    """The keyword arguments of ``apply_memory_options`` for the run ``cfg`` describes."""
    return dict(lora_dtype=lora_dtype(cfg),
                embedding_on_host=resolved(cfg.model.embedding_on_host, False),
                tiled_mlp=resolved(cfg.model.tiled_mlp, 0),
                tiled_qkv=resolved(cfg.model.tiled_qkv, 0),
                compact_norms=resolved(cfg.model.compact_norms, False))


def apply_memory_options(model, *, lora_dtype: torch.dtype, embedding_on_host: bool,
                         tiled_mlp: int, tiled_qkv: int, compact_norms: bool) -> list[str]:
    """Apply the options to ``model`` (adapters added, on its device): trained weights cast to
    ``lora_dtype`` (their fp32 masters live in the optimizer), the embedding table to host
    memory, the tiled MLP (``tiled_mlp`` tokens per chunk, 0: off), the tiled input norm +
    q/k/v + RoPE (``tiled_qkv`` likewise), the compact norms (but the input norms a tiled
    q/k/v runs: they exist for one chunk at a time). Returns what was done, one line each, for
    the run's log."""
    from qlora.model.activation_memory import (enable_compact_norms, enable_tiled_mlp,
                                               enable_tiled_qkv)
    from qlora.model.host_embedding import move_embedding_to_host

    done = []
    if lora_dtype != torch.float32:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(lora_dtype)
        done.append(f"trained weights in {lora_dtype}, fp32 masters in the optimizer")
    if embedding_on_host:
        moved = move_embedding_to_host(model)
        done.append(f"input embedding in host memory ({moved / 1e9:.3f} GB)")
    if tiled_mlp:
        done.append(f"tiled MLP, {tiled_mlp} tokens per chunk "
                    f"({enable_tiled_mlp(model, tiled_mlp)} layers)")
    if tiled_qkv:
        done.append(f"tiled input norm + q/k/v + RoPE, {tiled_qkv} tokens per chunk "
                    f"({enable_tiled_qkv(model, tiled_qkv)} layers)")
    if compact_norms:
        done.append(f"compact RMSNorms ({enable_compact_norms(model)})")
    return done
