"""The reference QLoRA layer (Linear4bit + LoRALinear) against plain PyTorch on dense weights."""
import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes import functional as bnbF
from torch import nn

from qlora.quant.nf4 import quantize
from qlora.nn import Linear4bit, LoRALinear

N, K, R, M = 192, 128, 8, 5  # all distinct, so a saved [N, K] tensor can only be a copy of W0


def _layer(dtype=torch.float32, r=R, alpha=16.0, dropout=0.0, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
        if bias:
            dense.bias.copy_(torch.randn(N, generator=g))
    layer = LoRALinear(Linear4bit.from_linear(dense.to(dtype)), r=r, lora_alpha=alpha, lora_dropout=dropout)
    with torch.no_grad():  # B is zero-initialised; give it values so the LoRA term is tested
        layer.lora_B["default"].weight.copy_(torch.randn(N, r, generator=g))
    return layer.to(dtype)


def _reference(layer, x, name="default"):
    """fp32 y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ with W0 dequantized once, on fp32 copies of every operand."""
    w = layer.base_layer.weight.dequantize(torch.float32)
    a = layer.lora_A[name].weight.float()
    b = layer.lora_B[name].weight.float()
    y = x.float() @ w.t() + layer.scaling[name] * (x.float() @ a.t()) @ b.t()
    if layer.base_layer.bias is not None:
        y = y + layer.base_layer.bias.float()
    return y


def _magnitude(layer, x, name="default"):
    """|x|·|W0|ᵀ + |b| + s·(|x|·|A|ᵀ)·|B|ᵀ: what rounding errors of the products scale with."""
    w = layer.base_layer.weight.dequantize(torch.float32).abs()
    a = layer.lora_A[name].weight.float().abs()
    b = layer.lora_B[name].weight.float().abs()
    mag = x.float().abs() @ w.t() + layer.scaling[name] * (x.float().abs() @ a.t()) @ b.t()
    if layer.base_layer.bias is not None:
        mag = mag + layer.base_layer.bias.float().abs()
    return mag


def test_fp32_forward_and_gradients_match_dense_reference():
    layer = _layer()
    x = torch.randn(M, K, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b_ref = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    w = layer.base_layer.weight.dequantize(torch.float32)
    y_ref = x_ref @ w.t() + layer.scaling["default"] * (x_ref @ a_ref.t()) @ b_ref.t() + layer.base_layer.bias
    torch.testing.assert_close(y, y_ref)  # same fp32 operations in the same order, up to summation order
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a_ref.grad)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, b_ref.grad)
    assert not layer.base_layer.weight.packed.requires_grad
    assert layer.base_layer.bias.grad is None
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.default.weight",
                                                                         "lora_B.default.weight"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_within_rounding_of_fp32(dtype):
    # Per output: W0 dequantized to dtype (one rounding, relative 2^-p), x·Aᵀ rounded to dtype before
    # the B product (one more), the output rounded (one more); CPU matmuls accumulate in fp32.
    # Three roundings of unit roundoff u = 2^-(mantissa bits + 1) bound the error by 3u·magnitude.
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    layer = _layer(dtype)
    x = torch.randn(M, K).to(dtype)
    err = (layer(x).float() - _reference(layer, x)).abs()
    assert (err <= 3 * u * _magnitude(layer, x)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_within_rounding_of_fp32(dtype):
    # dX = dY·W0 + s·(dY·B)·A, dA = s·(dY·B)ᵀ·x, dB = s·dYᵀ·(x·Aᵀ). In the low-precision path each
    # has at most three roundings to dtype on the way (W0 or the x·Aᵀ / dY·B intermediate, a second
    # intermediate, the result); s = 2 is exact. Same 3u·magnitude bound as the forward test, with the
    # magnitudes of the same products over absolute values.
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    layer = _layer(dtype)
    s = layer.scaling["default"]
    assert s == 2.0
    x = torch.randn(M, K).to(dtype).requires_grad_(True)
    dy = torch.randn(M, N).to(dtype)
    layer(x).backward(dy)
    w = layer.base_layer.weight.dequantize(torch.float32)
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    x32, dy32 = x.detach().float(), dy.float()
    expected = {
        "dX": (dy32 @ w + s * (dy32 @ b) @ a, dy32.abs() @ w.abs() + s * (dy32.abs() @ b.abs()) @ a.abs()),
        "dA": (s * (dy32 @ b).t() @ x32, s * (dy32.abs() @ b.abs()).t() @ x32.abs()),
        "dB": (s * dy32.t() @ (x32 @ a.t()), s * dy32.abs().t() @ (x32.abs() @ a.abs().t())),
    }
    got = {"dX": x.grad, "dA": layer.lora_A["default"].weight.grad, "dB": layer.lora_B["default"].weight.grad}
    for name, (ref, magnitude) in expected.items():
        assert got[name].dtype == dtype
        assert ((got[name].float() - ref).abs() <= 3 * u * magnitude).all(), name


def test_no_dense_copy_of_w0_is_saved_for_backward():
    layer = _layer(torch.bfloat16)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved, "the hook saw nothing, so it tested nothing"
    assert all(numel_shape != (N, K) and numel_shape != (K, N) for numel_shape, _ in saved), saved
    y.sum().backward()
    assert x.grad is not None


def test_dropout_applies_to_the_lora_input_only_in_training():
    layer = _layer(dropout=0.5)
    x = torch.randn(M, K)
    layer.eval()
    torch.testing.assert_close(layer(x), _reference(layer, x))
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    x_d = nn.functional.dropout(x, 0.5, training=True)
    w = layer.base_layer.weight.dequantize(torch.float32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ w.t() + layer.base_layer.bias + layer.scaling["default"] * (x_d @ a.t()) @ b.t()
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, _reference(layer, x))


def test_scaling_rslora_and_fresh_adapter_is_identity():
    layer = LoRALinear(Linear4bit.from_linear(nn.Linear(K, N)), r=16, lora_alpha=32)
    assert layer.scaling["default"] == 2.0
    x = torch.randn(M, K)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)  # B = 0 at init
    layer.add_adapter("rs", r=16, lora_alpha=32, use_rslora=True)
    assert layer.scaling["rs"] == 8.0


def test_multiple_adapters_set_and_disable():
    layer = _layer()
    layer.add_adapter("second", r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B["second"].weight.normal_()
    x = torch.randn(M, K)
    base = layer.base_layer(x)
    delta = {n: layer.scaling[n] * (x @ layer.lora_A[n].weight.t()) @ layer.lora_B[n].weight.t()
             for n in ("default", "second")}
    torch.testing.assert_close(layer(x), base + delta["default"] + delta["second"])
    layer.set_adapter("second")
    torch.testing.assert_close(layer(x), base + delta["second"])
    layer.disable_adapters = True
    torch.testing.assert_close(layer(x), base)
    with pytest.raises(KeyError, match="nope"):
        layer.set_adapter("nope")


def test_bad_adapter_arguments_are_named():
    base = Linear4bit.from_linear(nn.Linear(K, N))
    with pytest.raises(ValueError, match="rank r"):
        LoRALinear(base, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear(base, r=4, lora_dropout=1.0)


def test_dtype_cast_leaves_nf4_constants_fp32():
    layer = _layer().to(torch.bfloat16)
    w = layer.base_layer.weight
    assert w.packed.dtype == torch.uint8 and w.absmax.dtype == torch.uint8
    assert w.nested_absmax.dtype == w.quant_map.dtype == w.offset.dtype == torch.float32
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16


def test_state_dict_keys_match_peft_on_bitsandbytes():
    """Our LoRALinear and PEFT's LoRA wrapper of a bnb Linear4bit save the same keys, and the
    weights load across in both directions."""
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    ours = _layer(bias=False)
    bnb_layer = bnb.nn.Linear4bit(K, N, bias=False, compress_statistics=True, quant_type="nf4",
                                  compute_dtype=torch.float32)
    packed, qs = ours.base_layer.weight.to_bnb()
    bnb_layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, bnb_quantized=True)
    peft_layer = PeftLinear4bit(bnb_layer, "default", LoraConfig(r=R, lora_alpha=16), r=R, lora_alpha=16)
    assert set(ours.state_dict()) == set(peft_layer.state_dict())
    peft_layer.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    x = torch.randn(M, K)
    torch.testing.assert_close(peft_layer(x), ours(x))

    fresh = _layer(bias=False, seed=1)
    fresh.load_state_dict(peft_layer.state_dict())
    torch.testing.assert_close(fresh(x), ours(x), rtol=0, atol=0)


def test_linear4bit_loads_bitsandbytes_checkpoint_and_rejects_wrong_shape():
    w = torch.randn(N, K)
    packed, qs = bnbF.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
    bnb_layer = bnb.nn.Linear4bit(K, N, bias=True, compress_statistics=True, quant_type="nf4")
    bnb_layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, bnb_quantized=True)
    ours = Linear4bit(quantize(torch.zeros(N, K)), torch.zeros(N))
    ours.load_state_dict(bnb_layer.state_dict())
    assert torch.equal(ours.dequantized_weight(), bnbF.dequantize_4bit(packed, qs, quant_type="nf4"))
    assert torch.equal(ours.bias, bnb_layer.bias)
    wrong = Linear4bit(quantize(torch.zeros(N, K + 64)), torch.zeros(N))
    with pytest.raises(RuntimeError, match=r"weight: shape \(192, 128\) in the checkpoint"):
        wrong.load_state_dict(bnb_layer.state_dict())


@pytest.mark.parametrize("training", [False, True])
def test_triton_backend_layer_matches_reference(training, monkeypatch):
    """End to end through the dispatcher: QLORA_BACKEND=triton runs the fused kernels (interpreted
    on CPU) and agrees with the fp32 reference within bf16 rounding (see the low-precision test)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    layer = _layer(torch.bfloat16, bias=True)
    layer.train(training)
    m = 20  # above the GEMV bound, so the fused kernel and (in training) its backward run
    x = torch.randn(m, K, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    err = (y.float() - _reference(layer, x.detach())).abs()
    assert (err <= 3 * 2.0**-8 * _magnitude(layer, x.detach())).all()
    if training:
        y.float().sum().backward()
        w = layer.base_layer.weight.dequantize(torch.float32)
        b = layer.lora_B["default"].weight.float()
        a = layer.lora_A["default"].weight.float()
        dy = torch.ones(m, N)
        dx_ref = dy @ w + layer.scaling["default"] * (dy @ b) @ a
        mag = dy @ w.abs() + layer.scaling["default"] * (dy @ b.abs()) @ a.abs()
        assert ((x.grad.float() - dx_ref).abs() <= 3 * 2.0**-8 * mag).all()


def test_merge_and_unmerge_of_a_dense_fp32_base_restore_it_bit_for_bit():
    """The merge must not add the adapters into a dense fp32 W0 in place (its fp32 view is W0
    itself), or unmerge would hand back a changed weight."""
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    w0 = dense.weight.detach().clone()
    layer = LoRALinear(dense, r=2, lora_alpha=4)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 16)
    with torch.no_grad():
        adapted = layer(x)
        layer.merge(["default"])
        merged = layer(x)
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)
    # fp32, (W0 + s·B·A)·x against W0·x + s·B·(A·x): dot products of 16 terms, |y| < 10
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
