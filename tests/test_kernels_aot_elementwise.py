"""Ahead-of-time compile of this package's element-wise and loss kernels for sm_80 and sm_90.

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

MODULES = ["qlora.kernels.swiglu", "qlora.kernels.rms_norm", "qlora.kernels.rope",
           "qlora.kernels.cross_entropy"]
# shared memory a block may use: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

CHILD = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

results = []
for module_name in sys.argv[1].split(","):
    for spec in importlib.import_module(module_name).AOT_SPECS:
        # one storage dtype is enough to prove each constexpr variant compiles (the dtype
        # only changes load/store widths); bf16 is what training runs
        if any(t.startswith("*fp16") for t in spec["signature"].values()):
            continue
        for cc in (80, 90):
            source = ASTSource(fn=spec["kernel"], signature=spec["signature"],
                               constexprs=spec["constexprs"])
            kernel = triton.compile(source, target=GPUTarget("cuda", cc, 32))
            results.append({"kernel": spec["kernel"].__name__, "cc": cc,
                            "constexprs": {k: str(v) for k, v in spec["constexprs"].items()},
                            "cubin_bytes": len(kernel.asm["cubin"]),
                            "shared": kernel.metadata.shared})
print(json.dumps(results))
"""


def test_every_aot_spec_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's default-change note
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(MODULES)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])

    compiled = {r["kernel"] for r in results}
    assert compiled == {"swiglu_fwd_kernel", "swiglu_bwd_kernel", "rms_norm_fwd_kernel",
                        "rms_norm_bwd_kernel", "rope_kernel", "cross_entropy_fwd_bwd_kernel"}
    for r in results:
        assert r["cubin_bytes"] > 0, r
        assert r["shared"] <= SHARED_LIMIT[r["cc"]], r
