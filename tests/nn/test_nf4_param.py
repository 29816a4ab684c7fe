"""NF4Param: the row sharding FSDP2 applies and its all-gather hooks, in one process.

FSDP2 shards a parameter with ``torch.chunk`` on dim 0, pads with ``new_zeros`` + ``narrow().copy_``,
then all-gathers what ``fsdp_pre_all_gather`` returns (concatenating the ranks' inputs in rank order)
and rebuilds with ``fsdp_post_all_gather``. These tests do the same steps by hand; the two-process
run under FSDP2 itself is tests/model/test_fsdp.py.
"""
import pytest
import torch

from qlora.nn import Linear4bit
from qlora.nn.nf4_param import NF4Param, shard_rows_check
from qlora.quant.nf4 import quantize


def _shard_and_gather(q, world_size, param_dtype=torch.float32):
    chunks = torch.chunk(NF4Param(q), world_size, dim=0)
    shards = []
    for chunk in chunks:  # what fully_shard keeps on each rank
        padded = chunk.new_zeros(chunk.shape)
        padded.narrow(0, 0, chunk.shape[0]).copy_(chunk)
        shards.append(padded)
    inputs = [shard.fsdp_pre_all_gather(None, None, None, None, None) for shard in shards]
    for tensors, _ in inputs:
        assert all(t.dtype == torch.uint8 and t.dim() == 1 for t in tensors)  # bytes, never floats
    outputs = [torch.cat(parts) for parts in zip(*(tensors for tensors, _ in inputs))]
    gathered, inner = shards[0].fsdp_post_all_gather(outputs, inputs[0][1], param_dtype)
    return shards, outputs, gathered, inner


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("world_size", [2, 4])
def test_gathered_weight_is_bit_identical(double_quant, world_size):
    # 1024 rows x 64: a 4-way shard holds 256 rows = 256 absmax blocks = one double-quant group
    q = quantize(torch.randn(1024, 64, generator=torch.Generator().manual_seed(0)), 64, double_quant)
    shards, _, gathered, _ = _shard_and_gather(q, world_size)
    assert all(s.shape == (1024 // world_size, 64) for s in shards)
    w = gathered.nf4
    assert w.shape == q.shape and w.dtype == q.dtype
    for name in ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset"):
        have, want = getattr(w, name), getattr(q, name)
        assert (have is None) == (want is None), name
        if want is not None:
            assert have.dtype == want.dtype and torch.equal(have.reshape(want.shape), want), name
    assert torch.equal(w.dequantize(), q.dequantize())


def test_each_shard_is_its_rows():
    q = quantize(torch.randn(512, 128, generator=torch.Generator().manual_seed(1)))
    shards, _, _, _ = _shard_and_gather(q, 2)
    full = q.dequantize()
    assert torch.equal(shards[0].nf4.dequantize(), full[:256])
    assert torch.equal(shards[1].nf4.dequantize(), full[256:])
    assert shards[0].nf4.packed.numel() == q.packed.numel() // 2


def test_regather_into_the_same_buffers():
    """After a reshard FSDP refills its buffers and calls the hook with ``out=``: the weight FSDP
    holds (views of the buffers) must then show the new bytes."""
    q = quantize(torch.randn(512, 64, generator=torch.Generator().manual_seed(2)))
    shards, outputs, gathered, inner = _shard_and_gather(q, 2)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(inner, outputs))
    before = gathered.nf4.dequantize()
    for t in outputs:
        t.zero_()
    assert not torch.equal(gathered.nf4.dequantize(), before)
    fresh = [torch.cat(parts) for parts in zip(*(s.fsdp_pre_all_gather(None, None, None, None, None)[0]
                                                  for s in shards))]
    for t, f in zip(outputs, fresh):
        t.copy_(f)
    assert shards[0].fsdp_post_all_gather(outputs, shards[0].nf4, torch.float32, out=gathered) is None
    assert torch.equal(gathered.nf4.dequantize(), before)


def test_post_all_gather_sets_the_compute_dtype():
    q = quantize(torch.randn(512, 64, generator=torch.Generator().manual_seed(3)))
    _, _, gathered, _ = _shard_and_gather(q, 2, param_dtype=torch.bfloat16)
    assert gathered.dtype == gathered.nf4.dtype == torch.bfloat16
    assert torch.equal(gathered.nf4.dequantize(), q.dequantize(torch.bfloat16))


def test_unshardable_shapes_are_errors():
    with pytest.raises(ValueError, match="not a multiple of 2"):
        shard_rows_check(quantize(torch.randn(511, 64)), 2)
    with pytest.raises(ValueError, match="double-quant group 256"):  # 128 blocks per shard
        shard_rows_check(quantize(torch.randn(256, 64)), 2)
    shard_rows_check(quantize(torch.randn(256, 64), double_quant=False), 2)  # no groups: fine
    with pytest.raises(ValueError, match="not a multiple of the blocksize 64"):
        shard_rows_check(quantize(torch.randn(512, 96), double_quant=False), 2)
    with pytest.raises(NotImplementedError, match="only along the output dimension"):
        torch.chunk(NF4Param(quantize(torch.randn(512, 64))), 2, dim=1)
    with pytest.raises(NotImplementedError, match="does not implement"):
        NF4Param(quantize(torch.randn(512, 64))) + 1


def test_linear4bit_with_the_weight_as_parameter():
    g = torch.Generator().manual_seed(4)
    q = quantize(torch.randn(512, 64, generator=g))
    layer = Linear4bit(q, bias=torch.randn(512, generator=g))
    plain = Linear4bit(q, bias=layer.bias)
    layer.register_weight_parameter()
    assert isinstance(layer.weight, NF4Param) and not layer.weight.requires_grad
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "weight"]
    x = torch.randn(3, 64, generator=g)
    assert torch.equal(layer(x), plain(x))
    assert layer.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key

    other = Linear4bit(quantize(torch.randn(512, 64, generator=g)), bias=torch.zeros(512))
    other.register_weight_parameter()
    other.load_state_dict(plain.state_dict())
    assert isinstance(other.weight, NF4Param)
    assert torch.equal(other.nf4.dequantize(), q.dequantize())

    layer.to(torch.bfloat16)  # the NF4 data is left alone, the bias is cast
    assert isinstance(layer.weight, NF4Param) and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.nf4.packed, q.packed) and layer.nf4.absmax.dtype == q.absmax.dtype
