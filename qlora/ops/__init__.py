"""Autograd Functions and custom ops over the Triton kernels (qlora.kernels) and the CUDA extension
(csrc/), with the dispatch that picks a backend per call and the PyTorch reference they are tested
against."""
