"""Text as it is generated: a streamer for ``model.generate(streamer=...)`` over qlora's tokenizers
(the byte-level one and Hugging Face ones, see qlora.data.tokenizer)."""
from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"  # what decoding gives for the first bytes of an unfinished character


class TextStreamer:
    """Calls ``write(text)`` with each new piece of the answer while ``generate`` runs.

    ``generate`` calls :meth:`put` with the prompt first (skipped), then with each new token, and
    :meth:`end` when it stops. The text written so far is always a prefix of the decoded answer:
    a piece is held back while it ends in an unfinished UTF-8 character (a byte-level token can
    be half of one) or while decoding more tokens changed text already decoded (a tokenizer that
    cleans up spaces can); :meth:`end` writes what is left. Joined, the pieces are the decoded
    answer whenever the decoded text only grows at its end, as with byte-level tokenizers.
    """

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.written = ""
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += [int(i) for i in value.reshape(-1).tolist()]
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.written) and not text.endswith(REPLACEMENT):
            self._emit(text)

    def end(self) -> None:
        self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> None:
        new = text[len(self.written):]
        if new:
            self.write(new)
            self.written += new
