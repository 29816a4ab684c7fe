"""The package's layers: every module imports only from its own layer or those below, and no two
modules import each other, directly or round a longer circle (imports inside functions count)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module belongs to the longest prefix listed; the package root (the lazy public
# API and `python -m qlora`) sits above everything.
LAYERS = [
    ["qlora.util"],
    ["qlora.quant", "qlora.data"],
    ["qlora.kernels"],
    ["qlora.ops", "qlora.optim"],
    ["qlora.nn", "qlora.adalora.layer"],
    ["qlora.model", "qlora.adalora"],
    ["qlora.train"],
    ["qlora.memory", "qlora.bench"],
    ["qlora.cli"],
    ["qlora"],
]


def _modules() -> dict[str, Path]:
    files = {}
    for path in (ROOT / "qlora").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "kernels").glob("*.py"):
        name = "qlora.kernels" if path.stem == "__init__" else f"qlora.kernels.{path.stem}"
        files[name] = path
    return files


MODULES = _modules()


def _layer(module: str) -> int:
    best, rank = "", None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, i
    assert rank is not None, f"{module} is in no layer of tests/test_layers.py"
    return rank


def _imports(module: str, path: Path) -> set[str]:
    """The qlora modules ``module`` imports, resolved to module names (``from a import b`` is
    ``a.b`` where that is a module, else ``a``); ``qlora.__version__`` does not count."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
                     if (base, a.name) != ("qlora", "__version__")]  # a string, not a layer
        else:
            continue
        found |= {n for n in names if n == "qlora" or n.startswith("qlora.")}
    return found - {module}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` as [a, b, ..., a], or [] when there is none."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done or module not in graph:
            return []
        path.append(module)
        for imported in sorted(graph[module]):
            cycle = visit(imported)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_or_sideways(module):
    upward = sorted(i for i in GRAPH[module] if _layer(i) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports from above: {upward}"


def test_no_import_cycles():
    assert find_cycle(GRAPH) == []


def test_the_checks_see_what_they_look_for():
    """The graph holds real edges, the layers are ordered, and a made-up circle is found, so the
    checks above cannot pass by seeing nothing."""
    assert "qlora.quant.nf4" in GRAPH["qlora.nn.lora"]
    assert "qlora.model.peft_files" in GRAPH["qlora.adalora.adapter"]
    assert _layer("qlora.model.inject") > _layer("qlora.nn.lora") > _layer("qlora.quant.nf4")
    assert _layer("qlora.adalora.layer") < _layer("qlora.adalora.adapter")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
