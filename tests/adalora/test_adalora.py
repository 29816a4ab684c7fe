"""AdaLoRA on the NF4 base: the SVD-form layer, orthogonal regulariser, rank allocator, rank report
and pruning, checked against PEFT's AdaLoRA (layer, RankAllocator, saved-adapter format)."""
import copy
import io
import json
import types

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora import SVDLinear
from safetensors.torch import load_file, save_file
from torch import nn

from qlora.adalora.allocator import RankAllocator
from qlora.adalora.ranks import final_ranks, plot_ranks, prune_to_rank_pattern, rank_table
from qlora.adalora import AdaLoRALinear
from qlora.nn import Linear4bit
from qlora.adalora.layer import orthogonal_regularization

INIT_R, TARGET_R, ALPHA = 6, 2, 8.0
NAMES = ("l0", "l1", "l2")
# total_step 12, 2 warm-up steps, 3 final steps: the budget falls over steps 3..8, masking every 2nd.
SCHEDULE = dict(target_r=TARGET_R, total_step=12, tinit=2, tfinal=3, deltaT=2, beta1=0.85, beta2=0.85)


class TinyStack(nn.Module):
    """Three linear layers of different shapes; returns an output with ``.loss`` as transformers
    models do, which is what PEFT's AdaLoraModel adds its orthogonal regulariser to."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(16, 24), nn.Linear(24, 20), nn.Linear(20, 12)

    def forward(self, x):
        y = self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x)))))
        return types.SimpleNamespace(logits=y, loss=(y - 1).pow(2).mean())


def _base(seed=0):
    torch.manual_seed(seed)
    model = TinyStack()
    with torch.no_grad():
        for name in NAMES:
            getattr(model, name).weight.mul_(3)  # larger than the default init: a visible NF4 error
    return model


def _ours(base):
    """The QLoRA model: every layer NF4-quantized and wrapped in AdaLoRA; only adapters trainable."""
    model = copy.deepcopy(base)
    for name in NAMES:
        setattr(model, name, AdaLoRALinear(Linear4bit.from_linear(getattr(model, name)), r=INIT_R, lora_alpha=ALPHA))
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return model


def _dequantized_copy(ours, base):
    """``base`` with our NF4 weights dequantized into its dense layers: PEFT's view of the same model."""
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name in NAMES:
            getattr(dense, name).weight.copy_(getattr(ours, name).base_layer.weight.dequantize(torch.float32))
    return dense


def _peft_twin(ours, base):
    cfg = AdaLoraConfig(target_modules=list(NAMES), init_r=INIT_R, lora_alpha=ALPHA, orth_reg_weight=0.5, **SCHEDULE)
    twin = get_peft_model(_dequantized_copy(ours, base), cfg)
    with torch.no_grad():
        for name in NAMES:
            ours_layer, twin_layer = getattr(ours, name), twin.base_model.model.get_submodule(name)
            for factor in ("lora_A", "lora_B", "lora_E"):
                getattr(twin_layer, factor)["default"].copy_(getattr(ours_layer, factor)["default"])
    return twin


def _adapter_params(model, prefix=""):
    return {f"{name}.{f}": getattr(model.get_submodule(prefix + name), f)["default"]
            for name in NAMES for f in ("lora_A", "lora_E", "lora_B")}


def _randomize_singular_values(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in NAMES:
            e = getattr(model, name).lora_E["default"]
            e.copy_(torch.randn(e.shape, generator=g))


# --- the layer -------------------------------------------------------------------------------------

def test_layer_forward_and_gradients_match_peft_svdlinear():
    base = _base()
    ours = _ours(base)
    _randomize_singular_values(ours)  # λ = 0 at init would leave P and Q without gradient
    layer = ours.l1
    dense = _dequantized_copy(ours, base).l1
    twin = SVDLinear(dense, "default", config=AdaLoraConfig(total_step=10, init_r=INIT_R), r=INIT_R, lora_alpha=ALPHA)
    assert ({k for k in twin.state_dict() if not k.startswith("base_layer.")}
            == {k for k in layer.state_dict() if not k.startswith("base_layer.")}
            == {"lora_A.default", "lora_B.default", "lora_E.default", "ranknum.default"})
    twin.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")},
                         strict=False)
    x = torch.randn(3, 5, 24, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    y, y_twin = layer(x), twin(x_twin)
    # fp32 on the same values in a different association ((x·(Qλ)ᵀ)·(cP)ᵀ vs (x·(Qλ)ᵀ·Pᵀ)·c): a few ulp.
    torch.testing.assert_close(y, y_twin, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_twin.backward(dy)
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-5, atol=1e-5)
    for factor in ("lora_A", "lora_B", "lora_E"):
        ours_grad = getattr(layer, factor)["default"].grad
        assert ours_grad.abs().sum() > 0
        torch.testing.assert_close(ours_grad, getattr(twin, factor)["default"].grad, rtol=1e-5, atol=1e-6)
    assert layer.ranknum["default"].grad is None


def test_fresh_layer_reproduces_the_base_and_delta_weight_merges():
    ours = _ours(_base())
    x = torch.randn(4, 16)
    assert torch.equal(ours.l0(x), ours.l0.base_layer(x))  # λ = 0 at init
    _randomize_singular_values(ours)
    with torch.no_grad():
        merged = ours.l0.base_layer.weight.dequantize(torch.float32) + ours.l0.delta_weight("default")
        # fp32, ΔW folded in before vs after the matmul: rounding of order ulp(|x|·|W|).
        torch.testing.assert_close(x @ merged.t() + ours.l0.base_layer.bias, ours.l0(x), rtol=1e-5, atol=1e-5)


def test_rank_zero_layer_and_bad_arguments():
    layer = AdaLoRALinear(nn.Linear(8, 4), r=0)
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), layer.base_layer(x))
    with pytest.raises(ValueError, match="non-negative integer"):
        AdaLoRALinear(nn.Linear(8, 4), r=-1)
    with pytest.raises(ValueError, match="rank mask has 3 entries"):
        AdaLoRALinear(nn.Linear(8, 4), r=4).prune("default", [True, False, True])


# --- orthogonal regularisation ---------------------------------------------------------------------

def test_orthogonal_regularization_value_and_gradient():
    ours = _ours(_base())
    reg = orthogonal_regularization(ours)
    reg.backward()
    grams = []
    for name in NAMES:
        layer = getattr(ours, name)
        q, p = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
        grams += [(q, q @ q.t() - torch.eye(INIT_R)), (p.t(), p.t() @ p - torch.eye(INIT_R))]
    expected = sum(torch.linalg.matrix_norm(g) for _, g in grams) / len(grams)
    torch.testing.assert_close(reg, expected)
    # d‖MMᵀ − I‖_F / dM = 2(MMᵀ − I)M / ‖MMᵀ − I‖_F, averaged over the 2·3 matrices.
    for i, name in enumerate(NAMES):
        layer = getattr(ours, name)
        (q, gq), (pt, gp) = grams[2 * i], grams[2 * i + 1]
        grad_q = 2 * gq @ q / torch.linalg.matrix_norm(gq) / len(grams)
        grad_p = (2 * gp @ pt / torch.linalg.matrix_norm(gp) / len(grams)).t()
        torch.testing.assert_close(layer.lora_A["default"].grad, grad_q)
        torch.testing.assert_close(layer.lora_B["default"].grad, grad_p)
    # Orthonormal P and Q cost nothing.
    with torch.no_grad():
        for name in NAMES:
            layer = getattr(ours, name)
            layer.lora_A["default"].copy_(torch.linalg.qr(torch.randn(layer.in_features, INIT_R))[0].t())
            layer.lora_B["default"].copy_(torch.linalg.qr(torch.randn(layer.out_features, INIT_R))[0])
    assert orthogonal_regularization(ours).item() < 1e-5


# --- the allocator -------------------------------------------------------------------------------

def test_budget_schedule_at_key_steps():
    alloc = RankAllocator(_ours(_base()), **SCHEDULE)
    assert (alloc.init_budget, alloc.target_budget) == (3 * INIT_R, 3 * TARGET_R) == (18, 6)
    # b(t) = ⌊12·(1 − (t − 2)/7)³ + 6⌋ for 2 < t <= 9, masking on even steps; 18 before, 6 after:
    # t=3: 12·(6/7)³ = 7.56 -> 13; t=4: 12·(5/7)³ = 4.37 -> 10; t=5: 2.24 -> 8; t=6: 0.94 -> 6.
    expected = {0: (18, False), 2: (18, False), 3: (13, False), 4: (10, True), 5: (8, False),
                6: (6, True), 7: (6, False), 9: (6, False), 10: (6, True), 11: (6, True)}
    for step, value in expected.items():
        assert alloc.budget(step) == value, step


def test_schedule_and_masks_match_peft_rank_allocator_step_by_step():
    base = _base()
    ours = _ours(base)
    twin = _peft_twin(ours, base)
    alloc = RankAllocator(ours, **SCHEDULE)
    peft_alloc = twin.base_model.rankallocator
    assert peft_alloc.init_bgt == alloc.init_budget and peft_alloc.target_bgt == alloc.target_budget
    for step in range(SCHEDULE["total_step"]):
        assert alloc.budget(step) == peft_alloc.budget_schedule(step), step
    ours_params, twin_params = _adapter_params(ours), _adapter_params(twin, "base_model.model.")
    g = torch.Generator().manual_seed(3)
    masked_steps = 0
    for step in range(SCHEDULE["total_step"]):
        x = torch.randn(8, 16, generator=g)
        loss = ours(x).loss + 0.5 * orthogonal_regularization(ours)
        twin_loss = twin.base_model(x).loss  # AdaLoraModel.forward adds 0.5 · its regulariser itself
        # Same fp32 values through NF4 vs its dense dequantized copy; association differs: a few ulp.
        torch.testing.assert_close(loss, twin_loss, rtol=1e-5, atol=1e-6)
        loss.backward()
        twin_loss.backward()
        with torch.no_grad():
            for key, p in ours_params.items():
                torch.testing.assert_close(p.grad, twin_params[key].grad, rtol=1e-4, atol=1e-7)
                # From here on both sides see bit-identical gradients and take the same SGD step,
                # so the scores, masks and λ must agree exactly.
                twin_params[key].grad.copy_(p.grad)
                p -= 0.5 * p.grad
                twin_params[key] -= 0.5 * twin_params[key].grad
        budget = alloc.update_and_allocate(ours, step)
        twin.base_model.update_and_allocate(step)
        for key, p in ours_params.items():
            assert torch.equal(p, twin_params[key]), (step, key)
        if alloc.budget(step)[1] or step >= SCHEDULE["total_step"] - SCHEDULE["tfinal"]:
            masked_steps += 1
            peft_pattern = {k.replace(".default", ""): v for k, v in twin.peft_config["default"].rank_pattern.items()}
            assert alloc.rank_pattern == peft_pattern, step
            assert sum(map(sum, alloc.rank_pattern.values())) == budget
            nonzero = sum(int((getattr(ours, n).lora_E["default"] != 0).sum()) for n in NAMES)
            assert nonzero == budget, step
        ours.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
    assert masked_steps == 6  # steps 4, 6, 8 in the budgeting phase, 9, 10, 11 in the final one


def test_tiny_llama_reaches_target_rank_and_prunes_without_changing_outputs(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name != "lm_head":
                setattr(module, child_name, AdaLoRALinear(Linear4bit.from_linear(child), r=4, lora_alpha=8))
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    n_layers = 2 * 7
    total_step, tfinal = 16, 4
    alloc = RankAllocator(model, target_r=2, total_step=total_step, tinit=3, tfinal=tfinal, deltaT=2)
    assert (alloc.init_budget, alloc.target_budget) == (4 * n_layers, 2 * n_layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    final_patterns = []
    for step in range(total_step):
        loss = model(input_ids=ids, labels=ids).loss + 0.1 * orthogonal_regularization(model)
        loss.backward()
        opt.step()
        budget = alloc.update_and_allocate(model, step)
        opt.zero_grad(set_to_none=True)
        if step >= total_step - tfinal:
            final_patterns.append(copy.deepcopy(alloc.rank_pattern))
            assert budget == alloc.target_budget
            # After the optimizer moved them, the masked λ are zero again and the rest are not.
            for key, mask in alloc.rank_pattern.items():
                lam = model.get_submodule(key.removesuffix(".lora_E")).lora_E["default"].view(-1)
                assert torch.equal(lam != 0, torch.tensor(mask)), (step, key)
    assert all(p == final_patterns[0] for p in final_patterns)  # fixed once the final phase starts
    ranks = final_ranks(alloc.rank_pattern)
    assert len(ranks) == n_layers and sum(f for _, f in ranks.values()) == alloc.target_budget == 2 * n_layers
    assert len({f for _, f in ranks.values()}) > 1, "every layer kept the same rank: nothing was allocated"

    table = rank_table(alloc.rank_pattern)
    assert "model.layers.1.mlp.down_proj" in table and table.splitlines()[-1].split()[-2:] == ["56", "28"]
    png = plot_ranks(alloc.rank_pattern, tmp_path / "ranks.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in tmp_path.iterdir()) == ["ranks.png"]

    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        prune_to_rank_pattern(model, alloc.rank_pattern)
        after = model(input_ids=ids).logits
    for name, (_, final) in ranks.items():
        layer = model.get_submodule(name)
        assert layer.r["default"] == final and layer.lora_A["default"].shape[0] == final
        assert int(layer.ranknum["default"]) == 4  # the scaling α / r_init is kept
    # Dropping triplets whose λ is exactly 0 removes exact zeros from the sums; only BLAS blocking
    # over a shorter inner dimension may change the rounding, by a few ulp.
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_allocator_state_round_trip_resumes_identically():
    def run(steps, alloc, model):
        g = torch.Generator().manual_seed(5)
        for step in range(SCHEDULE["total_step"]):
            x = torch.randn(8, 16, generator=g)
            if step not in steps:
                continue
            model(x).loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= 0.5 * p.grad
            alloc.update_and_allocate(model, step)
            model.zero_grad(set_to_none=True)

    base = _base()
    straight = _ours(base)
    resumed = copy.deepcopy(straight)
    a = RankAllocator(straight, **SCHEDULE)
    run(range(12), a, straight)
    b = RankAllocator(resumed, **SCHEDULE)
    run(range(5), b, resumed)
    buf = io.BytesIO()  # through bytes: the state must survive a weights_only load, as checkpoints do
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    c = RankAllocator(resumed, **SCHEDULE)
    c.load_state_dict(torch.load(buf, weights_only=True))
    run(range(5, 12), c, resumed)
    assert c.rank_pattern == a.rank_pattern
    for key, p in _adapter_params(straight).items():
        assert torch.equal(p, _adapter_params(resumed)[key]), key


def test_finish_fixes_the_target_budget_when_there_is_no_final_phase():
    model = _ours(_base())
    alloc = RankAllocator(model, **{**SCHEDULE, "tfinal": 0, "deltaT": 7})  # masks only at step 7
    g = torch.Generator().manual_seed(6)
    for step in range(SCHEDULE["total_step"]):
        model(torch.randn(8, 16, generator=g)).loss.backward()
        alloc.update_and_allocate(model, step)
        model.zero_grad(set_to_none=True)
    # Without a final phase the last mask (step 7, budget ⌊12·(1 − 5/10)³ + 6⌋ = 7) is above target.
    assert sum(map(sum, alloc.rank_pattern.values())) == 7 > alloc.target_budget
    pattern = alloc.finish(model)
    assert sum(map(sum, pattern.values())) == alloc.target_budget
    assert alloc.finish(model) == pattern


def test_allocator_errors_name_the_problem():
    model = _ours(_base())
    with pytest.raises(ValueError, match="no budgeting phase"):
        RankAllocator(model, target_r=2, total_step=10, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match="target_r=7"):
        RankAllocator(model, target_r=7, total_step=10)
    with pytest.raises(ValueError, match="beta1"):
        RankAllocator(model, target_r=2, total_step=10, beta1=1.0)
    with pytest.raises(ValueError, match="no AdaLoRA layer"):
        RankAllocator(_base(), target_r=2, total_step=10)
    with pytest.raises(ValueError, match=r"l0\.lora_A\.default has no gradient"):
        RankAllocator(model, target_r=2, total_step=10).update_and_allocate(model, 0)
    with pytest.raises(ValueError, match="no module 'l9'"):
        prune_to_rank_pattern(model, {"l9.lora_E": [True] * INIT_R})


# --- the pruned adapter in PEFT's format -------------------------------------------------------------

def _trained_and_pruned():
    base = _base()
    ours = _ours(base)
    alloc = RankAllocator(ours, **SCHEDULE)
    g = torch.Generator().manual_seed(4)
    for step in range(SCHEDULE["total_step"]):
        (ours(torch.randn(8, 16, generator=g)).loss + 0.5 * orthogonal_regularization(ours)).backward()
        with torch.no_grad():
            for p in ours.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad
        alloc.update_and_allocate(ours, step)
        ours.zero_grad(set_to_none=True)
    prune_to_rank_pattern(ours, alloc.rank_pattern)
    return base, ours, alloc.rank_pattern


def test_pruned_adapter_loads_into_peft_adalora_and_back(tmp_path):
    base, ours, pattern = _trained_and_pruned()
    # What a PEFT-format save of AdaLoRA holds: the adapter name dropped from the keys, no ranknum,
    # the pruned tensors, and the full-length rank pattern (plus init_r) in adapter_config.json.
    state = {f"base_model.model.{k.replace('.default', '')}": v.detach().contiguous()
             for k, v in ours.state_dict().items() if ".lora_" in k}
    save_file(state, tmp_path / "adapter_model.safetensors")
    AdaLoraConfig(target_modules=list(NAMES), init_r=INIT_R, lora_alpha=ALPHA, rank_pattern=pattern,
                  **SCHEDULE).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == pattern
    twin = PeftModel.from_pretrained(_dequantized_copy(ours, base), tmp_path)
    x = torch.randn(8, 16)
    with torch.no_grad():
        ours_y = ours(x).logits
        for name in NAMES:
            assert twin.base_model.model.get_submodule(name).lora_A["default"].shape[0] == sum(pattern[f"{name}.lora_E"])
        # Same fp32 values (NF4 vs its dequantized copy), different association: a few ulp.
        torch.testing.assert_close(twin(x).logits, ours_y, rtol=1e-5, atol=1e-5)
    # PEFT's own save of it, back into ours: layers at init_r, pruned by the saved pattern, tensors loaded.
    twin.save_pretrained(tmp_path / "peft")
    saved_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "ADALORA" and saved_config["rank_pattern"] == pattern
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(saved) == set(state)  # no ranknum, no adapter name
    fresh = _ours(base)
    prune_to_rank_pattern(fresh, saved_config["rank_pattern"])
    missing, unexpected = fresh.load_state_dict(
        {k.removeprefix("base_model.model.") + ".default": v for k, v in saved.items()}, strict=False)
    assert not unexpected and not any(".lora_" in k for k in missing)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, ours_y)


def test_triton_backend_tracks_the_fp32_layer(monkeypatch):
    """The adapter inside the fused NF4 kernel (Triton's interpreter on CPU): output and gradients
    within the rule of tests/ops/test_fused.py: at most 2x the error of the torch path in bf16, plus one bf16
    output rounding (2⁻⁷ under the interpreter's truncating cast)."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 128)  # the kernel needs multiples of 64
    layer = AdaLoRALinear(Linear4bit.from_linear(dense), r=INIT_R, lora_alpha=ALPHA)
    with torch.no_grad():
        layer.lora_E["default"].normal_()
    x = torch.randn(5, 64)
    dy = torch.randn(5, 128)

    def run(module, dtype):
        xi = x.detach().to(dtype).requires_grad_(True)
        y = module(xi)
        y.backward(dy.to(dtype))
        return [y.detach(), xi.grad] + [getattr(module, f)["default"].grad for f in ("lora_A", "lora_E", "lora_B")]

    ref = run(layer, torch.float32)
    low = copy.deepcopy(layer).to(torch.bfloat16)
    low.zero_grad(set_to_none=True)
    lowp = run(low, torch.bfloat16)
    low.zero_grad(set_to_none=True)
    monkeypatch.setenv("QLORA_BACKEND", "triton")
    ours = run(low, torch.bfloat16)
    for name, o, lp, r in zip(["y", "dx", "dQ", "dλ", "dP"], ours, lowp, ref):
        err = (o.float() - r).abs().max().item()
        assert err <= 2 * (lp.float() - r).abs().max().item() + 2.0**-7 * r.abs().max().item(), name
