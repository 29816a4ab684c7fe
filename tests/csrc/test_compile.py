"""CPU-side checks of csrc/: every .cu compiles for sm_80 and sm_90 without register spills, and the
host-independent NF4 format logic (csrc/nf4_format.h) decodes real bitsandbytes data bit-exactly.

Needs nvcc and a host C++ compiler (both are on the CI image); nothing here needs a GPU. The kernels'
GPU numerics are checked in tests/test_csrc_cuda.py.
"""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
HARNESS = Path(__file__).resolve().parent / "nf4_format_harness.cpp"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = ["sm_80", "sm_90"]


def _nvcc():
    found = shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc")
    if found is None:
        pytest.skip("nvcc not found on PATH or in /usr/local/cuda/bin")
    return found


def _cxx():
    found = shutil.which("g++") or shutil.which("c++")
    if found is None:
        pytest.skip("no host C++ compiler (g++/c++) found")
    return found


def test_csrc_has_kernels():
    # Guards the parametrization below: an empty glob would make the compile test vacuous.
    assert {p.name for p in CU_FILES} >= {"nf4_dequantize.cu", "nf4_gemv_lora.cu"}


def _ptxas_report(stderr: str) -> dict[str, str]:
    """Map each compiled kernel (mangled name) to its ptxas 'N bytes stack frame, ...' line."""
    report = {}
    current = None
    for line in stderr.splitlines():
        match = re.search(r"Function properties for (\S+)", line)
        if match:
            current = match.group(1)
        elif current is not None and "bytes stack frame" in line:
            report[current] = line.strip()
            current = None
    return report


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu_file", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_without_spills(cu_file, arch, tmp_path):
    cmd = [_nvcc(), f"-arch={arch}", "-std=c++17", "-O3", "-c", "-Xptxas", "-v",
           "--Werror", "all-warnings", f"-I{CSRC}", str(cu_file), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    report = _ptxas_report(proc.stderr)
    assert report, f"no ptxas -v function report in the output of {cu_file.name}:\n{proc.stderr}"
    for kernel, line in report.items():
        # Spills move registers to local memory (DRAM-backed): in a bandwidth-bound kernel they
        # cost real traffic. A stack frame means a local array, usually a register array indexed
        # by a runtime value (the reason the code table lives in a warp shuffle, not an array).
        found = re.findall(r"(\d+) bytes (stack frame|spill stores|spill loads)", line)
        numbers = {what: int(n) for n, what in found}
        assert numbers == {"stack frame": 0, "spill stores": 0, "spill loads": 0}, (
            f"{cu_file.name} [{arch}] {kernel}: {line}")


def test_ptxas_report_sees_local_memory(tmp_path):
    # The check above must be able to fail: a runtime-indexed local array needs a stack frame.
    source = tmp_path / "local_array.cu"
    source.write_text(
        "__global__ void k(const int* i, float* o) {\n"
        "    float a[256];\n"
        "    a[0] = o[0];\n"
        "    for (int j = 1; j < 256; ++j) a[j] = a[j - 1] * o[j];\n"
        "    o[0] = a[i[0]] + a[i[1]];\n"
        "}\n")
    proc = subprocess.run([_nvcc(), "-arch=sm_80", "-c", "-Xptxas", "-v", str(source), "-o",
                           str(tmp_path / "out.o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (line,) = _ptxas_report(proc.stderr).values()
    assert not line.startswith("0 bytes stack frame"), line


# ---------------------------------------------------------------- host harness for nf4_format.h


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    exe = tmp_path_factory.mktemp("harness") / "nf4_format_harness"
    # -ffp-contract=off: the header's absmax decode must round the multiply and the add separately,
    # as bitsandbytes does; the host build must not fuse them either.
    cmd = [_cxx(), "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
           f"-I{CSRC}", str(HARNESS), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    return exe


def _bnb_quantize(shape, blocksize, double_quant, seed):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    w.view(-1)[:: 97] *= 8.0  # outliers, as in LLM weights, so block scales vary widely
    packed, state = bnb_functional.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    return bnb_functional, packed, state


def _bnb_fields(packed, state):
    """The NF4 fields of a bitsandbytes (packed, QuantState) under NF4Tensor's names."""
    fields = {"packed": packed, "quant_map": state.code, "absmax": state.absmax,
              "blocksize": state.blocksize}
    if state.nested:
        fields |= {"nested_absmax": state.state2.absmax, "nested_quant_map": state.state2.code,
                   "offset": state.offset, "nested_blocksize": state.state2.blocksize}
    return fields


def _run_harness(harness, tmp_path, fields, numel):
    """Run the harness on NF4 fields (NF4Tensor names); returns (absmax_fp32, by_element, by_word)."""
    double_quant = fields["absmax"].dtype == torch.uint8
    names = ["packed", "quant_map", "absmax"]
    if double_quant:
        names += ["nested_absmax", "nested_quant_map", "offset"]
    for name in names:
        fields[name].reshape(-1).contiguous().cpu().numpy().tofile(tmp_path / f"{name}.bin")
    cmd = [str(harness), str(tmp_path), str(numel), str(fields["blocksize"]),
           str(fields["nested_blocksize"] if double_quant else 0), str(int(double_quant))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    read = lambda name: torch.from_numpy(np.fromfile(tmp_path / f"{name}.bin", dtype=np.float32))
    return read("absmax_fp32"), read("by_element"), read("by_word")


# Shapes: K = 96 puts absmax blocks across row boundaries; 7 x 37 has an odd element count (half-used
# last byte) and a partial last chunk and block; 128 x 320 has 640 blocks, so three nested blocks.
CASES = [((33, 96), 64, True), ((7, 37), 64, True), ((128, 320), 64, True), ((128, 320), 128, True),
         ((33, 96), 64, False)]


@pytest.mark.parametrize("shape,blocksize,double_quant", CASES, ids=str)
def test_format_header_matches_bitsandbytes(harness, tmp_path, shape, blocksize, double_quant,
                                             bnb_lookup_dequantize):
    bnb_functional, packed, state = _bnb_quantize(shape, blocksize, double_quant, seed=shape[0])
    numel = shape[0] * shape[1]
    absmax_fp32, by_element, by_word = _run_harness(harness, tmp_path, _bnb_fields(packed, state), numel)

    # Exact equality is the right bar: both sides do the same fp32 operations in the same order
    # (absmax: one rounded multiply, one rounded add; element: one rounded multiply).
    if double_quant:
        expected_absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        expected_absmax = state.absmax
    torch.testing.assert_close(absmax_fp32, expected_absmax.float(), rtol=0, atol=0)
    expected = bnb_lookup_dequantize(packed, state).reshape(-1)
    torch.testing.assert_close(by_element, expected, rtol=0, atol=0)
    torch.testing.assert_close(by_word, by_element, rtol=0, atol=0)


@pytest.mark.parametrize("shape,double_quant", [((7, 37), True), ((128, 320), True), ((33, 96), False)],
                         ids=str)
def test_format_header_matches_qlora_nf4(harness, tmp_path, shape, double_quant):
    from qlora.quant import nf4
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]))
    weight = nf4.quantize(w, blocksize=64, double_quant=double_quant)
    fields = {name: getattr(weight, name) for name in (
        "packed", "quant_map", "absmax", "blocksize", "nested_absmax", "nested_quant_map", "offset",
        "nested_blocksize")}
    absmax_fp32, by_element, by_word = _run_harness(harness, tmp_path, fields, w.numel())
    # Exact, for the reasons given in test_format_header_matches_bitsandbytes.
    torch.testing.assert_close(absmax_fp32, weight.absmax_fp32().reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(by_element, weight.dequantize(torch.float32).reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(by_word, by_element, rtol=0, atol=0)
