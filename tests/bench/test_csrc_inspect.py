"""The csrc/ CUDA kernels through the inspector: nvcc compiles them for sm_80 and sm_90 (no GPU
needed), and the speed model finds the main loop of every bf16 instantiation of the GEMV and the
loop-free path of the dequant kernel. About 5 s per arch (2-core CPU sandbox, 2026-11-29)."""
import pytest

from qlora.bench import csrc_inspect


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_csrc_kernels_have_a_main_loop(arch):
    if csrc_inspect.nvcc() is None:
        pytest.skip("nvcc not found on PATH or in /usr/local/cuda/bin")
    results = csrc_inspect.inspect_csrc(arch)
    # the template instantiations launch_typed picks for M = 1, 2, <= 4, <= 8, each with and without
    # double quantization (u8 or fp32 absmax)
    assert [(r.kernel, r.config) for r in results] == [
        ("csrc_nf4_gemv_lora", f"bf16,MT={mt},R={rows},double_quant={dq}")
        for mt, rows in ((1, 4), (2, 4), (4, 4), (8, 2)) for dq in (0, 1)] + [("csrc_nf4_dequantize", "bf16")]
    for r in results:
        assert r.ok and r.model_error is None and r.spill_bytes == 0 and 0 < r.registers <= 255, r
        assert r.model["unroll"] >= 1 and r.model["instructions_per_weight"] > 0, r
    for r in results[:-1]:
        gemv = r.model
        assert gemv["region"].startswith("loop at") and gemv["figure"] == "speedup_over_dense_gemv", r
        # the memory bound: 2 bytes per weight against 0.516 (u8 absmax) or 0.5625 (fp32 absmax)
        assert 0 < gemv["predicted"] <= 2 / gemv["hbm_bytes_per_weight"] + 1e-9, r
    dequant = results[-1].model
    assert dequant["region"] == "kernel (no loop)" and 0 < dequant["predicted"] <= 1.0


def test_compile_error_is_a_result(tmp_path, monkeypatch):
    if csrc_inspect.nvcc() is None:
        pytest.skip("nvcc not found on PATH or in /usr/local/cuda/bin")
    (tmp_path / "nf4_dequantize.cu").write_text("this is not C++\n")
    monkeypatch.setattr(csrc_inspect, "CSRC", tmp_path)
    (result,) = csrc_inspect.inspect_csrc("sm_80", kernels=["csrc_nf4_dequantize"])
    assert not result.ok and "failed" in result.error
