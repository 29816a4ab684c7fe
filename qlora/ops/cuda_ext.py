"""The optional CUDA extension built from csrc/: ``torch.ops.qlora.nf4_gemv_lora`` and
``torch.ops.qlora.nf4_dequantize``.

Loading order: the extension that ``setup.py`` built (``qlora/_C*.so``, present when the package was
installed with a CUDA toolkit and a CUDA build of torch), else a just-in-time build of csrc/ with
``torch.utils.cpp_extension.load`` (needs a CUDA device, nvcc and a source checkout; the first build
takes about a minute and is cached by torch). Nothing is compiled at import time.

Ops (fields as in ``qlora.quant.nf4.NF4Tensor``):
    nf4_dequantize(packed, absmax, nested_absmax?, nested_quant_map?, offset?, quant_map,
                   blocksize, nested_blocksize, out!) -> ()
        out[i] = quant_map[code_i] * absmax_fp32[i // blocksize], written into ``out`` (bf16/fp16).
    nf4_gemv_lora(x [M, K], packed, absmax, nested_absmax?, nested_quant_map?, offset?, quant_map,
                  blocksize, nested_blocksize, N, lora_A? [r, K], lora_B? [N, r], scaling) -> [M, N]
        y = x W^T + scaling * (x A^T) B^T for 1 <= M <= 8 and K % 32 == 0, fp32 accumulation.
``nested_*`` and ``offset`` are given iff absmax is uint8 (double quantization).
"""
from __future__ import annotations

import functools
import importlib.util
import shutil
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ("torch_bindings.cpp", "nf4_dequantize.cu", "nf4_gemv_lora.cu")
MAX_GEMV_ROWS = 8


def _prebuilt_path() -> str | None:
    spec = importlib.util.find_spec("qlora._C")
    return spec.origin if spec is not None else None


def _jit_blocker() -> str | None:
    """Why a just-in-time build cannot run here, or None if it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not all((_CSRC / name).is_file() for name in _SOURCES):
        return f"csrc/ sources not found at {_CSRC} (not a source checkout)"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / FakeTensor tracing can see through the ops."""

    @torch.library.register_fake("qlora::nf4_gemv_lora")
    def _nf4_gemv_lora_fake(x, packed, absmax, nested_absmax, nested_quant_map, offset, quant_map,
                            blocksize, nested_blocksize, N, lora_A, lora_B, scaling):
        return x.new_empty((x.shape[0], N))

    @torch.library.register_fake("qlora::nf4_dequantize")
    def _nf4_dequantize_fake(packed, absmax, nested_absmax, nested_quant_map, offset, quant_map,
                             blocksize, nested_blocksize, out):
        return None


@functools.cache
def _load() -> tuple[bool, str]:
    """Load the extension once; returns (loaded, how or why not)."""
    prebuilt = _prebuilt_path()
    if prebuilt is not None:
        torch.ops.load_library(prebuilt)
        how = f"prebuilt {prebuilt}"
    else:
        blocker = _jit_blocker()
        if blocker is not None:
            return False, f"not built and no JIT build possible: {blocker}"
        from torch.utils.cpp_extension import load

        load(name="qlora_C", sources=[str(_CSRC / name) for name in _SOURCES],
             extra_include_paths=[str(_CSRC)], extra_cflags=["-O3"], extra_cuda_cflags=["-O3"],
             is_python_module=False)
        how = "JIT-built from csrc/"
    _register_fakes()
    return True, how


def is_available() -> bool:
    """True when the ops can run. May JIT-compile csrc/ on the first call on a GPU machine."""
    return _load()[0]


def status() -> str:
    """One line for ``qlora info``. Never compiles: reports what loading would do if not loaded."""
    if _load.cache_info().currsize:
        loaded, how = _load()
        return f"loaded ({how})" if loaded else f"unavailable ({how})"
    prebuilt = _prebuilt_path()
    if prebuilt is not None:
        return f"prebuilt, not loaded yet ({prebuilt})"
    blocker = _jit_blocker()
    if blocker is not None:
        return f"unavailable (not built and no JIT build possible: {blocker})"
    return "not built; will JIT-compile csrc/ on first use"


def _require() -> None:
    loaded, how = _load()
    if not loaded:
        raise RuntimeError(f"qlora CUDA extension unavailable: {how}")


def _weight_args(weight) -> tuple:
    """NF4Tensor fields in the ops' argument order; nested fields only for uint8 absmax."""
    double_quant = weight.absmax.dtype == torch.uint8
    return (weight.packed, weight.absmax,
            weight.nested_absmax if double_quant else None,
            weight.nested_quant_map if double_quant else None,
            weight.offset.reshape(1).float() if double_quant else None,
            weight.quant_map, weight.blocksize, weight.nested_blocksize if double_quant else 0)


def nf4_dequantize(weight, out: torch.Tensor) -> torch.Tensor:
    """Dequantize ``weight`` (NF4Tensor of logical shape S) into ``out`` (bf16/fp16, shape S); returns out."""
    _require()
    if tuple(out.shape) != tuple(weight.shape):
        raise ValueError(f"nf4_dequantize: out has shape {tuple(out.shape)}, weight {tuple(weight.shape)}")
    torch.ops.qlora.nf4_dequantize(*_weight_args(weight), out)
    return out


def nf4_gemv_lora(x: torch.Tensor, weight, lora_A: torch.Tensor | None = None,
                  lora_B: torch.Tensor | None = None, scaling: float = 1.0) -> torch.Tensor:
    """y = x W^T + scaling (x A^T) B^T for x [..., K] with at most 8 rows; W = weight [N, K] NF4.

    Several adapters fold into one call: concatenate the A's along r and the scaled B's (s_i B_i)
    along r, and pass scaling=1.
    """
    _require()
    N, K = weight.shape
    rows = x.reshape(-1, K)  # [M, K]
    if rows.shape[0] > MAX_GEMV_ROWS:
        raise ValueError(f"nf4_gemv_lora: at most {MAX_GEMV_ROWS} rows, got {rows.shape[0]}")
    y = torch.ops.qlora.nf4_gemv_lora(rows.contiguous(), *_weight_args(weight), N, lora_A, lora_B,
                                      scaling)  # [M, N]
    return y.reshape(*x.shape[:-1], N)
