"""`qlora info`: versions, device and the kernel backend that will run."""
from __future__ import annotations

import importlib.metadata


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="print versions, device and active kernel backend")
    parser.set_defaults(func=run_info)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_info(args) -> int:
    import torch

    from qlora import __version__
    from qlora.ops import cuda_ext
    from qlora.ops.backend import get_backend, requested_backend

    print(f"qlora {__version__}")
    for package in ("torch", "triton", "bitsandbytes", "transformers", "accelerate", "peft", "safetensors"):
        print(f"{package:<13} {_version(package)}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"device        {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB), "
              f"CUDA {torch.version.cuda}")
    else:
        print("device        CPU only")
    print(f"backend       {get_backend()} (QLORA_BACKEND={requested_backend()})")
    print(f"CUDA extension (csrc/): {cuda_ext.status()}")
    return 0
