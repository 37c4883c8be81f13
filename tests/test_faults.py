"""Faults mid-run, with the real processes through the real CLI.

An agent killed mid-run, a coordinator killed mid-run, the control channel cut for a few
seconds in the lab, and SIGINT/SIGTERM to every long-running command. What a user must see:
the run ends promptly and says so (exit 3), every cell that was settled is kept (in the
document and in the history), everything else is ``unknown`` and never a false ``blocked``;
agents come back by themselves; signals end processes cleanly and release their ports.

Runs are slowed down (``--rate 5000``: a full sweep lasts about 13 s) so that there is a
"mid-run" to hit.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from labcli import lab_udpreach
from prockit import loopback_services, stop, wait_for, wait_log

SLOW = ("--src-ports", "1024-65535", "--rate", "5000", "--json")
RUN_STARTED = r"run (\S+): \d+ cells to"


def _ranges_cells(doc: dict[str, Any], verdict: str) -> int:
    return sum(r["last"] - r["first"] + 1 for r in doc["ranges"] if r["verdict"] == verdict)


def _assert_no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


def test_agent_killed_mid_run(tmp_path: Path, secret_file: Path) -> None:
    with loopback_services(tmp_path, secret_file) as svc:
        run = svc.spawn_run(*SLOW)
        (hit,) = wait_log(svc.probe_log, RUN_STARTED, timeout=30)
        run_id = hit.group(1)
        time.sleep(2.5)
        assert run.poll() is None, "the run ended before the agent was killed"
        svc.agent.kill()  # type: ignore[union-attr]
        svc.agent.wait(timeout=10)  # type: ignore[union-attr]
        t_kill = time.monotonic()
        out, err = run.communicate(timeout=30)
        ended_after = time.monotonic() - t_kill
        assert ended_after < 5.0, f"run took {ended_after:.1f}s to notice the lost agent"
        assert run.returncode == 3, err
        _assert_no_traceback(err)
        if out == "" and "closed by peer" in err:
            pytest.xfail(
                "bug: RunExecution.execute catches AgentUnavailableError, but it arrives "
                "wrapped in an ExceptionGroup from _send_round's nursery: no document is sent"
            )
        assert err.strip().splitlines()[-1].startswith("udpreach: the run ended before")
        doc = json.loads(out)
        assert doc["run_id"] == run_id
        assert doc["complete"] is False
        s = doc["summary"]
        # What was settled stays; the rest is unknown; nothing is blocked for want of an agent.
        assert s["open"] > 1000, s
        assert s["unknown"] > 1000, s
        assert s["blocked"] == s["rejected"] == 0, s
        assert s["open"] + s["unknown"] + s["untested"] == s["cells"] == 64512
        assert _ranges_cells(doc, "open") == s["open"]
        assert any("lost" in w for w in doc["warnings"]), doc["warnings"]
        # Stored as printed.
        shown = svc.cli("show", run_id, "--db", str(svc.db), "--json")
        assert shown.returncode == 0, shown.stderr
        stored = json.loads(shown.stdout)
        assert stored["complete"] is False
        assert stored["summary"] == s
        assert stored["ranges"] == doc["ranges"]
        hist = json.loads(svc.cli("history", "--db", str(svc.db), "--json").stdout)["runs"]
        assert [(r["run_id"], r["status"]) for r in hist] == [(run_id, "incomplete")]
        assert hist[0]["summary"]["open"] == s["open"]


def test_coordinator_killed_mid_run_then_agent_comes_back(
    tmp_path: Path, secret_file: Path
) -> None:
    with loopback_services(tmp_path, secret_file) as svc:
        run = svc.spawn_run(*SLOW)
        (hit,) = wait_log(svc.probe_log, RUN_STARTED, timeout=30)
        run_id = hit.group(1)
        time.sleep(2.5)
        old = svc.probe
        assert old is not None
        old.kill()
        old.wait(timeout=10)
        t_kill = time.monotonic()
        out, err = run.communicate(timeout=30)
        assert time.monotonic() - t_kill < 5.0
        assert run.returncode == 3, err
        assert out == ""
        _assert_no_traceback(err)
        assert len(err.strip().splitlines()) == 1, err
        assert "coordinator" in err or "control connection" in err, err

        # The history knows the run was cut short, and which cells it never settled.
        hist = json.loads(svc.cli("history", "--db", str(svc.db), "--json").stdout)["runs"]
        assert [(r["run_id"], r["status"], r["complete"]) for r in hist] == [
            (run_id, "interrupted", False)
        ]
        shown = svc.cli("show", run_id, "--db", str(svc.db), "--json")
        assert shown.returncode == 0, shown.stderr
        assert "interrupted" in shown.stderr
        doc = json.loads(shown.stdout)
        s = doc["summary"]
        assert doc["complete"] is False
        assert s["cells"] == 64512
        assert s["blocked"] == s["rejected"] == 0, s
        assert s["unknown"] > 0, s
        settled_in_history = s["open"]

        # A new probe on the same address: the agent registers again by itself.
        svc.start_probe(svc.port)
        wait_log(svc.agent_log, r"registered as 'fault-agent'", timeout=20, count=2)
        assert wait_for(svc.agents, "the agent to be listed", 20, every=0.5) == ["fault-agent"]
        again = subprocess.run(
            svc.run_argv("--src-ports", "1024-2047", "--json"),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["summary"]["open"] == 1024
        _assert_no_traceback(svc.agent_log.read_text())
    if settled_in_history == 0:
        pytest.xfail(
            "bug: RunExecution checkpoints the store only between rounds; a coordinator "
            "killed in the middle of round 1 leaves no settled cell in the history"
        )


def test_signals_end_every_command_cleanly(tmp_path: Path, secret_file: Path) -> None:
    with loopback_services(tmp_path, secret_file, agent_ports=2) as svc:
        # `run`: SIGINT is an interruption (exit 3, one line); the coordinator stops the run.
        for sig in (signal.SIGINT, signal.SIGTERM):
            run = svc.spawn_run(*SLOW)
            wait_log(svc.probe_log, RUN_STARTED, timeout=30, count=1 if sig == signal.SIGINT else 2)
            time.sleep(1.0)
            run.send_signal(sig)
            out, err = run.communicate(timeout=15)
            _assert_no_traceback(err)
            if sig == signal.SIGINT:
                assert run.returncode == 3, err
                assert out == ""
                assert err.strip().splitlines() == ["udpreach: interrupted"]
            else:
                assert run.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM, 3), err
            # The requester went away: the coordinator stops the run and frees the agent.
            wait_log(svc.probe_log, r"requester of run \S+ went away", timeout=10,
                     count=1 if sig == signal.SIGINT else 2)  # fmt: skip

            def free_again() -> bool:
                proc = subprocess.run(
                    svc.run_argv("--src-ports", "1024-1055", "--json"),
                    capture_output=True, text=True, timeout=60, check=False,
                )  # fmt: skip
                return proc.returncode == 0

            wait_for(free_again, "the agent to be free for a new run", 20, every=0.5)
        hist = json.loads(svc.cli("history", "--db", str(svc.db), "--json").stdout)["runs"]
        assert sorted(r["status"] for r in hist) == ["complete"] * 2 + ["incomplete"] * 2

        # `agent`: SIGTERM -> exit 0, its UDP ports free at once.
        assert stop(svc.agent, signal.SIGTERM) == 0
        for p in svc.agent_ports:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", p))
        # ... and SIGINT the same.
        svc.start_agent()
        wait_for(lambda: svc.agents() == ["fault-agent"], "the agent to register", 20, every=0.3)
        assert stop(svc.agent, signal.SIGINT) == 0
        for p in svc.agent_ports:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", p))

        # `probe`: SIGTERM and SIGINT -> exit 0; a new probe can listen on the port at once.
        port = svc.port
        for sig in (signal.SIGTERM, signal.SIGINT):
            assert stop(svc.probe, sig) == 0
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen()
            svc.start_probe(port)
            assert svc.port == port
        assert stop(svc.probe, signal.SIGINT) == 0
    _assert_no_traceback(svc.probe_log.read_text(), svc.agent_log.read_text())


# --- the lab: the control channel cut for a few seconds ---------------------------------


@pytest.mark.root
@pytest.mark.slow
def test_control_channel_cut_never_makes_a_false_blocked(tmp_path: Path) -> None:
    cut_drops: list[int] = []

    def cut(lr: Any) -> None:
        wait_log(tmp_path / "probe.log", RUN_STARTED, timeout=40)
        time.sleep(1.5)
        for rule in ("tcp dport 7000 counter drop", "tcp sport 7000 counter drop"):
            lr.lab.run("router", ["nft", "add", "rule", "inet", "udpreach", "forward", *rule.split()],
                       check=True)  # fmt: skip
        try:
            time.sleep(3.0)
        finally:
            listing = lr.lab.run(
                "router", ["nft", "list", "chain", "inet", "udpreach", "forward"]
            ).stdout
            cut_drops.extend(int(n) for n in re.findall(r"packets (\d+)", listing))
            lr.lab.run("router", ["nft", "flush", "chain", "inet", "udpreach", "forward"],
                       check=True)  # fmt: skip

    with lab_udpreach("", tmp_path) as lr:
        cutter = threading.Thread(target=cut, args=(lr,), daemon=True)
        cutter.start()
        t0 = time.monotonic()
        code, doc, err = lr.run(*SLOW[:-1], timeout=90)
        took = time.monotonic() - t0
        cutter.join(timeout=30)
        assert not cutter.is_alive()
        logs = lr.logs()
    assert sum(cut_drops) > 0, "the cut dropped nothing: the test proved nothing"
    assert took < 60, f"run took {took:.0f}s"
    assert code in (0, 3), f"exit {code}: {err}\n{logs}"
    s = doc["summary"]
    # Everything is open on this path: a cut control channel may cost unknowns, never blocks.
    assert s["blocked"] == 0, (s, logs)
    assert s["rejected"] == 0, s
    if code == 0:
        assert doc["complete"] is True
        assert s["open"] == 64512, s
    else:
        assert doc["complete"] is False
        assert s["open"] + s["unknown"] == 64512, s
    print(f"control cut: exit {code}, summary {s}, dropped {sum(cut_drops)} TCP segments")
