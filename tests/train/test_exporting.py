"""`qlora export`: the merged model with its tokenizer, chat template and generation config, so
`qlora generate --model EXPORT` and transformers' pipeline use it as it is; the merge's error on
the training data, beside the weights; GGUF beside it on request."""
import json

import pytest
import torch
import transformers

from qlora.cli import main
from qlora.data.formats import prompt_ids
from qlora.data.tokenizer import ByteTokenizer
from qlora.model.adapters import save_adapter
from qlora.model.inject import add_lora, lora_layers
from qlora.train.config import BUILTIN_RUN, load_config
from qlora.train.loop import generate
from qlora.train.model import base_model


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """The built-in run's model with a LoRA adapter of random B (as training leaves one), saved."""
    model = base_model(load_config(BUILTIN_RUN), torch.device("cpu"))
    add_lora(model, r=8, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    path = tmp_path_factory.mktemp("adapter")
    save_adapter(model, str(path))
    return model, path


def test_export_serves_and_reports_its_error(tmp_path, adapted, capsys):
    model, adapter = adapted
    out = tmp_path / "merged"
    assert main(["export", BUILTIN_RUN, "--adapter", str(adapter), "--out", str(out), "--dtype", "f32",
                 "--report-batches", "2"]) == 0
    printed = capsys.readouterr().out
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "chat_template.jinja", "merge_report.json"} <= {p.name for p in out.iterdir()}
    f32 = json.loads((out / "merge_report.json").read_text())
    assert f32["batches"] == 2 and f32["tokens"] > 0 and "merged vs adapted model on" in printed

    # the export answers as base + adapter did: `qlora generate` and transformers' pipeline
    tok = ByteTokenizer()
    want = generate(model, tok, prompt_ids(tok, "hi", "chat"), 8)
    assert main(["generate", "--model", str(out), "--no-quant", "--chat", "--prompt", "hi",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == want + "\n"
    pipe = transformers.pipeline("text-generation", model=str(out), dtype=torch.float32)
    text = tok.chat_generation_prompt([{"role": "user", "content": "hi"}])
    reply = pipe("<s>" + text, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert reply == want

    # bf16 rounds every merged weight (relative error up to 2^-9); fp32 only reorders sums
    # (2^-24): the report must tell the two apart by orders of magnitude
    assert main(["export", BUILTIN_RUN, "--adapter", str(adapter), "--out", str(tmp_path / "bf16"),
                 "--report-batches", "2", "--gguf", "bf16"]) == 0
    bf16 = json.loads((tmp_path / "bf16" / "merge_report.json").read_text())
    assert bf16["tokens"] == f32["tokens"]
    assert 100 * f32["max_abs_logit_diff"] < bf16["max_abs_logit_diff"] and 0 < bf16["mean_kl"]
    assert (tmp_path / "bf16" / "model-bf16.gguf").is_file()


def test_export_options_are_checked(tmp_path, adapted, capsys):
    _, adapter = adapted
    assert main(["export", BUILTIN_RUN, "--adapter", str(adapter), "--out", str(tmp_path / "x"),
                 "--nf4", "--gguf", "f16"]) == 2
    assert "GGUF is written from the 16-bit export" in capsys.readouterr().err
    # the command line's choices (named there so it starts without torch) are the library's
    from qlora.cli import export
    from qlora.model.gguf import GGUF_TYPES
    from qlora.train.exporting import EXPORT_DTYPES

    assert export.EXPORT_DTYPES == tuple(EXPORT_DTYPES) and export.GGUF_TYPES == GGUF_TYPES
