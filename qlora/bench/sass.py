"""Reading SASS: ``cuobjdump -sass`` text -> functions -> basic blocks -> loops and hot paths.

The static speed model (``speed_model.py``) needs the instructions one thread executes per
iteration of a kernel's main loop. This module supplies the pieces, with no knowledge of any
particular kernel:

- ``disassemble`` runs ``cuobjdump -sass`` (Triton's bundled copy, else the CUDA toolkit's) on a
  cubin and ``parse_sass`` splits its text into ``Function``s of ``Instruction``s;
- ``ControlFlowGraph`` splits a function into basic blocks (leaders: the entry, branch targets and
  the instruction after a branch or exit) with their successors;
- ``find_loops`` returns the natural loops (a back edge u -> h where h dominates u; the body is h
  plus every block that reaches u without passing h), innermost first;
- ``heaviest_path`` walks the graph with back edges removed and returns the entry-to-exit (or
  header-to-latch) path that is heaviest under a caller's weight, so a loop body with an if/else
  counts one side, and a loop-free kernel counts the path that does its work.

A ``CALL`` (nvcc's out-of-line slow paths, e.g. 64-bit division) counts as one instruction and
falls through; the callee's blocks are not reachable from the entry and are ignored.
"""
import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile

# "        /*0a70*/              @!P3 BRA 0x5220 ;     /* 0x0000003c0008b947 */"
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;?\s*/\*\s*0x[0-9a-f]+\s*\*/\s*$")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_PREDICATE = re.compile(r"^@!?U?P[0-9T]+$")
_ADDRESS = re.compile(r"0x([0-9a-f]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers: "HGMMA.64x128x16.F32.BF16", "STG.E.128", "BRA"
    operands: str = ""
    predicate: str = ""  # guard predicate, e.g. "@!P3"; "" when unconditional

    @property
    def mnemonic(self) -> str:
        return self.opcode.split(".")[0]


@dataclasses.dataclass
class Function:
    name: str
    instructions: list
    registers: int | None = None  # per thread, from ``cuobjdump -res-usage`` (``disassemble`` fills it)
    static_shared_bytes: int | None = None  # likewise; Triton's shared memory is dynamic, not in here

    @property
    def spill_bytes(self) -> int:
        """Bytes of local-memory stores (or loads, if more) in the code: ptxas's static "bytes spill
        stores / loads" for kernels without local arrays, as Triton's are."""
        stores = sum(access_bytes(i) for i in self.instructions if i.mnemonic == "STL")
        loads = sum(access_bytes(i) for i in self.instructions if i.mnemonic == "LDL")
        return max(stores, loads)


def access_bytes(instruction: Instruction) -> int:
    """Bytes one thread moves with a load or store instruction, from its width modifier."""
    fields = set(instruction.opcode.split(".")[1:])
    for width, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if width in fields:
            return size
    return 4


def parse_instruction(address: int, text: str) -> Instruction:
    """One instruction's text (without the address and encoding comments) -> Instruction."""
    head, _, operands = text.partition(" ")
    predicate = ""
    if _PREDICATE.match(head):
        predicate = head
        head, _, operands = operands.strip().partition(" ")
    return Instruction(address, head, operands.strip(), predicate)


def parse_sass(text: str) -> list:
    """Split ``cuobjdump -sass`` output into functions (instructions in address order)."""
    functions = []
    for line in text.splitlines():
        match = _FUNCTION.match(line)
        if match:
            functions.append(Function(match.group(1), []))
            continue
        match = _INSTRUCTION.match(line)
        if match and functions:
            functions[-1].instructions.append(parse_instruction(int(match.group(1), 16), match.group(2)))
    return functions


def cuobjdump() -> str:
    """Path of cuobjdump: the copy Triton ships (always matches its ptxas), else the toolkit's."""
    try:
        import triton.backends.nvidia
        bundled = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    found = shutil.which("cuobjdump") or shutil.which("/usr/local/cuda/bin/cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump not found (neither in Triton's package nor on PATH)")
    return found


def disassemble(binary: bytes) -> list:
    """The functions of a cubin (or fatbin / object), parsed from ``cuobjdump -sass``, with their
    registers from ``cuobjdump -res-usage``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(binary)
        outputs = []
        for option in ("-sass", "-res-usage"):
            proc = subprocess.run([cuobjdump(), option, path], capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"cuobjdump {option} failed: {proc.stderr.strip()[-500:]}")
            outputs.append(proc.stdout)
    functions = parse_sass(outputs[0])
    usage = {name: (int(reg), int(shared)) for name, reg, shared in
             re.findall(r"Function (\S+?):\s*\n\s*REG:(\d+)\s.*?SHARED:(\d+)", outputs[1])}
    for function in functions:
        function.registers, function.static_shared_bytes = usage.get(function.name, (None, None))
    return functions


def _branch_target(instruction: Instruction):
    match = _ADDRESS.search(instruction.operands)
    return int(match.group(1), 16) if match else None


def _is_conditional(instruction: Instruction) -> bool:
    # "@P0 BRA x", "BRA.U !UP0, x" and "@P1 BRA P0, x" are conditional; "@PT BRA x" is not
    guarded = instruction.predicate not in ("", "@PT")
    return guarded or "," in instruction.operands


class ControlFlowGraph:
    """Basic blocks of one function. ``blocks[i]`` is a list of instructions, ``successors[i]`` a
    set of block indices; block 0 is the entry."""

    def __init__(self, function: Function):
        instructions = function.instructions
        if not instructions:
            raise ValueError(f"function {function.name} has no instructions")
        index_of = {ins.address: i for i, ins in enumerate(instructions)}
        leaders = {0}
        for i, ins in enumerate(instructions):
            if ins.mnemonic in ("BRX", "JMX"):
                raise ValueError(f"{function.name}: indirect branch at {ins.address:#x} ({ins.opcode}) "
                                 "cannot be followed statically")
            if ins.mnemonic in ("BRA", "JMP"):
                target = _branch_target(ins)
                if target not in index_of:
                    raise ValueError(f"{function.name}: branch at {ins.address:#x} to unknown address {target}")
                leaders.add(index_of[target])
            if ins.mnemonic in ("BRA", "JMP", "EXIT", "RET") and i + 1 < len(instructions):
                leaders.add(i + 1)
        starts = sorted(leaders)
        self.name = function.name
        self.blocks = [instructions[a:b] for a, b in zip(starts, starts[1:] + [len(instructions)])]
        block_at = {instructions[s].address: b for b, s in enumerate(starts)}
        self.successors = []
        for b, block in enumerate(self.blocks):
            last = block[-1]
            following = {b + 1} if b + 1 < len(self.blocks) else set()
            if last.mnemonic in ("BRA", "JMP"):
                taken = {block_at[_branch_target(last)]}
                self.successors.append(taken | following if _is_conditional(last) else taken)
            elif last.mnemonic in ("EXIT", "RET"):
                self.successors.append(following if _is_conditional(last) else set())
            else:
                self.successors.append(following)

    def reachable(self) -> list:
        """Blocks reachable from the entry, in reverse postorder (iterative DFS: SASS functions
        reach thousands of blocks)."""
        seen, order = {0}, []
        stack = [(0, iter(sorted(self.successors[0])))]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                order.append(node)
                stack.pop()
            elif child not in seen:
                seen.add(child)
                stack.append((child, iter(sorted(self.successors[child]))))
        return order[::-1]

    def dominators(self) -> dict:
        """block -> set of blocks that dominate it (reachable blocks only)."""
        order = self.reachable()
        predecessors = {b: set() for b in order}
        for b in order:
            for s in self.successors[b]:
                predecessors[s].add(b)
        everything = set(order)
        dom = {b: ({b} if b == 0 else set(everything)) for b in order}
        changed = True
        while changed:
            changed = False
            for b in order[1:]:
                new = {b} | set.intersection(*(dom[p] for p in predecessors[b]))
                if new != dom[b]:
                    dom[b], changed = new, True
        return dom

    @functools.cached_property
    def back_edges(self) -> frozenset:
        """Edges (u, h) whose target h dominates their source u."""
        dom = self.dominators()
        return frozenset((u, h) for u in dom for h in self.successors[u] if h in dom[u])


@dataclasses.dataclass
class Loop:
    header: int  # block index
    latches: frozenset  # sources of the back edges to the header
    body: frozenset  # block indices, header included
    cfg: ControlFlowGraph = dataclasses.field(repr=False)

    @property
    def instructions(self) -> list:
        return [ins for b in sorted(self.body) for ins in self.cfg.blocks[b]]

    @property
    def address(self) -> int:
        return self.cfg.blocks[self.header][0].address


def find_loops(cfg: ControlFlowGraph) -> list:
    """Natural loops (back edges sharing a header are one loop), innermost (smallest) first."""
    reachable = cfg.reachable()
    predecessors = {b: set() for b in reachable}
    for b in reachable:
        for s in cfg.successors[b]:
            predecessors[s].add(b)
    latches = {}
    for u, h in cfg.back_edges:
        latches.setdefault(h, set()).add(u)
    loops = []
    for header, sources in latches.items():
        body, stack = {header}, list(sources)
        while stack:
            b = stack.pop()
            if b not in body:
                body.add(b)
                stack.extend(predecessors[b])
        loops.append(Loop(header, frozenset(sources), frozenset(body), cfg))
    return sorted(loops, key=lambda loop: (len(loop.body), loop.header))


def heaviest_path(cfg: ControlFlowGraph, weight, start: int = 0, ends=None, within=None) -> list:
    """The instructions of the path from ``start`` to a block in ``ends`` (default: blocks without
    successors, i.e. exits) that maximises ``weight(instructions)`` (any value that adds and
    compares, e.g. a tuple), over the graph without back edges, restricted to ``within`` blocks."""
    back = cfg.back_edges
    nodes = set(within) if within is not None else set(cfg.reachable())
    ends = set(ends) if ends is not None else {b for b in nodes if not cfg.successors[b]}
    edges = {b: [s for s in cfg.successors[b] if s in nodes and (b, s) not in back] for b in nodes}
    # topological order (Kahn); what is left over lies on a cycle that has no back edge
    indegree = {b: 0 for b in nodes}
    for b in nodes:
        for s in edges[b]:
            indegree[s] += 1
    ready, order = [b for b in nodes if indegree[b] == 0], []
    while ready:
        b = ready.pop()
        order.append(b)
        for s in edges[b]:
            indegree[s] -= 1
            if indegree[s] == 0:
                ready.append(s)
    if len(order) != len(nodes):
        raise ValueError(f"{cfg.name}: irreducible control flow; no static path")
    best = {}  # block -> (weight of the heaviest path from it to an end, its blocks)
    for b in reversed(order):
        own = weight(cfg.blocks[b])
        options = [best[s] for s in edges[b] if best[s] is not None]
        if options:
            w, path = max(options, key=lambda option: option[0])
            best[b] = (own + w, [b] + path)
        else:
            best[b] = (own, [b]) if b in ends else None
    if best.get(start) is None:
        raise ValueError(f"{cfg.name}: no path from block {start} to an end block")
    return [ins for b in best[start][1] for ins in cfg.blocks[b]]


# ---- instruction mix ------------------------------------------------------------------------
# Classes by mnemonic; a uniform-datapath op ("UIADD3", "ULDC", "UMOV") is classed as its
# vector twin. Every SASS instruction takes one issue slot, whatever its class.
OPCODE_CLASSES = {
    "mma": ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BGMMA", "DMMA"),
    "global": ("LDG", "STG", "LDGSTS", "ATOM", "ATOMG", "RED", "REDG", "LD", "ST", "TMALDG", "TMASTG",
               "BLKCP", "TMAPF"),
    "shared": ("LDS", "STS", "LDSM", "STSM", "ATOMS"),
    "local": ("LDL", "STL"),
    "const": ("LDC",),
    "select": ("FSEL", "SEL", "ISETP", "FSETP", "HSETP2", "DSETP", "PLOP3", "P2R", "R2P", "VOTE", "VOTEU",
               "FMNMX", "IMNMX", "VIMNMX", "HMNMX2"),
    "int": ("IMAD", "IADD3", "IADD", "VIADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "PRMT", "IABS",
            "SGXT", "BMSK", "FLO", "POPC", "BREV", "IDP", "IMUL", "BFE", "BFI"),
    "float": ("FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "MUFU", "FCHK", "DADD", "DMUL", "DFMA"),
    "convert": ("F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND", "I2I"),
    "move": ("MOV", "SHFL", "S2R", "S2UR", "CS2R", "R2UR", "MOVM"),
    "sync": ("BAR", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "WARPSYNC", "MEMBAR", "SYNCS", "ARRIVES", "ERRBAR",
             "FENCE", "CCTL"),
    "control": ("BRA", "JMP", "EXIT", "RET", "CALL", "BSSY", "BSYNC", "NOP", "BREAK", "BPT", "YIELD", "KILL"),
}
_CLASS_OF = {mnemonic: cls for cls, mnemonics in OPCODE_CLASSES.items() for mnemonic in mnemonics}


def opcode_class(mnemonic: str) -> str:
    if mnemonic in _CLASS_OF:
        return _CLASS_OF[mnemonic]
    if mnemonic.startswith("U") and mnemonic[1:] in _CLASS_OF:
        return _CLASS_OF[mnemonic[1:]]
    return "other"


def instruction_mix(instructions) -> tuple:
    """(count per class, count per mnemonic) of ``instructions``, each sorted by count."""
    by_class, by_mnemonic = {}, {}
    for ins in instructions:
        by_mnemonic[ins.mnemonic] = by_mnemonic.get(ins.mnemonic, 0) + 1
        cls = opcode_class(ins.mnemonic)
        by_class[cls] = by_class.get(cls, 0) + 1
    order = lambda counts: dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    return order(by_class), order(by_mnemonic)
