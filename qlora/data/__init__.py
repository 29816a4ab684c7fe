"""Training data: tokenizers, record formats, packing and batching.

``tasks.jsonl`` is the shipped dataset of the built-in run: 1200 alpaca records, 400 each of
uppercasing and reversing a random 3-letter word and adding two digits, written by
``python -m qlora.data.make_tasks`` (see there for why these tasks).
"""
from qlora.data.batching import BatchStream, Sequence, collate, pack, single
from qlora.data.formats import IGNORE_INDEX, Example, ReadStats, alpaca_prompt, load_examples
from qlora.data.tokenizer import ByteTokenizer, HFTokenizer

__all__ = ["BatchStream", "ByteTokenizer", "Example", "HFTokenizer", "IGNORE_INDEX", "ReadStats",
           "Sequence", "alpaca_prompt", "collate", "load_examples", "pack", "single"]
