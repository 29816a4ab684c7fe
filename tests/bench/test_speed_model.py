"""The static speed model's arithmetic on hand-written SASS loops whose counts are known, the
main-loop finder on nested and side-by-side loops, and the machine constants against the rated
figures they are cited from."""
import dataclasses

import pytest

from qlora.bench import speed_model
from qlora.bench.speed_model import MACHINES, MainLoopNotFound, Workload

H200, A100 = MACHINES["H200"], MACHINES["A100 80GB SXM"]


def filler(n: int) -> str:
    """n instructions that are neither MMA, FFMA nor stores (selects, like a where-tree dequant)."""
    return "\n".join("FSEL R1, R2, R3, P0" for _ in range(n))


def gemm_tile(n=128, m=128, k=64, warps=8) -> Workload:
    return Workload("gemm", "mma", work=n * m * k, weights=n * k, threads=32 * warps, tile={"N": n, "M": m, "K": k})


# One K step of a 128x128x64 tile with 8 warps = 2 warpgroups on sm_90: each warpgroup computes
# 64x128 of the tile, 64/16 = 4 wgmma of k = 16, so 4 HGMMA in every warp's instruction stream.
def wgmma_loop(other: int, hgmma: int = 4) -> str:
    body = "\n".join("HGMMA.64x128x16.F32.BF16 R24, R96, gdesc[UR16], R24" for _ in range(hgmma))
    return f"""
        S2R R0, SR_TID.X
    loop:
        {filler(other)}
        {body}
        ISETP.NE.AND P0, PT, R0, RZ, PT
        @P0 BRA loop
        EXIT
    """


def test_gemm_issue_bound(sass_function):
    function = sass_function(wgmma_loop(other=994))  # 994 + 4 HGMMA + ISETP + BRA = 1000 per thread
    p = speed_model.predict_function(function, gemm_tile(), H200)
    assert (p.loop_instructions, p.unroll, p.region) == (1000, 1, "loop at 0x10")
    # 1000 instructions x 256 threads / (128 x 64 weights)
    assert p.instructions_per_weight == pytest.approx(31.25)
    # issue: 1000 x 8 warps / 4 per clock = 2000; tensor: 2 x 128*128*64 / 4096 FLOP per clock = 512
    assert (p.issue_cycles, p.tensor_cycles, p.memory_cycles) == (2000, 512, 0)
    assert (p.bound, p.figure) == ("issue", "ratio_to_dense_gemm")
    assert p.predicted == pytest.approx(2000 / 512)
    assert p.mix == {"select": 995, "mma": 4, "control": 1}  # the ISETP is a select too
    assert speed_model.summary(dataclasses.asdict(p)) == "3.91x dense GEMM time (issue-bound)"


def test_gemm_tensor_bound(sass_function):
    function = sass_function(wgmma_loop(other=194))  # 200 per thread: issue 400 < tensor 512
    p = speed_model.predict_function(function, gemm_tile(), H200)
    assert (p.issue_cycles, p.tensor_cycles, p.bound, p.predicted) == (400, 512, "tensor", 1.0)


def test_unrolled_loop_counts_per_tile_step(sass_function):
    # two K steps per pass: 8 HGMMA, 400 instructions -> 200 per step
    function = sass_function(wgmma_loop(other=390, hgmma=8))
    p = speed_model.predict_function(function, gemm_tile(), H200)
    assert (p.unroll, p.loop_instructions) == (2, 400)
    assert p.instructions_per_weight == pytest.approx(200 * 256 / (128 * 64))
    assert (p.issue_cycles, p.tensor_cycles) == (400, 512)


def test_mma_sync_on_sm80(sass_function):
    # 128x64x64 tile, 8 warps: each warp owns 128*64*64 / 8 MACs = 32 m16n8k16 HMMA per K step
    hmma = "\n".join("HMMA.16816.F32.BF16 R4, R8, R12, R4" for _ in range(32))
    function = sass_function(f"loop:\n{filler(766)}\n{hmma}\nISETP.NE.AND P0, PT, R0, RZ, PT\n@P0 BRA loop\nEXIT")
    p = speed_model.predict_function(function, gemm_tile(n=128, m=64, k=64), A100)
    # issue: 800 x 8 / 4 = 1600; tensor: 2 x 524288 / 2048 = 512
    assert (p.loop_instructions, p.issue_cycles, p.tensor_cycles) == (800, 1600, 512)
    assert p.predicted == pytest.approx(1600 / 512)


# A persistent outer loop around the K loop, a LoRA loop of rank 16 (a quarter of a K step's
# MMA work) before it, and a second loop with no MMA: the finder must take the inner K loop.
NESTED_KERNEL = f"""
    S2R R0, SR_TID.X
lora:
    LDS R4, [R2]
    HGMMA.64x128x16.F32.BF16 R24, R96, gdesc[UR16], R24
    @P1 BRA lora
tiles:
    IADD3 R2, R2, 0x1, RZ
kloop:
    {filler(20)}
    HGMMA.64x128x16.F32.BF16 R24, R96, gdesc[UR16], R24
    HGMMA.64x128x16.F32.BF16 R24, R96, gdesc[UR16], R24
    HGMMA.64x128x16.F32.BF16 R24, R96, gdesc[UR16], R24
    HGMMA.64x128x16.F32.BF16 R24, R96, gdesc[UR16], R24
    @P0 BRA kloop
    STG.E.128 desc[UR4][R6.64], R8
    @P2 BRA tiles
epilogue:
    FMUL R6, R6, R6
    @P3 BRA epilogue
    EXIT
"""


def test_main_loop_is_the_innermost_with_whole_tile_steps(sass_function):
    main = speed_model.find_main_loop(sass_function(NESTED_KERNEL), gemm_tile())
    assert main.unroll == 1 and len(main.instructions) == 25  # 20 + 4 HGMMA + BRA
    assert main.instructions[0].address == 0x50 and main.region == "loop at 0x50"


def test_no_main_loop_is_an_error(sass_function):
    too_big = gemm_tile(n=128, m=128, k=128)  # needs 8 HGMMA per pass; no loop has them
    with pytest.raises(MainLoopNotFound, match="no loop"):
        speed_model.find_main_loop(sass_function(NESTED_KERNEL), too_big)


def test_gemv_memory_model(sass_function):
    # one warp streams 2 rows x 1024 weights per pass with 64 FFMA per thread (M = 1)
    ffma = "\n".join("FFMA R1, R2, R3, R1" for _ in range(64))
    function = sass_function(f"loop:\n{filler(62)}\n{ffma}\n@P0 BRA loop\nEXIT")  # 127 per thread
    workload = Workload("gemv", "ffma", work=2048, weights=2048, threads=32, tile={},
                        hbm_bytes_per_weight=0.515625, dense_bytes_per_weight=2.0)
    p = speed_model.predict_function(function, workload, H200)
    bytes_per_clock = 4.8e12 / (132 * 1.98e9)  # H200's HBM share of one SM per clock
    assert p.issue_cycles == pytest.approx(127 / 4)  # one warp
    assert p.memory_cycles == pytest.approx(2048 * 0.515625 / bytes_per_clock)
    assert p.reference_cycles == pytest.approx(2048 * 2.0 / bytes_per_clock)
    assert p.bound == "memory" and p.figure == "speedup_over_dense_gemv"
    assert p.predicted == pytest.approx(2.0 / 0.515625)
    assert p.tensor_cycles == 0 and p.instructions_per_weight == pytest.approx(127 * 32 / 2048)


DEQUANT_KERNEL = """
    ISETP.GE.AND P0, PT, R0, R1, PT
    @P0 BRA bytewise
    LDG.E.128 R4, desc[UR4][R2.64]
    {filler}
    STG.E.128 desc[UR4][R8.64], R4
    STG.E.128 desc[UR4][R8.64+0x10], R4
    EXIT
bytewise:
    STG.E.U16 desc[UR4][R8.64], R4
    @P1 BRA bytewise
    EXIT
"""


def test_dequant_without_loop_counts_the_path_that_stores_the_tile(sass_function):
    # 128 threads x 16 weights, 32 bf16 bytes stored per thread on the vector path
    function = sass_function(DEQUANT_KERNEL.format(filler=filler(494)))  # 2 + 1 + 494 + 2 + 1 = 500
    workload = Workload("dequant", "store", work=4096, weights=2048, threads=128, tile={},
                        hbm_bytes_per_weight=2.515625, dense_bytes_per_weight=2.515625)
    p = speed_model.predict_function(function, workload, A100)
    assert (p.region, p.loop_instructions) == ("kernel (no loop)", 500)
    memory = 2048 * 2.515625 / (2.039e12 / (108 * 1.41e9))  # 384.8 cycles of the SM's HBM share
    assert (p.issue_cycles, p.bound, p.figure) == (500 * 4 / 4, "issue", "hbm_fraction")
    assert p.memory_cycles == pytest.approx(memory)
    assert p.predicted == pytest.approx(memory / 500)


def test_machine_constants_match_their_rated_peaks():
    for machine in MACHINES.values():
        peak = machine.sms * machine.tensor_flop_per_clock_per_sm * machine.tensor_clock_hz
        # the tensor clock is the one NVIDIA's rated dense bf16 peak implies, to the 3 digits cited
        assert peak == pytest.approx(machine.rated_dense_bf16_flop_per_s, rel=2e-3), machine.name
        assert machine.issue_per_clock_per_sm == 4 and machine.clock_hz >= machine.tensor_clock_hz
        assert machine.sources and all("https://" in source for source in machine.sources)
    assert {m.arch for m in MACHINES.values()} == set(speed_model.DEFAULT_MACHINE)
    assert all(MACHINES[name].arch == arch for arch, name in speed_model.DEFAULT_MACHINE.items())


def test_table_is_json_with_the_machines():
    import json

    table = speed_model.table([{"kernel": "k", "model": None}])
    assert json.loads(json.dumps(table))["machines"]["H200"]["hbm_bytes_per_s"] == 4.8e12
    assert table["kernels"] == [{"kernel": "k", "model": None}]
