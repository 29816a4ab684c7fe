"""qlora/bench/path_table.py: the inspector's results as the dispatcher's table (no compiling here;
tests/bench/test_kernel_inspect.py checks the committed table against the compiled kernels)."""
import pytest

from qlora.bench import path_table
from qlora.bench.kernel_inspect import InspectResult
from qlora.cli import main


def _result(kernel, tile, config="cfg", arch="sm_90"):
    model = {"tile": tile, "issue_cycles": 100.0, "tensor_cycles": 50.0, "memory_cycles": 20.0, "bound": "issue"}
    return InspectResult(kernel, config, arch, 100, 0, 0, "wgmma.mma_async", model=model)


RESULTS = [_result("nf4_lora_linear_fwd", {"N": 128, "M": 64, "K": 64}),
           _result("nf4_lora_linear_bwd_dx", {"M": 128, "K": 128, "N": 64}),
           _result("nf4_gemv_lora", {"N": 128, "M": 1, "K": 128, "MMA_COLS": 16, "SPLIT_K": 4}),
           _result("nf4_gemv_lora_m16", {"N": 128, "M": 16, "K": 128, "MMA_COLS": 16, "SPLIT_K": 4}),
           _result("nf4_dequantize", {"weights": 4096}),
           _result("lora_a", {"M": 64, "K": 64})]


def test_arch_entry_keeps_what_a_launch_time_needs():
    entry = path_table.arch_entry("sm_90", RESULTS)
    assert entry["machine"]["name"] == "H200" and entry["machine"]["sms"] == 132
    assert set(entry["kernels"]) == set(path_table.LOOP_DIM)  # lora_a is not a path's main kernel
    (gemv,) = entry["kernels"]["nf4_gemv_lora"]
    assert gemv == {"config": "cfg", "tile": {"M": 1, "N": 128, "K": 128}, "loop": "K", "split": 4,
                    "issue_cycles": 100.0, "tensor_cycles": 50.0, "memory_cycles": 20.0, "bound": "issue"}
    assert entry["kernels"]["nf4_lora_linear_bwd_dx"][0]["loop"] == "N"
    assert entry["kernels"]["nf4_dequantize"][0]["tile"] == {"weights": 4096}
    assert entry["kernels"]["nf4_dequantize"][0]["loop"] is None


def test_a_missing_kernel_or_prediction_is_an_error_naming_it():
    with pytest.raises(ValueError, match="sm_90: no inspected config of nf4_dequantize"):
        path_table.arch_entry("sm_90", RESULTS[:4])
    broken = InspectResult("nf4_dequantize", "BLOCK_BYTES=2048", "sm_90", error="ptxas failed")
    with pytest.raises(ValueError, match=r"nf4_dequantize \[BLOCK_BYTES=2048\] sm_90: no prediction \(ptxas failed\)"):
        path_table.arch_entry("sm_90", RESULTS[:4] + [broken])


def test_write_table_needs_both_archs(capsys):
    assert main(["kernels", "inspect", "--arch", "sm_90", "--write-table"]) == 2
    assert "--write-table needs both archs" in capsys.readouterr().err
