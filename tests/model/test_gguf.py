"""GGUF export: read back with transformers' GGUF loader, the f16/bf16 file computes the logits of
the 16-bit merged export it came from; q8_0 stays within its rounding bound; the tokenizer and
chat template travel in the file."""
import shutil

import pytest
import torch
import transformers

from qlora.data.tokenizer import ByteTokenizer
from qlora.model.gguf import _interleave_rotary_halves, export_gguf
from qlora.model.inject import add_lora, lora_layers
from qlora.model.loading import quantize_model
from qlora.model.merging import export_merged
from qlora.train.model import builtin_model

pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'qlora[gguf]')")

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def _adapted_builtin():
    model = builtin_model(0)
    quantize_model(model)
    add_lora(model, r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The adapted built-in model merged in f16 and bf16, each with its GGUF file moved to a
    directory of its own (as a llama.cpp user has it: the file alone)."""
    root = tmp_path_factory.mktemp("gguf")
    model = _adapted_builtin()
    out = {}
    for name, dtype, types in (("f16", torch.float16, ["f16", "q8_0"]), ("bf16", torch.bfloat16, ["bf16"])):
        export_merged(model, root / name, dtype=dtype, tokenizer=ByteTokenizer().hf_tokenizer(), log=None)
        for ftype in types:
            alone = root / f"gguf-{ftype}"
            alone.mkdir()
            shutil.move(export_gguf(root / name, root / name / f"model-{ftype}.gguf", ftype), alone)
            out[ftype] = alone / f"model-{ftype}.gguf"
        out[name + "-export"] = root / name
    return out


def _gguf_model(file):
    return transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("ftype", ["f16", "bf16"])
def test_16_bit_gguf_computes_the_exports_logits(exports, ftype):
    # the same 16-bit weights (the q/k rows reordered for llama.cpp and back), upcast to fp32 on
    # both sides: the same computation, so the same logits
    merged = transformers.AutoModelForCausalLM.from_pretrained(exports[f"{ftype}-export"], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(_gguf_model(exports[ftype])(IDS).logits, merged(IDS).logits, rtol=0, atol=0)


def test_q8_0_rounds_each_weight_within_its_blocks_step(exports):
    """Q8_0: blocks of 32 along a row, d = max|w| / 127 stored in f16, q = round(w / d). So
    |q·d_f16 - w| <= d/2 + 127·|d_f16 - d| <= max|w| (1/254 + 127·2^-11 / 127) per block."""
    merged = transformers.AutoModelForCausalLM.from_pretrained(exports["f16-export"], dtype=torch.float32)
    q8 = _gguf_model(exports["q8_0"])
    theirs = dict(q8.named_parameters())
    for name, w in merged.named_parameters():
        got = theirs[name].detach()
        if w.dim() == 1:  # norms are stored f32
            assert torch.equal(got, w)
            continue
        blocks, read = w.detach().reshape(-1, 32), got.reshape(-1, 32)
        bound = blocks.abs().amax(dim=1, keepdim=True) * (1 / 254 + 2.0**-11)
        assert ((read - blocks).abs() <= bound).all(), name
        assert not torch.equal(read, blocks)


def test_gguf_carries_the_tokenizer_and_chat_template(exports):
    tok = transformers.AutoTokenizer.from_pretrained(exports["f16"].parent, gguf_file=exports["f16"].name)
    ours = ByteTokenizer()
    text = "Uppercase: añb \u2713\n"
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id) == (ours.bos_id, ours.eos_id)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.chat_generation_prompt(messages)


def test_interleave_rotary_halves_is_llama_cpps_order():
    # one head of 8 dims: HF pairs (0,4) (1,5) (2,6) (3,7); llama.cpp wants them adjacent
    w = torch.arange(8.0)[:, None]
    assert _interleave_rotary_halves(w, heads=1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    w = torch.arange(16.0)[:, None]  # two heads: each reordered alone
    assert _interleave_rotary_halves(w, heads=2).flatten().tolist() == \
        [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_qwen2_with_biases_and_chat_tokenizer(tmp_path, byte_bpe_tokenizer):
    """Qwen2 (no row reordering, q/k/v biases) with a ChatML tokenizer whose markers are special."""
    # as transformers loads it beside a qwen2 config (Qwen2Tokenizer adds <|endoftext|>)
    byte_bpe_tokenizer("chatml").save_pretrained(tmp_path / "qwen")
    transformers.Qwen2Config().save_pretrained(tmp_path / "qwen")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "qwen")
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tokenizer) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))  # 3 unused ids
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model.to(torch.float16).save_pretrained(tmp_path / "qwen")
    (tmp_path / "alone").mkdir()
    export_gguf(tmp_path / "qwen", tmp_path / "alone" / "qwen.gguf", "f16")
    loaded = _gguf_model(tmp_path / "alone" / "qwen.gguf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "alone", gguf_file="qwen.gguf")
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert tok(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_unsupported_model_or_tokenizer_is_named(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="GGUF export supports llama, mistral, qwen2 models, not 'gpt2'"):
        export_gguf(tmp_path / "gpt2", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="GGUF type 'q4_0' is not one of f16, bf16, q8_0"):
        export_gguf(tmp_path / "gpt2", tmp_path / "x.gguf", "q4_0")
