"""`qlora export`: a run's adapter merged into its base model and written as a checkpoint that
serves on its own (tokenizer, chat template and generation config beside the weights), in 16 bits
or NF4, optionally also as GGUF; with the merge's error measured on the training data."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from qlora.data.batching import collate
from qlora.train.config import Config
from qlora.train.dataset import build_data, locate_data
from qlora.train.model import base_model, checked_model_path, compute_dtype, load_tokenizer, \
    resolve_model

EXPORT_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def _report_batches(cfg: Config, tokenizer, n_batches: int) -> list[dict]:
    """The first ``n_batches`` micro-batches of the training data, in file order."""
    data = build_data(cfg, tokenizer, locate_data(cfg))
    size = cfg.train.micro_batch_size
    rows = data.train[:n_batches * size]
    return [collate(rows[i:i + size], tokenizer.pad_id, packed=False) for i in range(0, len(rows), size)]


def _reload(cfg: Config, out: Path, dtype: torch.dtype, nf4: bool, device: torch.device):
    """The export as a user loads it: transformers for 16 bits, qlora for NF4 (transformers +
    bitsandbytes on CPU compute NF4 layers less exactly than bitsandbytes' own format holds)."""
    if nf4:
        from qlora.model.loading import load_model

        return load_model(out, compute_dtype=compute_dtype(cfg, device), device=device,
                          trust_remote_code=cfg.model.trust_remote_code)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code) \
        .to(device).eval()


def export_run(cfg: Config, adapter_dir: Optional[str], out: str, dtype: str = "bf16", nf4: bool = False,
               gguf: Optional[str] = None, report_batches: int = 4, log=print) -> Path:
    """Merge ``adapter_dir`` into ``cfg``'s model and export it to ``out`` (``dtype`` one of
    :data:`EXPORT_DTYPES`; ``nf4``: keep the NF4 layers NF4); measure the merge's error on
    ``report_batches`` batches of the training data (0: skip) and write it beside the weights
    (merge_report.json); ``gguf``: also write ``out/model-<gguf>.gguf``."""
    from qlora.model.adapters import load_adapter
    from qlora.model.merge_report import merge_error
    from qlora.model.merging import export_merged

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    if gguf is not None and nf4:
        raise ValueError("GGUF is written from the 16-bit export: export without --nf4 for --gguf")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checked_model_path(cfg)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    batches = _report_batches(cfg, tokenizer, report_batches) if report_batches else []
    model = base_model(cfg, device)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
        model.to(device)
    path = Path(out)
    export_merged(model, path, dtype=EXPORT_DTYPES[dtype], quantize_merged=nf4,
                  tokenizer=tokenizer.hf_tokenizer(), log=log)
    log(f"merged export ({'NF4' if nf4 else dtype}, tokenizer and generation config beside it): {path} "
        f"(from {resolve_model(cfg.model.name_or_path)}{' + ' + adapter_dir if adapter_dir else ''})")
    if batches:
        merged = _reload(cfg, path, EXPORT_DTYPES[dtype], nf4, device)
        error = merge_error(model, merged, [{k: v.to(device) for k, v in b.items()} for b in batches])
        error.write(path)
        log(error.line())
        del merged
    if gguf is not None:
        from qlora.model.gguf import export_gguf

        log(f"GGUF ({gguf}): {export_gguf(path, path / f'model-{gguf}.gguf', gguf)}")
    return path
