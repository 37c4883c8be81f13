"""What `make demo` and `make test` install as root: the demo what the lab needs (nftables,
iproute2), the tests chromium as well, each said in one line.

The trial: `make demo` as root installed chromium (for the HTML browser tests) without a word.
Here make runs the real Makefile with a PATH holding only stubs: `id` says root, `apt-get`
records what it was asked and installs nothing, and none of the packages' commands exist.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")

pytestmark = pytest.mark.skipif(MAKE is None, reason="needs make")


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _make(target: str, tmp_path: Path, *, root: bool = True) -> tuple[str, list[str]]:
    """(what `make TARGET` printed, the apt-get calls it made) with stubbed commands."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    calls = tmp_path / "apt-get.calls"
    _stub(stubs / "id", f"echo {0 if root else 1000}\n")
    _stub(stubs / "apt-get", f'echo "$*" >> {calls}\n')
    assert MAKE is not None
    proc = subprocess.run(
        [MAKE, "--no-print-directory", "-C", str(REPO), target],
        env={"PATH": str(stubs)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    made = calls.read_text().splitlines() if calls.exists() else []
    return proc.stdout, made


def test_the_demo_installs_the_lab_and_says_so_in_one_line(tmp_path: Path) -> None:
    out, calls = _make("lab-deps", tmp_path)
    assert out.splitlines() == ["installing nftables iproute2 (apt-get) for the real-firewall lab"]
    assert calls == ["update -qq", "install -y -qq nftables iproute2"]


def test_the_demo_needs_no_chromium() -> None:
    assert MAKE is not None
    plan = subprocess.run(
        [MAKE, "--no-print-directory", "-n", "-C", str(REPO), "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "nftables" in plan.stdout
    assert "chromium" not in plan.stdout


def test_the_tests_also_install_chromium_and_say_why(tmp_path: Path) -> None:
    out, calls = _make("test-deps", tmp_path)
    assert out.splitlines() == [
        "installing nftables iproute2 (apt-get) for the real-firewall lab",
        "installing chromium (apt-get) for the HTML report's browser tests",
    ]
    assert calls[-1] == "install -y -qq chromium"


def test_not_root_installs_nothing_and_says_what_that_means(tmp_path: Path) -> None:
    out, calls = _make("test-deps", tmp_path, root=False)
    assert calls == []
    assert out.splitlines() == [
        "not root: nothing installed; the demo runs over loopback and the lab tests skip",
        "not root: nothing installed; the HTML report's browser tests skip without chromium",
    ]


def _plan(venv: Path, py: str) -> str:
    assert MAKE is not None
    return subprocess.run(
        [MAKE, "--no-print-directory", "-n", "-C", str(REPO), f"VENV={venv}", f"PY={py}", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def test_a_venv_made_with_another_python_is_made_anew(tmp_path: Path) -> None:
    """`make demo PY=/usr/bin/python3` went on with the .venv another Python had made, and
    said nothing (a new user's trial): the venv names its Python, and another one rebuilds
    it; the same one leaves it alone."""
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    me = f"{sys.executable} {sys.version.split()[0]}"
    (venv / ".python").write_text("/opt/other/python3 3.12.0\n")
    (venv / ".installed").touch()
    plan = _plan(venv, sys.executable)
    assert f"rm -rf {venv}" in plan
    assert f"{sys.executable} -m venv {venv}" in plan
    assert f'echo "{me}" > {venv}/.python' in plan
    (venv / ".python").write_text(me + "\n")
    (venv / ".installed").touch()  # newer than pyproject.toml and the Makefile
    assert str(venv / ".installed") not in _plan(venv, sys.executable)
