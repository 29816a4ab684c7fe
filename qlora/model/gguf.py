"""A merged export as one GGUF file, for llama.cpp and Ollama (needs the ``gguf`` package).

Reads the 16-bit Hugging Face checkpoint ``export_merged`` wrote (config.json, safetensors,
tokenizer; all weights are held in memory while the file is written) and writes the weights under llama.cpp's tensor names with the metadata it reads:
architecture hyperparameters, and the tokenizer as a byte-level BPE vocabulary ("gpt2": tokens,
merges, token types, special token ids, chat template).

Supported: Llama-family models (``llama``, ``mistral``: llama.cpp's ``llama`` architecture) and
``qwen2``, with byte-level BPE tokenizers (Llama 3, Mistral Nemo, Qwen2, the built-in one).
Types: f16 and bf16 store every matrix in that type; q8_0 stores each matrix in blocks of 32
int8 values with one f16 scale (a matrix whose rows are not a multiple of 32 stays f16). Norm
weights and biases stay f32, as llama.cpp's own converter keeps them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

GGUF_TYPES = ("f16", "bf16", "q8_0")
# Hugging Face model_type -> llama.cpp architecture, and whether q_proj/k_proj rows are reordered
# for llama.cpp's rotary embedding (see _interleave_rotary_halves)
_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3  # llama.cpp's token types


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return {"f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16,
            "q8_0": GGMLQuantizationType.Q8_0}[name]


def _file_type(name: str):
    from gguf import LlamaFileType

    return {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0}[name]


def _interleave_rotary_halves(w: "torch.Tensor", heads: int) -> "torch.Tensor":
    """q_proj / k_proj rows of each head reordered from Hugging Face's rotary layout (the first
    half of the head's dimensions rotate with the second half: pairs (i, i + d/2)) to llama.cpp's
    (adjacent pairs (2i, 2i + 1)). [heads * d, in] -> the same shape."""
    out_features = w.shape[0]
    half = out_features // heads // 2
    # [heads, 2 (which half), d/2 (pair index), in] -> [heads, d/2, 2, in]: the two members of
    # each pair side by side
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(out_features, *w.shape[1:])


def _tensor_data(w: "torch.Tensor", ftype: str):
    """(numpy data, GGML type) of one tensor as stored: vectors f32, matrices in ``ftype``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    values = w.float().numpy()
    if values.ndim < 2:
        return values, GGMLQuantizationType.F32
    if ftype == "q8_0" and values.shape[-1] % 32:
        ftype = "f16"
    qtype = _qtype(ftype)
    return quantize(values, qtype), qtype


def _read_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no safetensors weights (export_merged writes them)")
    weights = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def _byte_level_vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of a byte-level BPE fast tokenizer, ``vocab_size`` tokens (the
    model's embedding rows; ids the tokenizer does not use are named ``[PAD<id>]``, as llama.cpp
    does); ValueError for another kind of tokenizer or one larger than the model's vocabulary."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    pre = json.dumps(state.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen2, ...); this one "
                         f"is {model.get('type')} with pre-tokenizer {pre[:80]}: convert the merged "
                         f"export with llama.cpp's convert_hf_to_gguf.py instead")
    vocab = dict(model["vocab"])
    special = set()
    for added in state.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = max(vocab.values()) + 1
    if size > vocab_size:
        raise ValueError(f"the tokenizer has ids up to {size - 1}, beyond the model's vocab_size {vocab_size}")
    size = vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    types = [_TOKEN_CONTROL if i in special else _TOKEN_NORMAL for i in range(size)]
    return tokens, merges, types


def export_gguf(export_dir: Union[str, Path], out_file: Union[str, Path], ftype: str = "f16") -> Path:
    """Write the merged Hugging Face export in ``export_dir`` as the GGUF file ``out_file``
    (``ftype``: one of :data:`GGUF_TYPES`). Returns the file's path."""
    from gguf import GGUFWriter, get_tensor_name_map, MODEL_ARCH_NAMES
    from transformers import AutoTokenizer

    if ftype not in GGUF_TYPES:
        raise ValueError(f"GGUF type {ftype!r} is not one of {', '.join(GGUF_TYPES)}")
    path = Path(export_dir)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise ValueError(f"{path}: an NF4 export; GGUF is written from the 16-bit one (export without --nf4)")
    model_type = config.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"{path}: GGUF export supports {', '.join(_ARCHITECTURES)} models, not {model_type!r}")
    arch, interleave = _ARCHITECTURES[model_type]
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens, merges, token_types = _byte_level_vocabulary(tokenizer, config["vocab_size"])

    out = Path(out_file)
    tmp = out.with_name(f".{out.name}.tmp")  # renamed into place once complete
    writer = GGUFWriter(str(tmp), arch)
    writer.add_name(path.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(_file_type(ftype))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if merges:
        writer.add_token_merges(merges)
    else:
        # a vocabulary of single bytes has no merges, and an empty array cannot be written:
        # transformers then rebuilds the (empty) merges from scores; llama.cpp wants merges, so
        # such a file (the built-in tiny model's) is for transformers' GGUF loader only
        writer.add_token_scores([0.0] * len(tokens))
    for name, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, name)
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    names = get_tensor_name_map(next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch), layers)
    for key, w in _read_weights(path).items():
        module, _, suffix = key.rpartition(".")
        gguf_name = names.get_name(module)
        if gguf_name is None:
            raise ValueError(f"{path}: tensor {key} has no GGUF name for the {arch} architecture")
        if interleave and module.endswith(("q_proj", "k_proj")) and suffix == "weight":
            w = _interleave_rotary_halves(w, heads if module.endswith("q_proj") else kv_heads)
        data, qtype = _tensor_data(w, ftype)
        writer.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out
