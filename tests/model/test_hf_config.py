"""A checkpoint's config.json checked before anything is built: its shipped Python code runs only
when trusted (and nobody is ever asked on the terminal), and only causal LMs are accepted."""
import json

import pytest
import torch
import transformers

from qlora import load_model
from qlora.model.hf_config import check_causal_lm


def test_shipped_code_runs_only_when_trusted_and_nobody_is_asked(tmp_path, no_prompt, modules_cache,
                                                                  remote_code_checkpoint):
    marker = tmp_path / "ran"
    path = remote_code_checkpoint(tmp_path / "model", marker)
    with pytest.raises(ValueError, match=(
            rf"^{path / 'config.json'}: model_type 'x_llama' is implemented by Python code shipped "
            rf"in {path} .*qlora never runs such code unless asked: set model.trust_remote_code: "
            r"true in the training config \(qlora generate: --trust-remote-code; Python: "
            r"trust_remote_code=True\) if you trust it$")):
        load_model(path, compute_dtype=torch.float32)
    assert not marker.exists() and no_prompt == []

    model = load_model(path, compute_dtype=torch.float32, trust_remote_code=True)
    assert type(model).__name__ == "XForCausalLM" and marker.exists() and no_prompt == []


def test_a_known_model_type_is_built_by_transformers_without_the_shipped_code(
        tmp_path, no_prompt, modules_cache, remote_code_checkpoint):
    marker = tmp_path / "ran"
    path = remote_code_checkpoint(tmp_path / "model", marker, model_type="llama")
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "architectures": ["LlamaForCausalLM"]}))
    with pytest.warns(UserWarning, match=r"the custom code it names \(auto_map\) is not run; "
                                         r"transformers' own 'llama' implementation is used"):
        model = load_model(path, compute_dtype=torch.float32)
    assert type(model) is transformers.LlamaForCausalLM and not marker.exists() and no_prompt == []


def test_only_causal_language_models_are_accepted(tmp_path):
    for names in (["LlamaForCausalLM"], ["GPT2LMHeadModel"], ["XForCausalLM"]):
        check_causal_lm(tmp_path, {"architectures": names})
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'config.json'} names BertForMaskedLM, which is "
                                         r"not a causal language model"):
        check_causal_lm(tmp_path, {"architectures": ["BertForMaskedLM"]})
    check_causal_lm(tmp_path, {"model_type": "llama"})  # no architectures: its type has one
    with pytest.raises(ValueError, match="names no architectures and model_type 'vit', which is not "
                                         "a causal language model"):
        check_causal_lm(tmp_path, {"model_type": "vit"})
