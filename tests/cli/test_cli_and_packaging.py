"""The installed package: console script, `qlora info`, and the import names it exposes."""
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qlora


def _run(args, cwd, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_version_flag(tmp_path):
    proc = _run([sys.executable, "-m", "qlora", "--version"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"qlora {qlora.__version__}"


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).with_name("qlora")
    if not script.exists():
        pytest.fail(f"console script missing next to {sys.executable}: reinstall the package")
    proc = _run([str(script), "--version"], cwd=tmp_path)
    assert proc.returncode == 0 and qlora.__version__ in proc.stdout, proc.stderr


def test_info_reports_versions_device_and_backend(tmp_path):
    import torch

    proc = _run([sys.executable, "-m", "qlora", "info"], cwd=tmp_path, env={"QLORA_BACKEND": "torch"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"torch         {torch.__version__}" in out
    for package in ("triton", "bitsandbytes", "transformers"):
        assert package in out
    assert ("CPU only" in out) != torch.cuda.is_available()
    assert "backend       torch (QLORA_BACKEND=torch)" in out
    assert "CUDA extension (csrc/):" in out


def test_bad_backend_name_is_a_clear_error(tmp_path):
    proc = _run([sys.executable, "-m", "qlora", "info"], cwd=tmp_path, env={"QLORA_BACKEND": "tpu"})
    assert proc.returncode == 2
    assert "QLORA_BACKEND='tpu' is not one of auto, triton, cuda, torch" in proc.stderr


def test_kernels_import_only_under_qlora(tmp_path):
    """`qlora.kernels` imports; a top-level `kernels` (Hugging Face's package name) does not come
    from this installation. Run outside the checkout, so the repository root is not on sys.path."""
    code = ("import importlib.util, qlora.kernels, qlora;"
            "spec = importlib.util.find_spec('kernels');"
            "print(qlora.kernels.__name__, None if spec is None else spec.origin)")
    proc = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    name, origin = proc.stdout.split()
    assert name == "qlora.kernels"
    repo_kernels = str(Path(qlora.__file__).resolve().parents[1] / "kernels")
    assert origin == "None" or not origin.startswith(repo_kernels), origin


def test_every_package_and_data_file_is_in_the_wheel_list():
    """An editable install finds subpackages by path; a wheel ships only what pyproject.toml
    lists. Every package directory and every non-Python file in one must be listed."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    root = Path(qlora.__file__).resolve().parents[1]
    setuptools_cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    found = {"qlora." + ".".join(p.parent.relative_to(root / "qlora").parts) if p.parent != root / "qlora" else "qlora"
             for p in (root / "qlora").rglob("__init__.py") if "__pycache__" not in p.parts}
    found |= {"qlora.kernels"}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    data = setuptools_cfg.get("package-data", {})
    for package in sorted(found - {"qlora.kernels"}):
        directory = root.joinpath(*package.split("."))
        for path in directory.rglob("*"):
            owner = next(d for d in path.parents if (d / "__init__.py").exists())
            if owner != directory or not path.is_file() or path.suffix in (".py", ".pyc"):
                continue  # a subpackage's file, a directory, or code
            relative = path.relative_to(directory).as_posix()
            assert any(fnmatch.fnmatch(relative, p) for p in data.get(package, [])), \
                f"{path.relative_to(root)} is not in [tool.setuptools.package-data] {package!r}"
