"""`qlora train` on a Hugging Face checkpoint directory with a real tokenizer (loaded by
AutoTokenizer, with a chat template), on chat data; then `qlora generate --chat` on the result
answers as the trained model did."""
import json

import pytest
import torch
import transformers

from qlora.cli import main
from qlora.cli.train import resolve_config
from qlora.data.formats import prompt_ids
from qlora.train.loop import Trainer, generate


@pytest.fixture
def checkpoint(tmp_path, byte_bpe_tokenizer):
    """A tiny Llama with GQA saved as Hugging Face does, with a ChatML byte-level tokenizer."""
    tokenizer = byte_bpe_tokenizer("chatml")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    path = tmp_path / "model"
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_train_hf_checkpoint_on_chat_data_then_generate(tmp_path, checkpoint, capsys):
    words = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "key", "owl", "fig", "jam"]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Reverse the word."},
        {"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]}) + "\n"
        for w in words * 2))
    out = tmp_path / "run"
    cfg = resolve_config(None, [
        f"model.name_or_path={checkpoint}", f"data.path={data}", "data.format=chat",
        "data.eval_fraction=0.1", f"train.output_dir={out}", "train.max_steps=3",
        "train.micro_batch_size=4", "train.gradient_accumulation_steps=1", "lora.r=8", "lora.alpha=16", "logging.progress_bar=false",
        "logging.sample_max_new_tokens=6", "logging.exact_match_examples=2", "checkpoint.every=0"])
    trainer = Trainer(cfg)
    result = trainer.run()
    assert result.steps == 3 and result.sample_after is not None
    # the sample prompt is the first held-out conversation up to the assistant header
    hf = trainer.tokenizer.tok  # decodes special tokens too
    assert hf.decode(trainer.sample_prompt_ids).endswith(
        "<|im_end|>\n<|im_start|>assistant\n")

    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"}

    # the adapter, loaded from its PEFT files onto a freshly quantized base by the CLI, answers
    # a chat prompt as the trained model does
    ids = prompt_ids(trainer.tokenizer, "owl", "chat")
    assert hf.decode(ids) == "<s><|im_start|>user\nowl<|im_end|>\n<|im_start|>assistant\n"
    want = generate(trainer.model, trainer.tokenizer, ids, 6)
    assert want  # an empty answer would make the comparison below say little
    capsys.readouterr()
    assert main(["generate", "--model", str(checkpoint), "--adapter", str(result.adapter_dir),
                 "--chat", "--prompt", "owl", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == want + "\n"


MODELS = {  # transformers' conversions rename or fuse these checkpoints' tensors when loading
    "gpt-neox": lambda v: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    "mixtral": lambda v: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": lambda v: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=v, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_qlora_train_runs_on_converted_and_moe_checkpoints(tmp_path, byte_bpe_tokenizer, name):
    tokenizer = byte_bpe_tokenizer("chatml")
    torch.manual_seed(0)
    path = tmp_path / name
    MODELS[name](len(tokenizer)).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} -> {w[::-1]}"}) + "\n" for w in ["cat", "dog", "sun", "owl"] * 4))
    cfg = resolve_config(None, [
        f"model.name_or_path={path}", f"data.path={data}", "data.format=completion", "data.eval_fraction=0.25",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.micro_batch_size=4",
        "lora.r=4", "lora.dropout=0", "logging.progress_bar=false", "logging.sample_max_new_tokens=2",
        "logging.exact_match_examples=0", "checkpoint.every=0"])
    result = Trainer(cfg).run()
    assert result.steps == 3 and result.eval_loss is not None and torch.isfinite(torch.tensor(result.eval_loss))
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    if name != "gpt-neox":  # the experts are adapted, as PEFT targets them
        assert set(adapter_config["target_parameters"]) == {"experts.gate_up_proj", "experts.down_proj"}


def test_a_model_that_is_no_causal_lm_is_refused_before_loading(tmp_path):
    path = tmp_path / "bert"
    transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=128, architectures=["BertForMaskedLM"]).save_pretrained(path)
    # no weights in the directory at all: the refusal must come from config.json alone
    cfg = resolve_config(None, [f"model.name_or_path={path}", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="BertForMaskedLM, which is not a causal language model"):
        Trainer(cfg)
