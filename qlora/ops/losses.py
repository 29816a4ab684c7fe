"""Chunked lm_head + cross-entropy as an autograd Function, and the causal-LM loss built on it.

    loss = sum_t loss_t / n,   loss_t = cross-entropy of f(W h_t) against y_t (0 where ignored)

f is the model's final-logit transform (:class:`LogitTransform`: Gemma's soft-capping, Cohere's
and Granite's logit scaling; the identity for most models), so the loss is the one the model's
own forward computes. n is the caller's number of trained tokens (``num_items_in_batch``, as
Hugging Face's loss takes it under gradient accumulation) or, when not given, the count of labels
!= ignore_index in this call (the mean over trained tokens; 1 when there are none, so an
all-ignored batch gives loss 0 rather than NaN). The [tokens, vocab] logits are never
materialised: see ``qlora.kernels.cross_entropy``. The head gets a gradient only if
``weight.requires_grad``.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from qlora.kernels.cross_entropy import default_chunk_size, linear_cross_entropy
from qlora.ops.backend import get_backend


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to its head's output u before the loss:

        z = softcap·tanh(scale·u / softcap)     (z = scale·u when softcap is None)
    """

    scale: float = 1.0
    softcap: Optional[float] = None

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        z = u * self.scale if self.scale != 1.0 else u
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)


# The final-logit transforms of transformers' (5.x) causal LMs, read from their forward methods:
# soft caps by the config key that holds them (Gemma-2/3/3n/4, VaultGemma, Mistral-Large-4,
# nanochat: final_logit_softcapping; RecurrentGemma: logits_soft_cap), scales by model_type prefix:
# (config key, whether the logits are multiplied (True) or divided by it).
_SOFTCAP_KEYS = ("final_logit_softcapping", "logits_soft_cap")
_SCALE_KEYS = {
    "cohere": ("logit_scale", True),        # Cohere, Cohere2, Cohere2-MoE: logits * logit_scale
    "granite": ("logits_scaling", False),   # Granite, GraniteMoE(-Shared/-Hybrid): logits / logits_scaling
    "hyperclovax": ("logits_scaling", True),  # HyperCLOVA X: logits * logits_scaling
    "falcon_h1": ("lm_head_multiplier", True),
    "muse": ("output_multiplier", True),    # MuseSpark / MuseGlimmer, before their soft cap
}


def final_logit_transform(config) -> LogitTransform:
    """The :class:`LogitTransform` of a model with this transformers ``config`` (its text config,
    for a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = next((getattr(text, k) for k in _SOFTCAP_KEYS if getattr(text, k, None) is not None), None)
    scale = 1.0
    model_type = getattr(text, "model_type", "") or ""
    for prefix, (key, multiply) in _SCALE_KEYS.items():
        if model_type.startswith(prefix) and getattr(text, key, None) is not None:
            scale = float(getattr(text, key)) if multiply else 1.0 / float(getattr(text, key))
    return LogitTransform(scale, None if softcap is None else float(softcap))


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, ignore_index, label_smoothing, chunk_size,
                grad_enabled, transform):
        # needs_input_grad reflects requires_grad even under torch.no_grad(): grad_enabled (the
        # caller's grad mode) keeps evaluation from paying for gradients it will never use.
        loss_rows, d_hidden, d_weight = linear_cross_entropy(
            hidden, weight, labels, scale, ignore_index=ignore_index,
            label_smoothing=label_smoothing, chunk_size=chunk_size,
            grad_hidden=grad_enabled and ctx.needs_input_grad[0],
            grad_weight=grad_enabled and ctx.needs_input_grad[1],
            logit_scale=transform.scale, softcap=transform.softcap)
        ctx.d_weight_dtype = weight.dtype
        ctx.save_for_backward(d_hidden, d_weight)
        return loss_rows.sum() * scale[0]

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight = ctx.saved_tensors
        grad_hidden = d_hidden * grad_loss if d_hidden is not None else None
        grad_weight = (d_weight * grad_loss).to(ctx.d_weight_dtype) if d_weight is not None \
            else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def chunked_cross_entropy(hidden, lm_head_weight, labels, *, num_items_in_batch=None,
                          ignore_index=-100, label_smoothing=0.0, chunk_size=None,
                          transform=LogitTransform()):
    """Cross-entropy of the logits transform(hidden @ lm_head_weight.T) against labels, chunked
    over tokens.

    hidden: [..., H]; lm_head_weight: [V, H] (same dtype); labels: int [...] aligned with hidden
    (labels[t] is the target of hidden[t]; no shift here). num_items_in_batch: int or tensor, the
    divisor of the summed loss (None: the number of labels != ignore_index). chunk_size: tokens
    per chunk (None: ~256 MiB of logits per chunk). transform: the model's final-logit transform
    (:func:`final_logit_transform`). Returns the fp32 scalar loss.
    """
    H = hidden.shape[-1]
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"chunked_cross_entropy: labels {tuple(labels.shape)} must match hidden "
                         f"{tuple(hidden.shape)} without its last dim")
    hidden2 = hidden.reshape(-1, H)
    labels1 = labels.reshape(-1).long()
    if num_items_in_batch is None:
        count = (labels1 != ignore_index).sum().clamp_min(1)
    else:
        count = torch.as_tensor(num_items_in_batch, device=hidden.device)
    scale = (1.0 / count.to(device=hidden.device, dtype=torch.float32)).reshape(1)
    if chunk_size is None:
        chunk_size = default_chunk_size(lm_head_weight.shape[0], hidden.dtype)
    return ChunkedCrossEntropyFunction.apply(hidden2, lm_head_weight, labels1, scale,
                                             ignore_index, label_smoothing, chunk_size,
                                             torch.is_grad_enabled(), transform)


def head_loss(hidden, lm_head_weight, labels, num_items, *, transform=LogitTransform(),
              ignore_index=-100):
    """sum_t cross-entropy(transform(hidden_t @ lm_head_weight.T), labels_t) / num_items, labels
    already aligned with hidden. On the Triton and CUDA backends it is
    :func:`chunked_cross_entropy` (the logits never exist whole); on the PyTorch reference backend
    the [tokens, vocab] logits are materialized in fp32, which is what that backend is for (CPU and
    small models)."""
    if get_backend(hidden.device) in ("triton", "cuda"):
        return chunked_cross_entropy(hidden, lm_head_weight, labels, num_items_in_batch=num_items,
                                     ignore_index=ignore_index, transform=transform)
    logits = transform((hidden @ lm_head_weight.t()).float())
    summed = torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(),
                                               ignore_index=ignore_index, reduction="sum")
    return summed / num_items


def causal_lm_loss(hidden, lm_head_weight, labels, *, num_items_in_batch=None, ignore_index=-100,
                   label_smoothing=0.0, chunk_size=None, transform=LogitTransform()):
    """Next-token loss, Hugging Face's convention: hidden[b, s] predicts labels[b, s + 1].

    hidden: [B, S, H]; labels: [B, S] (the input ids with untrained positions set to
    ignore_index); the last position of each row has no target.
    """
    if labels.dim() != 2 or hidden.dim() != 3:
        raise ValueError(f"causal_lm_loss: expected hidden [B, S, H] and labels [B, S], got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    return chunked_cross_entropy(hidden, lm_head_weight, shifted,
                                 num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, chunk_size=chunk_size,
                                 transform=transform)


def causal_lm_forward_loss(model, input_ids, labels, *, attention_mask=None, position_ids=None,
                           num_items_in_batch=None, ignore_index=-100, label_smoothing=0.0,
                           chunk_size=None):
    """model(input_ids, labels=labels).loss for a Hugging Face causal LM, without the logits.

    Runs the decoder (``model.get_decoder()``) for the final hidden states, then
    ``causal_lm_loss`` against the output embedding's weight (``model.get_output_embeddings()``,
    which must be a bias-free linear head with a plain weight tensor) with the model's
    :func:`final_logit_transform`.
    """
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
            or getattr(head, "bias", None) is not None:
        raise ValueError(f"causal_lm_forward_loss: the output embedding {type(head).__name__} "
                         f"must be a bias-free linear head with a 2-D weight tensor")
    outputs = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False)
    return causal_lm_loss(outputs.last_hidden_state, weight, labels,
                          num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, chunk_size=chunk_size,
                          transform=final_logit_transform(model.config))


@torch.no_grad()
def check_final_logits(model, input_ids) -> None:
    """Refuse a model whose logits are not ``final_logit_transform(config)`` of its head applied to
    its decoder's output (a transform this module does not know would make every loss here differ
    from the model's own): one forward of ``input_ids`` [B, S] both ways. Tolerance: the two
    logits are the same products rounded to the compute dtype (unit roundoff u) once or twice and
    transformed in fp32 or in that dtype, so they agree to 8u·max|z|, far below any transform's
    effect (Gemma-2's cap moves logits of 90 to 29, Cohere's scale multiplies them by 1/16)."""
    was_training = model.training
    model.eval()  # no dropout: both passes must compute the same thing
    try:
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        ours = final_logit_transform(model.config)(model.get_output_embeddings()(hidden).float())
        theirs = model(input_ids=input_ids, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    u = torch.finfo(hidden.dtype).eps / 2
    worst = (ours - theirs).abs().max().item()
    if ours.shape != theirs.shape or worst > 8 * u * theirs.abs().max().item():
        raise ValueError(f"{type(model).__name__}: its logits are not those of its head with the final-logit "
                         f"transform qlora knows for it ({final_logit_transform(model.config)}): max difference "
                         f"{worst:.3g}, so the loss would not be the model's own; this architecture is not supported")
