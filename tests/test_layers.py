"""The layout's promises, checked on the source: layers, and no import cycles.

Every import statement counts, at module level or inside a function (a lazy import is still
a dependency). The layers, from the bottom:

* ``udpreach.core``: the synchronous core; the standard library, numpy and itself only;
* ``udpreach.render``: renders a document; the core, rich and jinja2;
* ``udpreach.net``: the control channel's shells (trio and blocking) over the core;
* ``agent`` (client side) and ``probe`` (server side): neither imports the other, nor the CLI;
* ``udpreach.cli``: the commands, on top of everything.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("udpreach", "agent", "probe")
STDLIB = set(sys.stdlib_module_names)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            out[_module_name(path)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (project modules resolved to the deepest known one)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            for alias in node.names:  # "from udpreach.core import ledger": a module too
                if f"{base}.{alias.name}" in MODULES:
                    found.add(f"{base}.{alias.name}")
    return {m for m in found if m}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _project(targets: set[str]) -> set[str]:
    return {t for t in targets if t.split(".")[0] in PACKAGES}


def _third_party(targets: set[str]) -> set[str]:
    return {t.split(".")[0] for t in targets if t.split(".")[0] not in (*PACKAGES, *STDLIB)}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("udpreach.core")))
def test_the_core_imports_only_itself_the_stdlib_and_numpy(name: str) -> None:
    targets = GRAPH[name]
    assert _third_party(targets) <= {"numpy", "tomli_w"}, name
    # ``udpreach`` itself: the package root, for its version string and nothing else.
    assert all(t.startswith("udpreach.core") or t == "udpreach" for t in _project(targets)), (
        name,
        sorted(_project(targets)),
    )


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("udpreach.render")))
def test_render_only_renders_documents(name: str) -> None:
    project = _project(GRAPH[name])
    assert all(
        t.startswith(("udpreach.core", "udpreach.render")) or t == "udpreach" for t in project
    )
    assert _third_party(GRAPH[name]) <= {"rich", "jinja2"}


@pytest.mark.parametrize("side", ["agent", "probe"])
def test_the_two_sides_do_not_import_each_other_or_the_cli(side: str) -> None:
    other = "probe" if side == "agent" else "agent"
    for name in (n for n in MODULES if n.split(".")[0] == side):
        for target in _project(GRAPH[name]):
            assert target.split(".")[0] != other, (name, target)
            assert not target.startswith(("udpreach.cli", "udpreach.render")), (name, target)


def test_only_the_cli_and_the_demo_reach_across_everything() -> None:
    """Nothing below the CLI imports it; the shared infrastructure imports no side."""
    for name, targets in GRAPH.items():
        if name.startswith("udpreach.cli") or name in ("udpreach.__main__", "udpreach._entry"):
            continue  # the commands, and the console script's entry point that loads them
        assert not any(t.startswith("udpreach.cli") for t in targets), name
    for name in ("udpreach.store", "udpreach.keyring", "udpreach.secret", "udpreach.logs"):
        assert not any(t.split(".")[0] in ("agent", "probe") for t in GRAPH[name]), name


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in _project(GRAPH[v]):
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(1000, 10 * len(MODULES)))
    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    # A package's __init__ that re-exports its modules is not a cycle worth the name: the
    # graph is of modules, and ``udpreach.cli`` is the one package that wires its commands.
    cycles = [c for c in _cycles() if not all(m.startswith("udpreach.cli") for m in c)]
    assert cycles == []
