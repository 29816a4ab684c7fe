"""The model a run trains: from a checkpoint directory only a causal LM, and the directory's own
Python code only with model.trust_remote_code: true; both refused before anything is trained.
model.name_or_path: a hub model id resolved from the local Hugging Face cache, never the
network; a missing model is named with where it was looked for."""
import pytest
import torch
import transformers

from qlora.cli import main
from qlora.model.loading import quantize_model
from qlora.train.config import load_config
from qlora.train.model import base_model, load_tokenizer, resolve_model

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
SMALL = ["logging.progress_bar=false", "logging.sample_max_new_tokens=2", "train.micro_batch_size=4",
         "data.max_seq_len=48", "logging.exact_match_examples=2", "train.max_steps=2",
         "lora.r=4", "lora.alpha=4"]


def _train_args(model, out, *extra):
    overrides = [f"model.name_or_path={model}", f"train.output_dir={out}", *SMALL, *extra]
    return ["train", "builtin:tiny", *[a for o in overrides for a in ("--set", o)]]


def test_a_model_directorys_code_runs_only_with_trust_remote_code(
        tmp_path, capsys, no_prompt, modules_cache, remote_code_checkpoint, byte_bpe_tokenizer):
    tokenizer = byte_bpe_tokenizer("chatml")
    marker = tmp_path / "ran"
    model = remote_code_checkpoint(tmp_path / "model", marker, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(model)
    # transformers, asked nothing, would prompt "[y/N]" and run the code on a piped "y"
    assert main(_train_args(model, tmp_path / "refused")) == 2
    err = capsys.readouterr().err
    assert "model_type 'x_llama' is implemented by Python code shipped in" in err
    assert "set model.trust_remote_code: true in the training config" in err
    assert not marker.exists() and no_prompt == []

    assert main(_train_args(model, tmp_path / "run", "model.trust_remote_code=true")) == 0
    assert marker.exists() and no_prompt == []
    capsys.readouterr()
    generate = ["generate", "--model", str(model), "--adapter", str(tmp_path / "run" / "adapter"),
                "--prompt", "hi", "--max-new-tokens", "2"]
    assert main(generate) == 2 and "--trust-remote-code" in capsys.readouterr().err
    # (the code is imported once per process, so the marker is not written again)
    assert main([*generate, "--trust-remote-code"]) == 0 and no_prompt == []


def test_a_model_that_is_not_a_causal_lm_is_refused_before_training(tmp_path, capsys):
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    capsys.readouterr()
    # the old loop built it, trained it and died at the first sample answer: no `generate`
    assert main(_train_args(tmp_path / "bert", tmp_path / "run")) == 2
    assert capsys.readouterr().err == (
        f"qlora train: error: {tmp_path / 'bert' / 'config.json'} names BertForMaskedLM, which is "
        f"not a causal language model; qlora trains and generates with decoder models that predict the "
        f"next token (a ...ForCausalLM class such as LlamaForCausalLM)\n")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read when huggingface_hub is imported
    return cache


def test_hub_id_resolves_from_the_local_cache(hub_cache, byte_bpe_tokenizer):
    """A model laid out as huggingface_hub caches it (refs/main -> snapshots/<commit>/) loads by
    its id: the tokenizer and the NF4 model come from the snapshot."""
    tokenizer = byte_bpe_tokenizer("chatml")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2))
    repo = hub_cache / "models--someone--tiny-chat"
    snapshot = repo / "snapshots" / COMMIT
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)

    assert resolve_model("someone/tiny-chat") == str(snapshot)
    assert load_tokenizer("someone/tiny-chat").encode("hi") == tokenizer("hi", add_special_tokens=False)["input_ids"]
    cfg = load_config(None, ["model.name_or_path=someone/tiny-chat"])
    loaded = base_model(cfg, torch.device("cpu"))
    # the same weights quantized in memory: the same NF4 codes, so the same logits (fp32)
    quantize_model(model)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_unknown_model_is_named_with_the_cache_it_was_looked_for_in(hub_cache):
    with pytest.raises(ValueError, match=r"model.name_or_path: 'someone/missing' is not a directory, "
                                         r"nor a model in the local Hugging Face cache \(.*hub\); "
                                         r"qlora never downloads"):
        resolve_model("someone/missing")
