"""Hugging Face hub ids resolved from the local cache only: never a network request.

A model or dataset downloaded once (``huggingface-cli download``, ``from_pretrained``,
``load_dataset``) sits in ``$HF_HUB_CACHE/<models|datasets>--<owner>--<name>/snapshots/<commit>/``;
``local_snapshot`` finds that directory, so the rest of qlora only ever reads local paths.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def local_snapshot(repo_id: str, repo_type: str) -> Optional[Path]:
    """The cached snapshot directory of ``repo_id`` (``repo_type`` "model" or "dataset") at the
    revision ``main`` points to, or None when the cache does not hold it or ``repo_id`` is not a
    valid hub id (an absolute path, say)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError):
        return None


def cache_dir() -> str:
    """Where ``local_snapshot`` looks (for error messages)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
