"""qlora.quant.nf4 against bitsandbytes as a second implementation of the same format."""
import math

import pytest
import torch
from bitsandbytes import functional as bnbF

from qlora.quant import nf4

SHAPES = [(64, 64), (3, 100), (7,), (130, 192), (1, 1), (33, 257)]


def _random(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    if w.numel() >= 128:
        w.view(-1)[64:128] = 0  # one all-zero block: absmax 0 must not give NaN
    return w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_bnb_data_is_bit_identical(shape, dtype, blocksize, bnb_lookup_dequantize):
    w = _random(shape, dtype)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    ours = nf4.NF4Tensor.from_bnb(packed, state).dequantize()
    assert ours.dtype == dtype
    assert torch.equal(ours, bnb_lookup_dequantize(packed, state).to(dtype))
    if blocksize == 64 and shape[-1] % 64 == 0:
        # bitsandbytes' own CPU dequantize_4bit is a second reference only where it is right
        # (see bnb_lookup_dequantize in conftest.py).
        assert torch.equal(ours, bnbF.dequantize_4bit(packed, state, quant_type="nf4"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_matches_bnb_bytes(shape, double_quant):
    w = _random(shape, torch.float32, seed=1)
    ours = nf4.quantize(w, blocksize=64, double_quant=double_quant)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    # Ties at code midpoints may round differently; random normal data hits none.
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.quant_map, state.code)
    if double_quant:
        assert torch.equal(ours.offset, state.offset)
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_quant_map, state.state2.code)
        assert ours.absmax.dtype == torch.uint8
        # bnb's CPU blockwise kernel may break ties between 8-bit codes differently; allow a
        # one-code difference on at most 1% of the absmax codes, and require bit-identical
        # dequantized weights wherever the codes agree.
        # A nested block whose absmax is 0 (a lone absmax equal to the mean) decodes to 0 whatever its
        # code, so codes are compared only where the nested absmax is nonzero.
        scaled = (state.state2.absmax > 0).repeat_interleave(state.state2.blocksize)[: state.absmax.numel()]
        diff = (ours.absmax.int() - state.absmax.int()).abs()[scaled]
        assert diff.numel() == 0 or (diff.max() <= 1 and (diff > 0).float().mean() <= 0.01)
        same = ours.absmax == state.absmax
        theirs = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(ours.absmax_fp32()[same], theirs[same])
    else:
        assert torch.equal(ours.absmax, state.absmax)


@pytest.mark.parametrize("shape", SHAPES)
def test_bnb_dequantizes_our_quantization(shape):
    w = _random(shape, torch.bfloat16, seed=2)
    q = nf4.quantize(w)
    packed, state = q.to_bnb()
    assert torch.equal(bnbF.dequantize_4bit(packed, state, quant_type="nf4"), q.dequantize())


def test_quantization_error_is_nf4_rounding():
    # |w - deq(w)| <= half the largest gap between NF4 codes (0.3038/2 between -1 and -0.696) times the
    # block absmax, plus the 8-bit absmax error (dynamic map relative step <= ~1/64 of |absmax|).
    w = _random((256, 128), torch.float32, seed=3)
    q = nf4.quantize(w)
    err = (q.dequantize() - w).abs().view(-1, 64)
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    gap = (nf4.NF4_CODE[1:] - nf4.NF4_CODE[:-1]).max() / 2
    assert (err <= absmax * (gap + 1 / 64)).all()


def test_all_zero_tensor_round_trips_exactly():
    w = torch.zeros(4, 64)
    q = nf4.quantize(w)
    assert torch.equal(q.dequantize(), w)


def test_storage_is_4_127_bits_per_parameter():
    # QLoRA paper §3: 4 bits + 8/64 (absmax codes) + 32/(64*256) (second-level fp32 scale) = 4.127.
    n = 64 * 256 * 16
    q = nf4.quantize(torch.randn(n // 1024, 1024))
    constant_bytes = 16 * 4 + 256 * 4 + 4  # quant_map, nested_quant_map, offset: per tensor, not per parameter
    bits = (q.nbytes() - constant_bytes) * 8 / n
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-12)
    assert round(bits, 3) == 4.127


def test_state_dict_round_trip_and_bnb_module_load():
    import bitsandbytes as bnb

    w = _random((128, 64), torch.bfloat16, seed=4)
    q = nf4.quantize(w)
    state = q.state_dict("weight")
    assert set(state) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                          "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    back = nf4.NF4Tensor.from_state_dict(state, "weight")
    assert torch.equal(back.dequantize(), q.dequantize())
    # bitsandbytes parses our serialized form into its own QuantState
    qs = bnbF.QuantState.from_dict({k.removeprefix("weight."): v for k, v in state.items() if k != "weight"},
                                   device=torch.device("cpu"))
    assert torch.equal(bnbF.dequantize_4bit(state["weight"], qs, quant_type="nf4"), q.dequantize())
    # and the reverse: a bnb Linear4bit's serialized weight loads into ours
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compress_statistics=True, quant_type="nf4",
                              compute_dtype=torch.bfloat16)
    packed, qs = bnbF.quantize_4bit(_random((32, 64), torch.bfloat16, 5), compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, bnb_quantized=True)
    sd = layer.state_dict()
    ours = nf4.NF4Tensor.from_state_dict(sd, "weight")
    assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(packed, qs, quant_type="nf4"))


def test_bad_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize(torch.randn(64), blocksize=48)
    with pytest.raises(TypeError, match="int64"):
        nf4.quantize(torch.arange(64))
    state = nf4.quantize(torch.randn(64)).state_dict("w")
    del state["w.absmax"]
    with pytest.raises(KeyError, match="w.absmax"):
        nf4.NF4Tensor.from_state_dict(state, "w")


def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(nf4.DYNAMIC_MAP, bnbF.create_dynamic_map(signed=True))
    assert math.isclose(nf4.NF4_CODE.sum().item(), bnbF.get_4bit_type("nf4", device="cpu").sum().item())
