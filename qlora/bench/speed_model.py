"""Static speed model: a lower bound on a kernel's time from the SASS of its main loop.

No GPU has run these kernels, so their speed is *predicted* from what the compiler produced. One
iteration of the main loop (one tile step of one CTA, or of one warp for warp-level kernels) costs
at least the largest of, in SM clock cycles:

    issue  = SASS instructions per thread x warps / 4     (an SM issues 4 warp-instructions a clock)
    tensor = 2 x tensor-core MACs / tensor FLOP per clock per SM            (0 without MMA)
    memory = HBM bytes / (HBM bytes per second / (SMs x clock))  (this SM's share; memory-bound kinds)

so predicted cycles = max(issue, tensor, memory), and against the dense bf16 kernel that does the
same work (assumed to run at its own limit):

    gemm     ratio to a dense bf16 GEMM = max(issue, tensor) / tensor         (1.0 is the limit)
    gemv     speed-up over a dense bf16 GEMV = (2 bytes x weights) / bytes per clock / cycles
    dequant  fraction of HBM bandwidth = memory / cycles

It is a lower bound from instruction issue: latency, memory stalls, occupancy and wave
quantization come on top. What is per iteration is read from the SASS, not assumed: the loop is the
one whose tensor-core (or FFMA, or global-store) work per iteration is a whole multiple of one tile
step's, and that multiple is the compiler's unroll factor. A wgmma (``HGMMA.64xNx16``) is issued by
each of the 4 warps of a warpgroup and computes one 64xNx16 tile for the warpgroup, so it counts
64*N*16 MACs per 4 warps; an ``HMMA.16816`` computes a 16x8x16 tile per warp.

``Prediction`` is plain data (``dataclasses.asdict`` gives JSON); ``table`` bundles predictions
with the machine constants for code that cannot import this package (the ops-layer dispatcher).
A tile iteration's predicted time on ``machine`` is ``cycles / clock``; a launch of I tile
iterations spread over all SMs takes about ``I x cycles / (SMs x clock)`` (no wave quantization).
"""
import dataclasses
import re

from qlora.bench import sass

NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed codes, u8 absmax per 64, fp32 nested per 256 blocks
NF4_FP32_ABSMAX_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # without double quantization: fp32 absmax per 64
DENSE_BYTES_PER_WEIGHT = 2.0  # bf16


@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    arch: str
    sms: int
    tensor_flop_per_clock_per_sm: int  # dense bf16 in, fp32 accumulate
    issue_per_clock_per_sm: int  # warp-instructions: one warp scheduler per SM partition, 4 partitions
    hbm_bytes_per_s: float
    clock_hz: float  # max boost clock, at which the non-tensor peaks are rated
    tensor_clock_hz: float  # the clock of the rated dense bf16 peak: peak / (SMs x FLOP per clock per SM)
    rated_dense_bf16_flop_per_s: float
    sources: tuple

    @property
    def hbm_bytes_per_clock_per_sm(self) -> float:
        return self.hbm_bytes_per_s / (self.sms * self.clock_hz)


_HOPPER_WHITEPAPER = (
    "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), 'H100 SM Architecture': four SM partitions, "
    "each with one warp scheduler and dispatch unit (32 threads/clk); per SM, 2x the A100's dense MMA rate clock "
    "for clock (A100: 1024 FP16 FMA/clk/SM), so 4096 bf16 FLOP/clk/SM. "
    "https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper")
_PER_SM_RATES = (
    "How the rated tensor TFLOPS follow from FLOP/clk/SM x SMs x clock (NVIDIA developer forum): "
    "https://forums.developer.nvidia.com/t/how-to-calculate-the-tensor-core-fp16-performance-of-h100/244727")

_H100_SXM = Machine(
    "H100 SXM", "sm_90", sms=132, tensor_flop_per_clock_per_sm=4096, issue_per_clock_per_sm=4,
    hbm_bytes_per_s=3.35e12, clock_hz=1.98e9, tensor_clock_hz=1.83e9, rated_dense_bf16_flop_per_s=989.4e12,
    sources=(_HOPPER_WHITEPAPER,
             "NVIDIA H100 datasheet (H100 SXM column): 132 SMs; GPU memory bandwidth 3.35 TB/s; BF16 tensor "
             "1,979 TFLOPS with sparsity = 989.4 dense (-> 1830 MHz at 4096 FLOP/clk/SM); FP32 67 TFLOPS = "
             "132 SMs x 128 FMA x 2 x 1980 MHz. https://www.nvidia.com/en-us/data-center/h100/",
             _PER_SM_RATES))
# the H100 SXM's GH100 (same SMs, clocks and rated peaks) with HBM3e
_H200 = dataclasses.replace(
    _H100_SXM, name="H200", hbm_bytes_per_s=4.8e12,
    sources=(_HOPPER_WHITEPAPER,
             "NVIDIA H200 datasheet (H200 SXM column): GPU memory bandwidth 4.8 TB/s; BF16 tensor 1,979 TFLOPS "
             "with sparsity and FP32 67 TFLOPS, the H100 SXM's figures. https://www.nvidia.com/en-us/data-center/h200/",
             _PER_SM_RATES))
_A100_80GB_SXM = Machine(
    "A100 80GB SXM", "sm_80", sms=108, tensor_flop_per_clock_per_sm=2048, issue_per_clock_per_sm=4,
    hbm_bytes_per_s=2.039e12, clock_hz=1.41e9, tensor_clock_hz=1.41e9, rated_dense_bf16_flop_per_s=312e12,
    sources=("NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020): 108 SMs, boost clock 1410 MHz; "
             "third-generation tensor core 256 FP16 FMA/clk, 4 per SM = 2048 FLOP/clk/SM; four SM partitions, "
             "each with one warp scheduler (32 threads/clk). "
             "https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/nvidia-ampere-architecture-whitepaper.pdf",
             "NVIDIA A100 datasheet (A100 80GB SXM column): GPU memory bandwidth 2,039 GB/s; BF16 tensor 312 TFLOPS. "
             "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
             "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
             _PER_SM_RATES))
MACHINES = {m.name: m for m in (_H100_SXM, _H200, _A100_80GB_SXM)}
# the machine each arch's table row is shown for: the project's lent GPU is an H200
DEFAULT_MACHINE = {"sm_90": "H200", "sm_80": "A100 80GB SXM"}

KINDS = ("gemm", "gemv", "dequant")
COUNTERS = ("mma", "ffma", "store")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one tile step of a kernel's main loop does, for one CTA of ``threads`` threads (or one
    warp, for kernels whose warps loop independently)."""
    kind: str  # "gemm", "gemv" or "dequant" (see the module docstring)
    counter: str  # what identifies the main loop: "mma" / "ffma" MACs or "store" bytes
    work: int  # the counter's value for one tile step
    weights: int  # W0 elements consumed by one tile step
    threads: int
    tile: dict  # the tile's shape, for reports
    hbm_bytes_per_weight: float = 0.0  # gemv, dequant: HBM bytes this kernel moves per weight
    dense_bytes_per_weight: float = 0.0  # gemv: the dense kernel's; dequant: the same as ours

    def __post_init__(self):
        if self.kind not in KINDS or self.counter not in COUNTERS:
            raise ValueError(f"workload kind {self.kind!r} / counter {self.counter!r}: expected one of "
                             f"{KINDS} / {COUNTERS}")
        if self.work <= 0 or self.weights <= 0 or self.threads % 32:
            raise ValueError(f"workload needs work > 0, weights > 0 and whole warps, got {self}")


_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32),
                "8816": (8, 8, 16), "8832": (8, 8, 32)}
_WGMMA_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def mma_macs(instruction: sass.Instruction, warps: int) -> int:
    """Multiply-adds one execution of ``instruction`` by every warp of a CTA of ``warps`` warps
    contributes (0 if it is not a tensor-core MMA)."""
    fields = instruction.opcode.split(".")
    if instruction.mnemonic in ("HGMMA", "IGMMA", "QGMMA", "BGMMA"):
        match = _WGMMA_SHAPE.match(fields[1]) if len(fields) > 1 else None
        if match is None:
            raise ValueError(f"unknown wgmma shape in {instruction.opcode}")
        m, n, k = map(int, match.groups())
        return m * n * k * warps // 4  # one tile per warpgroup of 4 warps
    if instruction.mnemonic in ("HMMA", "IMMA"):
        if len(fields) < 2 or fields[1] not in _HMMA_SHAPES:
            raise ValueError(f"unknown mma.sync shape in {instruction.opcode}")
        m, n, k = _HMMA_SHAPES[fields[1]]
        return m * n * k * warps
    return 0


def counter_work(instructions, counter: str, threads: int) -> int:
    """The ``counter`` work (see ``Workload``) of ``instructions`` executed once by a CTA."""
    if counter == "mma":
        return sum(mma_macs(ins, threads // 32) for ins in instructions)
    if counter == "ffma":
        return sum(threads for ins in instructions if ins.mnemonic == "FFMA")
    return sum(sass.access_bytes(ins) * threads for ins in instructions if ins.mnemonic == "STG")


class MainLoopNotFound(ValueError):
    pass


@dataclasses.dataclass
class MainLoop:
    region: str  # "loop at 0x19e0", or "kernel (no loop)" for a loop-free kernel
    instructions: list  # one thread's instructions of one pass (the heaviest path through the body)
    unroll: int  # tile steps per pass


def find_main_loop(function: sass.Function, workload: Workload) -> MainLoop:
    """The innermost loop whose work per pass is a whole multiple of one tile step's (the longest
    such loop if several); for a kernel with no such loop, the heaviest entry-to-exit path when its
    work is one or more tile steps (a loop-free kernel: one program is one step)."""
    cfg = sass.ControlFlowGraph(function)
    work = lambda instructions: counter_work(instructions, workload.counter, workload.threads)
    weight = lambda block: (work(block), len(block))  # most work first, then most instructions
    candidates = []
    for loop in sass.find_loops(cfg):
        path = sass.heaviest_path(cfg, weight, loop.header, loop.latches, loop.body)
        done = work(path)
        if done and done % workload.work == 0:
            candidates.append((loop, path, done // workload.work))
    innermost = [c for c in candidates if not any(other[0].body < c[0].body for other in candidates)]
    if innermost:
        loop, path, unroll = max(innermost, key=lambda c: len(c[1]))
        return MainLoop(f"loop at {loop.address:#x}", path, unroll)
    path = sass.heaviest_path(cfg, weight)
    done = work(path)
    if done and done % workload.work == 0:
        return MainLoop("kernel (no loop)", path, done // workload.work)
    raise MainLoopNotFound(
        f"{function.name}: no loop (of {len(sass.find_loops(cfg))}) and no path does a whole multiple of one "
        f"tile step's {workload.counter} work ({workload.work}); the heaviest path does {done}")


@dataclasses.dataclass
class Prediction:
    """The model's figures for one kernel config on one machine (per tile step unless named)."""
    machine: str
    kind: str
    tile: dict
    threads: int
    region: str
    unroll: int
    loop_instructions: int  # per thread, one pass of the loop as compiled (unroll tile steps)
    weights: int  # per tile step
    hbm_bytes_per_weight: float  # modelled for gemv / dequant only
    dense_bytes_per_weight: float
    instructions_per_weight: float  # loop_instructions x threads / (weights x unroll)
    issue_cycles: float
    tensor_cycles: float
    memory_cycles: float
    reference_cycles: float  # the dense bf16 kernel's cycles for the same step
    cycles: float  # max(issue, tensor, memory)
    bound: str  # which of the three sets ``cycles``
    figure: str  # "ratio_to_dense_gemm", "speedup_over_dense_gemv" or "hbm_fraction"
    predicted: float
    mix: dict  # instruction classes of the loop pass (sass.OPCODE_CLASSES), by count
    opcodes: dict  # mnemonics of the loop pass, by count


def predict(main_loop: MainLoop, workload: Workload, machine: Machine) -> Prediction:
    """Apply the model (module docstring) to one main loop."""
    warps = workload.threads // 32
    per_step = lambda value: value / main_loop.unroll
    instructions = per_step(len(main_loop.instructions))
    issue = instructions * warps / machine.issue_per_clock_per_sm
    macs = per_step(counter_work(main_loop.instructions, "mma", workload.threads))
    tensor = 2 * macs / machine.tensor_flop_per_clock_per_sm
    per_clock = machine.hbm_bytes_per_clock_per_sm
    memory = workload.weights * workload.hbm_bytes_per_weight / per_clock
    terms = {"issue": issue, "tensor": tensor, "memory": memory}
    bound = max(terms, key=terms.get)
    cycles = terms[bound]
    if workload.kind == "gemm":
        if tensor == 0:
            raise ValueError("a gemm workload's main loop has no tensor-core MMA")
        reference, figure, predicted = tensor, "ratio_to_dense_gemm", cycles / tensor
    else:
        reference = workload.weights * workload.dense_bytes_per_weight / per_clock
        figure = "speedup_over_dense_gemv" if workload.kind == "gemv" else "hbm_fraction"
        predicted = reference / cycles
    mix, opcodes = sass.instruction_mix(main_loop.instructions)
    return Prediction(
        machine=machine.name, kind=workload.kind, tile=dict(workload.tile), threads=workload.threads,
        region=main_loop.region, unroll=main_loop.unroll, loop_instructions=len(main_loop.instructions),
        weights=workload.weights, hbm_bytes_per_weight=workload.hbm_bytes_per_weight,
        dense_bytes_per_weight=workload.dense_bytes_per_weight,
        instructions_per_weight=instructions * workload.threads / workload.weights,
        issue_cycles=issue, tensor_cycles=tensor, memory_cycles=memory, reference_cycles=reference,
        cycles=cycles, bound=bound, figure=figure, predicted=predicted, mix=mix, opcodes=opcodes)


def predict_function(function: sass.Function, workload: Workload, machine: Machine) -> Prediction:
    return predict(find_main_loop(function, workload), workload, machine)


def summary(prediction: dict) -> str:
    """A Prediction (as a dict) in words, e.g. '3.52x dense GEMM time (issue-bound)'."""
    value, bound = prediction["predicted"], prediction["bound"]
    if prediction["figure"] == "ratio_to_dense_gemm":
        return f"{value:.2f}x dense GEMM time ({bound}-bound)"
    if prediction["figure"] == "speedup_over_dense_gemv":
        return f"{value:.2f}x dense GEMV speed ({bound}-bound)"
    return f"{100 * value:.0f}% of HBM bandwidth ({bound}-bound)"


def table(rows: list) -> dict:
    """JSON-serialisable rows (each with its prediction as a dict) plus the machine constants, for
    code that reads predictions without importing this package."""
    return {"machines": {name: dataclasses.asdict(m) for name, m in MACHINES.items()}, "kernels": rows}
