"""The CLI's error paths on every Python we can find here: one line and the contract's exit
code, never a traceback.

Python before 3.11.4 wraps an exception raised inside ``except*`` in a new group, so an error
path that is one line on this suite's Python can be an 80-line traceback on Debian 12's own
3.11.2. Each case runs on the suite's interpreter and on the machine's system Python
(``/usr/bin/python3``, or $UDPREACH_SYSTEM_PYTHON) in the venv of its own that ``make test``
builds (``.venv-sys``; built here if missing). The system Python is skipped only where there
is none, or where it is the very Python the suite runs on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO
from prockit import Services, loopback_services, run_pty

SYSTEM_PY = Path(os.environ.get("UDPREACH_SYSTEM_PYTHON", "/usr/bin/python3"))
SYSTEM_VENV = REPO / ".venv-sys"


def _identity(python: str | Path) -> str:
    """Version and installation of an interpreter (a venv's is its base's)."""
    return subprocess.run(
        [str(python), "-c", "import sys; print(sys.version.split()[0], sys.base_prefix)"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip


@pytest.fixture(scope="module", params=["suite", "system"])
def python(request: pytest.FixtureRequest) -> str:
    """The interpreter to run the CLI with."""
    if request.param == "suite":
        return sys.executable
    if not SYSTEM_PY.exists():
        pytest.skip(f"no system Python at {SYSTEM_PY}: there is no second Python here")
    if _identity(SYSTEM_PY) == _identity(sys.executable):
        pytest.skip(f"{SYSTEM_PY} is the Python this suite runs on")
    venv_python = SYSTEM_VENV / "bin" / "python"
    if not (SYSTEM_VENV / ".installed").exists():
        subprocess.run(
            ["make", "-s", ".venv-sys/.installed", f"SYS_PY={SYSTEM_PY}"],
            cwd=REPO, check=True, timeout=900, capture_output=True,
        )  # fmt: skip
    return str(venv_python)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    tmp = tmp_path_factory.mktemp("errors")
    secret = tmp / "secret"
    secret.write_text("error-paths-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    with loopback_services(tmp, secret, name="err-agent") as svc:
        yield svc


def cli(python: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UDPREACH_")}
    return subprocess.run(
        [python, "-m", "udpreach", *args],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip


def one_line(proc: subprocess.CompletedProcess[str], code: int, needle: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("udpreach: "), lines
    assert needle in lines[0], lines
    return lines[0]


def _wrong_secret(tmp_path: Path) -> Path:
    p = tmp_path / "wrong"
    p.write_text("ffffffffffffffffffffffffffffffff\n")
    p.chmod(0o600)
    return p


def test_bad_secret(python: str, services: Services, tmp_path: Path) -> None:
    wrong = _wrong_secret(tmp_path)
    for command in (["agents"], ["run", "--agent", "err-agent"]):
        proc = cli(
            python, *command, "--coordinator", services.endpoint, "--secret-file", str(wrong)
        )
        one_line(proc, 3, "does not know our secret")
    agent = cli(
        python, "agent", "--coordinator", services.endpoint, "--secret-file", str(wrong),
        "--port", "0", "--listen", "127.0.0.1", "--name", "intruder", timeout=60,
    )  # fmt: skip
    one_line(agent, 3, "does not know our secret")
    loose = tmp_path / "loose"
    loose.write_text("0123456789abcdef0123456789abcdef\n")
    loose.chmod(0o644)
    proc = cli(python, "agents", "--coordinator", services.endpoint, "--secret-file", str(loose))
    one_line(proc, 2, "chmod 600")


def test_port_in_use(python: str, services: Services) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        agent = cli(
            python, "agent", "--coordinator", services.endpoint, "--secret-file",
            str(services.secret), "--port", str(port), "--listen", "127.0.0.1",
        )  # fmt: skip
    one_line(agent, 2, f"cannot listen on UDP 127.0.0.1:{port}: the port is in use")
    probe = cli(
        python, "probe", "--control", services.endpoint, "--secret-file", str(services.secret),
        "--db", str(services.tmp / "other.sqlite3"),
    )  # fmt: skip
    one_line(probe, 2, f"cannot listen on {services.endpoint}")


def test_unknown_agent(python: str, services: Services) -> None:
    base = ["run", "--coordinator", services.endpoint, "--secret-file", str(services.secret)]
    proc = cli(python, *base, "--agent", "ghost")
    one_line(proc, 3, "ghost")
    assert proc.stdout == ""
    as_json = cli(python, *base, "--agent", "ghost", "--json")
    line = one_line(as_json, 3, "ghost")
    doc = json.loads(as_json.stdout)
    assert doc == {
        "schema": "udpreach/error-v1",
        "error": line.removeprefix("udpreach: "),
        "exit": 3,
    }


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--src-ports", "12a"], "malformed"),
        (["--src-ports", "70000"], "out of range"),
        (["--dst-ports", "5000,,5001"], "empty item"),
        (["--copies", "many"], "'--copies'"),
        (["--nonsense"], "No such option"),
    ],
)
def test_malformed_spec(python: str, args: list[str], needle: str) -> None:
    base = ["run", "--coordinator", "127.0.0.1:9", "--secret-file", "/nonexistent", "--agent", "x"]
    proc = cli(python, *base, *args)
    one_line(proc, 2, needle)
    assert proc.stdout == ""
    as_json = cli(python, *base, *args, "--json")
    assert json.loads(as_json.stdout)["exit"] == 2


def test_errors_on_a_terminal_are_one_line_too(python: str, services: Services) -> None:
    """stderr a terminal: the paths that only run there (progress) end in one line as well."""
    argv = [
        python, "-m", "udpreach", "run", "--coordinator", services.endpoint,
        "--secret-file", str(services.secret), "--agent", "ghost",
    ]  # fmt: skip
    res = run_pty(argv, cols=60, env={"UDPREACH_COORDINATOR": ""})
    assert res.returncode == 3, res.text
    assert "Traceback" not in res.text
    lines = [s for s in res.segments() if not s.startswith(("round ", "starting "))]
    assert len(lines) == 1, lines
    assert lines[0].startswith("udpreach: "), lines
    assert "ghost" in lines[0]
