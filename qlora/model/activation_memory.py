"""Patches that cut what the decoder layers of a Hugging Face model hold in memory per token.

    enable_tiled_mlp(model, chunk)   each layer's MLP runs over ``chunk`` tokens at a time, in the
                                     forward and in the backward (``qlora.ops.tiled``): its
                                     intermediates (3·I values per token) exist for one chunk only
    enable_tiled_qkv(model, chunk)   each layer's input norm, q/k/v projections and RoPE run over
                                     ``chunk`` tokens at a time (``qlora.ops.tiled``): the
                                     normalized input (which LoRA on q/k/v would keep) and the
                                     unrotated q and k exist for one chunk only; the attention
                                     keeps the layer input and its rotated q, k and v
    enable_compact_norms(model)      each RMSNorm keeps its input and 1/rms for the backward
                                     instead of an fp32 copy of its input
                                     (``qlora.ops.compact_norm``)

All patch module instances (the classes, and other models, keep their forward), compute what
the unpatched modules compute, and compose with checkpointing (``qlora.ops.offload``), the fused
kernels (``qlora.model.patch``, applied first: the patches here wrap what they find) and LoRA on
the projections. ``disable_activation_patches`` undoes them.
"""
import functools
import importlib
import sys
import types

from qlora.ops.compact_norm import compact_rms_norm
from qlora.ops.offload import decoder_layers
from qlora.ops.tiled import tiled
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


def _pass_through(self, hidden_states):
    # enable_tiled_qkv: the layer's input norm runs inside its attention, chunk by chunk
    return hidden_states


def _sliding_window(attention) -> dict:
    """The window argument the unpatched attention forward gives the attention function: Qwen2
    its module's, Mistral its config's, Llama none."""
    if hasattr(attention, "sliding_window"):
        return {"sliding_window": attention.sliding_window}
    if type(attention).__name__ == "MistralAttention":
        return {"sliding_window": getattr(attention.config, "sliding_window", None)}
    return {}


def _normed_qkv(attention, normalize, rotate, x, cos, sin):
    """q and k rotated, and v, of tokens x [c, H] (cos, sin: [c, head_dim]), each [c, heads·d]."""
    c, d = x.shape[0], attention.head_dim
    normed = normalize(x)
    q = attention.q_proj(normed).view(c, -1, d)
    k = attention.k_proj(normed).view(c, -1, d)
    # [c, heads, d] by [c, d]: unsqueeze_dim=1 spreads each token's cos and sin over its heads,
    # and the rotated q and k come out in the [c, heads·d] rows the caller writes
    q, k = rotate(q, k, cos, sin, unsqueeze_dim=1)
    return q.reshape(c, -1), k.reshape(c, -1), attention.v_proj(normed)


def _tiled_qkv_forward(norm):
    """The attention forward of a layer whose input norm ``norm`` passes its input through:
    norm, projections and RoPE tiled, then what the unpatched forward does."""
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        normalize = getattr(norm, _ORIGINAL)
        if cache is not None:  # generation writes whole projections into its KV cache
            return getattr(self, _ORIGINAL)(normalize(hidden_states),
                                            position_embeddings=position_embeddings,
                                            attention_mask=attention_mask, cache=cache, **kwargs)
        modeling = sys.modules[type(self).__module__]
        cos, sin = position_embeddings
        params = [p for module in (norm, self.q_proj, self.k_proj, self.v_proj)
                  for p in module.parameters() if p.requires_grad]
        qkv = tiled(functools.partial(_normed_qkv, self, normalize, modeling.apply_rotary_pos_emb),
                    hidden_states, self.tiled_qkv_chunk, params, per_token=(cos, sin))
        tokens = hidden_states.shape[:-1]
        q, k, v = (t.view(*tokens, -1, self.head_dim).transpose(1, 2) for t in qkv)
        attention = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling.eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **_sliding_window(self), **kwargs)
        return self.o_proj(out.reshape(*tokens, -1).contiguous()), weights

    return forward


def _supported_modeling(model, what: str):
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"{what}: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED)})")
    module_name, prefix = SUPPORTED[model_type]
    return importlib.import_module(module_name), prefix


def enable_tiled_qkv(model, chunk: int) -> int:
    """Run the input norm, q/k/v projections and RoPE of every decoder layer of a Llama, Mistral
    or Qwen2 model over ``chunk`` tokens at a time, inside the attention (the layer's
    ``input_layernorm`` then passes its input through). Returns the number of layers patched."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"tiled q/k/v: chunk must be a positive number of tokens, got {chunk!r}")
    modeling, prefix = _supported_modeling(model, "tiled q/k/v")
    attention_cls = getattr(modeling, f"{prefix}Attention")
    layers = [layer for layer in decoder_layers(model)
              if isinstance(getattr(layer, "self_attn", None), attention_cls)]
    for layer in layers:
        attention, norm = layer.self_attn, layer.input_layernorm
        attention.tiled_qkv_chunk = chunk
        if not hasattr(attention, _ORIGINAL):
            _patch(norm, _pass_through)
            _patch(attention, _tiled_qkv_forward(norm))
    return len(layers)


def _compact_norm_forward(self, hidden_states):
    return compact_rms_norm(hidden_states, self.weight, self.variance_epsilon)


def enable_compact_norms(model) -> int:
    """Make every RMSNorm of a Llama, Mistral or Qwen2 model save its input and 1/rms. Norms
    already patched (the fused Triton RMSNorm saves the same; an input norm that a tiled q/k/v
    runs chunk by chunk) are left alone. Returns the number of norms patched."""
    modeling, prefix = _supported_modeling(model, "compact norms")
    norm_cls = getattr(modeling, f"{prefix}RMSNorm")
    count = 0
    for module in model.modules():
        if isinstance(module, norm_cls) and "forward" not in module.__dict__:
            _patch(module, _compact_norm_forward)
            count += 1
    return count


def disable_activation_patches(model) -> None:
    """Undo ``enable_tiled_mlp``, ``enable_tiled_qkv`` and ``enable_compact_norms``."""
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            original = getattr(module, _ORIGINAL)
            delattr(module, _ORIGINAL)
            if getattr(original, "__func__", None) is getattr(type(module), "forward", None):
                del module.forward
            else:
                module.forward = original
