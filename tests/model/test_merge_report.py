"""merge_error: max and mean |logit difference| and KL(adapted || merged), over the real tokens."""
import pytest
import torch
import transformers

from qlora.model.merge_report import merge_error


def _model(seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)).eval()


def test_merge_error_against_a_direct_computation():
    a, b = _model(0), _model(1)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding is left out of every number
    batches = [{"input_ids": ids, "attention_mask": mask}]
    error = merge_error(a, b, batches)
    with torch.no_grad():
        la = a(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        lb = b(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    kl = torch.nn.functional.kl_div(lb.log_softmax(-1), la.log_softmax(-1), log_target=True, reduction="batchmean")
    assert error.tokens == 12 and error.batches == 1
    assert error.max_abs_logit_diff == (la - lb).abs().max().item()
    assert error.mean_abs_logit_diff == pytest.approx((la - lb).abs().mean().item(), rel=1e-6)
    assert error.mean_kl == pytest.approx(kl.item(), rel=1e-5)
    same = merge_error(a, a, batches)
    assert (same.max_abs_logit_diff, same.mean_kl) == (0.0, 0.0)
