"""The model and tokenizer a run trains: the built-in tiny Llama or a Hugging Face checkpoint
(a directory, or a hub id found in the local cache), NF4-quantized and with LoRA adapters added
(``qlora.load_model`` / ``quantize_model`` / ``add_lora``)."""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

from qlora.data.tokenizer import ByteTokenizer, HFTokenizer
from qlora.model.hf_config import TRUST_HOW, check_causal_lm, check_remote_code, read_config_json
from qlora.train.config import BUILTIN_MODEL, Config
from qlora.util.hub import cache_dir, local_snapshot

BUILTIN_CONFIG_FILE = "tiny-llama-bytes.json"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The configured compute dtype on CUDA; float32 on CPU (no fast 16-bit matmuls there)."""
    return _DTYPES[cfg.quant.compute_dtype] if device.type == "cuda" else torch.float32


def resolve_model(name_or_path) -> str:
    """``model.name_or_path`` as a local directory (or the built-in model): a hub id is looked up
    in the local Hugging Face cache and never downloaded."""
    if name_or_path is None:
        raise ValueError("model.name_or_path: not set; name a Hugging Face checkpoint directory or "
                         "a model in the local Hugging Face cache, or run `qlora train` with no "
                         "arguments for the built-in run")
    if name_or_path == BUILTIN_MODEL or os.path.isdir(name_or_path):
        return name_or_path
    snapshot = local_snapshot(name_or_path, "model")
    if snapshot is None:
        raise ValueError(f"model.name_or_path: {name_or_path!r} is not a directory, nor a model in "
                         f"the local Hugging Face cache ({cache_dir()}); qlora never downloads: "
                         f"fetch it first, e.g. `huggingface-cli download {name_or_path}`")
    return str(snapshot)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The built-in byte tokenizer, or the checkpoint's (its shipped code only if trusted)."""
    path = resolve_model(name_or_path)
    if path == BUILTIN_MODEL:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))
    except ValueError as err:
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise ValueError(f"{name_or_path}: the tokenizer is implemented by Python code shipped "
                         f"in that directory; qlora never runs such code unless asked: {TRUST_HOW} "
                         f"if you trust it") from None


def checked_model_path(cfg: Config) -> str:
    """``model.name_or_path`` resolved (:func:`resolve_model`) and its config.json checked: a
    causal LM, its shipped code only with ``model.trust_remote_code``. Reads no weights, so a
    run refuses a wrong model in seconds."""
    path = resolve_model(cfg.model.name_or_path)
    if path != BUILTIN_MODEL:
        config = read_config_json(Path(path))
        check_remote_code(Path(path), config, cfg.model.trust_remote_code)
        check_causal_lm(Path(path), config)
    return path


def builtin_model(init_seed: int, dtype: torch.dtype = torch.float32):
    """The shipped tiny byte-level Llama with weights drawn from ``init_seed`` (the global RNG
    is left as it was). Its ``initializer_range`` is 0.1 rather than transformers' 0.02: with
    the smaller weights the frozen random base passes too little signal for LoRA alone to learn
    the shipped tasks in minutes (held-out loss after 80 steps: 3.2 at 0.1, 4.5 at 0.02)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    text = resources.files("qlora.train").joinpath(BUILTIN_CONFIG_FILE).read_text(encoding="utf-8")
    config = LlamaConfig(**json.loads(text))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def base_model(cfg: Config, device: torch.device):
    """The frozen base model on ``device``: NF4 linear layers when ``quant.enabled``. A checkpoint
    directory must hold a causal LM (checked from its config.json before anything is read), its
    shipped code runs only with ``model.trust_remote_code`` (qlora.model.hf_config), and one whose
    logits are not what the loss computes (a final-logit transform qlora does not know) is refused
    right after loading."""
    from qlora.model.loading import load_model, quantize_model
    from qlora.ops.losses import check_final_logits

    dtype = compute_dtype(cfg, device)
    q = cfg.quant
    trust = cfg.model.trust_remote_code
    path = checked_model_path(cfg)
    if path == BUILTIN_MODEL:
        model = builtin_model(cfg.model.init_seed, dtype)
        if q.enabled:
            quantize_model(model, blocksize=q.blocksize, double_quant=q.double_quant)
        model.to(device)
    elif q.enabled:
        model = load_model(path, compute_dtype=dtype, device=device,
                           blocksize=q.blocksize, double_quant=q.double_quant,
                           trust_remote_code=trust)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     trust_remote_code=trust).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    check_final_logits(model, torch.arange(min(16, model.config.get_text_config().vocab_size), device=device)[None])
    return model


def add_adapters(model, cfg: Config) -> None:
    """The new adapter ``cfg.lora`` describes: LoRA, DoRA (``add_lora(use_dora=True)``) or
    AdaLoRA at rank ``init_r`` (``add_adalora``; its ranks are pruned by the loop's allocator)."""
    from qlora.model.inject import add_adalora, add_lora

    lora = cfg.lora
    if lora.type == "adalora":
        if lora.modules_to_save:
            raise ValueError("lora.modules_to_save: not supported with lora.type: adalora")
        if lora.target_r > lora.init_r:
            raise ValueError(f"lora.target_r: must be <= lora.init_r ({lora.init_r}) for "
                             f"adalora, got {lora.target_r}")
        if lora.tinit >= cfg.train.max_steps - lora.tfinal:
            raise ValueError(f"lora.tinit ({lora.tinit}) + lora.tfinal ({lora.tfinal}) leave no "
                             f"steps of train.max_steps ({cfg.train.max_steps}) to prune ranks in")
        add_adalora(model, init_r=lora.init_r, alpha=lora.alpha, dropout=lora.dropout,
                    target_modules=lora.target_modules)
    else:
        add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                 target_modules=lora.target_modules, use_rslora=lora.use_rslora,
                 use_dora=lora.type == "dora", modules_to_save=lora.modules_to_save)


def build_model(cfg: Config, device: torch.device, adapter_dir=None):
    """The model with trainable adapters: new ones (:func:`add_adapters`), or the PEFT-format
    LoRA/DoRA one in ``adapter_dir`` (``load_adapter``, to resume a run)."""
    from qlora.model.adapters import load_adapter

    model = base_model(cfg, device)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir, trainable=True)
    else:
        # A fixed seed for the adapter init, so a repeated run starts from the same A matrices.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            add_adapters(model, cfg)
    model.to(device)
    return model
