"""Ahead-of-time inspection of the Triton kernels: compile every autotune config of the NF4 + LoRA
kernels and the standalone dequant kernel, and every ``AOT_SPECS`` specialisation of the
element-wise and loss kernels, for a GPU architecture without a GPU; report registers, spills,
shared memory, the MMA instructions and, for the NF4 kernels, the static speed model's prediction
(``speed_model.py``) from the SASS of the main loop.

The NF4 kernels are compiled as a real launch of a large layer compiles them (``LARGE_LAUNCH``:
M = N = K = 4096, r = 16, one adapter): Triton specialises every int argument that is a multiple
of 16 with ``tt.divisibility = 16`` and every int equal to 1 as a constant, and PyTorch's
allocations make every pointer 16-byte aligned. Without that the compiler cannot vectorize loads
by the row strides, and registers, spills and SASS would not be those of the launched kernel.

``triton.compile`` with a ``GPUTarget`` runs Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX
-> cubin with Triton's bundled ptxas) on the CPU. Everything is read from that cubin, the code a
launch loads: registers from ``cuobjdump -res-usage``; spills as the bytes of its local-memory
stores (STL) in the SASS, which is what ptxas reports as spill stores; "MMA" from the SASS (HGMMA:
``wgmma.mma_async``, HMMA: ``mma.sync``; a kernel that fell back to FMA shows neither); shared
memory from the compile metadata (the dynamic shared memory the launch requests).
``csrc_inspect.py`` does the same for the CUDA C++ kernels of csrc/.
"""
import dataclasses
import importlib

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qlora.bench import sass, speed_model
from qlora.bench.speed_model import DENSE_BYTES_PER_WEIGHT, NF4_BYTES_PER_WEIGHT, Workload
from qlora.kernels import configs
from qlora.kernels.dequant import DEQUANT_BLOCK_BYTES, DEQUANT_NUM_WARPS, nf4_dequantize_kernel
from qlora.kernels.nf4_gemv import nf4_gemv_lora_kernel
from qlora.kernels.nf4_lora_linear import lora_a_kernel, nf4_lora_linear_fwd_kernel
from qlora.kernels.nf4_lora_linear_bwd import nf4_lora_linear_bwd_dx_kernel

# kernel modules that list their launch specialisations in AOT_SPECS (kernel, signature,
# constexprs, and the launch options such as num_warps where not Triton's default)
ELEMENTWISE_MODULES = ("swiglu", "rms_norm", "rope", "cross_entropy")
ARCHS = {"sm_80": 80, "sm_90": 90}
EXPECTED_MMA = {"sm_80": "mma.sync", "sm_90": "wgmma.mma_async"}
# kernels whose configs must not spill (the ISSUE's "fused forward/backward main configs")
MAIN_KERNELS = ("nf4_lora_linear_fwd", "nf4_lora_linear_bwd_dx")
# the GEMV compiled for decode (M = 1) and for its largest M (16, a whole MMA of rows)
GEMV_SPECS = {"nf4_gemv_lora": 1, "nf4_gemv_lora_m16": 16}

_W0_POINTERS = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32",
                "nested_quant_map_ptr": "*fp32", "offset_ptr": "*fp32"}
_NF4_FORMAT = {"QBLOCK": 64, "NESTED_BLOCK": 256, "DOUBLE_QUANT": True}
_W0_CONSTS = {**_NF4_FORMAT, "UPCAST_DOT": False}

# The non-pointer, non-constexpr arguments of a real launch of a Llama-2-7B 4096 x 4096 layer at
# M = 4096 tokens, r = 16, one adapter with dropout 0.05 (the GEMV specs override M with theirs).
LARGE_LAUNCH = {"M": 4096, "N": 4096, "K": 4096, "R": 16, "stride_xm": 4096, "stride_sm": 16, "M_BUCKET": 4096,
                "n_adapters": 1, "n_bytes": 4096 * 4096 // 2, "p": 0.05, "keep_scale": 1 / 0.95}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """How to compile one kernel: its @triton.jit function, autotune configs per arch, pointer
    types, fixed constexprs, the launch values of its other arguments, and (NF4 kernels) what one
    tile step of its main loop does for the speed model."""
    name: str
    kernel: object
    configs: dict  # arch -> list of triton.Config
    pointers: dict
    constexprs: dict
    launch: dict = dataclasses.field(default_factory=lambda: dict(LARGE_LAUNCH))
    workload: object = None  # triton.Config -> speed_model.Workload; None: no speed model
    options: dict = dataclasses.field(default_factory=dict)  # compile options beyond warps and stages


def _fwd_workload(config) -> Workload:
    bn, bm, bk = (config.kwargs[k] for k in ("BLOCK_N", "BLOCK_M", "BLOCK_K"))
    return Workload("gemm", "mma", work=bn * bm * bk, weights=bn * bk, threads=32 * config.num_warps,
                    tile={"N": bn, "M": bm, "K": bk})


def _bwd_dx_workload(config) -> Workload:
    bm, bk, bn = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_K", "BLOCK_N"))
    return Workload("gemm", "mma", work=bm * bk * bn, weights=bn * bk, threads=32 * config.num_warps,
                    tile={"M": bm, "K": bk, "N": bn})


def _gemv_workload(m_pad: int):
    def workload(config) -> Workload:
        # nf4_gemv.py's tile: the MMA has COLS columns, M_PAD rows of X per absmax block of the tile
        # (block-diagonal X^T), so a tile of TILE_K = N_GROUPS blocks costs BLOCK_N x COLS x TILE_K
        # MACs; TILES tiles go per loop iteration when one tile is one block
        bn, bk = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
        cols = max(config.kwargs["MMA_COLS"], m_pad)
        group_k = min(_NF4_FORMAT["QBLOCK"], bk)
        tile_k = min(cols // m_pad, bk // group_k) * group_k
        step_k = max(bk // tile_k, 1) * tile_k
        return Workload("gemv", "mma", work=bn * cols * step_k, weights=bn * step_k, threads=32 * config.num_warps,
                        tile={"N": bn, "M": m_pad, "K": step_k, "MMA_COLS": cols, "SPLIT_K": config.kwargs["SPLIT_K"]},
                        hbm_bytes_per_weight=NF4_BYTES_PER_WEIGHT, dense_bytes_per_weight=DENSE_BYTES_PER_WEIGHT)
    return workload


def _dequant_workload(config) -> Workload:
    weights = 2 * config.kwargs["BLOCK_BYTES"]
    return Workload("dequant", "store", work=weights * 2, weights=weights, threads=32 * config.num_warps,
                    tile={"weights": weights},
                    hbm_bytes_per_weight=NF4_BYTES_PER_WEIGHT + DENSE_BYTES_PER_WEIGHT,
                    dense_bytes_per_weight=NF4_BYTES_PER_WEIGHT + DENSE_BYTES_PER_WEIGHT)


def kernel_specs(dtype: str = "bf16") -> list:
    """The kernels the inspector compiles, specialized for a representative LoRA layer (r = 16,
    bias, dropout on, bf16)."""
    act = f"*{dtype}"
    lora = {"HAS_LORA": True, "BLOCK_R": 16}
    dequant_config = triton.Config({"BLOCK_BYTES": DEQUANT_BLOCK_BYTES}, num_warps=DEQUANT_NUM_WARPS)
    return [
        KernelSpec("nf4_lora_linear_fwd", nf4_lora_linear_fwd_kernel.fn, configs.CONFIGS["nf4_lora_linear_fwd"],
                   {"x_ptr": act, **_W0_POINTERS, "s_ptr": act, "b_ptr": act, "bias_ptr": act, "y_ptr": act},
                   {**lora, "HAS_BIAS": True, **_W0_CONSTS}, workload=_fwd_workload),
        KernelSpec("nf4_lora_linear_bwd_dx", nf4_lora_linear_bwd_dx_kernel.fn,
                   configs.CONFIGS["nf4_lora_linear_bwd_dx"],
                   {"dy_ptr": act, **_W0_POINTERS, "g_ptr": act, "a_ptr": act, "rank_start_ptr": "*i32",
                    "dropout_p_ptr": "*fp32", "seed_ptr": "*i64", "dx_ptr": act},
                   {**lora, **_W0_CONSTS}, workload=_bwd_dx_workload),
        *(KernelSpec(name, nf4_gemv_lora_kernel.fn, configs.CONFIGS["nf4_gemv_lora"],
                     {"x_ptr": act, **_W0_POINTERS, "s_ptr": act, "b_ptr": act, "bias_ptr": act, "y_ptr": act,
                      "partial_ptr": "*fp32", "counter_ptr": "*i32"},
                     {**lora, "HAS_BIAS": True, **_W0_CONSTS, "M_PAD": m}, launch={**LARGE_LAUNCH, "M": m},
                     workload=_gemv_workload(m))
          for name, m in GEMV_SPECS.items()),
        KernelSpec("nf4_dequantize", nf4_dequantize_kernel, {arch: [dequant_config] for arch in ARCHS},
                   {**_W0_POINTERS, "out_ptr": act}, dict(_NF4_FORMAT), workload=_dequant_workload,
                   options={"enable_fp_fusion": False}),
        KernelSpec("lora_a", lora_a_kernel.fn, configs.CONFIGS["lora_a"],
                   {"x_ptr": act, "a_ptr": act, "s_ptr": act, "seed_ptr": "*i64"},
                   {"APPLY_DROPOUT": True, "BLOCK_R": 16, "UPCAST_DOT": False}),
    ]


@dataclasses.dataclass
class InspectResult:
    kernel: str
    config: str
    arch: str
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    mma: str = "none"
    error: str | None = None
    model: dict | None = None  # speed_model.Prediction as a dict (NF4 kernels)
    model_error: str | None = None  # why the speed model has no prediction (NF4 kernels)

    @property
    def ok(self) -> bool:
        return self.error is None


def _config_label(config) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks},w={config.num_warps},s={config.num_stages}"


def launch_source(spec: KernelSpec, config) -> ASTSource:
    """The kernel with ``config`` as Triton specialises it for the launch ``spec.launch``: ints equal
    to 1 become constants, ints divisible by 16 and (16-byte aligned) pointers get
    ``tt.divisibility = 16``, floats stay fp32 arguments (JITFunction.run's rules)."""
    fn = spec.kernel
    constexprs = {**spec.constexprs, **config.kwargs}
    missing = [a for a in spec.pointers if a not in fn.arg_names]
    if missing:
        raise ValueError(f"kernel {spec.name}: pointer args {missing} not in its signature {fn.arg_names}")
    signature, attrs = {}, {}
    divisible = [["tt.divisibility", 16]]
    for i, arg in enumerate(fn.arg_names):
        if arg in spec.pointers:
            signature[arg], attrs[(i,)] = spec.pointers[arg], divisible
        elif arg in constexprs:
            signature[arg] = "constexpr"
        elif arg not in spec.launch:
            raise ValueError(f"kernel {spec.name}: argument {arg!r} has no value in the inspected launch; "
                             f"add it to its KernelSpec.launch")
        elif isinstance(spec.launch[arg], float):
            signature[arg] = "fp32"
        elif spec.launch[arg] == 1:
            signature[arg], constexprs[arg] = "constexpr", 1
        else:
            signature[arg] = "i32" if abs(spec.launch[arg]) < 2**31 else "i64"
            if spec.launch[arg] % 16 == 0:
                attrs[(i,)] = divisible
    return ASTSource(fn, signature, constexprs, attrs)


def _launch_options(spec: KernelSpec, config) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages, **spec.options}


def compile_config(spec: KernelSpec, config, arch: str) -> InspectResult:
    """Compile ``spec`` with one autotune ``config`` for ``arch``, measure it and apply the speed model."""
    workload = spec.workload(config) if spec.workload is not None else None
    return _compile(InspectResult(spec.name, _config_label(config), arch), launch_source(spec, config),
                    _launch_options(spec, config), workload)


def predict_config(kernel: str, config, arch: str, machine: str | None = None) -> speed_model.Prediction:
    """The speed model's prediction for NF4 kernel ``kernel`` (a ``kernel_specs`` name) compiled
    with ``config`` (a triton.Config) for ``arch``, on ``machine`` (default: the arch's
    ``speed_model.DEFAULT_MACHINE``). Raises if it does not compile or has no main loop."""
    spec = next((s for s in kernel_specs() if s.name == kernel and s.workload is not None), None)
    if spec is None:
        raise ValueError(f"no speed model for kernel {kernel!r}")
    _, function = compile_to_sass(launch_source(spec, config), arch, _launch_options(spec, config))
    return speed_model.predict_function(function, spec.workload(config),
                                        speed_model.MACHINES[machine or speed_model.DEFAULT_MACHINE[arch]])


def compile_to_sass(source, arch: str, options: dict) -> tuple:
    """(compiled kernel, its sass.Function) of a Triton source for ``arch`` with compile ``options``."""
    compiled = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch], 32), options=options)
    (function,) = sass.disassemble(compiled.asm["cubin"])
    return compiled, function


def apply_model(result: InspectResult, function: sass.Function, workload: Workload) -> InspectResult:
    """Fill ``result.model`` with the prediction for the arch's default machine (or the reason there is none)."""
    machine = speed_model.MACHINES[speed_model.DEFAULT_MACHINE[result.arch]]
    try:
        result.model = dataclasses.asdict(speed_model.predict_function(function, workload, machine))
    except ValueError as exc:  # no main loop, irreducible flow: a finding to report
        result.model_error = str(exc)
    return result


def _compile(result: InspectResult, source, options: dict, workload: Workload | None = None) -> InspectResult:
    """Compile ``source`` for ``result.arch`` and fill in registers, spills, shared memory, MMA and
    (with a ``workload``) the speed model."""
    try:
        compiled, function = compile_to_sass(source, result.arch, options)
    except Exception as exc:  # a compile failure is a result to report, not a crash of the report
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return result
    result.registers, result.spill_bytes = function.registers, function.spill_bytes
    result.shared_bytes = compiled.metadata.shared
    result.mma = mma_kind(function)
    if workload is not None:
        apply_model(result, function, workload)
    return result


def mma_kind(function: sass.Function) -> str:
    """"wgmma.mma_async" (HGMMA), "mma.sync" (HMMA) or "none": the PTX MMA the SASS came from."""
    mnemonics = {i.mnemonic for i in function.instructions}
    return "wgmma.mma_async" if "HGMMA" in mnemonics else "mma.sync" if "HMMA" in mnemonics else "none"


def elementwise_results(arch: str, kernels=None) -> list:
    """Compile every AOT_SPECS entry of the element-wise and loss kernel modules for ``arch``."""
    results = []
    for module in ELEMENTWISE_MODULES:
        for spec in importlib.import_module(f"qlora.kernels.{module}").AOT_SPECS:
            fn = spec["kernel"]
            name = fn.__name__.removesuffix("_kernel")
            if kernels is not None and name not in kernels:
                continue
            dtype = next(t for t in spec["signature"].values() if t.startswith("*"))[1:]
            options = spec.get("options", {})
            label = ",".join([dtype] + [f"{k}={v}" for k, v in {**spec["constexprs"], **options}.items()])
            source = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"])
            results.append(_compile(InspectResult(name, label, arch), source, options))
    return results


def inspect_kernels(arch: str, kernels=None, max_configs=None) -> list:
    """Compile every config of every kernel (or of ``kernels``; the first ``max_configs`` autotune
    configs of each NF4 kernel), then every element-wise/loss specialisation."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    if configs.interpreting():
        raise RuntimeError("kernel inspection compiles for a GPU target: run it without TRITON_INTERPRET=1 "
                           "(the kernels were defined as interpreted functions in this process)")
    results = []
    for spec in kernel_specs():
        if kernels is not None and spec.name not in kernels:
            continue
        for config in spec.configs[arch][:max_configs]:
            results.append(compile_config(spec, config, arch))
    return results + elementwise_results(arch, kernels)


def problems(results) -> list:
    """Compile errors anywhere; spills or a missing tensor-core MMA in the main fused kernels; an
    NF4 kernel whose main loop the speed model cannot find."""
    found = []
    for r in results:
        if not r.ok:
            found.append(f"{r.kernel} [{r.config}] {r.arch}: compile error {r.error}")
        elif r.model_error:
            found.append(f"{r.kernel} [{r.config}] {r.arch}: no speed model: {r.model_error}")
        elif r.kernel in MAIN_KERNELS and r.spill_bytes:
            found.append(f"{r.kernel} [{r.config}] {r.arch}: {r.spill_bytes} bytes of register spills")
        elif r.kernel in MAIN_KERNELS and r.mma != EXPECTED_MMA[r.arch]:
            found.append(f"{r.kernel} [{r.config}] {r.arch}: main loop uses {r.mma}, expected {EXPECTED_MMA[r.arch]}")
    return found
