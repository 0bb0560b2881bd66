"""The package's import structure: no module imports itself back through others, lower floors never import higher
ones, and every module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monai_qsa"
#: each floor may import only itself and the floors listed before it (docs/architecture.md)
FLOORS = [
    {"utils", "data", "transforms"},
    {"networks", "quantization"},
    {"models", "handlers", "inference", "visualize", "bundle"},
    {"benchmark", "__main__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """monai_qsa modules imported anywhere in the file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {target for target in targets if target in known and target != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next((index for index, names in enumerate(FLOORS) if top in names), -1)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), i.e. groups of mutually importing nodes."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules():
    """Package ``__init__`` re-exports aside, no two modules import each other, directly or through others."""
    modules = {name for name, path in _modules().items() if path.name != "__init__.py"}
    graph = {name: targets & modules for name, targets in _graph().items() if name in modules}
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


def test_no_import_cycle_between_subpackages():
    def subpackage(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        if module != "monai_qsa":
            graph.setdefault(subpackage(module), set()).update(
                subpackage(t) for t in targets if t != "monai_qsa" and subpackage(t) != subpackage(module)
            )
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


def test_lower_floors_do_not_import_higher_ones():
    upward = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if _floor(module) >= 0 and _floor(target) > _floor(module)
    ]
    assert not upward, "\n".join(sorted(upward))


@pytest.mark.parametrize("package", sorted({name.split(".")[1] for name in _modules() if name.count(".") >= 1}))
def test_each_subpackage_imports_alone(package):
    modules = sorted(name for name in _modules() if name.startswith(f"monai_qsa.{package}") and "__main__" not in name)
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
