"""The README's Python examples run as written (the checkpoint path swapped for a tiny local one)."""
import re
from pathlib import Path

import torch
import transformers

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert len(blocks) == 2
    checkpoint = tmp_path / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(checkpoint)
    monkeypatch.chdir(tmp_path)
    api, layer = blocks
    assert '"/models/Llama-2-7b-hf"' in api
    scope = {}
    exec(api.replace('"/models/Llama-2-7b-hf"', repr(str(checkpoint))), scope)
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "merged" / "config.json").is_file()
    scope = {}
    exec(layer, scope)
    assert scope["y"].shape == (8, 4096)
    assert sorted(n for n, p in scope["layer"].named_parameters() if p.requires_grad) == \
        ["lora_A.default.weight", "lora_B.default.weight"]


def test_readme_lists_the_architectures_the_end_to_end_test_covers():
    """The supported-model table is tests/model/test_architectures.py's ARCHITECTURES, class by class."""
    import importlib.util

    path = README.parent / "tests" / "model" / "test_architectures.py"
    spec = importlib.util.spec_from_file_location("test_architectures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = re.search(r"<!-- architectures -->(.*?)<!-- /architectures -->", README.read_text(encoding="utf-8"), re.S)
    rows = dict(re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", table.group(1), re.M))
    assert rows == {name: cls for name, (_, cls, _) in module.ARCHITECTURES.items()}
