"""TextStreamer: the answer's text in pieces as tokens come, never half a character."""
import torch

from qlora.data.streaming import TextStreamer
from qlora.data.tokenizer import ByteTokenizer


def test_pieces_join_to_the_answer_and_wait_for_whole_characters():
    tok = ByteTokenizer()
    pieces = []
    streamer = TextStreamer(tok, pieces.append)
    answer = "añb"  # ñ is two bytes: two byte-level tokens
    streamer.put(torch.tensor([[tok.bos_id, *b"prompt"]]))  # generate() passes the prompt first
    for token in [*answer.encode(), tok.eos_id]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    # nothing of the prompt; "ñ" only once both of its bytes came; EOS decodes to nothing
    assert pieces == ["a", "ñ", "b"]
