"""The console script's help fast path: stored pages, only while they are exactly typer's."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from udpreach import helppages, launch

# Runs the console script's entry point under the script's own name, then reports whether
# typer was imported.
_AS_SCRIPT = """
import atexit, sys
atexit.register(lambda: print("typer loaded:", "typer" in sys.modules, file=sys.stderr))
sys.argv = ["/usr/local/bin/udpreach", *sys.argv[1:]]
from udpreach.launch import main
main()
"""


def _script(*args: str, columns: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run(
        [sys.executable, "-c", _AS_SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_stored_pages_are_what_typer_prints_for_this_tree() -> None:
    """Every command's page, rendered by typer now, equals the stored one."""
    fresh = launch.render_pages()
    stale = sorted(" ".join(p) or "(top)" for p in fresh if fresh[p] != helppages.PAGES.get(p))
    stale += sorted(" ".join(p) for p in helppages.PAGES if p not in fresh)
    assert not stale, f"help pages are stale ({', '.join(stale)}): run `make help-pages`"
    assert launch.source_key() == helppages.KEY, "sources changed: run `make help-pages`"


@pytest.mark.parametrize("path", [(), ("run",), ("lab", "up"), ("secret", "new")])
def test_script_prints_the_stored_page_without_typer(path: tuple[str, ...]) -> None:
    proc = _script(*path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == helppages.PAGES[path]
    assert "typer loaded: False" in proc.stderr


def test_narrow_terminal_gets_typer_wrapping_its_own_page() -> None:
    proc = _script("run", "--help", columns="60")
    assert proc.returncode == 0, proc.stderr
    assert "typer loaded: True" in proc.stderr
    assert proc.stdout.startswith("Usage: udpreach run [OPTIONS]")
    assert max(map(len, proc.stdout.splitlines())) <= 58
    assert proc.stdout != helppages.PAGES[("run",)]


def test_everything_else_goes_to_typer() -> None:
    proc = _script("run", "--src-ports", "70000", "--help")  # click: --help is eager
    assert proc.returncode == 0, proc.stderr
    assert "typer loaded: True" in proc.stderr
    proc = _script("nosuch", "--help")
    assert proc.returncode == 2
    assert "typer loaded: True" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["udpreach"],
        ["udpreach", "run"],
        ["udpreach", "--help", "run"],
        ["udpreach", "nosuch", "--help"],
        ["udpreach", "run", "--json", "--help"],
        ["udpreach", "lab", "up", "extra", "--help"],
        ["python", "--help"],  # another program name: click would print another usage line
    ],
)
def test_only_exact_help_requests_use_a_stored_page(argv: list[str]) -> None:
    assert launch.stored_page(argv) is None


def test_a_changed_tree_or_narrow_terminal_uses_no_stored_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    assert launch.stored_page(["/opt/bin/udpreach", "lab", "--help"]) == helppages.PAGES[("lab",)]
    monkeypatch.setenv("COLUMNS", "79")
    assert launch.stored_page(["udpreach", "lab", "--help"]) is None
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(helppages, "KEY", "0" * 32)
    assert launch.stored_page(["udpreach", "lab", "--help"]) is None


def test_source_key_follows_every_source(tmp_path: Path) -> None:
    sources = ("udpreach/a.py", "probe/b.py")
    for rel in sources:
        (tmp_path / rel).parent.mkdir()
        (tmp_path / rel).write_text("X = 1\n")
    key = launch.source_key(tmp_path, sources)
    (tmp_path / "udpreach" / "other.py").write_text("Y = 1\n")
    assert launch.source_key(tmp_path, sources) == key  # not a source: not an input
    (tmp_path / "probe" / "b.py").write_text("X = 2\n")
    assert launch.source_key(tmp_path, sources) != key
    with pytest.raises(FileNotFoundError):  # main() then lets typer answer
        launch.source_key(tmp_path, (*sources, "nosuchpackage/__init__.py"))


_MODULES_AFTER_RENDERING = """
import os, sys
import udpreach
from udpreach.launch import OWN_PACKAGES, render_pages
root = os.path.dirname(os.path.dirname(os.path.abspath(udpreach.__file__)))
render_pages()
for mod in list(sys.modules.values()):
    rel = os.path.relpath(os.path.abspath(getattr(mod, "__file__", None) or "/"), root)
    if rel.split(os.sep)[0] in OWN_PACKAGES:
        print(rel)
"""


def test_help_is_rendered_from_the_keyed_sources_only() -> None:
    """Every module of ours that rendering help imports is in the key: an edit to any of
    them invalidates the stored pages."""
    proc = subprocess.run(
        [sys.executable, "-c", _MODULES_AFTER_RENDERING],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    imported = set(proc.stdout.split())
    assert "udpreach/cli.py" in imported
    assert imported <= set(launch.SOURCES), imported - set(launch.SOURCES)


def test_the_key_follows_the_renderers_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert any(v.startswith("typer-") for v in launch.installed_versions())
    key = launch.source_key()
    (tmp_path / "click-99.0.dist-info").mkdir()  # an external click appears first on the path
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "click-99.0" in launch.installed_versions()
    assert launch.source_key() != key
