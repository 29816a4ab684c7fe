"""The kernel inspector compiles the NF4 kernels for sm_80 and sm_90 without a GPU, as a real launch
of a large layer specialises them: every autotune config compiles, the speed model finds its main
loop, and the main fused configs have no register spills and use tensor-core MMA (wgmma / mma.sync).

Compilation runs in a subprocess without TRITON_INTERPRET (the test session defines the kernels as
interpreted functions on CPU), one per arch: every config of the NF4 kernels (the GEMV for M = 1
and M = 16), about 30 s of CPU per arch with Triton 3.9 (2-core CPU sandbox, 2026-11-29).
"""
import argparse
import json
import os
import subprocess
import sys

import pytest
import triton

from qlora.bench import path_table
from qlora.bench.kernel_inspect import (EXPECTED_MMA, LARGE_LAUNCH, MAIN_KERNELS, InspectResult, KernelSpec,
                                        _config_label, kernel_specs, launch_source, problems)
from qlora.cli import kernels as kernels_cli
from qlora.kernels import configs
from qlora.ops import path_times

MODELLED = {spec.name: spec for spec in kernel_specs() if spec.workload is not None}

_COMPILE_NF4_CONFIGS = """
import dataclasses, json, sys
from qlora.bench.kernel_inspect import inspect_kernels
print(json.dumps([dataclasses.asdict(r) for r in inspect_kernels(sys.argv[1], kernels=sys.argv[2].split(","))]))
"""


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_nf4_config_compiles_with_a_main_loop(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    proc = subprocess.run([sys.executable, "-c", _COMPILE_NF4_CONFIGS, arch, ",".join(MODELLED)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [InspectResult(**row) for row in json.loads(proc.stdout)]
    assert [r.kernel for r in results] == [name for name, spec in MODELLED.items() for _ in spec.configs[arch]]
    assert {r.kernel for r in results} == {"nf4_lora_linear_fwd", "nf4_lora_linear_bwd_dx", "nf4_gemv_lora",
                                           "nf4_gemv_lora_m16", "nf4_dequantize"}
    for r in results:
        assert r.ok and r.model_error is None and r.model is not None, r
        model = r.model
        assert model["unroll"] >= 1 and model["loop_instructions"] > 0 and model["instructions_per_weight"] > 0, r
        if r.kernel != "nf4_dequantize":
            assert model["region"].startswith("loop at") and model["mix"].get("mma", 0) > 0, r
        # the bounds the model cannot cross: a GEMM no faster than dense, a GEMV no faster than its
        # bytes allow (2 / 0.516 = 3.88x), a copy no faster than HBM
        limit = {"ratio_to_dense_gemm": (1.0, float("inf")), "speedup_over_dense_gemv": (0.0, 3.88),
                 "hbm_fraction": (0.0, 1.0)}[model["figure"]]
        assert limit[0] <= model["predicted"] <= limit[1] + 1e-9, r
    # the dispatcher's table (qlora/ops/path_times_predicted.json) is what the model computes now;
    # written with another Triton, its configs must still be these (the figures may differ)
    committed = path_times.predicted_table()
    entry = path_table.arch_entry(arch, results)
    if committed["triton"] == triton.__version__:
        assert committed["archs"][arch] == json.loads(json.dumps(entry)), "run: qlora kernels inspect --write-table"
    assert {name: [c["config"] for c in rows] for name, rows in committed["archs"][arch]["kernels"].items()} == \
        {name: [c["config"] for c in rows] for name, rows in entry["kernels"].items()}
    first = [r for r in results
             if r.kernel in MAIN_KERNELS and r.config == _config_label(configs.CONFIGS[r.kernel][arch][0])]
    assert {r.kernel for r in first} == set(MAIN_KERNELS)
    assert problems(first) == []
    for r in first:
        assert r.mma == EXPECTED_MMA[arch]
        assert 0 < r.registers <= 255 and r.spill_bytes == 0 and r.shared_bytes > 0


def test_launch_source_specialises_like_a_large_launch():
    fwd = MODELLED["nf4_lora_linear_fwd"]
    source = launch_source(fwd, fwd.configs["sm_90"][0])
    names = fwd.kernel.arg_names
    divisible = {names[i] for (i,), attrs in source.attrs.items() if attrs == [["tt.divisibility", 16]]}
    assert divisible == set(fwd.pointers) | {"M", "N", "K", "R", "stride_xm", "M_BUCKET"}
    assert source.signature["M"] == "i32" and source.signature["BLOCK_N"] == "constexpr"
    # ints equal to 1 are constants in a launch: one adapter in dX, decode's M = 1 in the GEMV
    dx = MODELLED["nf4_lora_linear_bwd_dx"]
    bwd = launch_source(dx, dx.configs["sm_80"][0])
    assert bwd.signature["n_adapters"] == "constexpr"
    assert bwd.constants[(dx.kernel.arg_names.index("n_adapters"),)] == 1
    gemv = launch_source(MODELLED["nf4_gemv_lora"], MODELLED["nf4_gemv_lora"].configs["sm_80"][0])
    assert gemv.signature["M"] == "constexpr" and LARGE_LAUNCH["M"] == 4096


def test_launch_source_needs_every_argument():
    fwd = MODELLED["nf4_lora_linear_fwd"]
    partial = KernelSpec(fwd.name, fwd.kernel, fwd.configs, fwd.pointers, fwd.constexprs, launch={"M": 16})
    with pytest.raises(ValueError, match="argument 'N' has no value"):
        launch_source(partial, fwd.configs["sm_90"][0])


def test_problems_flags_spills_errors_and_missing_mma():
    ok = InspectResult("nf4_lora_linear_fwd", "cfg", "sm_90", 200, 0, 1024, "wgmma.mma_async")
    spilled = InspectResult("nf4_lora_linear_fwd", "cfg", "sm_90", 255, 64, 1024, "wgmma.mma_async")
    broken = InspectResult("nf4_lora_linear_bwd_dx", "cfg", "sm_80", error="CompilationError: x")
    no_mma = InspectResult("nf4_lora_linear_bwd_dx", "cfg", "sm_80", 100, 0, 1024, "none")
    found = problems([ok, spilled, broken, no_mma])
    assert len(found) == 3
    assert "64 bytes of register spills" in found[0] and "compile error" in found[1] and "expected mma.sync" in found[2]


def test_cli_table_row_shows_the_prediction():
    model = {"loop_instructions": 900, "instructions_per_weight": 28.125, "mix": {"select": 483, "int": 301,
             "float": 34, "shared": 25, "sync": 19}, "figure": "ratio_to_dense_gemm", "predicted": 3.515625,
             "bound": "issue"}
    row = kernels_cli._row(InspectResult("nf4_lora_linear_fwd", "cfg", "sm_90", 168, 0, 89088, "wgmma.mma_async",
                                         model=model))
    assert row[7:] == ("900", "28.1", "select 483, int 301, float 34, shared 25", "3.52x dense GEMM time (issue-bound)")
    lost = InspectResult("nf4_gemv_lora", "cfg", "sm_80", 80, 0, 1024, "mma.sync", model_error="no loop")
    assert kernels_cli._row(lost)[-1] == "no main loop found"
    assert "no speed model: no loop" in problems([lost])[0]


def test_cli_registers_inspect_subcommand():
    parser = argparse.ArgumentParser()
    kernels_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kernels", "inspect", "--arch", "sm_90", "--kernel", "nf4_gemv_lora", "--json"])
    assert args.func is kernels_cli.run_inspect and args.arch == ["sm_90"] and args.json
    assert args.kernel == ["nf4_gemv_lora"]
