"""Write files so that a crash leaves the old version or the new one, never a torn file.

Files and directories made here get the usual permissions, 0666 and 0777 less the umask (0644 and
0755 under the common umask 022), as ``open`` and ``mkdir`` give: ``tempfile.mkstemp`` and
``mkdtemp`` would make them 0600 and 0700, and an adapter or export renamed from such a temporary
would stay unreadable to everyone but its owner.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable


def _temp_name(parent: Path, prefix: str) -> Path:
    return parent / f"{prefix}{secrets.token_hex(8)}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s directory, fsync it, rename it over
    ``path``, and fsync the directory so the rename itself is durable."""
    path = Path(path)
    tmp = _temp_name(path.parent, f".{path.name}.")
    # O_EXCL: a new file of our own; mode 0o666 is reduced by the umask, as open() does
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory in ``parent`` (mode 0o777 less the umask)."""
    path = _temp_name(Path(parent), prefix)
    os.mkdir(path)
    return path
