"""Which implementation runs the QLoRA linear layers.

``QLORA_BACKEND`` (environment variable, also the ``quant.backend`` config key):

* ``torch``: the pure-PyTorch reference path (dequantize, matmul, LoRA as plain ops).
* ``triton``: the fused Triton kernels in ``qlora.kernels``; with ``TRITON_INTERPRET=1`` they run on
  CPU through Triton's interpreter (slow, but the same code the GPU runs).
* ``cuda``: the hand-written kernels of ``csrc/`` where they apply (small M), Triton elsewhere.
* ``auto`` (default): ``triton`` on a CUDA device when Triton is importable, else ``torch``. The
  csrc kernels are not picked automatically until a GPU measurement shows them faster.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")


def requested_backend() -> str:
    value = os.environ.get("QLORA_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"QLORA_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def get_backend(device: torch.device | str | None = None) -> str:
    """The backend that runs a layer whose input lives on ``device`` (default: the current CUDA
    device if there is one, else CPU)."""
    requested = requested_backend()
    if requested != "auto":
        return requested
    if device is None:
        on_cuda = torch.cuda.is_available()
    else:
        on_cuda = torch.device(device).type == "cuda"
    return "triton" if on_cuda and triton_available() else "torch"
