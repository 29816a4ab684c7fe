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
        "train.micro_batch_size=4", "lora.r=8", "lora.alpha=16", "logging.progress_bar=false",
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
