"""What a run trained on: size, modification time and SHA-256 of each data file.

Every checkpoint stores them (``data_files.json``). Resuming compares them with the files the
config names now: a file whose size or content changed is refused, naming the file, since the
resumed run would go on with other sequences at the saved position in another order (and its
held-out split would differ) while looking like a continuation. ``allow_changed_data`` (the
``--allow-changed-data`` flag) continues anyway. A changed modification time alone is reported
nowhere: the content is what counts.
"""
from __future__ import annotations

import hashlib
import os
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Callable

from qlora.data.formats import BUILTIN_DATA_FILE
from qlora.train.checkpoint import DATA_FILES, read_json
from qlora.train.config import Config

_CHUNK = 1 << 20


class DataChangedError(ValueError):
    pass


def data_files(cfg: Config) -> dict[str, Path]:
    """``{"data.path": file, "data.datasets[0].path": file, "data.eval_path": file}`` for the keys
    set (the built-in data is the file shipped in the package); a hub dataset id or a
    save_to_disk directory is no file and is left out."""
    keys = [("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)]
    keys += [(f"data.datasets[{i}].path", entry["path"]) for i, entry in enumerate(cfg.data.datasets or [])]
    out = {}
    for key, value in keys:
        if value is None:
            continue
        if value.startswith("builtin:"):
            out[key] = Path(str(resources.files("qlora.data").joinpath(BUILTIN_DATA_FILE)))
        else:
            out[key] = Path(value)
    return out


def _describe(path: Path) -> dict:
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": digest.hexdigest()}


def fingerprint(cfg: Config) -> dict[str, dict]:
    """``{key: {file, size, mtime_ns, sha256}}`` of every existing data file of ``cfg`` (a
    missing one is left to the data loader to report)."""
    return {key: _describe(path) for key, path in data_files(cfg).items() if path.is_file()}


def _when(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9).isoformat(sep=" ", timespec="seconds")


def _change(key: str, saved: dict, now: dict) -> str:
    if not now:
        return f"{key} {saved['file']} is gone (was {saved['size']} bytes)"
    if not saved:
        return f"{key} {now['file']} was not in the checkpoint's data"
    return (f"{key} {now['file']} is not the file trained on: {saved['size']} -> {now['size']} "
            f"bytes, modified {_when(saved['mtime_ns'])} -> {_when(now['mtime_ns'])}, sha256 "
            f"{saved['sha256'][:12]}... -> {now['sha256'][:12]}...")


def check_same_data(checkpoint: Path, current: dict[str, dict], allow_changed_data: bool,
                    log: Callable[[str], None]) -> None:
    """Refuse to resume from ``checkpoint`` on data other than it was trained on, naming the
    file; with ``allow_changed_data``, log the change and go on."""
    file = checkpoint / DATA_FILES
    if not file.is_file():
        changes = [f"{file} is missing, so the data cannot be compared"]
    else:
        saved = read_json(file)
        changes = [_change(key, saved.get(key, {}), current.get(key, {}))
                   for key in sorted(saved.keys() | current.keys())
                   if (saved.get(key, {}).get("size"), saved.get(key, {}).get("sha256"))
                   != (current.get(key, {}).get("size"), current.get(key, {}).get("sha256"))]
    if not changes:
        return
    if allow_changed_data:
        log(f"resuming on changed data (--allow-changed-data): {'; '.join(changes)}")
        return
    raise DataChangedError(f"cannot resume from {checkpoint}: {'; '.join(changes)}. Resuming on "
                           f"other data does not continue that run; pass --allow-changed-data to "
                           f"continue anyway")
