import os
import socket

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The variable is read when a kernel
# is defined, so it must be set before any test module imports qlora.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _bnb_lookup_dequantize(packed, state):
    """fp32 dequantization of bitsandbytes' NF4 data by explicit table lookup.

    A reference independent of qlora.quant.nf4 and of bitsandbytes' CPU dequantize_4bit, which (0.50.2)
    returns wrong values when the blocksize is not 64 or does not divide the last dimension: e.g.
    shape (33, 96) at blocksize 64 differs from the lookup by up to 1.12 on N(0, 1) data.
    """
    from bitsandbytes import functional as bnbF

    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()[: state.shape.numel()]
    absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    scale = absmax.float().repeat_interleave(state.blocksize)[: codes.numel()]
    return (state.code[codes] * scale).view(state.shape)


@pytest.fixture
def bnb_lookup_dequantize():
    return _bnb_lookup_dequantize


def _bnb_nf4_weight(n, k, dtype, device, generator):
    """A random [n, k] weight quantized by bitsandbytes (NF4, double quant, blocksize 64), as
    (qlora NF4Tensor over bnb's tensors, its exact dequantization in ``dtype``)."""
    from bitsandbytes import functional as bnbF

    from qlora.quant.nf4 import NF4Tensor

    w = (torch.randn(n, k, generator=generator) / k**0.5).to(dtype).to(device)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return NF4Tensor.from_bnb(packed, state), _bnb_lookup_dequantize(packed, state).to(dtype)


@pytest.fixture
def bnb_nf4_weight():
    return _bnb_nf4_weight


U_BF16 = 2.0**-8  # bf16 unit roundoff


def _assert_close_as_torch(ours, theirs, exact, name):
    """Ours within 2x PyTorch's bf16 error against fp32, plus one bf16 ulp (2u = 2^-7
    relative) of the largest value: we round once at the store, where PyTorch may happen to be
    exact; on a GPU that rounding is to nearest (half an ulp), under TRITON_INTERPRET=1 the
    fp32 -> bf16 cast truncates (up to a full ulp)."""
    err_ours = (ours.float() - exact).abs().max().item()
    err_torch = (theirs.float() - exact).abs().max().item()
    bound = 2 * err_torch + 2 * U_BF16 * exact.abs().max().item()
    assert err_ours <= bound, f"{name}: {err_ours:.3g} > {bound:.3g} (torch {err_torch:.3g})"


@pytest.fixture
def assert_close_as_torch():
    return _assert_close_as_torch


# Chat templates as Hugging Face tokenizers ship them: ChatML (Qwen and others) adds the assistant
# header as its generation prompt; the Llama-2 one renders BOS and EOS itself.
CHAT_TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "llama-2": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}"
                "{% endfor %}"),
}


def _byte_bpe_tokenizer(chat_template: str):
    """A real Hugging Face fast tokenizer, built offline: byte-level BPE with no merges (one token
    per byte), BOS/EOS and the ChatML markers as special tokens, and the chat template named
    ``chat_template`` (a key of CHAT_TEMPLATES)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=CHAT_TEMPLATES[chat_template])


@pytest.fixture
def byte_bpe_tokenizer():
    return _byte_bpe_tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """A function returning a TCP port nobody listens on now (for a launcher's rendezvous)."""
    return _free_port


def _tiny_mixtral_checkpoint(path, vocab_size: int):
    """A random fp32 Mixtral (two layers, four experts, top 2; widths multiples of 64) saved by
    transformers at ``path`` (seeded: the same weights every call). Returns ``path``."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2)
    transformers.MixtralForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def tiny_mixtral_checkpoint():
    return _tiny_mixtral_checkpoint


# A model directory with its own Python code (config.json auto_map), for the trust_remote_code tests
REMOTE_CONFIGURATION = """
import pathlib
pathlib.Path({marker!r}).write_text("the model directory's code ran")
from transformers import LlamaConfig


class XConfig(LlamaConfig):
    model_type = "x_llama"
"""
REMOTE_MODELING = """
from transformers import LlamaForCausalLM
from .configuration_x import XConfig


class XForCausalLM(LlamaForCausalLM):
    config_class = XConfig
"""


def _remote_code_checkpoint(path, marker, model_type="x_llama", vocab_size=64):
    """A tiny Llama saved as Hugging Face does, whose config.json names classes in Python files
    shipped beside it (``auto_map``); importing them writes ``marker``."""
    import json

    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    (path / "configuration_x.py").write_text(REMOTE_CONFIGURATION.format(marker=str(marker)))
    (path / "modeling_x.py").write_text(REMOTE_MODELING)
    data = json.loads((path / "config.json").read_text())
    data.update(model_type=model_type, architectures=["XForCausalLM"],
                auto_map={"AutoConfig": "configuration_x.XConfig",
                          "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (path / "config.json").write_text(json.dumps(data))
    return path


@pytest.fixture
def remote_code_checkpoint():
    return _remote_code_checkpoint


@pytest.fixture
def no_prompt(monkeypatch):
    """transformers asks "Do you wish to run the custom code? [y/N]" through input(); answer
    yes, as a pipe would, and record that it was asked."""
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    return asked


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies trusted code into HF_MODULES_CACHE and imports it from there as the
    package ``transformers_modules``. Each test gets its own cache and a fresh import of that
    package: one imported by an earlier test in the process would point into that test's cache,
    where this test's code is not."""
    import sys

    import transformers.dynamic_module_utils as dynamic

    def imported():
        return [name for name in sys.modules if name.split(".")[0] == "transformers_modules"]

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in imported():
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    yield tmp_path / "modules"
    for name in imported():
        del sys.modules[name]  # this test's, before the earlier ones come back
