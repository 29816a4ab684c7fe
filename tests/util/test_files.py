"""Reading user files: every failure names the file and says what is wrong."""
import os
import re

import pytest
import torch

from qlora.util.files import load_safetensors, load_torch, read_text


def test_read_text_names_the_file_line_and_byte(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2: not UTF-8 text (byte 0xff at "
                                                   f"offset 16)")):
        read_text(path)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: is a directory, expected a file")):
        read_text(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'x'}: no such file")):
        read_text(tmp_path / "x")
    path.write_text("ünïcode\n", encoding="utf-8")
    assert read_text(path) == "ünïcode\n"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo ran",))


def test_load_torch_refuses_pickled_code_and_names_damaged_files(tmp_path):
    good = tmp_path / "optimizer.pt"
    torch.save({"state": {0: torch.ones(3)}, "step": 4}, good)
    assert load_torch(good)["step"] == 4
    truncated = tmp_path / "rng-rank0.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"{truncated}: unreadable, truncated or corrupt")):
        load_torch(truncated)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: unreadable, truncated or corrupt")):
        load_torch(empty)
    blocked = tmp_path / "scheduler.pt"
    torch.save({"x": _RunsCode()}, blocked)
    with pytest.raises(ValueError, match=re.escape(f"{blocked}: refused: it holds Python objects")) as err:
        load_torch(blocked)
    # the reason names what was blocked; torch's advice to load with weights_only=False is left out
    assert str(err.value).endswith("which could run code (GLOBAL posix.system)")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'gone.pt'}: no such file")):
        load_torch(tmp_path / "gone.pt")


def test_load_safetensors_names_a_damaged_file(tmp_path):
    path = tmp_path / "adalora_weights.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable safetensors file")):
        load_safetensors(path)
