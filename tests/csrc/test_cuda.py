"""GPU checks of the csrc/ kernels (torch.ops.qlora.*) against the pure-PyTorch NF4 reference.

The extension is JIT-built on first use (about a minute) unless setup.py built it. On a machine
without CUDA only the "unavailable" behaviour is checked.
"""
import pytest
import torch

from qlora.ops import cuda_ext

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_unavailable_without_cuda_says_why():
    assert not cuda_ext.is_available()
    assert "unavailable" in cuda_ext.status()
    with pytest.raises(RuntimeError, match="CUDA extension unavailable"):
        cuda_ext.nf4_dequantize(None, torch.empty(0))


def _quantized(shape, dtype, double_quant, seed):
    from qlora.quant.nf4 import quantize

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    w.view(-1)[::97] *= 8.0  # outliers, as in LLM weights, so block scales vary widely
    return quantize(w.to(dtype), blocksize=64, double_quant=double_quant).to("cuda")


@pytest.fixture(scope="module")
def extension():
    assert cuda_ext.is_available(), cuda_ext.status()


DTYPES = [torch.bfloat16, torch.float16]


# (7, 37): odd element count and a partial last chunk; (33, 96): blocks across row boundaries.
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 37), (33, 96), (1024, 4096)], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_dequantize_matches_reference(extension, shape, dtype, double_quant):
    weight = _quantized(shape, dtype, double_quant, seed=shape[0])
    out = torch.empty(shape, dtype=dtype, device="cuda")
    cuda_ext.nf4_dequantize(weight, out)
    # Same fp32 arithmetic in the same order, then one round-to-nearest cast: bit-exact.
    torch.testing.assert_close(out, weight.dequantize(dtype), rtol=0, atol=0)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_into_unaligned_buffer(extension, dtype):
    # A view 2 bytes into an allocation is not 16-byte aligned: exercises the element-wise path.
    shape = (64, 96)
    weight = _quantized(shape, dtype, True, seed=5)
    out = torch.empty(64 * 96 + 1, dtype=dtype, device="cuda")[1:].view(shape)
    cuda_ext.nf4_dequantize(weight, out)
    torch.testing.assert_close(out, weight.dequantize(dtype), rtol=0, atol=0)


def _gemv_case(M, N, K, r, dtype, seed):
    weight = _quantized((N, K), dtype, True, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, K, generator=gen).to(dtype).cuda()
    if r == 0:
        return weight, x, None, None
    A = (torch.randn(r, K, generator=gen) / K**0.5).to(dtype).cuda()
    B = (torch.randn(N, r, generator=gen) / r**0.5).to(dtype).cuda()
    return weight, x, A, B


def _gemv_reference(x, W, A, B, scaling):
    """x W^T + s (x A^T) B^T in the dtype of its arguments; x [M, K], W [N, K], A [r, K], B [N, r]."""
    y = x @ W.T
    if A is not None:
        y = y + scaling * ((x @ A.T) @ B.T)
    return y


# M = 1 (decode), 3 (not a power of two), 8 (the largest); r = 1 (awkward) and 16; r = 0 is no LoRA.
# N = 33 leaves a partly filled warp; K = 96 is not a multiple of the 64-element block or of the
# 1024 elements a warp covers per step.
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,r", [(1, 33, 96, 1), (3, 256, 4096, 16), (8, 1000, 1056, 0),
                                     (8, 4096, 4096, 16), (1, 4096, 11008, 64)], ids=str)
def test_gemv_lora_matches_reference(extension, M, N, K, r, dtype):
    weight, x, A, B = _gemv_case(M, N, K, r, dtype, seed=M + N)
    scaling = 2.0
    ours = cuda_ext.nf4_gemv_lora(x, weight, A, B, scaling)

    f32 = lambda t: None if t is None else t.float()
    W = weight.dequantize(torch.float32)
    reference = _gemv_reference(x.float(), W, f32(A), f32(B), scaling)
    torch_low = _gemv_reference(x, weight.dequantize(dtype), A, B, scaling)
    # Tolerance (flash-attention's rule): PyTorch doing the same math in `dtype` rounds W to `dtype`
    # and rounds intermediate results; our kernel keeps W and all sums in fp32 and rounds once at
    # the end. So we allow the larger of 2x PyTorch's max error and one rounding of the output
    # (unit roundoff u = 2^-8 bf16, 2^-11 fp16, times max|y|: needed when PyTorch happens to be
    # lucky on a small output), plus the worst-case fp32 summation-order difference
    # K * 2^-24 * max sum|x||w| (Higham's bound for recursive summation).
    unit_roundoff = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    torch_error = (torch_low.float() - reference).abs().max().item()
    output_rounding = unit_roundoff * reference.abs().max().item()
    fp32_summation = K * 2.0**-24 * (x.float().abs() @ W.abs().T).max().item()
    our_error = (ours.float() - reference).abs().max().item()
    assert our_error <= max(2 * torch_error, output_rounding) + fp32_summation, (
        our_error, torch_error, output_rounding)


@needs_cuda
def test_gemv_fake_and_schema(extension):
    weight, x, A, B = _gemv_case(2, 64, 128, 4, torch.bfloat16, seed=3)
    args = (x, *cuda_ext._weight_args(weight), 64, A, B, 0.5)
    torch.library.opcheck(torch.ops.qlora.nf4_gemv_lora.default, args)


@needs_cuda
def test_gemv_rejects_bad_shapes_with_clear_errors(extension):
    weight, x, _, _ = _gemv_case(1, 64, 128, 0, torch.bfloat16, seed=4)
    with pytest.raises(ValueError, match="at most 8 rows"):
        cuda_ext.nf4_gemv_lora(torch.zeros(9, 128, dtype=torch.bfloat16, device="cuda"), weight)
    odd = _quantized((64, 80), torch.bfloat16, True, seed=6)
    with pytest.raises(RuntimeError, match="K % 32 == 0"):
        cuda_ext.nf4_gemv_lora(torch.zeros(1, 80, dtype=torch.bfloat16, device="cuda"), odd)
