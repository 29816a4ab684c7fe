"""benchmarks/gpu_check.py, the first GPU run's driver: its dry run on CPU goes through every step
with the code the GPU call runs, and the GPU-only values (the Llama-2-7B preset, the CUDA test ids)
are checked against the real argument parsers and test files, so the one device call cannot fail on
a typo. Nothing here times anything."""
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout, json.loads((out / "summary.json").read_text())


def test_dry_run_runs_every_step(dry_run):
    out, stdout, summary = dry_run
    assert summary["finished"] and list(summary["steps"]) == list(gpu_check.STEPS)
    steps = summary["steps"]
    assert steps["env"]["status"] == "ok"
    versions = json.loads((out / "versions.json").read_text())
    assert versions["cuda_available"] is False and versions["torch"]
    assert "backend" in (out / "env.log").read_text()  # `qlora info` ran
    # No GPU: the extension cannot be built, and the summary says why instead of failing.
    assert steps["extension"]["status"].startswith("skipped: unavailable")
    assert steps["extension"]["extension"]["available"] is False
    for name in ("tests", "kernels", "train"):
        assert steps[name]["status"] == "ok", steps[name]
        assert (out / steps[name]["log"]).stat().st_size > 0
    for name in ("command.txt", "gpu_check.log", "kernels/bench_kernels.json", "train/bench_train.json"):
        assert (out / name).is_file(), name
    assert re.search(r"^\[ *\d+ s\] train: ok$", stdout, re.M) and "== gpu_check summary" in stdout


def test_dry_run_records_the_skipped_cuda_tests(dry_run):
    _, _, summary = dry_run
    tests = summary["steps"]["tests"]
    # tests/csrc/test_cuda.py: one test of the behaviour without CUDA passes; its GPU tests and the
    # two single CUDA tests skip, each with its reason.
    skipped = tests["skip_reasons"]["needs CUDA"]
    assert set(tests["skip_reasons"]) == {"needs CUDA"} and skipped >= 3
    assert tests["counts"] == {"passed": 1, "skipped": skipped}
    assert tests["first_failure"] is None and f"1 passed, {skipped} skipped" in tests["result_line"]


def test_dry_run_measures_every_provider_and_both_stacks(dry_run):
    _, _, summary = dry_run
    kernels = summary["steps"]["kernels"]
    assert kernels["left_out"] == {}
    rows = kernels["rows"]
    assert {r["provider"] for r in rows} == {"qlora-fused", "qlora-dequant-cublas", "dense-bf16", "unsloth-style",
                                             "hf-stack"}
    assert {(r["m"], r["mode"]) for r in rows} == {(1, "fwd"), (1, "bwd"), (32, "fwd"), (32, "bwd")}
    for row in rows:
        assert row["max_rel_err"] < 2 ** -5  # the bound of tests/bench/test_bench.py
        if row["provider"].startswith("qlora-"):  # Triton's interpreter: checked, never timed
            assert row["ms_p50"] is None
        else:
            assert row["ms_p50"] > 0
    # the speed model's predictions are copied when the command's rows carry them (issue 20)
    predicted = any("predict" in key and value is not None for row in rows for key, value in row.items())
    assert kernels["predictions"].startswith("beside each measured time" if predicted else "none")
    assert [r["stack"] for r in summary["steps"]["train"]["rows"]] == ["qlora", "hf-stack"]
    # every target is listed, none judged from CPU times
    assert len(summary["targets"]) == 5
    assert all(t["met"] is None and t["note"] for t in summary["targets"])


def test_dry_run_uses_the_gpu_runs_flags():
    """The dry run differs from the GPU run only in values, --quick (short CPU timers) and --nk
    (one tiny custom shape instead of a preset's)."""
    def flags(args):
        return {a for a in args if a.startswith("--")}

    assert flags(gpu_check.DRY.kernels) - flags(gpu_check.FULL.kernels) == {"--quick", "--nk"}
    assert flags(gpu_check.FULL.kernels) <= flags(gpu_check.DRY.kernels)
    assert flags(gpu_check.DRY.train) - flags(gpu_check.FULL.train) == {"--quick"}
    assert flags(gpu_check.FULL.train) <= flags(gpu_check.DRY.train)
    assert set(gpu_check.DRY.budgets_s) == set(gpu_check.FULL.budgets_s) == set(gpu_check.STEPS)
    # the GPU run's steps within 9 minutes, inside the device tool's 560 s with the pip installs
    assert sum(gpu_check.FULL.budgets_s.values()) <= 540


def test_gpu_values_parse_with_the_real_commands():
    from qlora.bench.kernels import preset_shapes
    from qlora.cli import build_parser
    from qlora.model.presets import load_preset

    parser = build_parser()
    args = parser.parse_args(["bench", "kernels", *gpu_check.FULL.kernels, "--out", "x"])
    assert preset_shapes(args.shapes) == [(4096, 4096, "q,k,v,o"), (11008, 4096, "gate,up"), (4096, 11008, "down")]
    assert (args.m, args.rank, args.mode) == ([1, 16, 4096], [16], ["fwd", "bwd"])
    args = parser.parse_args(["bench", "train", *gpu_check.FULL.train, "--out", "x"])
    assert load_preset(args.model)["hidden_size"] == 4096
    assert (args.seq_len, args.steps) == (2048, 5)


def test_gpu_test_selection_exists():
    for arg in gpu_check.FULL.tests:
        path, _, test = arg.removeprefix("--ignore=").partition("::")
        assert (ROOT / path).exists(), arg
        if test:
            assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.M), arg


def test_the_device_command_is_documented():
    assert gpu_check.RUN_COMMAND in SCRIPT.read_text()
    assert gpu_check.RUN_COMMAND in (ROOT / "README.md").read_text()


def _run(tmp_path, plan):
    run = gpu_check.Run(out=tmp_path, plan=plan, dry_run=True)
    return run, run.start + 600


def test_tests_step_stops_at_the_first_failure_with_its_output(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text("import pytest\n"
                     "def test_ok(): pass\n"
                     "@pytest.mark.skip(reason='not here')\n"
                     "def test_skipped(): pass\n"
                     "@pytest.mark.parametrize('shape', [(7, 37)], ids=str)\n"
                     "def test_broken(shape): assert shape == (1, 1), 'wrong shape'\n"
                     "def test_after(): pass\n")
    plan = gpu_check.Plan(budgets_s={}, tests=(str(tests),), kernels=(), train=())
    result = gpu_check.step_tests(*_run(tmp_path, plan))
    assert result["first_failure"].endswith("test_sample.py::test_broken[(7, 37)]")
    assert result["status"] == f"failed: {result['first_failure']}"
    assert result["counts"] == {"passed": 1, "skipped": 1, "failed": 1}  # -x: test_after never ran
    assert "wrong shape" in result["failure_output"]
    assert result["skip_reasons"] == {"not here": 1}


def test_csrc_tests_are_left_out_when_the_extension_did_not_build(tmp_path):
    tests = tmp_path / "test_other.py"
    tests.write_text("def test_ok(): pass\n")
    plan = gpu_check.Plan(budgets_s={}, tests=(gpu_check.CSRC_TESTS, str(tests)), kernels=(), train=())
    run, deadline = _run(tmp_path, plan)
    run.summary = {"steps": {"extension": {"status": "timed out"}}}
    result = gpu_check.step_tests(run, deadline)
    assert result["status"] == "ok" and result["counts"] == {"passed": 1}
    assert result["left_out"].startswith(f"{gpu_check.CSRC_TESTS}: the extension step did not build it")
    assert gpu_check.CSRC_TESTS not in result["commands"][0]["command"]


def test_tests_past_their_budget_are_killed_and_counted(tmp_path):
    tests = tmp_path / "test_slow.py"
    tests.write_text("import time\n"
                     "def test_quick(): pass\n"
                     "def test_slow(): time.sleep(600)\n")
    plan = gpu_check.Plan(budgets_s={}, tests=(str(tests),), kernels=(), train=())
    run, _ = _run(tmp_path, plan)
    start = time.monotonic()
    result = gpu_check.step_tests(run, start + 20)
    assert time.monotonic() - start < 120
    assert result["status"] == "timed out" and result["commands"][0]["rc"] is None
    assert result["counts"] == {"passed": 1} and result["unfinished"].endswith("test_slow.py::test_slow")
    assert "killed after" in (tmp_path / "tests.log").read_text()


def test_unused_budget_goes_to_later_steps():
    plan = gpu_check.Plan(budgets_s=dict(env=10, extension=20, tests=30, kernels=40, train=50),
                          tests=(), kernels=(), train=())
    run = gpu_check.Run(out=Path("."), plan=plan, dry_run=True, start=1000.0)
    assert [run.step_deadline(s) for s in gpu_check.STEPS] == [1010.0, 1030.0, 1060.0, 1100.0, 1150.0]


def test_kernel_rows_keep_the_predictions():
    row = dict(n=64, k=128, modules="custom", m=1, rank=4, mode="fwd", provider="qlora-fused", path="gemv",
               timing="timed", ms_p50=0.5, predicted_ms=0.25, predicted_arch="sm_90", version_torch="2.13")
    (kept,) = gpu_check.kernel_rows([row])
    assert kept["predicted_ms"] == 0.25 and kept["predicted_arch"] == "sm_90" and kept["path"] == "gemv"
    assert "version_torch" not in kept and kept["ms_p20"] is None
    lines = gpu_check.step_lines("kernels", dict(rows=[kept], predictions="beside each measured time", left_out={}))
    assert lines[1] == "  fwd 64x128 M=1: qlora-fused 0.5 ms (predicted_ms 0.25)"


def test_targets_on_gpu_rows():
    def row(m, provider, ms):
        return dict(n=4096, k=4096, modules="q,k,v,o", m=m, mode="fwd", provider=provider, ms_p50=ms)

    rows = [row(4096, "qlora-fused", 1.1), row(4096, "dense-bf16", 1.0),
            row(1, "qlora-fused", 0.1), row(1, "dense-bf16", 0.4), row(1, "hf-stack", 0.1)]
    train = [dict(stack="qlora", speedup_vs_hf_stack=2.5, memory_ratio_vs_hf_stack=0.5),
             dict(stack="hf-stack", speedup_vs_hf_stack=1.0, memory_ratio_vs_hf_stack=1.0)]
    found = {t["target"]: (t["value"], t["met"]) for t in gpu_check.targets(rows, train, on_gpu=True)}
    assert found == {
        "fused fwd time / dense bf16 at M = 4096": (pytest.approx(1.1), False),
        "fused fwd speed-up over dense bf16 at M = 1": (pytest.approx(4.0), True),
        "fused fwd speed-up over hf-stack (bitsandbytes GEMV + PEFT) at M = 1": (pytest.approx(1.0), False),
        "training tokens/s over the HF stack": (2.5, True),
        "training peak allocated memory / the HF stack's": (0.5, False),
    }


def test_a_step_that_broke_in_the_driver_still_prints():
    step = dict(status="error in gpu_check: KeyError: 'x'", traceback="Traceback ...\nKeyError: 'x'\n", seconds=1.0)
    for name in gpu_check.STEPS:
        assert gpu_check.step_lines(name, step) == ["Traceback ...\nKeyError: 'x'"]
    summary = dict(mode="gpu", finished=None, steps={"env": step}, targets=[])
    assert gpu_check.summary_lines(summary)[2] == "env        error in gpu_check: KeyError: 'x' (1 s)"


def test_out_with_a_previous_run_is_refused(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "already holds a gpu_check run" in capsys.readouterr().err
    assert (tmp_path / "summary.json").read_text() == "{}"
