"""Ahead-of-time compile of the element-wise and loss kernels for sm_80 and sm_90, through the
kernel inspector (`qlora kernels inspect` lists them too).

Each kernel module lists its launch specialisations in ``AOT_SPECS`` (kernel, signature,
constexprs). ``triton.compile`` needs real JIT functions, and under TRITON_INTERPRET=1 (set by
tests/conftest.py without a GPU) ``@triton.jit`` makes interpreter objects instead, so the
compile runs in a child process without that variable. No GPU is needed: Triton compiles to
PTX and assembles a cubin with its bundled ptxas.
"""
import json
import os
import subprocess
import sys

import pytest

# shared memory a block may use: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100)
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}

CHILD = r"""
import dataclasses, json
from qlora.bench.kernel_inspect import elementwise_results
print(json.dumps([dataclasses.asdict(r) for arch in ("sm_80", "sm_90") for r in elementwise_results(arch)]))
"""


def test_every_aot_spec_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's default-change note
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])

    assert {r["kernel"] for r in results} == {"swiglu_fwd", "swiglu_bwd", "rms_norm_fwd", "rms_norm_bwd",
                                               "rope", "cross_entropy_fwd_bwd"}
    assert {r["config"].split(",")[0] for r in results} == {"bf16", "fp16"}
    for r in results:
        assert r["error"] is None, r
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] == 0, r
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], r
