"""Ahead-of-time inspection of the Triton kernels: compile every autotune config of the NF4 + LoRA
kernels, and every ``AOT_SPECS`` specialisation of the element-wise and loss kernels, for a GPU
architecture without a GPU, and report registers, spills, shared memory and the MMA instructions.

``triton.compile`` with a ``GPUTarget`` runs Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX
-> cubin with Triton's bundled ptxas) on the CPU. Registers and spills come from ``ptxas -v`` on the
PTX (the assembler that produced the cubin), shared memory from the compile metadata (dynamic
shared memory the launch requests). "Main loop MMA" is read from the PTX: ``wgmma.mma_async`` on
sm_90, ``mma.sync`` on sm_80; a kernel that fell back to FMA shows neither.
"""
import dataclasses
import importlib
import os
import re
import subprocess
import tempfile

import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qlora.kernels import configs
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

_W0_POINTERS = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32",
                "nested_quant_map_ptr": "*fp32", "offset_ptr": "*fp32"}
_W0_CONSTS = {"QBLOCK": 64, "NESTED_BLOCK": 256, "DOUBLE_QUANT": True, "UPCAST_DOT": False}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """How to compile one kernel: its autotuned function, pointer types and fixed constexprs."""
    name: str
    autotuner: object
    pointers: dict
    constexprs: dict


def kernel_specs(dtype: str = "bf16") -> list:
    """The kernels the inspector compiles, specialized for a representative LoRA layer (r = 16,
    bias, dropout on, bf16)."""
    act = f"*{dtype}"
    lora = {"HAS_LORA": True, "BLOCK_R": 16}
    return [
        KernelSpec("nf4_lora_linear_fwd", nf4_lora_linear_fwd_kernel,
                   {"x_ptr": act, **_W0_POINTERS, "s_ptr": act, "b_ptr": act, "bias_ptr": act, "y_ptr": act},
                   {**lora, "HAS_BIAS": True, **_W0_CONSTS}),
        KernelSpec("nf4_lora_linear_bwd_dx", nf4_lora_linear_bwd_dx_kernel,
                   {"dy_ptr": act, **_W0_POINTERS, "g_ptr": act, "a_ptr": act, "rank_start_ptr": "*i32",
                    "dropout_p_ptr": "*fp32", "seed_ptr": "*i64", "dx_ptr": act},
                   {**lora, **_W0_CONSTS}),
        KernelSpec("nf4_gemv_lora", nf4_gemv_lora_kernel,
                   {"x_ptr": act, **_W0_POINTERS, "s_ptr": act, "b_ptr": act, "bias_ptr": act, "y_ptr": act,
                    "partial_ptr": "*fp32", "counter_ptr": "*i32"},
                   {**lora, "HAS_BIAS": True, **_W0_CONSTS, "M_PAD": 1}),
        KernelSpec("lora_a", lora_a_kernel, {"x_ptr": act, "a_ptr": act, "s_ptr": act, "seed_ptr": "*i64"},
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

    @property
    def ok(self) -> bool:
        return self.error is None


def _config_label(config) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks},w={config.num_warps},s={config.num_stages}"


def _ptxas_candidates(cc: int) -> list:
    bin_dir = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
    names = ["ptxas-blackwell", "ptxas"] if cc >= 90 else ["ptxas", "ptxas-blackwell"]
    return [os.path.join(bin_dir, n) for n in names] + ["ptxas"]


def ptxas_usage(ptx: str, arch: str) -> tuple:
    """(registers, spill bytes) from ``ptxas -v``; the first ptxas that accepts the PTX wins."""
    cc = ARCHS[arch]
    gpu = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for ptxas in _ptxas_candidates(cc):
            try:
                proc = subprocess.run([ptxas, "-v", f"-arch={gpu}", path, "-o", os.devnull],
                                      capture_output=True, text=True, timeout=300)
            except FileNotFoundError:
                continue
            if proc.returncode != 0:
                errors.append(f"{ptxas}: {proc.stderr.strip()[-200:]}")
                continue
            regs = re.search(r"Used (\d+) registers", proc.stderr)
            spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr)]
            return (int(regs.group(1)) if regs else None), max(spills, default=0)
    raise RuntimeError("no ptxas accepted the PTX: " + " | ".join(errors))


def compile_config(spec: KernelSpec, config, arch: str) -> InspectResult:
    """Compile ``spec`` with one autotune ``config`` for ``arch`` and measure it."""
    fn = spec.autotuner.fn
    constexprs = {**spec.constexprs, **config.kwargs}
    signature = {}
    for arg in fn.arg_names:
        if arg in spec.pointers:
            signature[arg] = spec.pointers[arg]
        elif arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ("p", "keep_scale"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    missing = [a for a in spec.pointers if a not in fn.arg_names]
    if missing:
        raise ValueError(f"kernel {spec.name}: pointer args {missing} not in its signature {fn.arg_names}")
    # pointers are 16-byte aligned (PyTorch allocations); lets Triton vectorize as on a real launch
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.pointers}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return _compile(InspectResult(spec.name, _config_label(config), arch),
                    ASTSource(fn, signature, constexprs, attrs), options)


def _compile(result: InspectResult, source, options: dict) -> InspectResult:
    """Compile ``source`` for ``result.arch`` and fill in registers, spills, shared memory and MMA."""
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", ARCHS[result.arch], 32), options=options)
        ptx = compiled.asm["ptx"]
        result.registers, result.spill_bytes = ptxas_usage(ptx, result.arch)
    except Exception as exc:  # a compile failure is a result to report, not a crash of the report
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return result
    result.shared_bytes = compiled.metadata.shared
    for instruction in ("wgmma.mma_async", "mma.sync"):
        if instruction in ptx:
            result.mma = instruction
            break
    return result


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
        for config in configs.CONFIGS[spec.name][arch][:max_configs]:
            results.append(compile_config(spec, config, arch))
    return results + elementwise_results(arch, kernels)


def problems(results) -> list:
    """Compile errors anywhere; spills or a missing tensor-core MMA in the main fused kernels."""
    found = []
    for r in results:
        if not r.ok:
            found.append(f"{r.kernel} [{r.config}] {r.arch}: compile error {r.error}")
        elif r.kernel in MAIN_KERNELS and r.spill_bytes:
            found.append(f"{r.kernel} [{r.config}] {r.arch}: {r.spill_bytes} bytes of register spills")
        elif r.kernel in MAIN_KERNELS and r.mma != EXPECTED_MMA[r.arch]:
            found.append(f"{r.kernel} [{r.config}] {r.arch}: main loop uses {r.mma}, expected {EXPECTED_MMA[r.arch]}")
    return found
