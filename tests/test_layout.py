"""The package's shape: no import circle between its modules (function-local imports included, since those are how a
circle is usually held open), and ``res2net.models`` imports with torch alone."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "res2net"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The res2net modules ``path`` imports anywhere in its body (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # A package's __init__ re-exports its modules; an edge to the package stands for an edge to what it imports.
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among non-package modules (a module importing its own package's __init__ is how Python
    packages work, not a circle), or None."""
    packages = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()}
    edges = {n: {m for m in deps if m not in packages} for n, deps in graph.items() if n not in packages}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_circle():
    graph = {"res2net.a": {"res2net.b"}, "res2net.b": {"res2net.c"}, "res2net.c": {"res2net.a"}, "res2net.d": set()}
    assert find_cycle(graph) == ["res2net.a", "res2net.b", "res2net.c", "res2net.a"]
    assert find_cycle({"res2net.a": {"res2net.b"}, "res2net.b": set()}) is None


def test_no_import_circle_in_the_package():
    assert find_cycle(import_graph()) is None


def test_models_do_not_import_the_engine_data_or_hydra():
    for path in (PACKAGE / "models").rglob("*.py"):
        imported = _imports(path)
        assert not {m for m in imported if m.startswith(("res2net.engine", "res2net.data", "hydra", "omegaconf"))}, path


@pytest.mark.slow
def test_models_import_with_torch_alone():
    heavy = ("hydra", "omegaconf", "nvidia.dali")
    code = f"import sys, res2net.models; print([m for m in {heavy} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_reading_a_checkpoint_never_reaches_the_network():
    # Fetching (download, hub) builds on reading (pretrained), never the other way: a tool that only reads files
    # (checkpoint.py's resume, recipe, the teacher's load) cannot start a download, directly or through a helper.
    graph = import_graph()
    reached, todo = set(), ["res2net.models.pretrained"]
    while todo:
        for m in graph[todo.pop()] - reached:
            reached.add(m)
            todo.append(m)
    assert not reached & {"res2net.models.download", "res2net.models.hub", "res2net.models.loading"}, reached
