"""Patches that cut what the decoder layers of a Hugging Face model hold in memory per token.

    enable_tiled_mlp(model, chunk)   each layer's MLP runs over ``chunk`` tokens at a time, in the
                                     forward and in the backward (``qlora.ops.tiled_mlp``): its
                                     intermediates (3·I values per token) exist for one chunk only
    enable_compact_norms(model)      each RMSNorm keeps its input and 1/rms for the backward
                                     instead of an fp32 copy of its input
                                     (``qlora.ops.compact_norm``)

Both patch module instances (the classes, and other models, keep their forward), compute what
the unpatched modules compute, and compose with checkpointing (``qlora.ops.offload``), the fused
kernels (``qlora.model.patch``) and LoRA on the MLP projections. ``disable_activation_patches``
undoes both.
"""
import importlib
import types

from qlora.ops.compact_norm import compact_rms_norm
from qlora.ops.offload import decoder_layers
from qlora.ops.tiled_mlp import tiled
from qlora.model.patch import SUPPORTED

_ORIGINAL = "_qlora_forward_before_activation_patch"


def _patch(module, forward) -> None:
    # the forward in use now (an instance patch such as the fused SwiGLU, or the class's)
    setattr(module, _ORIGINAL, module.forward)
    module.forward = types.MethodType(forward, module)


def _tiled_mlp_forward(self, x):
    params = [p for p in self.parameters() if p.requires_grad]
    return tiled(getattr(self, _ORIGINAL), x, self.tiled_mlp_chunk, params)


def enable_tiled_mlp(model, chunk: int) -> int:
    """Run the MLP (``layer.mlp``, a ``*MLP`` module) of every decoder layer over ``chunk``
    tokens at a time. Returns the number of MLPs patched."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"tiled MLP: chunk must be a positive number of tokens, got {chunk!r}")
    mlps = [layer.mlp for layer in decoder_layers(model)
            if type(getattr(layer, "mlp", None)).__name__.endswith("MLP")]
    if not mlps:
        raise ValueError(f"tiled MLP: {type(model).__name__} has no decoder layer with a token-wise "
                         f"MLP (a layer.mlp module whose class name ends in MLP)")
    for mlp in mlps:
        mlp.tiled_mlp_chunk = chunk
        if not hasattr(mlp, _ORIGINAL):
            _patch(mlp, _tiled_mlp_forward)
    return len(mlps)


def _compact_norm_forward(self, hidden_states):
    return compact_rms_norm(hidden_states, self.weight, self.variance_epsilon)


def enable_compact_norms(model) -> int:
    """Make every RMSNorm of a Llama, Mistral or Qwen2 model save its input and 1/rms. Norms
    already patched (the fused Triton RMSNorm saves the same) are left alone. Returns the number
    of norms patched."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"compact norms: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED)})")
    module_name, prefix = SUPPORTED[model_type]
    norm_cls = getattr(importlib.import_module(module_name), f"{prefix}RMSNorm")
    count = 0
    for module in model.modules():
        if isinstance(module, norm_cls) and "forward" not in module.__dict__:
            _patch(module, _compact_norm_forward)
            count += 1
    return count


def disable_activation_patches(model) -> None:
    """Undo ``enable_tiled_mlp`` and ``enable_compact_norms``."""
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            original = getattr(module, _ORIGINAL)
            delattr(module, _ORIGINAL)
            if getattr(original, "__func__", None) is getattr(type(module), "forward", None):
                del module.forward
            else:
                module.forward = original
