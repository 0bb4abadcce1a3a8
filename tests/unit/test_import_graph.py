"""The dtmcli package has no import cycles, counting imports inside functions (not TYPE_CHECKING ones).

Also: each public module imports on its own in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "dtmcli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(candidate: str) -> str | None:
    """The dtmcli module ``candidate`` names (a submodule, else its package), or None outside dtmcli."""
    while candidate and candidate not in MODULES:
        candidate = candidate.rpartition(".")[0]
    return candidate or None


def imports_of(name: str) -> set[str]:
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(filter(None, (_resolve(a.name) for a in child.names)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")
                    parent = parent[: len(parent) - (child.level - 1)]
                    base = ".".join([*parent, base] if base else parent)
                for alias in child.names:
                    target = _resolve(f"{base}.{alias.name}") or _resolve(base)
                    if target:
                        found.add(target)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    # A module importing its own package's __init__ (e.g. ``from . import x``) is not an edge to itself.
    found.discard(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = dfs(start)
            if cycle:
                return cycle
    return None


def graph() -> dict[str, set[str]]:
    # Package __init__ modules re-export their children; edges *into* a package mean "its __init__",
    # which is the parent of everything below it, so they are left out to avoid trivial cycles.
    out = {}
    for name in MODULES:
        out[name] = {t for t in imports_of(name) if not name.startswith(t + ".") and t != "dtmcli"}
    return out


def test_no_import_cycles() -> None:
    assert find_cycle(graph()) is None


def test_the_cycle_finder_finds_the_old_cycle() -> None:
    g = graph()
    g["dtmcli.branch"] = g["dtmcli.branch"] | {"dtmcli.barrier"}  # what branch.py used to import
    cycle = find_cycle(g)
    assert cycle is not None and "dtmcli.branch" in cycle and "dtmcli.barrier" in cycle


def test_branch_does_not_import_the_barrier() -> None:
    assert not {"dtmcli.barrier", "dtmcli._barrier_decorator"} & imports_of("dtmcli.branch")
    assert not any(m.startswith("dtmcli._barrier.") for m in imports_of("dtmcli.branch"))
    storage = [m for m in MODULES if m.startswith("dtmcli._barrier.")]
    assert not any("dtmcli.contrib" in " ".join(imports_of(m)) for m in storage)


@pytest.mark.parametrize(
    "module", ["dtmcli.branch", "dtmcli.barrier", "dtmcli._barrier_decorator", "dtmcli._barrier.branch_barrier",
               "dtmcli.contrib.flask", "dtmcli.contrib.fastapi", "dtmcli.contrib.django", "dtmcli.tcc", "dtmcli.xa"],
)
def test_imports_in_a_fresh_interpreter(module: str) -> None:
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT, timeout=60)
