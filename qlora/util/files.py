"""Reading the files a user hands over (configs, data, adapter configs, checkpoints) with errors
that name the file and what is wrong with it, instead of a bare ``UnicodeDecodeError``,
``IsADirectoryError`` or a pickle error."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _blocked_reason(err: BaseException) -> str:
    """The global that torch's weights-only unpickler refused to call, without its advice to
    load the file with ``weights_only=False`` or to allowlist the global."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f"GLOBAL {match.group(1)}" if match else _first_line(err)


def read_bytes(path: PathLike) -> bytes:
    """The bytes of file ``path``. A missing file is a FileNotFoundError, a directory or an
    unreadable file a ValueError, each naming ``path``."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, expected a file") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None


def read_text(path: PathLike) -> str:
    """The UTF-8 text of file ``path``; text that is not UTF-8 is a ValueError naming the file,
    the line and the offending byte."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at "
                         f"offset {err.start}); save the file as UTF-8") from None


def load_torch(path: PathLike):
    """``torch.load(path, weights_only=True)`` on the CPU. A file that holds Python objects a
    weights-only load refuses (a pickle that would run code) and a truncated or corrupt file are
    ValueErrors naming the file; a missing one is a FileNotFoundError."""
    import torch

    if not Path(path).is_file():
        read_bytes(path)  # the named error for a missing file or a directory
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused: it holds Python objects that a weights-only load does "
                         f"not create, which could run code ({_blocked_reason(err)})") from err
    except Exception as err:  # torch raises RuntimeError, EOFError, ... for a damaged file
        raise ValueError(f"{path}: unreadable, truncated or corrupt ({_first_line(err)})") from err


def load_safetensors(path: PathLike) -> dict:
    """The tensors of safetensors file ``path``; a damaged file is a ValueError naming it."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        read_bytes(path)
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{path}: not a readable safetensors file ({_first_line(err)})") from err
