"""The real CLI against a real probe and agent on loopback, as the new-user trial ran it:
output into a pipe that closes early, expectation files that judge nothing, the agent list.

One probe and one agent serve the whole module (``prockit.loopback_services``); every test
runs ``udpreach`` as a process and looks at what a user sees: its exit status, stdout and
stderr.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import run_cli, udpreach_argv
from prockit import Services, loopback_services, wait_for

from udpreach.core import schema
from udpreach.core.portspec import format_ports


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    tmp = tmp_path_factory.mktemp("loopback")
    secret = tmp / "secret"
    secret.write_text("loopback-cli-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    with loopback_services(tmp, secret, agent_ports=2, name="pc-17") as svc:
        yield svc


def _run(services: Services, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``udpreach run`` against the module's agent (waiting for it to register)."""
    return subprocess.run(
        services.run_argv(*args), capture_output=True, text=True, timeout=timeout, check=False
    )


def _stored_run(services: Services, *args: str) -> dict:
    proc = _run(services, "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    doc: dict = json.loads(proc.stdout)
    return doc


# ---------------------------------------------------------------------------------------
# A reader that goes away (`udpreach show RUN | head -1`).


def _into_closed_pipe(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run *argv* with stdout a pipe whose reader has already gone: every write to it finds
    the pipe closed (what `| head -1` does to all but the first lines, without the race)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(
            argv, stdout=w, stderr=subprocess.PIPE, text=True, timeout=timeout, check=False
        )
    finally:
        os.close(w)


def test_a_closed_pipe_changes_no_exit_status_and_says_nothing(
    services: Services, tmp_path: Path
) -> None:
    db = str(services.db)
    doc = _stored_run(services, "--src-ports", "1024-3071")
    blocked = tmp_path / "blocked.toml"  # loopback lets everything through: a deviation
    blocked.write_text('[[expect]]\ndst_ports = "1-65535"\nsrc_ports = "1024-1100"\n'
                       'verdict = "blocked"\n')  # fmt: skip
    cases = [
        (udpreach_argv("show", doc["run_id"], "--db", db), 0),
        (udpreach_argv("show", doc["run_id"], "--db", db, "--json"), 0),
        (udpreach_argv("history", "--db", db), 0),
        (udpreach_argv("history", "--db", db, "--json"), 0),
        (services.run_argv("--src-ports", "1024-2047"), 0),
        (services.run_argv("--src-ports", "1024-2047", "--json"), 0),
        (services.run_argv("--src-ports", "1024-2047", "--expect", str(blocked)), 1),
        (services.run_argv("--src-ports", "1024-2047", "--expect", str(blocked), "--json"), 1),
    ]
    for argv, code in cases:
        proc = _into_closed_pipe(argv)
        what = " ".join(argv[3:6])
        assert proc.returncode == code, f"{what}: exit {proc.returncode}: {proc.stderr}"
        if code:  # what a deviation always says on stderr, and nothing about the pipe
            (line,) = proc.stderr.splitlines()
            assert re.match(r"udpreach: [\d,]+ cells differ from --expect \S+ \(in ", line), line
        else:
            assert proc.stderr == "", f"{what}: {proc.stderr}"


def test_a_closed_pipe_still_gets_the_reports_written(services: Services, tmp_path: Path) -> None:
    """What the command does after printing (the export files) still happens."""
    junit, csv = tmp_path / "r.xml", tmp_path / "r.csv"
    argv = services.run_argv("--src-ports", "1024-2047", "--junit", str(junit), "--csv", str(csv))
    proc = _into_closed_pipe(argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "<testsuite" in junit.read_text()
    assert "1024,2047" in csv.read_text()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
def test_a_run_that_fails_after_it_ran_says_why_in_its_json_document(
    services: Services, tmp_path: Path
) -> None:
    """With --json, a run whose command fails after the run (here: a report file the kernel
    refuses, in a folder that exists) prints its results, not an error document in their
    place; the document also says why, with the exit status, as the error document would.
    A run that did not fail has neither key."""
    proc = _run(services, "--json", "--src-ports", "1024-1100", "--junit", "/proc/udpreach.xml")
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "udpreach/run-v1"
    assert doc["complete"] is True
    assert doc["summary"]["open"] == doc["summary"]["cells"] == 77 * len(doc["plan"]["dst_ports"])
    assert doc["exit"] == 3
    assert "/proc/udpreach.xml" in doc["error"]
    assert proc.stderr.splitlines()[-1] == f"udpreach: {doc['error']}"
    ok = _run(services, "--json", "--src-ports", "1024-1100")
    assert ok.returncode == 0, ok.stderr
    assert not {"error", "exit"} & set(json.loads(ok.stdout))


def test_version_and_help_into_a_closed_pipe() -> None:
    for args in (["--version"], ["run", "--help"]):
        proc = _into_closed_pipe(udpreach_argv(*args))
        assert (proc.returncode, proc.stderr) == (0, ""), args


# ---------------------------------------------------------------------------------------
# An expectation that judges nothing is not "as expected".


def _expect_file(tmp_path: Path, *entries: dict[str, str]) -> Path:
    path = tmp_path / "expect.toml"
    path.write_text(
        "".join("[[expect]]\n" + "".join(f'{k} = "{v}"\n' for k, v in e.items()) for e in entries)
    )
    return path


OPEN = {"dst_ports": "1-65535", "src_ports": "1024-65535", "verdict": "open"}


def test_a_mistyped_agent_judges_nothing_and_exits_1(services: Services, tmp_path: Path) -> None:
    """The trial: `agent = "pc-71"` for pc-17 said "as expected: no deviations", exit 0."""
    expect = _expect_file(tmp_path, {"agent": "pc-71", **OPEN})
    proc = _run(services, "--src-ports", "1024-2047", "--expect", str(expect))
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line == (
        f"udpreach: --expect {expect}: the expectations judged no cell: every entry names "
        "another agent (pc-71), and this run's agent is pc-17"
    )
    report = " ".join(proc.stdout.split())
    assert "expectations: 0 of 2,048 cells judged by 0 of 1 entry" in report
    assert "entry #1 (line 1) judged no cell: it is for agent pc-71" in report
    assert "not as expected: the expectations judged no cell" in report
    assert "as expected: no deviations" not in report

    proc = _run(services, "--src-ports", "1024-2047", "--expect", str(expect), "--json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)  # one document, nothing else
    assert doc["deviations"] == []  # the contract's form, unchanged
    judged = doc["judgement"]
    assert (judged["cells"], judged["as_expected"]) == (0, False)
    assert [(u["entry"], u["line"], u["fails"]) for u in judged["unmatched"]] == [(1, 1, False)]
    assert judged["problem"] in proc.stderr


def test_an_entry_that_judges_nothing_fails_the_run_even_beside_good_ones(
    services: Services, tmp_path: Path
) -> None:
    unplanned = {"dst_ports": "6000", "src_ports": "1024-65535", "verdict": "open"}
    expect = _expect_file(tmp_path, OPEN, unplanned)
    proc = _run(services, "--src-ports", "1024-2047", "--expect", str(expect), "--json")
    assert proc.returncode == 1, proc.stderr
    judged = json.loads(proc.stdout)["judgement"]
    assert [e["cells"] for e in judged["entries"]] == [2048, 0]
    (u,) = judged["unmatched"]
    assert (u["entry"], u["line"], u["fails"]) == (2, 5, True)
    assert u["reason"].startswith("none of its destination ports was planned")
    (line,) = proc.stderr.splitlines()
    assert "expectation entry #2 (line 5: dst 6000 src 1024-65535 open) judged no cell" in line
    assert f"(the run's: {format_ports(services.agent_ports)})" in line


def test_an_entry_for_another_agent_is_named_but_fails_nothing(
    services: Services, tmp_path: Path
) -> None:
    """One file may serve several agents: pc-18's entry is listed, and pc-17's run passes."""
    expect = _expect_file(tmp_path, OPEN, {"agent": "pc-18", **OPEN, "verdict": "blocked"})
    proc = _run(services, "--src-ports", "1024-2047", "--expect", str(expect))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    report = " ".join(proc.stdout.split())
    assert "expectations: 2,048 of 2,048 cells judged by 1 of 2 entries" in report
    assert "entry #2 (line 5) judged no cell: it is for agent pc-18" in report
    assert "as expected: no deviations" in report


# ---------------------------------------------------------------------------------------
# The agent list.


def test_agents_json_names_its_schema_and_says_since_in_utc(services: Services) -> None:
    wait_for(lambda: services.agents() == ["pc-17"], "pc-17 to register", 20)
    proc = run_cli(
        "agents", "--coordinator", services.endpoint, "--secret-file", str(services.secret),
        "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == schema.AGENTS == "udpreach/agents-v1"
    (agent,) = doc["agents"]
    assert isinstance(agent["since"], float)  # kept, for scripts that read it
    since = datetime.fromtimestamp(agent["since"], UTC)
    assert agent["since_utc"] == since.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_agents_with_none_registered_says_so(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("loopback-cli-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    with loopback_services(tmp_path, secret, agent=False) as svc:
        proc = run_cli("agents", "--coordinator", svc.endpoint, "--secret-file", str(secret))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # no empty table
    assert proc.stderr == "no agent is registered\n"


def test_an_agent_listening_on_one_address_registers_that_address(
    tmp_path: Path, secret_file: Path
) -> None:
    """``agent --listen 127.0.0.3``: the agent connects to the coordinator from 127.0.0.3,
    so that is the callback the coordinator registers and the datagrams reach it. Before,
    it registered 127.0.0.1, where nothing listened: the run said every cell was rejected
    (port unreachable), exit 0, and recommended firewall rules."""
    with loopback_services(tmp_path, secret_file, name="l3", agent_listen="127.0.0.3") as svc:
        wait_for(lambda: "l3" in svc.agents() or None, "the agent to register", 20)
        got = subprocess.run(
            svc.run_argv("--src-ports", "1024-1100", "--json"),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        log = svc.agent_log.read_text()
    assert got.returncode == 0, got.stderr
    doc = json.loads(got.stdout)
    assert doc["agent"]["registered"] == doc["agent"]["observed"] == "127.0.0.3"
    assert (
        doc["summary"]["open"] == doc["summary"]["cells"] == 77 * len(doc["plan"]["dst_ports"])
    ), doc["summary"]
    assert "callback 127.0.0.3" in log


@pytest.mark.parametrize(
    ("listen", "coordinator", "line"),
    [
        ("::1", "127.0.0.1:9", "--listen ::1 is IPv6 and the coordinator 127.0.0.1 is IPv4"),
        ("0.0.0.0", "[::1]:9",
         "--listen 0.0.0.0 takes IPv4 only and the coordinator ::1 is IPv6"),
        # A name is not looked up (a new user's trial: a DNS query for it).
        ("notanip", "127.0.0.1:9",
         "--listen 'notanip': give an IP address of this host (not a name)"),
    ],
)  # fmt: skip
def test_an_agent_listening_where_it_cannot_register_says_so(
    secret_file: Path, listen: str, coordinator: str, line: str
) -> None:
    """A listening address of another family than the coordinator's cannot be the address
    the agent registers from: one line, exit 2, before it dials."""
    got = run_cli(
        "agent", "--coordinator", coordinator, "--secret-file", str(secret_file),
        "--port", "0", "--listen", listen, timeout=30,
    )  # fmt: skip
    assert got.returncode == 2, got.stderr
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1, got.stderr
    assert line in lines[0]


def _wakeups(pid: int) -> int:
    """How many times the process has slept and woken (its main thread), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/PID/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_an_idle_agent_sleeps(services: Services) -> None:
    """Between runs the agent waits for the coordinator and its sockets and nothing else: an
    agent left running on a client for months must cost nothing. Its receipt flusher woke
    it 100 times a second (strace: 195 epoll_wait calls in 2 s); a run before the pause
    checks that the timer stops again after one."""
    assert services.agent is not None
    got = _run(services, "--src-ports", "1024-1055", "--json")
    assert got.returncode == 0, got.stderr
    time.sleep(0.3)
    before = _wakeups(services.agent.pid)
    time.sleep(2.0)
    woke = _wakeups(services.agent.pid) - before
    assert woke < 10, f"an idle agent woke {woke} times in 2 s"
