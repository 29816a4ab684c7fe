"""SASS reading: cuobjdump's layout, basic blocks, natural loops (nested and side by side), the
heaviest path, and the instruction mix, on hand-written snippets with known answers."""
import pytest

from qlora.bench import sass

# Two lines exactly as cuobjdump -sass (CUDA 13, Triton 3.9's copy) prints them for an sm_90 kernel.
REAL_OUTPUT = """
\t\tFunction : nf4_lora_linear_fwd_kernel
\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*4c70*/                   HGMMA.64x128x16.F32.BF16 R24, R96, gdesc[UR16], R24 ;              /* 0x01e0001060187df0 */
                                                                                                      /* 0x000fe60008700818 */
        /*5210*/              @!P5 BRA 0x4c70 ;                                                       /* 0xffffffc400f0d947 */
                                                                                                      /* 0x000fea000383ffff */
        /*5220*/                   NOP;                                                               /* 0x0000000000007918 */
                                                                                                      /* 0x000fc00000000000 */
"""


def test_parse_reads_cuobjdump_layout():
    (function,) = sass.parse_sass(REAL_OUTPUT)
    assert function.name == "nf4_lora_linear_fwd_kernel"
    hgmma, bra, nop = function.instructions
    assert (hgmma.address, hgmma.opcode, hgmma.mnemonic, hgmma.predicate) == (
        0x4C70, "HGMMA.64x128x16.F32.BF16", "HGMMA", "")
    assert hgmma.operands == "R24, R96, gdesc[UR16], R24"
    assert (bra.address, bra.predicate, bra.opcode, bra.operands) == (0x5210, "@!P5", "BRA", "0x4c70")
    assert (nop.address, nop.opcode, nop.operands) == (0x5220, "NOP", "")


def test_parse_splits_functions():
    text = REAL_OUTPUT + REAL_OUTPUT.replace("nf4_lora_linear_fwd_kernel", "other_kernel")
    assert [(f.name, len(f.instructions)) for f in sass.parse_sass(text)] == [
        ("nf4_lora_linear_fwd_kernel", 3), ("other_kernel", 3)]


# An outer loop (a persistent tile loop) around an inner loop, then a second, separate loop. The
# trap "BRA end" after EXIT loops on itself but is unreachable, as in every compiled kernel.
NESTED = """
    S2R R0, SR_TID.X
outer:
    IADD3 R2, R2, 0x1, RZ
inner:
    LDS R4, [R2]
    FFMA R5, R4, R4, R5
    ISETP.NE.AND P0, PT, R4, RZ, PT
    @P0 BRA inner
    ISETP.NE.AND P1, PT, R2, 0x10, PT
    @P1 BRA outer
second:
    FMUL R6, R6, R6
    BRA.U !UP0, second
    EXIT
end:
    BRA end
"""


def test_blocks_and_successors(sass_function):
    cfg = sass.ControlFlowGraph(sass_function(NESTED))
    starts = [block[0].address for block in cfg.blocks]
    # leaders: entry, "outer", "inner", after each branch, "second", after EXIT ("end")
    assert starts == [0x00, 0x10, 0x20, 0x60, 0x80, 0xA0, 0xB0]
    assert cfg.successors == [{1}, {2}, {2, 3}, {1, 4}, {4, 5}, set(), {6}]
    assert cfg.reachable() == [0, 1, 2, 3, 4, 5]


def test_loops_nested_and_side_by_side(sass_function):
    cfg = sass.ControlFlowGraph(sass_function(NESTED))
    loops = sass.find_loops(cfg)
    assert [(loop.address, sorted(loop.body), sorted(loop.latches)) for loop in loops] == [
        (0x20, [2], [2]),  # inner: one block, its own latch
        (0x80, [4], [4]),  # second loop
        (0x10, [1, 2, 3], [3]),  # outer contains inner
    ]
    assert [ins.mnemonic for ins in loops[0].instructions] == ["LDS", "FFMA", "ISETP", "BRA"]
    # the unreachable self-branch after EXIT is not a loop
    assert all(0xB0 not in [b[0].address for b in (cfg.blocks[i] for i in loop.body)] for loop in loops)


IF_ELSE_IN_LOOP = """
loop:
    ISETP.GE.AND P0, PT, R0, 0x4, PT
    @P0 BRA light
    FFMA R1, R1, R1, R1
    FFMA R1, R1, R1, R1
    FFMA R1, R1, R1, R1
    BRA join
light:
    IADD3 R2, R2, 0x1, RZ
join:
    IADD3 R0, R0, 0x1, RZ
    @P1 BRA P2, loop
    EXIT
"""


def test_heaviest_path_takes_one_side_of_an_if(sass_function):
    cfg = sass.ControlFlowGraph(sass_function(IF_ELSE_IN_LOOP))
    (loop,) = sass.find_loops(cfg)
    assert len(loop.instructions) == 9  # the whole body, both sides
    heavy = sass.heaviest_path(cfg, len, loop.header, loop.latches, loop.body)
    assert [i.mnemonic for i in heavy] == ["ISETP", "BRA", "FFMA", "FFMA", "FFMA", "BRA", "IADD3", "BRA"]
    # a weight that prefers fewer FFMA picks the other side
    fewer_ffma = lambda block: -sum(i.mnemonic == "FFMA" for i in block)
    light = sass.heaviest_path(cfg, fewer_ffma, loop.header, loop.latches, loop.body)
    assert [i.mnemonic for i in light] == ["ISETP", "BRA", "IADD3", "IADD3", "BRA"]
    # whole function, entry to EXIT
    assert [i.mnemonic for i in sass.heaviest_path(cfg, len)][-1] == "EXIT"


def test_conditional_and_unconditional_branches():
    parse = sass.parse_instruction
    conditional = [parse(0, "@P0 BRA 0x10"), parse(0, "BRA.U !UP0, 0x10"), parse(0, "@P1 BRA P0, 0x10"),
                   parse(0, "@!P2 EXIT")]
    unconditional = [parse(0, "BRA 0x10"), parse(0, "@PT BRA 0x10"), parse(0, "EXIT")]
    assert all(sass._is_conditional(i) for i in conditional)
    assert not any(sass._is_conditional(i) for i in unconditional)


def test_branch_outside_the_function_is_an_error(sass_function):
    with pytest.raises(ValueError, match="unknown address"):
        sass.ControlFlowGraph(sass_function("BRA 0x1000\nEXIT"))


def test_instruction_mix_and_classes(sass_function):
    function = sass_function("""
        HGMMA.64x128x16.F32.BF16 R24, R96, gdesc[UR16], R24
        FSEL R1, R2, R3, P0
        FSEL R1, R2, R3, P1
        UISETP.NE.AND UP0, UPT, UR4, URZ, UPT
        LOP3.LUT R4, R5, 0xf, RZ, 0xc0, !PT
        PRMT R4, R5, 0x7604, R6
        LDSM.16.M88.4 R8, [R9]
        STL [R1], R4
        BAR.SYNC.DEFER_BLOCKING 0x0
        FOO R1
    """)
    by_class, by_mnemonic = sass.instruction_mix(function.instructions)
    assert by_class == {"select": 3, "int": 2, "local": 1, "mma": 1, "other": 1, "shared": 1, "sync": 1}
    assert by_mnemonic["FSEL"] == 2 and by_mnemonic["UISETP"] == 1
    assert sass.opcode_class("UIADD3") == "int" and sass.opcode_class("ULDC") == "const"


def test_spill_bytes_count_local_memory_stores(sass_function):
    function = sass_function("""
        STL [R1+0x8], R4
        STL.64 [R1], R4
        LDL.LU R6, [R1+0x8]
        EXIT
    """)
    assert function.spill_bytes == 12  # max(4 + 8 stored, 4 loaded)
