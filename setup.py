"""Packaging metadata lives in pyproject.toml; this file adds the optional CUDA extension of csrc/.

QLORA_BUILD_CUDA selects it:
    unset  build ``qlora._C`` when torch is importable in the build environment, is a CUDA build, and
           a CUDA toolkit is found; otherwise install without it (the Triton/PyTorch paths are used).
    1      build it, and fail with the reason if any of those is missing.
    0      never build it.
pip builds in an isolated environment that has no torch, so the extension needs
``pip install --no-build-isolation .``; that is also why torch is imported only inside a guard here.
"""
import os

from setuptools import setup

_CHOICES = ("0", "1", "")
_SOURCES = ["csrc/torch_bindings.cpp", "csrc/nf4_dequantize.cu", "csrc/nf4_gemv_lora.cu"]


def _cuda_extension() -> dict:
    """setup() keyword arguments for the extension, or {} when it is not built."""
    choice = os.environ.get("QLORA_BUILD_CUDA", "")
    if choice not in _CHOICES:
        raise SystemExit(f"setup.py: QLORA_BUILD_CUDA must be 0, 1 or unset, got {choice!r}")
    if choice == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        reason = f"torch is not importable in the build environment ({exc}); use --no-build-isolation"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is not a CUDA build"
        elif CUDA_HOME is None:
            reason = "no CUDA toolkit found (set CUDA_HOME)"
        else:
            extension = CUDAExtension(
                name="qlora._C", sources=_SOURCES, include_dirs=[os.path.abspath("csrc")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
            return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}
    if choice == "1":
        raise SystemExit(f"setup.py: QLORA_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"setup.py: building without the CUDA extension: {reason}")
    return {}


setup(**_cuda_extension())
