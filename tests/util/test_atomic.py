"""Atomic writes: the new content or the old, never a torn file, and the usual permissions."""
import os
import stat

import pytest

from qlora.util.atomic import make_temp_dir, write_atomic


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_directories_get_the_modes_open_and_mkdir_give(tmp_path, umask):
    # tempfile.mkstemp / mkdtemp would give 0600 / 0700 whatever the umask
    path = tmp_path / "adapter_config.json"
    write_atomic(path, lambda f: f.write(b"{}"))
    assert _mode(path) == 0o666 & ~umask
    directory = make_temp_dir(tmp_path, ".export.")
    assert directory.name.startswith(".export.") and _mode(directory) == 0o777 & ~umask
    assert make_temp_dir(tmp_path, ".export.") != directory


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "weights.safetensors"
    write_atomic(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]
