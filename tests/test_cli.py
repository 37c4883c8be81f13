"""The real CLI in real processes: exit codes, one-line errors, and one end-to-end run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import run_cli, udpreach_argv
from prockit import python_output, stop


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--src-ports", "70000"], "out of range"),
        (["--src-ports", "2000-1000"], "reversed range"),
        (["--src-ports", ""], "empty port spec"),
        (["--src-ports", "12a"], "--src-ports: malformed"),
        (["--dst-ports", "abc"], "--dst-ports: malformed port spec item 'abc'"),
        (["--src-ports", "random:abc"], "random:N needs N to be a number of ports (1-64512)"),
        (["--src-ports", "random:"], "random:N needs N to be a number of ports"),
        (["--src-ports", "random:99999999"], "random:N needs 1 <= N <= 64512, got 99999999"),
        (["--src-ports", "random:5,1024"], "'random:N' must stand alone"),
        (["--dst-ports", "5000,,5001"], "--dst-ports: empty item"),
        (["--size", "8"], "--size"),
        (["--copies", "0"], "--copies"),
        (["--coordinator", "nohostport"], "HOST:PORT"),
        (["--coordinator", "127.0.0.1:0"], "--coordinator: port 0 out of range (1-65535)"),
        (["--agent", ""], "--agent '': no agent has that name"),
        (["--agent", "pc-17\n"], "--agent 'pc-17\\n': no agent has that name"),
        # Report files are checked before anything is sent (the coordinator here is
        # unreachable: reaching for it first would be exit 3).
        (["--junit", "/nonexistent-udpreach/j.xml"], "there is no folder /nonexistent-udpreach"),
        (["--html", "/tmp"], "cannot write --html /tmp: it is a folder"),
        (["--csv", "/tmp/" + "a" * 300 + ".csv"], "File name too long"),
        (["--wait", "nan"], "--wait must be 0-86400 seconds"),
        (["--wait", "inf"], "--wait must be 0-86400 seconds"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(secret_file: Path, args: list[str], needle: str) -> None:
    base = ["run", "--coordinator", "127.0.0.1:9", "--secret-file", str(secret_file)]
    proc = run_cli(*base, "--agent", "x", *args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("encoding", "needle"),
    [
        ("utf-16", "is not UTF-8 text (UTF-16 ('Unicode' in Notepad)): save it as UTF-8"),
        ("latin-1", "is not UTF-8 text (byte 4 is not UTF-8): save it as UTF-8"),
        ("utf-8-sig", None),
    ],
)
def test_an_expectation_file_in_another_encoding_is_said_plainly(
    tmp_path: Path, secret_file: Path, encoding: str, needle: str | None
) -> None:
    """Windows editors save "Unicode" (UTF-16) or add a BOM: one line and exit 2 (it was an
    internal error, exit 3), and a BOM is simply dropped."""
    exp = tmp_path / "exp.toml"
    text = '# Größe\n[[expect]]\ndst_ports = "5000"\nsrc_ports = "1024-2047"\nverdict = "open"\n'
    exp.write_bytes(text.encode(encoding))
    proc = run_cli("run", "--coordinator", "127.0.0.1:9", "--secret-file", str(secret_file),
                   "--agent", "x", "--expect", str(exp))  # fmt: skip
    assert "Traceback" not in proc.stderr
    if needle is None:  # read fine: the run then fails on the coordinator, unreachable
        assert proc.returncode == 3, proc.stderr
        assert "cannot reach coordinator" in proc.stderr
    else:
        assert proc.returncode == 2, proc.stderr
        assert f"{exp} {needle}" in proc.stderr


_IMPORTS_AFTER = """
import sys
sys.argv = ["udpreach", *sys.argv[1:]]
from udpreach.cli import main
try:
    main()
except SystemExit:
    pass
heavy = ("trio", "rich", "numpy", "udpreach.lab", "probe.coordinator", "udpreach.render.terminal")
print("loaded:", " ".join(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m in heavy)))
"""


def test_help_lists_every_command_without_loading_the_heavy_parts() -> None:
    """`udpreach --help` stays fast by loading trio, rich and the lab only when used."""
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("probe", "agent", "run", "agents", "demo", "history", "show", "diff"):
        assert f"  {command} " in proc.stdout
    for command in ("expect", "secret", "lab"):
        assert f"  {command} " in proc.stdout
    loaded = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "Usage: udpreach" in loaded.stdout
    assert loaded.stdout.splitlines()[-1].strip() == "loaded:", loaded.stdout


def test_requests_do_not_load_trio(secret_file: Path) -> None:
    """`run` and `agents` talk to the coordinator over a blocking socket: no trio start-up."""
    for command in ("agents", "run"):
        argv = [command, "--coordinator", "127.0.0.1:9", "--secret-file", str(secret_file)]
        if command == "run":
            argv += ["--agent", "x", "--json"]
        loaded = subprocess.run(
            [sys.executable, "-c", _IMPORTS_AFTER, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert "cannot reach coordinator" in loaded.stderr
        last = loaded.stdout.splitlines()[-1]
        assert "trio" not in last.split(), last
        assert "numpy" not in last.split(), last


def test_loose_secret_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "s"
    p.write_text("0123456789abcdef0123456789abcdef")
    p.chmod(0o644)
    proc = run_cli("agents", "--coordinator", "127.0.0.1:9", "--secret-file", str(p))
    assert proc.returncode == 2
    assert "chmod 600" in proc.stderr


def test_unreachable_coordinator_is_exit_3(secret_file: Path) -> None:
    proc = run_cli("agents", "--coordinator", "127.0.0.1:9", "--secret-file", str(secret_file))
    assert proc.returncode == 3
    assert "cannot reach coordinator" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_ipv6_coordinator_is_named_in_brackets(secret_file: Path) -> None:
    """`2001:2::2:7870` reads as one address; the message names it as it is typed."""
    proc = run_cli("agents", "--coordinator", "[::1]:9", "--secret-file", str(secret_file))
    assert proc.returncode == 3
    assert "cannot reach coordinator [::1]:9: " in proc.stderr


def test_secret_new_is_0600(tmp_path: Path) -> None:
    target = tmp_path / "fresh"
    proc = run_cli("secret", "new", str(target))
    assert proc.returncode == 0
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    assert len(target.read_text().strip()) == 64
    again = run_cli("secret", "new", str(target))
    assert again.returncode == 2
    assert "already exists" in again.stderr
    # "-" is standard output for a report; for a secret it made a file named "-".
    dash = subprocess.run(
        udpreach_argv("secret", "new", "-"), cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert dash.returncode == 2, dash.stderr
    assert dash.stderr.splitlines() == [
        "udpreach: give the secret file's name: a secret is written to a file (0600)"
    ]
    assert dash.stdout == ""
    assert not (tmp_path / "-").exists()


def _free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen(udpreach_argv(*args), stdout=fh, stderr=subprocess.STDOUT)


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return json.loads(path.read_text())
        assert proc.poll() is None, "process exited early"
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_end_to_end_real_processes(tmp_path: Path, secret_file: Path) -> None:
    """probe and agent as real CLI processes; ``run --json`` prints exactly the document."""
    ready = tmp_path / "ready.json"
    db = tmp_path / "runs.sqlite3"
    probe = _start(
        ["probe", "--control", "127.0.0.1:0", "--secret-file", str(secret_file), "--db", str(db),
         "--source", "127.0.0.2", "--ready-file", str(ready)],
        tmp_path / "probe.log",
    )  # fmt: skip
    agent = None
    try:
        addr = _wait_file(ready, probe)
        endpoint = f"{addr['host']}:{addr['port']}"
        env_secret = {"UDPREACH_SECRET_FILE": str(secret_file)}
        agent = _start(
            ["agent", "--coordinator", endpoint, "--secret-file", str(secret_file),
             "--port", ",".join(map(str, _free_udp_ports(2))), "--listen", "127.0.0.1",
             "--name", "e2e"],
            tmp_path / "agent.log",
        )  # fmt: skip
        proc = run_cli(
            "run", "--coordinator", endpoint, "--agent", "e2e", "--wait", "20",
            "--src-ports", "1024-65535", "--json", timeout=180, env=env_secret,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)  # nothing else on stdout
        assert doc["schema"] == "udpreach/run-v1"
        assert doc["complete"] is True
        assert doc["summary"]["cells"] == 2 * 64512
        assert doc["summary"]["open"] == 2 * 64512
        assert len(doc["ranges"]) == 2
        listed = run_cli("agents", "--coordinator", endpoint, "--json", env=env_secret)
        assert listed.returncode == 0
        assert [a["name"] for a in json.loads(listed.stdout)["agents"]] == ["e2e"]
        table = run_cli(
            "run", "--coordinator", endpoint, "--agent", "e2e", "--src-ports", "1024-3071",
            env=env_secret, timeout=120,
        )  # fmt: skip
        assert table.returncode == 0, table.stderr
        assert "1024-3071" in table.stdout
        assert "Matrix" in table.stdout
        gone = run_cli("run", "--coordinator", endpoint, "--agent", "ghost", env=env_secret)
        assert gone.returncode == 3
        assert "no agent named 'ghost'" in gone.stderr
    finally:
        codes = [stop(p) for p in (agent, probe) if p is not None]
    # SIGTERM is a clean shutdown: exit 0 and no traceback in the logs.
    assert codes == [0, 0]
    for log in ("probe.log", "agent.log"):
        text = (tmp_path / log).read_text()
        assert "Traceback" not in text, text
    # A requester that closes once it has its answer (a document, an unknown agent) did
    # not "go away" from a run.
    assert "went away" not in (tmp_path / "probe.log").read_text()
    assert os.path.exists(db)


def test_audit_log_json_records_refusals(tmp_path: Path, secret_file: Path) -> None:
    """--log-json: one JSON object per line on stderr; a wrong secret is logged with the peer."""
    ready = tmp_path / "ready.json"
    log = tmp_path / "probe.log"
    probe = _start(
        ["probe", "--control", "127.0.0.1:0", "--secret-file", str(secret_file),
         "--db", str(tmp_path / "runs.sqlite3"), "--ready-file", str(ready), "--log-json"],
        log,
    )  # fmt: skip
    try:
        addr = _wait_file(ready, probe)
        wrong = tmp_path / "wrong"
        wrong.write_text("ffffffffffffffffffffffffffffffff\n")
        wrong.chmod(0o600)
        denied = run_cli(
            "agents", "--coordinator", f"{addr['host']}:{addr['port']}",
            "--secret-file", str(wrong),
        )  # fmt: skip
        assert denied.returncode == 3
        assert "does not know our secret" in denied.stderr
    finally:
        assert stop(probe) == 0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert any(
        r["level"] == "warning" and "authentication failed from 127.0.0.1" in r["msg"]
        for r in records
    ), records
    for r in records:  # UTC, as the readable lines: the same instant in two forms
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]), r
        stamp = datetime.strptime(r["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert abs(stamp.timestamp() - r["ts"]) < 0.002, r
    text = log.read_text()
    assert secret_file.read_text().strip() not in text
    assert "ffffffffffffffffffffffffffffffff" not in text


def test_the_agent_imports_no_numpy() -> None:
    """numpy serves the probe's batches; an agent on a client machine does without it."""
    code = "import sys, agent.service, agent.core; print('numpy' in sys.modules)"
    assert python_output(code).strip() == "False"


def test_reading_stored_runs_imports_no_numpy() -> None:
    """history/show/diff read ledgers through the store: numpy only comes with a batch."""
    code = (
        "import sys, udpreach.store, udpreach.cli.history\n"
        "from udpreach.core.ledger import Ledger\n"
        "led = Ledger([5000], range(1024, 1100)); led.note_sent(5000, 1024); led.ranges()\n"
        "Ledger.from_snapshot(led.snapshot(), range(1024, 1100))\n"
        "print('numpy' in sys.modules)"
    )
    assert python_output(code).strip() == "False"


# --- conventions (issue 12, item 6) ----------------------------------------------------------


def test_version_and_short_help() -> None:
    from udpreach import __version__

    version = run_cli("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"udpreach {__version__}"
    for argv in (["-h"], ["run", "-h"], ["lab", "up", "-h"], ["secret", "new", "-h"]):
        proc = run_cli(*argv)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert proc.stdout.startswith("Usage: udpreach"), proc.stdout
        assert "-h, --help" in proc.stdout


def test_shell_completion_through_typer() -> None:
    script = run_cli(
        "--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    )
    assert script.returncode == 0, script.stderr
    assert "_UDPREACH_COMPLETE=complete_bash" in script.stdout
    words = run_cli(
        env={"_UDPREACH_COMPLETE": "complete_bash", "COMP_WORDS": "udpreach ag", "COMP_CWORD": "1"}
    )
    assert words.returncode == 0, words.stderr
    assert set(words.stdout.split()) == {"agent", "agents"}


def test_coordinator_and_secret_from_the_environment(secret_file: Path) -> None:
    env = {"UDPREACH_COORDINATOR": "127.0.0.1:9", "UDPREACH_SECRET_FILE": str(secret_file)}
    proc = run_cli("agents", env=env)
    assert proc.returncode == 3, proc.stderr
    assert "cannot reach coordinator 127.0.0.1:9" in proc.stderr
    help_text = run_cli("run", "-h").stdout
    assert "UDPREACH_COORDINATOR" in help_text
    assert "UDPREACH_SECRET_FILE" in help_text
    missing = run_cli("agents", env={"UDPREACH_COORDINATOR": "", "UDPREACH_SECRET_FILE": ""})
    assert missing.returncode == 2
    (line,) = missing.stderr.strip().splitlines()
    assert line.startswith("udpreach: Missing option '--coordinator'"), line
    assert line.endswith("(see 'udpreach agents -h')"), line


@pytest.mark.parametrize(
    ("env", "args", "line"),
    [
        ({"UDPREACH_COORDINATOR": "bogus"}, [],
         "--coordinator must be HOST:PORT, got 'bogus' (from UDPREACH_COORDINATOR)"),
        ({}, ["--coordinator", "bogus"], "--coordinator must be HOST:PORT, got 'bogus'"),
        ({"UDPREACH_COORDINATOR": "127.0.0.1:9"}, [],
         "cannot reach coordinator 127.0.0.1:9: Connection refused "
         "(--coordinator from UDPREACH_COORDINATOR)"),
        ({"UDPREACH_SECRET_FILE": "/nonexistent/secret"}, ["--coordinator", "127.0.0.1:9"],
         "cannot read secret file /nonexistent/secret: No such file or directory "
         "(--secret-file from UDPREACH_SECRET_FILE)"),
        ({}, ["--coordinator", "127.0.0.1:9", "--secret-file", "/nonexistent/secret"],
         "cannot read secret file /nonexistent/secret: No such file or directory"),
    ],
)  # fmt: skip
def test_an_error_from_the_environment_names_the_variable(
    secret_file: Path, env: dict[str, str], args: list[str], line: str
) -> None:
    """`UDPREACH_COORDINATOR=bogus` said '--coordinator must be HOST:PORT', and the user had
    given no --coordinator: a value set in the environment and forgotten is named."""
    base = {"UDPREACH_SECRET_FILE": str(secret_file), "UDPREACH_COORDINATOR": ""}
    for command in (["agents"], ["run", "--agent", "x"]):
        proc = run_cli(*command, *args, env=base | env)
        assert proc.returncode in (2, 3), proc.stderr
        assert proc.stderr.splitlines() == [f"udpreach: {line}"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["agents", "--coordinator", "127.0.0.1:9"], 3),  # unreachable
        (["agents", "--coordinator", "nohostport"], 2),  # bad configuration
        (["history", "--db", "/nonexistent/runs.sqlite3"], 2),
        (["agents"], 2),  # click's own usage error
    ],
)
def test_json_failures_print_the_error_document(
    secret_file: Path, args: list[str], code: int
) -> None:
    proc = run_cli(*args, "--json", env={"UDPREACH_SECRET_FILE": str(secret_file)})
    assert proc.returncode == code, proc.stderr
    doc = json.loads(proc.stdout)
    (line,) = proc.stderr.strip().splitlines()
    assert doc == {
        "schema": "udpreach/error-v1",
        "error": line.removeprefix("udpreach: "),
        "exit": code,
    }


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("", "--name is empty (leave it out for the host name)"),
        ("x" * 65, f"--name '{'x' * 65}': use letters, digits, '.', '_' or '-', starting with "
         "a letter or digit, at most 64 characters"),
    ],
)  # fmt: skip
def test_a_bad_agent_name_is_refused_in_one_line(secret_file: Path, name: str, line: str) -> None:
    """An empty --name silently became the host name; a long one was refused without the
    limit being said."""
    proc = run_cli(
        "agent", "--coordinator", "127.0.0.1:9", "--secret-file", str(secret_file),
        "--port", "0", "--name", name, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"udpreach: {line}"]


def test_probe_db_in_no_directory_is_refused(tmp_path: Path, secret_file: Path) -> None:
    """``probe --db /typo/dir/x.db`` made the directories without a word and started."""
    db = tmp_path / "no-such-dir" / "runs.sqlite3"
    proc = run_cli(
        "probe", "--control", "127.0.0.1:0", "--secret-file", str(secret_file), "--db", str(db),
        timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"udpreach: --db {db}: no directory {db.parent}"]
    assert not db.parent.exists()


def test_sigterm_while_dialling_gives_the_error_document(secret_file: Path) -> None:
    """A coordinator that accepts and never answers holds `run` in its handshake for up to
    10 s; a SIGTERM then (`timeout` in CI) killed it with nothing on stdout, though --json
    promises a pipeline its JSON."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        proc = subprocess.Popen(
            udpreach_argv("run", "--coordinator", f"127.0.0.1:{port}", "--secret-file",
                          str(secret_file), "--agent", "x", "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            conn, _ = server.accept()  # dialled: now in the handshake
            with conn:
                time.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                out, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=5)
    assert proc.returncode == 3, err
    assert err.strip().splitlines() == ["udpreach: interrupted"]
    assert json.loads(out) == {"schema": "udpreach/error-v1", "error": "interrupted", "exit": 3}


def test_messages_are_not_read_as_markup(tmp_path: Path, secret_file: Path) -> None:
    """An expectation error quotes the file's `[[expect]]`: rich used to eat it as markup."""
    bad = tmp_path / "e.toml"
    bad.write_text('[[expect]]\ndst_ports = "5000"\nverdict = "open"\n')
    proc = run_cli(
        "run", "--coordinator", "127.0.0.1:9", "--secret-file", str(secret_file),
        "--agent", "x", "--expect", str(bad),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "[[expect]] #1" in proc.stderr, proc.stderr


def test_agent_name_rule_is_the_coordinators() -> None:
    from probe.coordinator import NAME_RE
    from udpreach.cli.service import AGENT_NAME_RE

    assert AGENT_NAME_RE.pattern == NAME_RE.pattern


def test_unexpected_errors_are_one_line_and_exit_3(tmp_path: Path) -> None:
    """A bug still reaches the user as one line (the traceback with UDPREACH_DEBUG=1)."""
    code = (
        "import sys\n"
        "import udpreach.render.terminal as t\n"
        "def boom(*a, **k): raise TypeError('unsupported format string')\n"
        "t.render_run = boom\n"
        "import udpreach.cli.history as h\n"
        "h._load = lambda db, *ids: [{}]\n"
        "sys.argv = ['udpreach', 'show', 'x']\n"
        "from udpreach.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("udpreach: internal error: TypeError: unsupported format string")
    debug = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**os.environ, "UDPREACH_DEBUG": "1"},
    )  # fmt: skip
    assert "Traceback" in debug.stderr


def test_a_plan_with_nothing_testable_exits_3_with_the_reason(
    tmp_path: Path, secret_file: Path
) -> None:
    """Every source port taken (bind mode cannot send from it): all untested, so the run
    says why and exits 3 instead of reporting 'no cell blocked'."""
    from prockit import loopback_services

    held = []
    try:
        with loopback_services(tmp_path, secret_file, probe_args=("--send-mode", "bind")) as svc:
            for port in range(40100, 40110):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(s)
                s.bind(("127.0.0.2", port))
            proc = run_cli(*svc.run_argv("--src-ports", "40100-40109", "--json")[3:], timeout=120)
    finally:
        for s in held:
            s.close()
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)  # the run's own document, and only it
    assert doc["summary"]["untested"] == doc["summary"]["cells"] == 10
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("udpreach: no cell could be tested: "), line


def test_the_progress_line_counts_the_icmp_budget_down() -> None:
    from udpreach.cli.progress import RunProgress, fit_line

    state = RunProgress()
    state.update({"round": 3, "stage": "icmp", "cells": 64_512, "settled": 60_000,
                  "icmp_left": 12})  # fmt: skip
    now = time.monotonic()
    line = "".join(text for text, _ in fit_line(state, 80, now + 2.5))
    assert line.startswith("icmp tests (10s left) "), line
    state.update({"round": 3, "stage": "recheck", "cells": 64_512, "settled": 64_000})
    assert "left" not in "".join(text for text, _ in fit_line(state, 80, now + 3))


@pytest.mark.parametrize("width", [12, 20, 40, 41, 60, 80, 120, 200])
def test_progress_line_fits_every_width(width: int) -> None:
    """The live line is laid out for the terminal: never wider, the elapsed time never cut,
    and what it leaves out goes least useful first."""
    from udpreach.cli.progress import RunProgress, fit_line

    state = RunProgress()
    state.update(
        {"round": 12, "cells": 1_032_192, "settled": 999_999, "sent": 12_345_678,
         "open": 987_654, "rate": 1_000_000}
    )  # fmt: skip
    line = "".join(text for text, _ in fit_line(state, width, state.started + 3725.5))
    assert len(line) <= width - 1, line
    if width >= 20:
        assert line.startswith("round 12 ")
        assert line.endswith(" 1:02:05"), line
    if width >= 40:
        assert "999,999/1,032,192" in line, line
    if width >= 120:
        assert "cells settled" in line
        assert "1,000,000/s" in line
    if width < 60:
        assert "1,000,000/s" not in line


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        # 198.18.0.0/15 is never configured on the test host outside a namespace
        ("198.18.255.254", "is not an address of this host"),
        ("not-an-ip", "not an IP address"),
    ],
)
def test_probe_source_must_be_ours(secret_file: Path, source: str, needle: str) -> None:
    """The probe sends only from its own addresses: ICMP answers must come back to it."""
    proc = run_cli(
        "probe", "--control", "127.0.0.1:0", "--secret-file", str(secret_file), "--source", source
    )
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _as_another_user() -> dict[str, object] | None:
    """``subprocess`` arguments that run a command as a user who may not enter root's
    folders (root: as ``nobody``; anyone else: as themselves, a folder's mode does it).
    None when nobody cannot run this interpreter (a checkout under /root)."""
    if os.geteuid() != 0:
        return {}
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import udpreach"],
            user="nobody", capture_output=True, timeout=60, check=False,
        )  # fmt: skip
    except OSError:  # the interpreter itself is out of its reach
        return None
    return {"user": "nobody"} if probe.returncode == 0 else None


def test_a_folder_the_user_may_not_enter_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A service user with another's HOME (``HOME=/root``): the default keyring's and run
    database's folders could not even be looked at, and every command said "internal
    error: PermissionError", exit 3 (the probe even with ``--secret-file``)."""
    how = _as_another_user()
    if how is None:
        pytest.skip("nobody cannot run this checkout's Python (it lives in a private folder)")
    home = tmp_path / "home"
    for sub in (".config/udpreach", ".local/share/udpreach"):
        (home / sub).mkdir(parents=True)
    # The user's own folder, outside pytest's (root's is 0700).
    mine = Path(tempfile.mkdtemp(prefix="udpreach-user-"))
    secret = mine / "s.secret"
    secret.write_text("k" * 64 + "\n")
    secret.chmod(0o600)
    theirs = mine / "theirs.secret"  # a secret this user may not read
    theirs.write_text("k" * 64 + "\n")
    theirs.chmod(0o600)
    if how:  # root: nobody owns the secret and its folder, root the HOME
        os.chown(mine, 65534, 65534)
        os.chown(secret, 65534, 65534)
        home.chmod(0o700)
    else:  # the user's own HOME, made unenterable
        home.chmod(0)
        theirs.chmod(0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update(HOME=str(home), UDPREACH_DEBUG="0")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            udpreach_argv(*args), capture_output=True, text=True, timeout=60, env=env,
            check=False, **how,  # type: ignore[call-overload]
        )  # fmt: skip

    try:
        history = cli("history")
        assert history.returncode == 2, history.stderr
        db = home / ".local/share/udpreach/runs.sqlite3"
        assert history.stderr.splitlines() == [f"udpreach: cannot use {db}: Permission denied"], (
            history.stderr
        )
        # click's own words named an environment variable nobody had set.
        unreadable = cli(
            "run", "--coordinator", "127.0.0.1:9", "--agent", "x", "--secret-file", str(theirs)
        )
        assert unreadable.returncode == 2, unreadable.stderr
        assert unreadable.stderr.splitlines() == [
            f"udpreach: cannot read secret file {theirs}: Permission denied"
        ]
        # The probe with a secret needs no keyring: it starts (and stops on SIGTERM).
        ready = mine / "ready.json"
        proc = subprocess.Popen(
            udpreach_argv(
                "probe", "--control", "127.0.0.1:0", "--secret-file", str(secret),
                "--db", str(mine / "runs.sqlite3"), "--ready-file", str(ready),
            ),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            **how,  # type: ignore[call-overload]
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not (ready.exists() and ready.stat().st_size) and proc.poll() is None:
                assert time.monotonic() < deadline, "the probe did not start"
                time.sleep(0.05)
            assert proc.poll() is None, proc.communicate()
        finally:
            code = stop(proc)
        _out, err = proc.communicate(timeout=10)  # (and closes the pipes)
        assert code == 0, err
        assert "internal error" not in err
    finally:
        home.chmod(0o700)
        shutil.rmtree(mine, ignore_errors=True)


_LOADING_INTERRUPTED = (
    "import os, signal, sys, time\n"
    "how = sys.argv.pop(1)\n"
    "class Interrupt:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'udpreach.cli':  # as if the signal came while typer was loading\n"
    "            if how == 'int':\n"
    "                raise KeyboardInterrupt\n"
    "            os.kill(os.getpid(), signal.SIGTERM)\n"
    "            time.sleep(5)\n"
    "        return None\n"
    "sys.meta_path.insert(0, Interrupt())\n"
    "sys.argv[0] = 'udpreach'\n"
    "from udpreach._entry import main\n"
    "main()\n"
)


@pytest.mark.parametrize("how", ["int", "term"])
@pytest.mark.parametrize(
    ("argv", "document"),
    [
        (["run", "--agent", "x"], False),
        (["history", "--json"], True),
        (["probe", "--control", "127.0.0.1:0"], False),
        (["agent", "--", "--json"], False),
    ],
)
def test_an_interrupt_while_the_command_line_loads_ends_it_like_any_other(
    how: str, argv: list[str], document: bool
) -> None:
    """Ctrl-C or SIGTERM in the tenth of a second ``udpreach.cli`` takes to import: one
    line and exit 3, the error document too with --json, as a command interrupted later
    ends (a traceback, or a silent 143, before: a new user's trial)."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOADING_INTERRUPTED, how, *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr == "udpreach: interrupted\n"
    if document:
        from udpreach._entry import ERROR_DOCUMENT
        from udpreach.core import schema

        assert json.loads(proc.stdout) == {
            "schema": schema.ERROR,
            "error": "interrupted",
            "exit": 3,
        }
        assert proc.stdout == ERROR_DOCUMENT + "\n"
    else:
        assert proc.stdout == ""


def _entry_with(stub: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``udpreach ARGV`` through the console script's entry point, in a fresh interpreter,
    after ``stub`` (Python source that patches the command's insides) has run."""
    code = f"import sys\n{stub}sys.argv = ['udpreach', *{argv!r}]\n"
    code += "from udpreach._entry import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_sigterm_while_a_command_works_is_an_interrupt_too(tmp_path: Path) -> None:
    """SIGTERM stays Ctrl-C's equal once a command runs: ``history`` (no signal handling
    of its own; held in its work here by a stub) ends with the one line and, with --json,
    the error document, where it used to die silently with 143."""
    from udpreach.store import RunStore

    db = tmp_path / "runs.sqlite3"
    RunStore.open(db).close()
    stub = (
        "import os, signal, time\n"
        "import udpreach.cli.history as h\n"
        "def slow(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "h.print_json = slow\n"
    )
    proc = _entry_with(stub, ["history", "--db", str(db), "--json"])
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr == "udpreach: interrupted\n"
    assert json.loads(proc.stdout)["error"] == "interrupted"


def test_an_interrupt_in_an_errors_last_words_is_still_one_line_and_one_document(
    tmp_path: Path,
) -> None:
    """Ctrl-C after a failing command wrote its error document, while it writes the line:
    typer turns it into a silent exit 130; it ends as interrupted (exit 3), with stdout
    still holding exactly the one document."""
    stub = (
        "import udpreach.cli.common as c\n"
        "def console(*a, **k):\n"
        "    raise KeyboardInterrupt\n"
        "c.err_console = console\n"
    )
    proc = _entry_with(stub, ["history", "--db", str(tmp_path / "none.db"), "--json"])
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr == "udpreach: interrupted\n"
    (line,) = proc.stdout.splitlines()
    assert "no run database" in json.loads(line)["error"]


def test_the_console_script_and_python_m_go_through_the_guarded_entry() -> None:
    import tomllib

    root = Path(__file__).resolve().parent.parent
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"udpreach": "udpreach._entry:main"}
    assert "from udpreach._entry import main" in (root / "udpreach" / "__main__.py").read_text()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7870", ("127.0.0.1", 7870)),
        ("mail.example.net:7870", ("mail.example.net", 7870)),
        ("[::1]:7870", ("::1", 7870)),
        ("::1:7870", ("::1", 7870)),
        ("[fe80::1%eth0]:7870", ("fe80::1%eth0", 7870)),
        ("127.0.0.1:7870:1", None),
        ("[127.0.0.1]:7870", None),
        ("[host]:7870", None),
        ("a:b:7870", None),
        ("127.0.0.1", None),
        (":7870", None),
    ],
)
def test_endpoints_with_colons_are_ipv6_addresses_or_bad_usage(
    text: str, expected: tuple[str, int] | None
) -> None:
    """`--coordinator 127.0.0.1:7870:1` went to the resolver as a host name (exit 3, "Name
    or service not known") where every other malformed endpoint is bad usage (exit 2)."""
    from udpreach.cli.common import parse_endpoint
    from udpreach.core.errors import ConfigError

    if expected is None:
        with pytest.raises(ConfigError, match="must be HOST:PORT"):
            parse_endpoint(text, "--coordinator")
    else:
        assert parse_endpoint(text, "--coordinator") == expected


def test_an_allow_target_covering_the_internet_is_warned_about(secret_file: Path) -> None:
    """`--allow-target 0.0.0.0/0` was taken without a word: anyone holding the secret may
    then aim the probe anywhere (the README's Security section)."""
    got = run_cli(
        "probe", "--control", "127.0.0.1:0", "--secret-file", str(secret_file),
        "--allow-target", "0.0.0.0/0", "--allow-target", "198.18.1.0/24",
        "--send-mode", "bogus", timeout=30,
    )  # fmt: skip
    assert got.returncode == 2, got.stderr
    warned = [line for line in got.stderr.splitlines() if "--allow-target" in line]
    assert len(warned) == 1, got.stderr  # the /24 is an agent's network: no warning
    assert "0.0.0.0/0" in warned[0]
    assert "4,294,967,296 addresses" in warned[0]


def test_a_run_that_waits_for_its_agent_says_so() -> None:
    """`run --wait 30` for an agent not registered yet showed "starting" and nothing else
    (a new user's trial): after a second without news it says what it waits for; the first
    progress message ends that; a run without --wait never says it."""
    from udpreach.cli.progress import WAITING_AFTER, RunProgress

    state = RunProgress("waiting for agent later (up to 30s)")
    t0 = state.started
    assert state.pieces(t0 + 0.1)[0] == "starting"  # it usually starts at once
    assert state.pieces(t0 + WAITING_AFTER + 0.1)[0] == "waiting for agent later (up to 30s)"
    state.update({"round": 0, "cells": 64512, "sent": 0})
    assert state.pieces(t0 + 5.0)[0] == "starting"
    assert RunProgress().pieces(t0 + 5.0)[0] == "starting"
