"""Where training data comes from, read into ``(location, record)`` pairs for qlora.data.formats.

A source is one of

    builtin:tasks                the shipped tasks
    FILE.json / FILE.jsonl       read here, so a bad record is named by file and line
    FILE.csv / FILE.parquet      read with the ``datasets`` library
    DIR                          written by datasets' ``save_to_disk`` (a Dataset, or a
                                 DatasetDict whose ``split`` is taken), or a folder of data files
                                 as the hub lays them out (``data/train-*.parquet``, ...)
    OWNER/NAME                   a dataset in the local Hugging Face cache (never downloaded)

:func:`locate` only checks that a source exists, so a misspelt path fails before anything slow
(the tokenizer, the model) is loaded; :func:`read_records` then reads it.
"""
from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qlora.data.formats import DATA_FORMATS, ReadStats, read_records as read_json_records
from qlora.util.hub import cache_dir, local_snapshot

JSON_SUFFIXES = (".json", ".jsonl")
DATASETS_SUFFIXES = {".csv": "csv", ".parquet": "parquet"}
SPEC_KEYS = ("path", "format", "split", "weight")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a run. ``weight``: how many times each of its training examples is used
    per epoch (2: twice; 0.5: a seeded random half)."""

    path: str
    format: str
    split: str = "train"
    weight: float = 1.0


@dataclass(frozen=True)
class Source:
    """A located dataset: ``kind`` is "json" (read here), "saved" (save_to_disk), "files" (a file
    or folder for ``datasets.load_dataset``, ``builder`` naming the loader or None to infer it)."""

    spec: DatasetSpec
    kind: str
    location: str
    builder: Optional[str] = None


def check_dataset_specs(key: str, value: list) -> None:
    """ValueError naming ``key[i].field`` for a bad entry of ``data.datasets``."""
    if not value:
        raise ValueError(f"{key}: an empty list; give at least one dataset, or use data.path")
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        for name in entry:
            if name not in SPEC_KEYS:
                match = difflib.get_close_matches(str(name), SPEC_KEYS, n=1)
                hint = f"; did you mean {match[0]!r}?" if match else f" (keys: {', '.join(SPEC_KEYS)})"
                raise ValueError(f"{where}: unknown key {name!r}{hint}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ValueError(f"{where}: 'path' must be given, as a string")
        if "format" in entry and entry["format"] not in DATA_FORMATS:
            raise ValueError(f"{where}.format: {entry['format']!r} is not one of {', '.join(DATA_FORMATS)}")
        if "split" in entry and not isinstance(entry["split"], str):
            raise ValueError(f"{where}.split: expected a string, got {entry['split']!r}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{where}.weight: must be a number > 0, got {weight!r}")


def dataset_specs(path: Optional[str], fmt: str, split: str, datasets: Optional[list]) -> list[DatasetSpec]:
    """The run's datasets from the config's ``data.path`` / ``data.format`` / ``data.split`` or
    ``data.datasets`` (entries already checked by :func:`check_dataset_specs`)."""
    if datasets is not None and path is not None:
        raise ValueError("data.path and data.datasets are both set; put every dataset in "
                         "data.datasets, or use data.path alone")
    if datasets is not None:
        return [DatasetSpec(d["path"], d.get("format", fmt), d.get("split", split), float(d.get("weight", 1.0)))
                for d in datasets]
    if path is None:
        raise ValueError("data.path: not set; name the training data (a JSONL/JSON/CSV/Parquet "
                         "file, a save_to_disk directory or a cached hub dataset), or run "
                         "`qlora train` with no arguments for the built-in run")
    return [DatasetSpec(path, fmt, split)]


def locate(spec: DatasetSpec) -> Source:
    """Where ``spec.path`` is, without reading it; ValueError saying what was looked for."""
    path = spec.path
    if path.startswith("builtin:"):
        return Source(spec, "json", path)
    local = Path(path)
    if local.is_file():
        suffix = local.suffix.lower()
        if suffix in JSON_SUFFIXES:
            return Source(spec, "json", path)
        if suffix in DATASETS_SUFFIXES:
            return Source(spec, "files", path, DATASETS_SUFFIXES[suffix])
        raise ValueError(f"{path}: unsupported data file type {suffix or '(no suffix)'!r}; expected "
                         f"{', '.join(JSON_SUFFIXES + tuple(DATASETS_SUFFIXES))}")
    if local.is_dir():
        saved = (local / "dataset_dict.json").is_file() or (local / "state.json").is_file()
        return Source(spec, "saved" if saved else "files", path)
    snapshot = local_snapshot(path, "dataset")
    if snapshot is not None:
        return Source(spec, "files", str(snapshot))
    raise ValueError(f"{path}: no such file or directory, nor a dataset in the local Hugging Face "
                     f"cache ({cache_dir()}); qlora never downloads: fetch it first, e.g. "
                     f"`huggingface-cli download --repo-type dataset {path}`")


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' progress bars off while reading (qlora prints its own summary)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_hf(source: Source):
    """The ``datasets.Dataset`` of a "saved" or "files" source, at its split."""
    import datasets

    spec = source.spec
    with _quiet_datasets():
        if source.kind == "saved":
            loaded = datasets.load_from_disk(source.location)
            if isinstance(loaded, datasets.DatasetDict):
                if spec.split not in loaded:
                    raise ValueError(f"{spec.path}: no split {spec.split!r}; it has "
                                     f"{', '.join(loaded)} (set data.split)")
                loaded = loaded[spec.split]
            return loaded
        try:
            if source.builder is not None:  # one file: everything in it is the split asked for
                return datasets.load_dataset(source.builder, data_files={spec.split: source.location},
                                             split=spec.split)
            return datasets.load_dataset(source.location, split=spec.split)
        except ValueError as err:
            # datasets names the split it lacks ("Unknown split ...") or the files it found none in
            raise ValueError(f"{spec.path}: {err}") from None


def read_records(source: Source, skip_bad_lines: bool, stats: ReadStats) -> list[tuple[str, object]]:
    """(location, record) of every record of ``source``; locations name the file and line, or
    the dataset, split and row."""
    if source.kind == "json":
        return read_json_records(source.location, skip_bad_lines, stats)
    dataset = _load_hf(source)
    name = f"{source.spec.path}[{source.spec.split}]"
    return [(f"{name} row {i}", row) for i, row in enumerate(dataset)]


def describe(source: Source) -> str:
    """How the source was read, for the run's data summary."""
    spec = source.spec
    where = {"json": "", "saved": " (save_to_disk)", "files": ""}[source.kind]
    if source.kind == "files" and not os.path.exists(spec.path):
        where = f" (hub cache: {source.location})"
    split = f"[{spec.split}]" if source.kind != "json" else ""
    return f"{spec.path}{split}{where}"
