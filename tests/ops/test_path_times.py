"""qlora/ops/path_times.py: launch times from the speed model's table, the path choice, measured
times overriding predictions, and the committed table (both archs, every kernel, the dequant
kernel near HBM bandwidth). That the committed table matches the compiled kernels is checked where
they are compiled (tests/bench/test_kernel_inspect.py)."""
import pytest

from qlora.ops import path_times

MACHINE = {"name": "toy", "sms": 10, "clock_hz": 1e9, "tensor_clock_hz": 0.5e9, "hbm_bytes_per_s": 1e12,
           "rated_dense_bf16_flop_per_s": 1e15}


def _config(tile, loop, issue, tensor=0.0, memory=0.0, split=1):
    return {"config": "toy", "tile": tile, "loop": loop, "split": split, "issue_cycles": issue,
            "tensor_cycles": tensor, "memory_cycles": memory, "bound": "issue"}


def toy_table(fused_issue=1000.0):
    """One config per kernel; the fused kernels' cost per step is ``fused_issue`` cycles."""
    gemv = [_config({"M": 1, "N": 64, "K": 256}, "K", 100.0, split=4)]
    return {"archs": {"sm_90": {"machine": MACHINE, "kernels": {
        "nf4_lora_linear_fwd": [_config({"N": 128, "M": 128, "K": 64}, "K", fused_issue, tensor=200.0)],
        "nf4_lora_linear_bwd_dx": [_config({"M": 128, "K": 128, "N": 64}, "N", fused_issue, tensor=200.0)],
        "nf4_gemv_lora": gemv, "nf4_gemv_lora_m16": gemv,
        "nf4_dequantize": [_config({"weights": 1024}, None, 100.0, memory=400.0)]}}}}


def test_launch_seconds_is_the_busier_of_all_sms_and_one_cta():
    config = _config({"N": 128, "M": 128, "K": 64}, "K", issue=1000.0, tensor=600.0)
    # step = max(1000 / 1e9, 600 / 0.5e9) = 1.2 us; tiles 2 x 2 x 10 = 40 steps
    # on 10 SMs: 4 steps each, but a CTA walks its 10 K steps alone: 12 us
    assert path_times._launch_seconds(config, {"M": 256, "N": 256, "K": 640}, MACHINE) == pytest.approx(12e-6)
    # 8 x 8 x 10 = 640 steps over 10 SMs: 64 steps = 76.8 us
    assert path_times._launch_seconds(config, {"M": 1024, "N": 1024, "K": 640}, MACHINE) == pytest.approx(76.8e-6)
    # split-K 4: a CTA walks ceil(16 / 4) = 4 of the 16 K steps of 100 ns; 2 x 16 = 32 steps / 10 SMs = 3.2
    gemv = _config({"M": 1, "N": 64, "K": 256}, "K", 100.0, split=4)
    assert path_times._launch_seconds(gemv, {"M": 1, "N": 128, "K": 4096}, MACHINE) == pytest.approx(400e-9)


def test_dense_path_is_dequant_plus_two_gemms_at_the_dense_limit():
    table = toy_table()
    m, n, k, r = 4096, 1024, 2048, 16
    # dequant: 2M weights / 1024 = 2048 loop-free steps of 400 ns over 10 SMs
    dequant = 2048 * 400e-9 / 10
    lora_a = max(2 * m * r * k / 1e15, 2 * (m * k + r * k + m * r) / 1e12)
    lora_b = max(2 * m * n * r / 1e15, 2 * (m * r + n * r + m * n) / 1e12)
    base = max(2 * m * n * k / 1e15, 2 * (m * k + n * k + 2 * m * n) / 1e12)  # reads Y: beta = 1
    assert path_times.predicted_seconds("sm_90", "dense", "fwd", m, n, k, r, table) == pytest.approx(
        lora_a + dequant + lora_b + base)
    without_lora = max(2 * m * n * k / 1e15, 2 * (m * k + n * k + m * n) / 1e12)
    assert path_times.predicted_seconds("sm_90", "dense", "fwd", m, n, k, 0, table) == pytest.approx(
        dequant + without_lora)
    full = path_times.predicted_seconds("sm_90", "dense", "full", m, n, k, r, table)
    assert full == pytest.approx(path_times.predicted_seconds("sm_90", "dense", "fwd", m, n, k, r, table)
                                 + path_times.predicted_seconds("sm_90", "dense", "bwd", m, n, k, r, table))


def test_bad_requests_name_what_is_wrong():
    table = toy_table()
    with pytest.raises(ValueError, match="gemv path serves the forward of M <= 16"):
        path_times.predicted_seconds("sm_90", "gemv", "fwd", 17, 64, 64, 0, table)
    with pytest.raises(ValueError, match="'sm_75'"):
        path_times.predicted_seconds("sm_75", "fused", "fwd", 1, 64, 64, 0, table)
    with pytest.raises(ValueError, match="'fast'"):
        path_times.predicted_seconds("sm_90", "fast", "fwd", 1, 64, 64, 0, table)


@pytest.fixture
def toy_tables(monkeypatch):
    """The toy predicted table and an empty measured table; returns a setter for measured rows."""
    monkeypatch.setattr(path_times, "predicted_table", lambda: toy_table(fused_issue=3000.0))
    measured = {}
    monkeypatch.setattr(path_times, "measured_table", lambda: measured)
    return measured


def test_best_path_takes_the_lowest_predicted_time(toy_tables):
    table = toy_table(fused_issue=3000.0)
    shapes = [(m, 1024, 2048, 16) for m in (1, 16, 64, 512, 4096)]
    for training in (False, True):
        for m, n, k, r in shapes:
            mode = "full" if training else "fwd"
            times = {p: path_times.predicted_seconds("sm_90", p, mode, m, n, k, r, table)
                     for p in path_times.candidates(m, training)}
            chosen = path_times.best_path("sm_90", m, n, k, r, training)
            assert times[chosen] == min(times.values()), (m, training, times)
    # this toy's fused kernels cost 3x a dense GEMM's tensor time: the dequant pays off at large M only
    assert path_times.best_path("sm_90", 64, 1024, 2048, 16, training=True) == "fused"
    assert path_times.best_path("sm_90", 4096, 1024, 2048, 16, training=True) == "dense"
    assert path_times.best_path("sm_90", 1, 1024, 2048, 16, training=False) == "gemv"


def test_measured_times_override_predictions_where_every_candidate_was_measured(toy_tables):
    key = ("sm_90", 4096, 1024, 2048, 16, "full")
    toy_tables[(*key, "fused")] = 1e-3
    # one path measured: not comparable with a prediction (a lower bound), so the prediction decides
    assert path_times.best_path("sm_90", 4096, 1024, 2048, 16, training=True) == "dense"
    toy_tables[(*key, "dense")] = 2e-3
    assert path_times.best_path("sm_90", 4096, 1024, 2048, 16, training=True) == "fused"
    # other shapes keep the predictions
    assert path_times.best_path("sm_90", 8192, 1024, 2048, 16, training=True) == "dense"


def test_measured_table_file_rows(tmp_path):
    path = tmp_path / "measured.json"
    path.write_text('[{"arch": "sm_90", "m": 512, "n": 4096, "k": 4096, "r": 16, "mode": "full", '
                    '"path": "dense", "seconds": 0.001, "gpu": "NVIDIA H200"}]')
    assert path_times.measured_table(path) == {("sm_90", 512, 4096, 4096, 16, "full", "dense"): 0.001}
    path.write_text('[{"arch": "sm_90", "m": 512}]')
    path_times.measured_table.cache_clear()
    with pytest.raises(ValueError, match="measured.json: each row needs arch, m, n, k, r, mode, path, seconds"):
        path_times.measured_table(path)
    assert path_times.measured_table(tmp_path / "absent.json") == {}


LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (1024, 8192), (28672, 8192),
                (8192, 28672)]


def test_committed_table_covers_both_archs_and_the_dequant_kernel_is_near_hbm_bandwidth():
    table = path_times.predicted_table()
    assert set(table["archs"]) == {"sm_80", "sm_90"}
    for arch, entry in table["archs"].items():
        assert set(entry["kernels"]) == {"nf4_lora_linear_fwd", "nf4_lora_linear_bwd_dx", "nf4_gemv_lora",
                                         "nf4_gemv_lora_m16", "nf4_dequantize"}
        for (dequant,) in [entry["kernels"]["nf4_dequantize"]]:
            # the model's HBM fraction: memory cycles / max(issue, tensor, memory)
            fraction = dequant["memory_cycles"] / max(dequant["issue_cycles"], dequant["memory_cycles"])
            assert fraction >= 0.8, (arch, dequant)
    # on sm_90 no benchmark shape goes to a path the model predicts slower than another
    for n, k in LLAMA_SHAPES:
        for m in (1, 16, 512, 4096, 16384):
            for r in (16, 64):
                for training in (False, True):
                    mode = "full" if training else "fwd"
                    times = {p: path_times.predicted_seconds("sm_90", p, mode, m, n, k, r)
                             for p in path_times.candidates(m, training)}
                    assert times[path_times.best_path("sm_90", m, n, k, r, training)] == min(times.values())
