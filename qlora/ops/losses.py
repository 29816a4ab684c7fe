"""Chunked lm_head + cross-entropy as an autograd Function, and the causal-LM loss built on it.

    loss = sum_t loss_t / n,   loss_t = cross-entropy of (W h_t) against y_t (0 where ignored)

n is the caller's number of trained tokens (``num_items_in_batch``, as Hugging Face's loss takes
it under gradient accumulation) or, when not given, the count of labels != ignore_index in this
call (the mean over trained tokens; 1 when there are none, so an all-ignored batch gives loss 0
rather than NaN). The [tokens, vocab] logits are never materialised: see
``qlora.kernels.cross_entropy``. The head gets a gradient only if ``weight.requires_grad``.
"""
import torch

from qlora.kernels.cross_entropy import default_chunk_size, linear_cross_entropy


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, ignore_index, label_smoothing, chunk_size,
                grad_enabled):
        # needs_input_grad reflects requires_grad even under torch.no_grad(): grad_enabled (the
        # caller's grad mode) keeps evaluation from paying for gradients it will never use.
        loss_rows, d_hidden, d_weight = linear_cross_entropy(
            hidden, weight, labels, scale, ignore_index=ignore_index,
            label_smoothing=label_smoothing, chunk_size=chunk_size,
            grad_hidden=grad_enabled and ctx.needs_input_grad[0],
            grad_weight=grad_enabled and ctx.needs_input_grad[1])
        ctx.d_weight_dtype = weight.dtype
        ctx.save_for_backward(d_hidden, d_weight)
        return loss_rows.sum() * scale[0]

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight = ctx.saved_tensors
        grad_hidden = d_hidden * grad_loss if d_hidden is not None else None
        grad_weight = (d_weight * grad_loss).to(ctx.d_weight_dtype) if d_weight is not None \
            else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_cross_entropy(hidden, lm_head_weight, labels, *, num_items_in_batch=None,
                          ignore_index=-100, label_smoothing=0.0, chunk_size=None):
    """Cross-entropy of the logits hidden @ lm_head_weight.T against labels, chunked over tokens.

    hidden: [..., H]; lm_head_weight: [V, H] (same dtype); labels: int [...] aligned with hidden
    (labels[t] is the target of hidden[t]; no shift here). num_items_in_batch: int or tensor, the
    divisor of the summed loss (None: the number of labels != ignore_index). chunk_size: tokens
    per chunk (None: ~256 MiB of logits per chunk). Returns the fp32 scalar loss.
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
                                             torch.is_grad_enabled())


def causal_lm_loss(hidden, lm_head_weight, labels, *, num_items_in_batch=None, ignore_index=-100,
                   label_smoothing=0.0, chunk_size=None):
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
                                 label_smoothing=label_smoothing, chunk_size=chunk_size)


def causal_lm_forward_loss(model, input_ids, labels, *, attention_mask=None, position_ids=None,
                           num_items_in_batch=None, ignore_index=-100, label_smoothing=0.0,
                           chunk_size=None):
    """model(input_ids, labels=labels).loss for a Hugging Face causal LM, without the logits.

    Runs the decoder (``model.get_decoder()``) for the final hidden states, then
    ``causal_lm_loss`` against the output embedding's weight (``model.get_output_embeddings()``,
    which must be a bias-free linear head with a plain weight tensor).
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
                          label_smoothing=label_smoothing, chunk_size=chunk_size)
