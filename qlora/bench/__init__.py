"""Benchmarks behind ``qlora bench``: ``harness`` (timing, environment, device peak, output files),
``kernels`` with ``linear_providers`` (the QLoRA linear layer of each implementation), ``optim``
(optimizer step time and memory) and ``train`` (whole training steps against the Hugging Face stack).
"""
