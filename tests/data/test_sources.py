"""Data where users keep it: CSV, Parquet, save_to_disk directories and datasets in the local
Hugging Face cache (read with no network), each read into the same records as a JSONL file."""
import json

import pytest

from qlora.data.formats import ReadStats
from qlora.data.sources import DatasetSpec, check_dataset_specs, dataset_specs, locate, read_records

RECORDS = [{"instruction": "Uppercase: abc", "input": "", "output": "ABC"},
           {"instruction": "Add", "input": "2+3", "output": "5"},
           {"instruction": "Reverse, then say it", "input": "", "output": "cba"}]
TEST_RECORDS = [{"instruction": "Uppercase: xyz", "input": "", "output": "XYZ"}]


def _read(path, split="train"):
    source = locate(DatasetSpec(str(path), "alpaca", split))
    return source, [record for _, record in read_records(source, False, ReadStats())]


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home (hub cache and datasets cache) inside tmp_path, offline."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the cache location when it is imported
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


def test_csv_and_parquet_read_like_jsonl(tmp_path, hf_home):
    import datasets

    table = datasets.Dataset.from_list(RECORDS)
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    table.to_parquet(str(tmp_path / "d.parquet"))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert _read(jsonl)[1] == RECORDS
    source, records = _read(tmp_path / "d.parquet")
    assert (source.kind, records) == ("files", RECORDS)
    # an empty CSV cell reads as None: an optional field left empty
    source, records = _read(tmp_path / "d.csv")
    assert [{k: v or "" for k, v in r.items()} for r in records] == RECORDS


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, hf_home):
    import datasets

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict(train=datasets.Dataset.from_list(RECORDS),
                         test=datasets.Dataset.from_list(TEST_RECORDS)).save_to_disk(str(tmp_path / "two"))
    source, records = _read(tmp_path / "one")
    assert (source.kind, records) == ("saved", RECORDS)
    assert _read(tmp_path / "two")[1] == RECORDS
    assert _read(tmp_path / "two", split="test")[1] == TEST_RECORDS
    with pytest.raises(ValueError, match=r"two: no split 'validation'; it has train, test \(set data.split\)"):
        _read(tmp_path / "two", split="validation")


def _cache_dataset(hub_cache, repo_id, files: dict) -> None:
    """``files`` (relative path -> datasets.Dataset) laid out as huggingface_hub caches a dataset
    repository: refs/main names the commit whose snapshot holds the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, table in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(path))


def test_dataset_in_the_local_hub_cache(hf_home):
    import datasets

    _cache_dataset(hf_home / "hub", "someone/tasks", {
        "data/train-00000-of-00001.parquet": datasets.Dataset.from_list(RECORDS),
        "data/test-00000-of-00001.parquet": datasets.Dataset.from_list(TEST_RECORDS)})
    source, records = _read("someone/tasks")
    assert source.kind == "files" and source.location.startswith(str(hf_home / "hub"))
    assert records == RECORDS
    assert _read("someone/tasks", split="test")[1] == TEST_RECORDS


def test_missing_data_fails_naming_what_was_looked_for(tmp_path, hf_home):
    with pytest.raises(ValueError, match=r"^data/alpac\.jsonl: no such file or directory, nor a dataset "
                                         r"in the local Hugging Face cache \(.*hf/hub\)"):
        locate(DatasetSpec("data/alpac.jsonl", "alpaca"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: unsupported data file type '\.txt'; expected "
                                         r"\.json, \.jsonl, \.csv, \.parquet"):
        locate(DatasetSpec(str(tmp_path / "notes.txt"), "alpaca"))


@pytest.mark.parametrize("entry, message", [
    ({"path": "a.jsonl", "wieght": 2}, r"data.datasets\[0\]: unknown key 'wieght'; did you mean 'weight'\?"),
    ({"format": "alpaca"}, r"data.datasets\[0\]: 'path' must be given, as a string"),
    ({"path": "a.jsonl", "format": "sharegtp"}, r"data.datasets\[0\].format: 'sharegtp' is not one of"),
    ({"path": "a.jsonl", "weight": 0}, r"data.datasets\[0\].weight: must be a number > 0, got 0"),
])
def test_bad_dataset_entry_is_named(entry, message):
    with pytest.raises(ValueError, match=message):
        check_dataset_specs("data.datasets", [entry])


def test_dataset_specs_from_path_or_datasets():
    assert dataset_specs("a.jsonl", "chat", "train", None) == [DatasetSpec("a.jsonl", "chat")]
    mixed = dataset_specs(None, "alpaca", "train", [{"path": "a.jsonl", "weight": 2},
                                                    {"path": "b", "format": "sharegpt", "split": "x"}])
    assert mixed == [DatasetSpec("a.jsonl", "alpaca", "train", 2.0), DatasetSpec("b", "sharegpt", "x", 1.0)]
    with pytest.raises(ValueError, match="data.path and data.datasets are both set"):
        dataset_specs("a.jsonl", "alpaca", "train", [{"path": "b.jsonl"}])
    with pytest.raises(ValueError, match="data.path: not set"):
        dataset_specs(None, "alpaca", "train", None)
