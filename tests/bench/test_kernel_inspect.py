"""The kernel inspector compiles the fused kernels for sm_80 and sm_90 without a GPU: no compile
errors, no register spills and tensor-core MMA (wgmma / mma.sync) in the main fwd/bwd configs.

Compilation runs in a subprocess without TRITON_INTERPRET (the test session defines the kernels
as interpreted functions on CPU). The first (main) config of each fused kernel is compiled here to
stay within the test budget; `qlora kernels inspect` compiles every config.
"""
import argparse
import json
import os
import subprocess
import sys

import pytest

from qlora.cli import kernels as kernels_cli
from qlora.bench.kernel_inspect import EXPECTED_MMA, MAIN_KERNELS, InspectResult, problems

_COMPILE_MAIN_CONFIGS = """
import dataclasses, json, sys
from qlora.bench.kernel_inspect import MAIN_KERNELS, inspect_kernels
print(json.dumps([dataclasses.asdict(r) for r in inspect_kernels(sys.argv[1], kernels=MAIN_KERNELS, max_configs=1)]))
"""


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_main_fused_configs_compile_without_spills(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    proc = subprocess.run([sys.executable, "-c", _COMPILE_MAIN_CONFIGS, arch], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [InspectResult(**row) for row in json.loads(proc.stdout)]
    assert {r.kernel for r in results} == set(MAIN_KERNELS)
    assert problems(results) == []
    for r in results:
        assert r.mma == EXPECTED_MMA[arch]
        assert 0 < r.registers <= 255 and r.spill_bytes == 0 and r.shared_bytes > 0


def test_problems_flags_spills_errors_and_missing_mma():
    ok = InspectResult("nf4_lora_linear_fwd", "cfg", "sm_90", 200, 0, 1024, "wgmma.mma_async")
    spilled = InspectResult("nf4_lora_linear_fwd", "cfg", "sm_90", 255, 64, 1024, "wgmma.mma_async")
    broken = InspectResult("nf4_lora_linear_bwd_dx", "cfg", "sm_80", error="CompilationError: x")
    no_mma = InspectResult("nf4_lora_linear_bwd_dx", "cfg", "sm_80", 100, 0, 1024, "none")
    found = problems([ok, spilled, broken, no_mma])
    assert len(found) == 3
    assert "64 bytes of register spills" in found[0] and "compile error" in found[1] and "expected mma.sync" in found[2]


def test_cli_registers_inspect_subcommand():
    parser = argparse.ArgumentParser()
    kernels_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kernels", "inspect", "--arch", "sm_90", "--json"])
    assert args.func is kernels_cli.run_inspect and args.arch == ["sm_90"] and args.json
