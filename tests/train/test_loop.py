"""The training loop: token-normalized accumulation, the non-finite guard, lr schedules."""
import math
import re
import warnings

import pytest
import torch

from qlora.cli.train import resolve_config
from qlora.train.config import BUILTIN_RUN
from qlora.data.batching import epoch_batches
from qlora.data.formats import IGNORE_INDEX
from qlora.train.loop import NonFiniteLossError, Trainer
from qlora.train.optimizer import lr_factor


def _cfg(tmp_path, *overrides):
    return resolve_config(BUILTIN_RUN, [f"train.output_dir={tmp_path}", "logging.progress_bar=false",
                                 "logging.sample_max_new_tokens=2", "train.max_steps=4",
                                 "logging.exact_match_examples=4",
                                 *overrides])


def _one_step_grads(trainer):
    """(loss, gradients) of one train_step; the optimizer step is replaced by a capture."""
    grads = []
    trainer.optimizer.step = lambda: grads.append([p.grad.clone() for p in trainer.params])
    with warnings.catch_warnings():
        # the scheduler notices that optimizer.step is no longer the one it wrapped
        warnings.filterwarnings("ignore", message=re.escape("Seems like `optimizer.step()` has been"))
        record = trainer.train_step()
    return record, grads[0]


def test_accumulating_4x1_equals_one_batch_of_4(tmp_path):
    common = ["lora.dropout=0", "data.group_by_length=false", "train.max_grad_norm=0"]
    acc = Trainer(_cfg(tmp_path / "a", "train.micro_batch_size=1",
                       "train.gradient_accumulation_steps=4", *common))
    # the four sequences have different numbers of trained tokens, so averaging per
    # micro-batch (the known accumulation bug) would weight them differently
    first = epoch_batches([len(r) for r in acc.data.train], 4, acc.cfg.train.seed, 0, False)[0]
    assert len({sum(t != IGNORE_INDEX for t in acc.data.train[i].labels) for i in first}) > 1
    big = Trainer(_cfg(tmp_path / "b", "train.micro_batch_size=4",
                       "train.gradient_accumulation_steps=1", *common))
    rec_acc, grads_acc = _one_step_grads(acc)
    rec_big, grads_big = _one_step_grads(big)
    assert rec_acc["trained_tokens"] == rec_big["trained_tokens"]
    # fp32 sums of the same terms in a different order (padding, batch split): ~1e-7 relative
    assert rec_acc["loss"] == pytest.approx(rec_big["loss"], rel=1e-5)
    for a, b in zip(grads_acc, grads_big, strict=True):
        # an entry is a sum over ~10^3 token terms, each at most about the tensor's largest
        # entry, so reordering it moves it by up to ~10^3 * 6e-8 (fp32 eps) of that: where terms
        # cancel, the small result is off by that absolute amount, not by a relative one. Per-
        # micro-batch averaging would change entries by tens of percent of the largest one.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    assert any(g.abs().max() > 0 for g in grads_big)


def test_non_finite_step_is_skipped_then_aborts(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "train.max_bad_steps=2", "optim.name=adamw"))
    forward = trainer.loss_module.forward
    trainer.loss_module.forward = lambda *a, **k: forward(*a, **k) * math.nan
    before = [p.detach().clone() for p in trainer.params]
    record = trainer.train_step()
    assert record["skipped"] and trainer.state.bad_steps_in_a_row == 1
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))
    trainer.loss_module.forward = forward
    assert not trainer.train_step()["skipped"] and trainer.state.bad_steps_in_a_row == 0
    assert not all(torch.equal(a, p) for a, p in zip(before, trainer.params))
    trainer.loss_module.forward = lambda *a, **k: forward(*a, **k) * math.inf
    with pytest.raises(NonFiniteLossError, match="2 non-finite steps in a row"):
        trainer.run()


def test_lr_schedules(tmp_path):
    cfg = _cfg(tmp_path, "train.max_steps=100", "optim.warmup_ratio=0.1")
    assert [lr_factor(s, cfg) for s in (0, 4, 9)] == pytest.approx([1 / 11, 5 / 11, 10 / 11])
    assert lr_factor(10, cfg) == lr_factor(99, cfg) == 1.0
    cfg.optim.schedule = "linear"
    assert [lr_factor(s, cfg) for s in (10, 55, 100)] == pytest.approx([1.0, 0.5, 0.0])
    cfg.optim.schedule = "cosine"
    assert [lr_factor(s, cfg) for s in (10, 55, 100)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)


def test_packed_step_with_gradient_checkpointing_matches_plain(tmp_path):
    """Packing goes through the loop (positions restart, labels stay per example) and
    recomputing each decoder layer in backward gives the gradients of storing activations."""
    common = ["data.packing=true", "data.max_seq_len=256", "lora.dropout=0",
              "train.micro_batch_size=2"]
    plain = Trainer(_cfg(tmp_path / "a", *common))
    ckpt = Trainer(_cfg(tmp_path / "b", *common, "model.gradient_checkpointing=true"))
    assert len(plain.data.train) < plain.data.stats.records / 3  # rows hold several examples
    rec_plain, grads_plain = _one_step_grads(plain)
    rec_ckpt, grads_ckpt = _one_step_grads(ckpt)
    assert rec_plain["loss"] == rec_ckpt["loss"]  # the forward is the same computation
    for a, b in zip(grads_plain, grads_ckpt, strict=True):
        # the recomputed forward is bitwise the same; backward may sum in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_optimizer_choices_and_lora_plus(tmp_path):
    from qlora.optim import PagedAdamW

    trainer = Trainer(_cfg(tmp_path, "optim.lora_plus_ratio=16", "optim.warmup_ratio=0"))
    assert isinstance(trainer.optimizer, PagedAdamW)
    lrs = sorted(g["lr"] for g in trainer.optimizer.param_groups)
    assert lrs == pytest.approx([1e-3, 16 * 1e-3])
    trainer.train_step()
    assert sorted(trainer.scheduler.get_last_lr()) == pytest.approx([1e-3, 16 * 1e-3])
    adamw = Trainer(_cfg(tmp_path / "b", "optim.name=adamw")).optimizer
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["betas"] == (0.9, 0.999)


class _ScriptedModel(torch.nn.Module):
    """Answers each prompt with a fixed continuation (through ``generate``, as the loop calls it)."""

    def __init__(self, replies):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.replies = replies

    def generate(self, ids, max_new_tokens, **_):
        reply = self.replies[tuple(ids[0].tolist())][:max_new_tokens]
        return torch.tensor([ids[0].tolist() + reply])


def test_exact_match_needs_the_whole_answer_and_its_end():
    from qlora.data.formats import Example
    from qlora.data.tokenizer import ByteTokenizer
    from qlora.train.loop import exact_match

    tok = ByteTokenizer()

    def example(prompt, answer):  # labels shifted as qlora.data.formats makes them
        ids = [tok.bos_id, *prompt, *answer]
        labels = [IGNORE_INDEX] * len(prompt) + [*answer, tok.eos_id]
        return Example(ids, labels, 1 + len(prompt), len(answer) + 1)

    examples = [example(b"A", b"xy"), example(b"B", b"xy"), example(b"C", b"xy"), example(b"D", b"xy")]
    model = _ScriptedModel({(tok.bos_id, *b"A"): [*b"xy", tok.eos_id],   # right
                            (tok.bos_id, *b"B"): [*b"xyz", tok.eos_id],  # runs on
                            (tok.bos_id, *b"C"): [*b"x", tok.eos_id],    # stops early
                            (tok.bos_id, *b"D"): [*b"xy", tok.eos_id]})  # right
    assert exact_match(model, tok, examples) == 2


def test_fused_kernels_switch_patches_the_model_or_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_BACKEND", "torch")
    with pytest.raises(ValueError, match="model.fused_kernels: true needs the triton or cuda backend"):
        Trainer(_cfg(tmp_path / "torch", "model.fused_kernels=true"))
    # The kernels' numerics are tested in tests/model/test_patch.py; here, that the switch reaches them.
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    trainer = Trainer(_cfg(tmp_path / "triton", "model.fused_kernels=true", "model.tiled_mlp=8",
                           "model.tiled_qkv=8"))
    layers = trainer.model.config.num_hidden_layers
    assert trainer.patched == {"rms_norm": 2 * layers + 1, "swiglu": layers, "rope": layers}
    # the memory options wrap the fused forwards rather than being replaced by them
    from qlora.model.activation_memory import _ORIGINAL

    for layer in trainer.model.model.layers:
        assert getattr(layer.mlp, _ORIGINAL).__name__ == "_fused_mlp_forward"
        assert getattr(layer.input_layernorm, _ORIGINAL).__name__ == "_fused_rms_norm_forward"
        assert layer.mlp.forward.__name__ == "_tiled_mlp_forward"
        assert layer.self_attn.forward.__name__ == "forward" and layer.self_attn.tiled_qkv_chunk == 8


def test_the_memory_plan_places_the_optimizer_pages_as_estimated(tmp_path):
    """`qlora train` hands the plan to the run: the optimizer gets the plan's device budget and
    puts as many pages in host memory as the estimate did, and the run trains with the "auto"
    options the plan turned on (a budget nothing fits: the host embedding among them) and the
    16-bit adapters the config asks for, their fp32 masters in the pages."""
    from qlora.memory.plan import plan_for_run
    from qlora.model.host_embedding import HostEmbedding
    from qlora.optim import PagedAdamW

    cfg = _cfg(tmp_path, "train.gpu_memory_gb=0.001", "lora.dtype=bfloat16")
    plan = plan_for_run(cfg)
    assert plan.choices["model.embedding_on_host"] is True and cfg.model.embedding_on_host is True
    trainer = Trainer(cfg, plan=plan)
    assert isinstance(trainer.model.get_input_embeddings(), HostEmbedding)
    assert isinstance(trainer.optimizer, PagedAdamW) and trainer.optimizer.master_weights
    assert trainer.optimizer.gpu_budget_bytes == plan.optimizer_budget_bytes is not None
    trainer.train_step()
    report = trainer.optimizer.memory_report()
    host = plan.estimate.bytes_of("optimizer states (host)")
    assert report["page_bytes"] * report["pages_on_host"] == host > 0
    assert all(p.dtype == torch.bfloat16 for p in trainer.params)
