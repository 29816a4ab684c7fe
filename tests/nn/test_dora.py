"""DoRA on the NF4 base (qlora.nn.DoRALinear) against PEFT's DoRA layer on the same dense weights."""
import copy
import weakref

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from safetensors.torch import load_file, save_file
from torch import nn

import qlora.nn.dora as dora
from qlora.quant.nf4 import NF4Tensor, quantize
from qlora.nn import DoRALinear, Linear4bit

N, K, R, M = 48, 37, 4, 6  # K odd: row slabs start in the middle of a packed byte and of an NF4 block


def _layer(bias=True, dropout=0.0, seed=0, r=R, alpha=8.0):
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(N, K, generator=g) * 0.1)
        if bias:
            dense.bias.copy_(torch.randn(N, generator=g))
    layer = DoRALinear(Linear4bit.from_linear(dense), r=r, lora_alpha=alpha, lora_dropout=dropout)
    _randomize(layer, "default", g)
    return layer


def _randomize(layer, name, g):
    """B = 0 and m = ‖W0‖ at init make the DoRA terms vanish; give them values so they are tested."""
    with torch.no_grad():
        layer.lora_B[name].weight.copy_(torch.randn(layer.out_features, layer.r[name], generator=g))
        m = layer.lora_magnitude_vector[name].weight
        m.mul_(1 + 0.5 * torch.rand(m.shape, generator=g))


def _peft_twin(layer, dropout=0.0):
    """PEFT's DoRA layer on an nn.Linear holding our dequantized W0, with our A, B and m copied in."""
    base = nn.Linear(K, N, bias=layer.base_layer.bias is not None)
    with torch.no_grad():
        base.weight.copy_(layer.base_layer.weight.dequantize(torch.float32))
        if base.bias is not None:
            base.bias.copy_(layer.base_layer.bias)
    config = LoraConfig(r=layer.r["default"], lora_alpha=layer.lora_alpha["default"], lora_dropout=dropout,
                        use_dora=True)
    twin = PeftLoraLinear(base, "default", config=config, r=config.r, lora_alpha=config.lora_alpha)
    adapter_state = {k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")}
    missing, unexpected = twin.load_state_dict(adapter_state, strict=False)
    assert not unexpected and all(k.startswith("base_layer.") for k in missing)
    return twin


def _params(module):
    return [module.lora_A["default"].weight, module.lora_B["default"].weight,
            module.lora_magnitude_vector["default"].weight]


@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, False), (32, True)])
def test_nf4_rows_are_bit_identical_to_full_dequantize(blocksize, double_quant):
    # 300 rows of 37: > 256 absmax blocks at blocksize 32, so slabs cross nested (double-quant) blocks.
    w = torch.randn(300, K)
    q = quantize(w, blocksize, double_quant)
    full = q.dequantize(torch.float32)
    for start, stop in [(0, 300), (0, 1), (1, 2), (3, 17), (150, 299), (299, 300)]:
        assert torch.equal(dora.nf4_rows(q, start, stop), full[start:stop]), (start, stop)


@pytest.mark.parametrize("tile_rows", [1, 7, N, 1000])
def test_tiled_norm_matches_full_norm(tile_rows):
    layer = _layer()
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    full = torch.linalg.vector_norm(layer.base_layer.weight.dequantize(torch.float32) + s * (b @ a), dim=1)
    tiled = dora.dora_weight_norm(layer.base_layer.weight, a, b, s, tile_rows)
    # Same fp32 values; only addmm's fused multiply-add vs a separate add differs: a few ulp of the norm.
    torch.testing.assert_close(tiled, full, rtol=1e-6, atol=0)
    assert not tiled.requires_grad


def test_norm_dequantizes_one_tile_at_a_time(monkeypatch):
    layer = _layer()
    layer.norm_tile_elements = 7 * K  # 7 rows a tile: 7 tiles for 48 rows, the last one short
    calls, alive = [], []

    def spy(weight, start, stop):
        # Every earlier tile must be gone (freed) before the next is dequantized.
        assert all(ref() is None for ref in alive), f"a tile was still alive when rows {start}:{stop} were read"
        tile = real(weight, start, stop)
        calls.append((start, stop))
        alive.append(weakref.ref(tile))
        return tile

    def no_full_dequantize(*args, **kwargs):
        raise AssertionError("the DoRA norm dequantized the whole NF4 weight")

    real = dora.nf4_rows
    monkeypatch.setattr(dora, "nf4_rows", spy)
    monkeypatch.setattr(NF4Tensor, "dequantize", no_full_dequantize)
    layer.weight_norm("default")
    assert calls == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 35), (35, 42), (42, 48)]


def test_backward_keeps_no_dense_copy_of_w0():
    layer = _layer()
    x = torch.randn(M, K, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(x).sum().backward()
    assert saved and all(shape.numel() < N * K for shape in saved), saved


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_peft_dora(bias):
    layer = _layer(bias=bias)
    twin = _peft_twin(layer)
    x = torch.randn(2, M, K, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    y, y_twin = layer(x), twin(x_twin)
    # fp32 throughout on the same values; the two differ only in summation order (x·W0ᵀ·m/n vs
    # PEFT's x·W0ᵀ + (m/n − 1)·x·W0ᵀ): errors of a few ulp of |x|·|W| ≈ 10.
    torch.testing.assert_close(y, y_twin, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_twin.backward(dy)
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(_params(layer), _params(twin)):
        assert ours.grad is not None and ours.grad.abs().sum() > 0
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-4)


def test_dropout_matches_peft_with_the_same_random_mask():
    layer = _layer(dropout=0.3).train()
    twin = _peft_twin(layer, dropout=0.3).train()
    x = torch.randn(M, K)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    y_twin = twin(x)
    torch.testing.assert_close(y, y_twin, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    y_twin.sum().backward()
    for ours, theirs in zip(_params(layer), _params(twin)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-4)
    layer.eval()
    assert not torch.equal(layer(x), y), "dropout had no effect in training mode"


def test_fresh_adapter_and_reset_reproduce_the_base_layer_exactly():
    dense = nn.Linear(K, N)
    layer = DoRALinear(Linear4bit.from_linear(dense), r=R, lora_alpha=8)
    x = torch.randn(M, K)
    base = layer.base_layer(x)
    # B = 0 and m is the very norm the forward divides by, so m/n is exactly 1.
    assert torch.equal(layer(x), base)
    _randomize(layer, "default", torch.Generator().manual_seed(1))
    assert not torch.allclose(layer(x), base)
    layer.reset_adapter("default")
    assert torch.equal(layer(x), base)


def test_disabled_adapters_give_the_base_output():
    layer = _layer()
    x = torch.randn(M, K)
    layer.disable_adapters = True
    assert torch.equal(layer(x), layer.base_layer(x))


def test_merged_delta_weights_reproduce_the_forward_with_two_adapters():
    layer = _layer()
    layer.add_adapter("second", r=3, lora_alpha=6)
    _randomize(layer, "second", torch.Generator().manual_seed(2))
    layer.set_adapter(["default", "second"])
    x = torch.randn(M, K)
    with torch.no_grad():
        merged = layer.base_layer.weight.dequantize(torch.float32)
        merged += layer.delta_weight("default") + layer.delta_weight("second")
        # fp32, W0 folded in before vs after the matmul: rounding of order ulp(|x|·|W|).
        torch.testing.assert_close(x @ merged.t() + layer.base_layer.bias, layer(x), rtol=1e-5, atol=1e-5)


def test_state_dict_has_peft_keys_and_round_trips():
    layer = _layer()
    twin = _peft_twin(layer)
    ours = {k for k in layer.state_dict() if not k.startswith("base_layer.")}
    theirs = {k for k in twin.state_dict() if not k.startswith("base_layer.")}
    assert ours == theirs == {"lora_A.default.weight", "lora_B.default.weight",
                              "lora_magnitude_vector.default.weight"}
    # PEFT's trained values load into a fresh layer of ours and give PEFT's output.
    with torch.no_grad():
        for p in _params(twin):
            p.add_(0.01 * torch.randn_like(p))
    fresh = DoRALinear(layer.base_layer, r=R, lora_alpha=8)
    fresh.load_state_dict({k: v for k, v in twin.state_dict().items() if not k.startswith("base_layer.")},
                          strict=False)
    x = torch.randn(M, K)
    torch.testing.assert_close(fresh(x), twin(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_forward_tracks_the_fp32_layer():
    layer = _layer()
    x = torch.randn(M, K)
    y32 = layer(x)
    y16 = layer.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: each of x, A, B, m and the products rounds at ≈ 2⁻⁸ relative,
    # a few such errors accumulate on outputs of magnitude ≈ |x|·|W| ≈ 10.
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=1e-1)


def test_triton_backend_tracks_the_fp32_layer(monkeypatch):
    """The base matmul through the fused NF4 kernel (Triton's interpreter on CPU): output and
    gradients within the rule of tests/ops/test_fused.py: at most 2x the error of the torch path in bf16, plus
    one bf16 output rounding (2⁻⁷ under the interpreter's truncating cast)."""
    torch.manual_seed(0)
    layer = DoRALinear(Linear4bit.from_linear(nn.Linear(64, 128)), r=R, lora_alpha=8)  # the kernel's 64-multiples
    _randomize(layer, "default", torch.Generator().manual_seed(0))
    x = torch.randn(M, 64)
    dy = torch.randn(M, 128)

    def run(module, dtype):
        xi = x.detach().to(dtype).requires_grad_(True)
        y = module(xi)
        y.backward(dy.to(dtype))
        return [y.detach(), xi.grad] + [p.grad for p in _params(module)]

    ref = run(layer, torch.float32)
    low = DoRALinear(Linear4bit.from_linear(nn.Linear(64, 128)), r=R, lora_alpha=8)
    low.load_state_dict(layer.state_dict())
    low = low.to(torch.bfloat16)
    lowp = run(low, torch.bfloat16)
    low.zero_grad(set_to_none=True)
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    ours = run(low, torch.bfloat16)
    for name, o, lp, r in zip(["y", "dx", "dA", "dB", "dm"], ours, lowp, ref):
        err = (o.float() - r).abs().max().item()
        assert err <= 2 * (lp.float() - r).abs().max().item() + 2.0**-7 * r.abs().max().item(), name


def _file_key(module_key):
    """Our module key -> PEFT's adapter-file key: adapter name dropped and, for the magnitude only,
    ".weight" too (PEFT keeps the file format of the time m was a bare parameter)."""
    key = "base_model.model." + module_key.replace(".default", "")
    return key.removesuffix(".weight") if key.endswith("lora_magnitude_vector.weight") else key


def test_peft_adapter_files_map_onto_our_layers_both_ways(tmp_path):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(K, N), nn.Tanh(), nn.Linear(N, 16))
    ours = copy.deepcopy(dense)
    for i in (0, 2):
        ours[i] = DoRALinear(Linear4bit.from_linear(dense[i]), r=R, lora_alpha=8)
        _randomize(ours[i], "default", torch.Generator().manual_seed(i))
    dequantized = copy.deepcopy(dense)
    with torch.no_grad():
        for i in (0, 2):
            dequantized[i].weight.copy_(ours[i].base_layer.weight.dequantize(torch.float32))
    adapter = {k: v for k, v in ours.state_dict().items() if ".lora_" in k}
    x = torch.randn(M, K)

    # Ours -> PEFT: write PEFT's file layout and let PeftModel load it.
    config = LoraConfig(r=R, lora_alpha=8, target_modules=["0", "2"], use_dora=True)
    config.save_pretrained(tmp_path)
    save_file({_file_key(k): v.contiguous() for k, v in adapter.items()}, tmp_path / "adapter_model.safetensors")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(dequantized), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), ours(x), rtol=1e-5, atol=1e-5)  # fp32, summation order only

    # PEFT -> ours: a file PEFT itself wrote.
    trained = get_peft_model(copy.deepcopy(dequantized), config)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if ".lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    trained.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(saved) == {_file_key(k) for k in adapter}
    by_file_key = {_file_key(k): k for k in adapter}
    missing, unexpected = ours.load_state_dict({by_file_key[k]: v for k, v in saved.items()}, strict=False)
    assert not unexpected and not any(".lora_" in k for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), trained(x), rtol=1e-5, atol=1e-5)
