import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The variable is read when a kernel
# is defined, so it must be set before any test module imports qlora.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _bnb_lookup_dequantize(packed, state):
    """fp32 dequantization of bitsandbytes' NF4 data by explicit table lookup.

    A reference independent of qlora.nf4 and of bitsandbytes' CPU dequantize_4bit, which (0.50.2)
    returns wrong values when the blocksize is not 64 or does not divide the last dimension: e.g.
    shape (33, 96) at blocksize 64 differs from the lookup by up to 1.12 on N(0, 1) data.
    """
    from bitsandbytes import functional as bnbF

    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()[: state.shape.numel()]
    absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    scale = absmax.float().repeat_interleave(state.blocksize)[: codes.numel()]
    return (state.code[codes] * scale).view(state.shape)


@pytest.fixture
def bnb_lookup_dequantize():
    return _bnb_lookup_dequantize
