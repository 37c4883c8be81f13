"""The presentation layer only renders documents: udpreach.render imports udpreach.core and
nothing else of udpreach (no trio, no sockets, no store, no CLI, no probe or agent)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import docsamples

RENDER = Path(__file__).resolve().parent.parent / "udpreach" / "render"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_render_modules_import_only_core_and_render() -> None:
    modules = sorted(RENDER.glob("*.py"))
    assert {p.stem for p in modules} >= {"terminal", "junit", "markdown", "csv", "html"}
    for path in modules:
        ours = {m for m in _imports(path) if m.split(".")[0] in ("udpreach", "probe", "agent")}
        stray = {m for m in ours if not m.startswith(("udpreach.core", "udpreach.render"))}
        assert not stray, f"{path.name} imports {stray}"


def test_rendering_every_format_loads_no_other_layer(tmp_path: Path) -> None:
    # In a fresh interpreter: render documents every way, then look at what got imported.
    for name, doc in (("a", docsamples.baseline()), ("b", docsamples.after_change())):
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    code = f"""
import json, sys
from pathlib import Path
from rich.console import Console
from udpreach.core.diff import diff_runs
from udpreach.render.exports import write_reports
from udpreach.render.terminal import render_diff, render_run
tmp = Path({str(tmp_path)!r})
a, b = (json.loads((tmp / f"{{n}}.json").read_text()) for n in "ab")
render_run(a, Console(file=open("/dev/null", "w")))
render_diff(diff_runs(a, b), Console(file=open("/dev/null", "w")))
write_reports(a, None, tmp / "j.xml", tmp / "r.md", tmp / "r.csv", tmp / "r.html")
bad = sorted(m for m in sys.modules if m.split(".")[0] in {{"trio", "probe", "agent", "numpy",
            "typer"}} or m.startswith(("udpreach.cli", "udpreach.store", "udpreach.net")))
print(",".join(bad))
"""
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"rendering imported: {res.stdout.strip()}"
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")
