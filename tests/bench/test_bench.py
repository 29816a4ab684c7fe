"""`qlora bench kernels|optim --quick`: every file is written and every value is sane.

No timing is asserted (speed is checked by benchmarks writing results, never by tests): times only
have to be positive and finite, and the quantiles ordered.
"""
import csv
import json
import math

import pytest
import torch

from qlora.bench import harness, kernels
from qlora.bench.linear_providers import PROVIDERS, LinearProblem
from qlora.cli import main
from qlora.ops import path_times

# Relative error bound of every provider's Y or dX against the fp32 reference. Each path rounds
# W0 and S = X·Aᵀ to bf16 (relative 2^-9 per element, random signs over K <= 256 terms, ~2^-9 of
# the result) and rounds the output to bf16 (2^-9); the sum stays below 4·2^-9 ≈ 0.008 (measured:
# <= 0.008). A wrong term is O(1) instead: the LoRA term has the base term's magnitude.
REL_ERR = 2 ** -5


def _rows(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def quick_kernels(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_kernels")
    assert main(["bench", "kernels", "--quick", "--out", str(out)]) == 0
    return out


def test_kernels_quick_writes_every_file(quick_kernels):
    names = {p.name for p in quick_kernels.iterdir()}
    expected = {"bench_kernels.json", "bench_kernels.csv", "bench_kernels.md"}
    expected |= {f"bench_kernels_{mode}_r8.png" for mode in kernels.MODES}
    assert expected <= names
    for png in expected - {"bench_kernels.json", "bench_kernels.csv", "bench_kernels.md"}:
        assert (quick_kernels / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(quick_kernels / "bench_kernels.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(_rows(quick_kernels / "bench_kernels.json"))


def test_kernels_quick_rows_are_sane(quick_kernels):
    rows = _rows(quick_kernels / "bench_kernels.json")
    shapes = [(n, k) for n, k, _ in kernels.parse_nk(kernels.QUICK_SHAPES)]
    providers = {row["provider"] for row in rows}
    # dense-bf16 always runs; the bitsandbytes/PEFT baselines are installed in the test env; the
    # Triton providers run in the interpreter (conftest sets TRITON_INTERPRET=1 without CUDA).
    assert providers == set(PROVIDERS)
    combos = {(r["n"], r["k"], r["m"], r["rank"], r["mode"], r["provider"]) for r in rows}
    assert len(combos) == len(rows) == len(shapes) * len(kernels.QUICK_M) * len(kernels.MODES) * len(PROVIDERS)
    for row in rows:
        assert row["device"] and row["date"] and row["version_torch"] == torch.__version__
        assert row["peak_gemm_bf16_tflops"] > 0 and row["peak_copy_gb_per_s"] > 0
        assert row["max_rel_err"] < REL_ERR, row
        assert row["flops"] > 2 * row["m"] * row["n"] * row["k"] - 1
        if row["timing"] == "timed":
            assert 0 < row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"] < math.inf
            assert row["samples"] >= row["rounds"]
            assert row["tflops"] > 0 and row["gb_per_s"] > 0 and row["pct_peak"] > 0
            assert row["metric"] == ("GB/s" if row["m"] <= kernels.SMALL_M else "TFLOP/s")
        else:  # interpreter: never presented as a speed
            assert row["provider"].startswith("qlora-") and row["device_type"] == "cpu"
            assert row["ms_p50"] is None and row["tflops"] is None and row["pct_peak"] is None
    # speedups are consistent with the times they come from
    by_key = {(r["n"], r["k"], r["m"], r["mode"], r["provider"]): r for r in rows}
    for row in rows:
        if row["provider"] == "hf-stack" and row["timing"] == "timed":
            dense = by_key[(row["n"], row["k"], row["m"], row["mode"], "dense-bf16")]
            assert row["speedup_vs_dense-bf16"] == pytest.approx(dense["ms_p50"] / row["ms_p50"])


def test_kernels_quick_markdown_says_what_is_not_speed(quick_kernels):
    text = (quick_kernels / "bench_kernels.md").read_text()
    assert "CPU run" in text and "not timed" in text
    for mode in kernels.MODES:
        assert f"## mode {mode}, rank 8" in text
    assert "*interpreter*" in text


def test_kernels_quick_rows_carry_the_predicted_time_of_their_path(quick_kernels):
    rows = _rows(quick_kernels / "bench_kernels.json")
    for row in rows:
        if row["provider"] in kernels.PROVIDER_PATH:
            assert row["path"] == ("gemv" if row["provider"] == "qlora-fused" and row["mode"] == "fwd"
                                   and row["m"] <= 16 else kernels.PROVIDER_PATH[row["provider"]])
            expected = path_times.predicted_seconds("sm_90", row["path"], row["mode"], row["m"], row["n"], row["k"],
                                                    row["rank"])
            assert row["predicted_arch"] == "sm_90" and row["predicted_ms"] == pytest.approx(1e3 * expected)
        else:
            assert row["path"] is None and row["predicted_ms"] is None
    text = (quick_kernels / "bench_kernels.md").read_text()
    assert "## Predicted time of each path: sm_90 on H200" in text


def test_kernels_predicted_prints_every_path_without_running_a_kernel(capsys, monkeypatch):
    monkeypatch.setattr(kernels, "run", lambda args: pytest.fail("--predicted ran the benchmark"))
    assert main(["bench", "kernels", "--predicted", "--shapes", "llama-2-70b", "--mode", "fwd,full"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x" in line.split("|")[1]]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    # 4 weight shapes x 2 ranks x 5 M x 2 modes, each with the time of every candidate path
    assert len(cells) == 4 * len(kernels.DEFAULT_RANKS) * len(kernels.DEFAULT_M) * 2
    for shape, r, m, mode, *ms, chosen in cells:
        times = dict(zip(path_times.PATHS, ms))
        candidates = path_times.candidates(int(m), training=mode != "fwd")
        assert [p for p, t in times.items() if t != "-"] == list(candidates), (shape, m, mode)
        assert float(times[chosen]) == min(float(times[p]) for p in candidates), (shape, r, m, mode, times)


def test_measured_path_times_are_what_the_dispatcher_reads(tmp_path):
    base = dict(device="NVIDIA H200", n=4096, k=4096, rank=16, date="2026-11-29", lora=True, timing="timed")
    rows = [dict(base, provider="qlora-fused", path="fused", m=512, mode="full", ms_p50=2.0),
            dict(base, provider="qlora-dequant-cublas", path="dense", m=512, mode="full", ms_p50=1.0),
            dict(base, provider="dense-bf16", path=None, m=512, mode="full", ms_p50=0.5),
            dict(base, provider="qlora-fused", path="fused", m=64, mode="full", ms_p50=None, timing="not timed")]
    path = tmp_path / "path_times_measured.json"
    path.write_text(json.dumps(kernels.measured_path_times(rows, "sm_90")))
    assert path_times.measured_table(path) == {("sm_90", 512, 4096, 4096, 16, "full", "fused"): 2e-3,
                                               ("sm_90", 512, 4096, 4096, 16, "full", "dense"): 1e-3}


def test_problem_reference_matches_dequantized_layer():
    problem = LinearProblem.random(128, 64, 4, torch.device("cpu"))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    dy = torch.randn(3, 128, dtype=torch.bfloat16)
    y, dx = problem.reference(x, dy, lora=True)
    w = problem.weight.dequantize(torch.float32)
    lora = problem.scaling * problem.b.float() @ problem.a.float()
    torch.testing.assert_close(y, x.float() @ (w + lora).t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dy.float() @ (w + lora), rtol=1e-5, atol=1e-6)
    # the LoRA term is as large as the base term, so a provider dropping it fails REL_ERR
    base = x.float() @ w.t()
    assert (y - base).abs().max() > 0.3 * base.abs().max()


def test_preset_shapes_of_llama_2_70b():
    shapes = kernels.preset_shapes("llama-2-70b")
    assert shapes == [(8192, 8192, "q,o"), (1024, 8192, "k,v"), (28672, 8192, "gate,up"), (8192, 28672, "down")]


def test_bad_shapes_are_clear_errors(capsys):
    assert main(["bench", "kernels", "--shapes", "custom"]) == 2
    assert "--nk" in capsys.readouterr().err
    assert main(["bench", "kernels", "--shapes", "custom", "--nk", "128x100"]) == 2
    assert "multiple of the NF4 blocksize" in capsys.readouterr().err


def test_interleaved_timing_pools_every_round():
    calls = []
    timed = harness.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                     torch.device("cpu"), rounds=2, budget_ms=1.0)
    assert set(timed) == {"a", "b"}
    for p50, p20, p80, count in timed.values():
        assert 0 < p20 <= p50 <= p80 and count >= 2
    # round 1 times a then b; round 2 b then a
    assert calls[0] == "a" and calls[-1] == "a" and "b" in calls


def test_optim_quick_writes_rows_and_markdown(tmp_path):
    assert main(["bench", "optim", "--quick", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "bench_optim.json")
    assert {r["provider"] for r in rows} >= {"torch_adamw", "paged_adamw", "paged_adamw_spill"}
    for row in rows:
        assert 0 < row["step_ms_p20"] <= row["step_ms_p50"] <= row["step_ms_p80"] < math.inf
        assert row["device"] and row["version_torch"] == torch.__version__ and row["rounds"] == 3
    spill = next(r for r in rows if r["provider"] == "paged_adamw_spill")
    assert spill["state_host_mib"] > 0 and spill["pages_moved_per_step"] > 0
    assert (tmp_path / "bench_optim.csv").exists()
    assert "| paged_adamw_spill |" in (tmp_path / "bench_optim.md").read_text()


def test_train_quick_runs_both_stacks_on_the_same_function(tmp_path):
    assert main(["bench", "train", "--quick", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "bench_train.json")
    assert [r["stack"] for r in rows] == ["qlora", "hf-stack"]
    for row in rows:
        assert row["model"] == "tiny-llama" and row["dtype"] == "float32"
        assert 0 < row["step_ms_p20"] <= row["step_ms_p50"] <= row["step_ms_p80"] < math.inf
        assert row["tokens_per_s"] > 0
        # r (d_in + d_out) per adapted linear: 4 layers x (q 128+128, k 128+64, v 128+64, o 128+128,
        # gate 128+384, up 128+384, down 384+128) x r=16
        assert row["trainable_params"] == 4 * 16 * (256 + 192 + 192 + 256 + 512 + 512 + 512)
        # random weights: the loss starts near ln(vocab) = ln(256) and training moves it
        assert abs(row["first_loss"] - math.log(256)) < 0.5 and row["last_loss"] != row["first_loss"]
    # Same NF4 bits, same batch, B = 0: the same function in fp32, up to summation order.
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], rel=1e-4)
    assert rows[1]["speedup_vs_hf_stack"] == 1.0
    assert (tmp_path / "bench_train.csv").exists()
    assert "| qlora |" in (tmp_path / "bench_train.md").read_text()


def test_generate_quick_times_adapter_and_merged_export(tmp_path):
    assert main(["bench", "generate", "--quick", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "bench_generate.json")
    assert [r["provider"] for r in rows] == ["base+adapter", "merged-nf4", "merged-dense"]
    for row in rows:
        assert row["new_tokens"] == 24 and row["adapter"] == "random LoRA r=16"
        assert 0 < row["generate_ms_p20"] <= row["generate_ms_p50"] <= row["generate_ms_p80"]
        assert row["decode_tokens_per_s"] == pytest.approx(1000 / row["decode_ms_per_token"])
    assert rows[0]["decode_speedup_vs_adapter"] == 1.0 and rows[0]["same_tokens_as_adapter"] == 1.0
    # fp32 merged weights compute what base + adapter does up to summation order (~1e-6 of the
    # logits): greedy decoding picks the same tokens unless two logits tie that closely
    assert rows[2]["same_tokens_as_adapter"] == 1.0
    assert "says nothing about GPU decoding speed" in (tmp_path / "bench_generate.md").read_text()
