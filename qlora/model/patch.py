"""Swap the fused kernels into Hugging Face Llama / Mistral / Qwen2 modules of one model.

    patch_model(model, rms_norm=True, swiglu=True, rope=True) -> {"rms_norm": n, "swiglu": n,
                                                                   "rope": n}
    unpatch_model(model)

What is replaced, per module instance (other models, and the classes, are left alone, so the
unpatched path stays available as the reference):

- ``<Prefix>RMSNorm.forward``  -> ``qlora.ops.fused_layers.rms_norm`` (dL/dweight only if trained)
- ``<Prefix>MLP.forward``      -> down_proj(swiglu(gate_proj(x), up_proj(x))), when the
  activation is SiLU; the projections stay whatever modules they are (NF4 + LoRA included)
- RoPE inside ``<Prefix>Attention.forward`` -> ``qlora.ops.fused_layers.rope_`` (Q and K in one
  in-place launch). The attention code calls its module's global ``apply_rotary_pos_emb``;
  that global is replaced once by a dispatcher that uses the fused kernel only while a patched
  attention module is running (a context variable set by the patched forward) and otherwise
  calls the original function.
"""
import contextvars
import functools
import importlib
import types

import torch

from qlora.ops import fused_layers

# model_type -> (modeling module, class-name prefix)
SUPPORTED = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}

_FUSED_ROPE_ACTIVE = contextvars.ContextVar("qlora_fused_rope_active", default=False)


def _fused_rms_norm_forward(self, hidden_states):
    return fused_layers.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fused_mlp_forward(self, x):
    return self.down_proj(fused_layers.swiglu(self.gate_proj(x), self.up_proj(x)))


def _rope_dispatcher(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # the kernel takes [B, H, S, D] q/k with [1|B, S, D] cos/sin: unsqueeze_dim=1's layout
        if _FUSED_ROPE_ACTIVE.get() and unsqueeze_dim == 1 and q.dim() == 4:
            return fused_layers.rope_(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.qlora_original = original
    return apply_rotary_pos_emb


def _install_rope_dispatcher(modeling):
    current = modeling.apply_rotary_pos_emb
    if not hasattr(current, "qlora_original"):
        modeling.apply_rotary_pos_emb = _rope_dispatcher(current)


def _fused_rope_attention_forward(attention):
    forward = type(attention).forward.__get__(attention)

    @functools.wraps(forward)
    def patched(*args, **kwargs):
        token = _FUSED_ROPE_ACTIVE.set(True)
        try:
            return forward(*args, **kwargs)
        finally:
            _FUSED_ROPE_ACTIVE.reset(token)

    return patched


def _is_silu(act):
    from transformers import activations

    silu_types = (torch.nn.SiLU,) + tuple(
        getattr(activations, name) for name in ("SiLUActivation",) if hasattr(activations, name))
    return isinstance(act, silu_types)


def patch_model(model, *, rms_norm=True, swiglu=True, rope=True):
    """Patch the enabled ops into ``model``'s modules; returns how many modules each op patched.

    Raises ValueError for a model type other than llama, mistral, qwen2.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"patch_model: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED)})")
    module_name, prefix = SUPPORTED[model_type]
    modeling = importlib.import_module(module_name)
    norm_cls = getattr(modeling, f"{prefix}RMSNorm")
    mlp_cls = getattr(modeling, f"{prefix}MLP")
    attention_cls = getattr(modeling, f"{prefix}Attention")
    if rope:
        _install_rope_dispatcher(modeling)

    patched = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    for module in model.modules():
        if rms_norm and isinstance(module, norm_cls):
            module.forward = types.MethodType(_fused_rms_norm_forward, module)
            patched["rms_norm"] += 1
        elif swiglu and isinstance(module, mlp_cls) and _is_silu(module.act_fn):
            module.forward = types.MethodType(_fused_mlp_forward, module)
            patched["swiglu"] += 1
        elif rope and isinstance(module, attention_cls):
            module.forward = _fused_rope_attention_forward(module)
            patched["rope"] += 1
    return patched


def unpatch_model(model):
    """Undo ``patch_model``: every patched module runs its class forward again."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        return
    module_name, prefix = SUPPORTED[model_type]
    modeling = importlib.import_module(module_name)
    classes = tuple(getattr(modeling, f"{prefix}{name}")
                    for name in ("RMSNorm", "MLP", "Attention"))
    for module in model.modules():
        if isinstance(module, classes):
            module.__dict__.pop("forward", None)
