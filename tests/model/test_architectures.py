"""Every supported causal-LM architecture, end to end on a tiny random checkpoint: load_model, logits
against transformers + bitsandbytes on the same NF4 bytes, our loss against the model's own
``model(input_ids, labels=...)``, three training steps, and the adapter through PEFT.

The README's list of supported architectures is this file's ARCHITECTURES. Everything runs in fp32
on the CPU, so the references can be exact: both stacks compute with identical NF4 weights
(bitsandbytes' layers are given our packed codes and quant state; where bitsandbytes has no NF4
form, the fused MoE experts, its model gets our dequantized experts as dense weights), and differ
only in the order of fp32 operations.
"""
import copy

import pytest
import torch

from qlora import add_lora, load_model, save_adapter
from qlora.model.inject import trainable_parameters
from qlora.nn import Linear4bit
from qlora.nn.experts import ExpertLinears4bit
from qlora.ops.losses import LogitTransform, causal_lm_forward_loss, final_logit_transform
from qlora.train.loop import LossModule

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

# Widths are multiples of 64 (the blocksize): bitsandbytes 0.50.2's CPU dequantize_4bit is wrong
# otherwise (see tests/conftest.py). Two layers, four heads, vocabulary 192.
BASE = dict(vocab_size=192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
MOE = dict(num_experts_per_tok=2)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    # final_logit_softcapping well below the logits' size, so that a loss without it is far off
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=16,
                                                         final_logit_softcapping=0.5)),
    "gemma3-text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_key_value_heads=2, head_dim=16,
                                                                  final_logit_softcapping=0.5)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0)),  # fused qkv/gate_up
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_positions=64, n_embd=64, n_layer=2, n_head=4)),  # Conv1D
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict()),  # Pythia: embed_out is lm_head
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(num_key_value_heads=2, logit_scale=8.0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(num_key_value_heads=2, logits_scaling=0.125)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=4, **MOE)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_key_value_heads=2, head_dim=16, num_experts=4,
                                                                moe_intermediate_size=64, **MOE)),
}


def _config(name):
    config_cls, _, extra = ARCHITECTURES[name]
    base = {} if name == "gpt2" else BASE
    if name == "gpt2":
        extra = dict(extra, vocab_size=BASE["vocab_size"], bos_token_id=0, eos_token_id=0)
    return getattr(transformers, config_cls)(**base, **extra)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    """(architecture, path of a bf16 checkpoint saved by transformers from random weights)."""
    name = request.param
    torch.manual_seed(0)
    model = getattr(transformers, ARCHITECTURES[name][1])(_config(name))
    with torch.no_grad():  # larger logits than the default init, so final-logit transforms matter
        model.get_output_embeddings().weight.mul_(25)
    path = tmp_path_factory.mktemp(name)
    model.to(torch.bfloat16).save_pretrained(path)
    return name, path


def _bnb_stack(path, ours):
    """transformers + bitsandbytes (NF4, double quant, fp32 compute) on the checkpoint, each
    bitsandbytes layer then given our NF4 bytes and quant state; fused MoE experts, which
    bitsandbytes keeps dense, get our dequantized experts."""
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    replaced = 0
    experts = [n for n, m in ours.named_modules() if isinstance(m, ExpertLinears4bit)]
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, ExpertLinears4bit):
                owner, _, param = name.rpartition(".")
                w = module.dequantized(torch.float32)
                getattr(model.get_submodule(owner), param).copy_(w.transpose(1, 2) if module.transposed else w)
                replaced += 1
            elif isinstance(module, Linear4bit) and not any(name.startswith(e + ".") for e in experts):
                target = model.get_submodule(name)
                assert isinstance(target, bnb.nn.Linear4bit), name  # bitsandbytes quantized it too
                packed, state = copy.deepcopy(module.weight).to_bnb()
                target.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True)
                # In eval mode on a CPU with AVX512-BF16, bitsandbytes repacks the weight with its
                # scales rounded to bf16 for a faster kernel; off, so it computes the NF4 weight exactly.
                target.support_avx512bf16_for_cpu = False
                replaced += 1
    assert replaced > 0
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _assert_same_computation(ours, theirs, what):
    """fp32 on both sides with the same weights: they differ only in summation order (dot products
    of at most 192 terms, a few layers), a few fp32 roundings (u = 6e-8) per term, so 1e-4 of the
    largest value bounds it with margin; a wrong weight, transform or routing is O(1)."""
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * theirs.abs().max().item(), f"{what}: max difference {err:.3g}"


def test_load_logits_loss_training_and_peft_adapter(checkpoint, tmp_path):
    name, path = checkpoint
    moe = "mixtral" in name or "moe" in name
    ours = load_model(path, compute_dtype=torch.float32)
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) >= 4 * BASE["num_hidden_layers"]
    if moe:
        assert sum(isinstance(m, ExpertLinears4bit) for m in ours.modules()) == 2 * BASE["num_hidden_layers"]
    theirs = _bnb_stack(path, ours)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=g)
    _assert_same_computation(_logits(ours, ids), _logits(theirs, ids), f"{name} logits vs transformers + bitsandbytes")

    # our loss, both paths (materialized logits on the torch backend, the chunked Triton kernel),
    # against the model's own forward
    labels = ids.clone()
    labels[:, :3] = -100  # an untrained prompt
    with torch.no_grad():
        own = ours(input_ids=ids, labels=labels).loss
        shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        looped = LossModule(ours)(ids, shifted, (shifted != -100).sum())
        chunked = causal_lm_forward_loss(ours, ids, labels)
    # fp32 cross-entropy of the same logits: 1e-5 relative covers the reordered sums (as in
    # tests/kernels/test_cross_entropy.py)
    torch.testing.assert_close(looped, own, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, own, rtol=1e-5, atol=1e-5)
    if final_logit_transform(ours.config) != LogitTransform():
        # the comparison can fail: without the model's transform the loss is far off
        with torch.no_grad():
            hidden = ours.get_decoder()(input_ids=ids).last_hidden_state
            untransformed = (hidden @ ours.get_output_embeddings().weight.t())[:, :-1]
            plain = torch.nn.functional.cross_entropy(untransformed.flatten(0, 1), labels[:, 1:].flatten())
        assert abs(plain.item() - own.item()) > 0.1 * own.item()

    # three training steps move the adapter and lower the loss on the batch
    add_lora(ours, r=4, alpha=8, target_modules="all-linear")
    kinds = {kind for kind, _, _ in trainable_parameters(ours).rows}
    if moe:  # the experts are adapted; the router (mlp.gate) is not, unless asked for by name
        assert "gate_up_proj" in kinds and "down_proj" in kinds and "gate" not in kinds
    params = [p for p in ours.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    loss_module = LossModule(ours.train())
    losses = []
    for _ in range(3):
        loss = loss_module(ids, shifted, (shifted != -100).sum())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        after = loss_module(ids, shifted, (shifted != -100).sum()).item()
    assert after < losses[0], (losses, after)
    ours.eval()

    # the trained adapter, saved in PEFT's format, loads into PEFT on the transformers +
    # bitsandbytes model and computes what ours does
    save_adapter(ours, tmp_path / "adapter")
    with_peft = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    _assert_same_computation(_logits(ours, ids), _logits(with_peft, ids), f"{name} logits with the adapter vs PEFT")
