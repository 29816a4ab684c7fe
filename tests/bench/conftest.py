import re

import pytest


def cuobjdump_text(name: str, program: str) -> str:
    """Render hand-written SASS in the layout of ``cuobjdump -sass``: one instruction per line of
    ``program``; a line "name:" labels the next instruction, and a branch operand naming a label
    becomes that instruction's address (16 bytes per instruction, as on sm_80 / sm_90)."""
    lines = [line.strip() for line in program.strip().splitlines() if line.strip()]
    labels, address = {}, 0
    for line in lines:
        if line.endswith(":"):
            labels[line[:-1]] = address
        else:
            address += 16
    out = ["", "\tcode for sm_90a", "\t.target\tsm_90a", "", f"\t\tFunction : {name}",
           '\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"']
    address = 0
    for line in lines:
        if line.endswith(":"):
            continue
        text = re.sub(r"\b(" + "|".join(map(re.escape, labels)) + r")\b", lambda m: hex(labels[m.group(1)]), line) \
            if labels else line
        out.append(f"        /*{address:04x}*/                   {text} ;".ljust(100) + "/* 0x000000000000794d */")
        out.append(" " * 102 + "/* 0x000fc00000000000 */")
        address += 16
    return "\n".join(out) + "\n"


@pytest.fixture
def sass_function():
    """Hand-written SASS -> the one sass.Function that ``cuobjdump -sass`` text of it parses to."""
    from qlora.bench import sass

    def build(program: str, name: str = "kernel"):
        (function,) = sass.parse_sass(cuobjdump_text(name, program))
        return function

    return build
