"""`qlora generate` prints the answer while it is generated, not all at once at the end."""
import io

import torch

from qlora.cli import main


def test_generate_streams_the_answer(monkeypatch):
    from transformers import LlamaForCausalLM

    forwards = 0
    original = LlamaForCausalLM.forward

    def counting_forward(self, *args, **kwargs):
        nonlocal forwards
        forwards += 1
        return original(self, *args, **kwargs)

    class Stdout(io.StringIO):
        """Records, with each write, how many forward passes generation had made by then."""
        def __init__(self):
            super().__init__()
            self.writes = []

        def write(self, text):
            self.writes.append((text, forwards))
            return super().write(text)

    monkeypatch.setattr(LlamaForCausalLM, "forward", counting_forward)
    out = Stdout()
    monkeypatch.setattr("sys.stdout", out)
    torch.manual_seed(0)
    assert main(["generate", "--model", "builtin:tiny-llama", "--raw", "--prompt", "abc",
                 "--max-new-tokens", "12"]) == 0
    pieces = [(text, n) for text, n in out.writes if text != "\n"]
    # one forward pass per new token; the first piece is out after the first pass, long before
    # the last of them
    assert len(pieces) > 1 and forwards > 1
    assert pieces[0][1] < forwards
    assert out.getvalue() == "".join(text for text, _ in pieces) + "\n"
