"""Training data: tokenizers, record formats, packing and batching.

``tasks.jsonl`` is the shipped dataset of the built-in run: 640 alpaca records, 160 each of
reversing, uppercasing and sorting the letters of a random 3-6 letter word, and adding two
numbers below 50 — tasks a byte-level model a few MB in size picks up in minutes.
"""
from qlora.data.batching import BatchStream, Sequence, collate, pack, single
from qlora.data.formats import IGNORE_INDEX, Example, ReadStats, alpaca_prompt, load_examples
from qlora.data.tokenizer import ByteTokenizer, HFTokenizer

__all__ = ["BatchStream", "ByteTokenizer", "Example", "HFTokenizer", "IGNORE_INDEX", "ReadStats",
           "Sequence", "alpaca_prompt", "collate", "load_examples", "pack", "single"]
