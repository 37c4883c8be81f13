"""``udpreach demo``: the main job in one command on one machine.

With root and nftables it builds the real-firewall lab (agent, router with a sample policy,
probe in three network namespaces), runs the real ``udpreach probe`` and ``udpreach agent``
processes inside it, sweeps every high source port, and prints the policy beside the
report where the terminal is wide enough for both, else below it. Otherwise it does the
same over loopback and says so. Everything it starts is stopped, and the lab is torn down,
however the demo ends.

Ctrl-C: every process the demo starts runs in a session of its own, so the terminal's
SIGINT reaches the demo alone; the demo hands it on to the sweep (``udpreach run``), which
asks the coordinator to stop and prints what was settled, while the probe and the agent stay
up long enough to answer. A second Ctrl-C is handed on too and ends the sweep at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from udpreach.core.errors import UnreachableError

READY_TIMEOUT = 20.0
SWEEP_TIMEOUT = 600.0


def cli_argv(*args: str) -> list[str]:
    """How to run this very udpreach as a subprocess."""
    return [sys.executable, "-m", "udpreach", *args]


def stop(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM) -> int | None:
    """Signal *proc* (if still running) and reap it, SIGKILL after 5 s; its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            return -9
    return proc.returncode


@contextlib.contextmanager
def background(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run a service in the background; SIGTERM (then SIGKILL) it on the way out."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop(proc)


def sweep(argv: list[str], *, capture: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run the sweep (``udpreach run``) in its own session; a Ctrl-C of the demo is handed
    on to it (see the module's docstring). Bounded: the sweep ends within seconds of a
    second SIGINT, and is killed after ``SWEEP_TIMEOUT``."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE if capture else None,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + SWEEP_TIMEOUT
    out = b""
    try:
        while True:
            try:
                out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                break
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
            except subprocess.TimeoutExpired:
                raise UnreachableError(f"the sweep took more than {SWEEP_TIMEOUT:g}s") from None
    finally:
        stop(proc, signal.SIGKILL)
    return subprocess.CompletedProcess(argv, proc.returncode, out or b"")


def wait_ready(path: Path, proc: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    """Wait for a probe's ready file (its bound control address)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                return data
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            raise UnreachableError(f"probe exited early: {' '.join(tail)}")
        time.sleep(0.05)
    raise UnreachableError("probe did not start listening in time")


def say(text: str) -> None:
    """A note on stderr: on a terminal wrapped at word boundaries to its width, the lines
    after the first indented (as the report's); piped, one line."""
    import textwrap

    from udpreach.render.console import report_console

    console = report_console(stderr=True)
    if not console.is_terminal:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        return
    for line in textwrap.wrap(
        text,
        width=max(20, console.width),
        subsequent_indent="  ",
        break_long_words=False,
        break_on_hyphens=False,
    ):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


#: The demo's probe keeps its history in the demo's own directory, removed at the end (a
#: demo leaves nothing behind); the report names its run all the same, so say so.
NO_HISTORY = (
    "udpreach demo: its run history went with it: the demo's probe kept it in a folder of "
    "its own, now removed (udpreach history and show find the runs of a probe you start "
    "yourself: README, across two hosts)"
)


def run_demo(*, loopback: bool = False) -> int:
    """Run the demo; returns the exit code of the sweep.

    SIGTERM ends it like Ctrl-C before the sweep (an interruption, exit 3), so that what
    it started is stopped and the lab torn down on the way out.
    """
    from udpreach.lab import lab_available

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    reason = lab_available()
    if reason is None and not loopback:
        return _lab_demo()
    if reason is None:
        say("udpreach demo: over loopback (--loopback); leave it out for the real-firewall lab")
    else:
        say(
            f"udpreach demo: over loopback ({reason}); run as root with nftables for the "
            "real-firewall lab"
        )
    return _loopback_demo()


def _loopback_demo() -> int:
    from udpreach.secret import new_secret

    with tempfile.TemporaryDirectory(prefix="udpreach-demo-") as tmp:
        d = Path(tmp)
        secret = new_secret(d / "secret")
        ready = d / "ready.json"
        probe_log, agent_log = d / "probe.log", d / "agent.log"
        probe_argv = cli_argv(
            "probe", "--control", "127.0.0.1:0", "--secret-file", str(secret),
            "--db", str(d / "runs.sqlite3"), "--source", "127.0.0.2",
            "--ready-file", str(ready), "--log-level", "warning",
        )  # fmt: skip
        with background(probe_argv, probe_log) as probe:
            addr = wait_ready(ready, probe, probe_log)
            endpoint = f"{addr['host']}:{addr['port']}"
            agent_argv = cli_argv(
                "agent", "--coordinator", endpoint, "--secret-file", str(secret),
                "--port", "0", "--listen", "127.0.0.1", "--name", "demo-agent",
                "--log-level", "warning",
            )  # fmt: skip
            with background(agent_argv, agent_log):
                say(
                    "udpreach demo: probe (127.0.0.2) and agent (127.0.0.1) running; "
                    "sweeping source ports 1024-65535"
                )
                run_argv = cli_argv(
                    "run", "--coordinator", endpoint, "--secret-file", str(secret),
                    "--agent", "demo-agent", "--wait", "15",
                )  # fmt: skip
                code = sweep(run_argv).returncode
        if code in (0, 1):  # a report was printed (3 may be an error line alone)
            say(NO_HISTORY)
        return code


def _policy_rules(policy: str) -> str:
    """The policy without its comments: what the firewall actually does."""
    lines = [ln for ln in policy.splitlines() if not ln.lstrip().startswith("#")]
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


def _lab_demo() -> int:

    from udpreach.lab import Lab, bundled_policy
    from udpreach.render.console import report_console
    from udpreach.render.terminal import Policy, fits_beside, render_run
    from udpreach.secret import new_secret

    policy = bundled_policy("demo")
    console = report_console()
    with tempfile.TemporaryDirectory(prefix="udpreach-demo-") as tmp:
        d = Path(tmp)
        os.chmod(d, 0o700)
        secret = new_secret(d / "secret")
        ready = d / "ready.json"
        probe_log, agent_log = d / "probe.log", d / "agent.log"
        with Lab.create(policy) as lab:
            info = lab.info
            shown = Policy(
                _policy_rules(policy), f"nftables policy on the router ({info.router_ns})"
            )
            where = "beside" if fits_beside(console.width, shown.width) else "below"
            say(
                f"udpreach demo: lab {info.name}: agent {info.agent_addr} <-> router "
                f"(nftables policy {where} the report) <-> probe {info.probe_addr}"
            )
            control = f"{info.probe_addr}:7870"
            probe_argv = lab.ns_argv(
                "probe",
                cli_argv(
                    "probe", "--control", control, "--secret-file", str(secret),
                    "--db", str(d / "runs.sqlite3"), "--ready-file", str(ready),
                    "--log-level", "warning",
                ),
            )  # fmt: skip
            with background(probe_argv, probe_log) as probe:
                wait_ready(ready, probe, probe_log)
                agent_argv = lab.ns_argv(
                    "agent",
                    cli_argv(
                        "agent", "--coordinator", control, "--secret-file", str(secret),
                        "--port", "5000,5001", "--name", "demo-agent", "--log-level", "warning",
                    ),
                )  # fmt: skip
                with background(agent_argv, agent_log):
                    say("udpreach demo: sweeping source ports 1024-65535 to ports 5000,5001")
                    run_argv = lab.ns_argv(
                        "probe",
                        cli_argv(
                            "run", "--coordinator", control, "--secret-file", str(secret),
                            "--agent", "demo-agent", "--wait", "15", "--json",
                        ),
                    )  # fmt: skip
                    proc = sweep(run_argv, capture=True)
        if not proc.stdout.strip():
            return proc.returncode or 3
        doc = json.loads(proc.stdout)
        render_run(doc, console, beside=shown)
        say(NO_HISTORY)
        if proc.returncode not in (0, 1):  # its error line came before the report: say so last
            say(
                f"udpreach demo: the sweep ended early (exit {proc.returncode}: see its line "
                "above the report); the report shows what it settled"
            )
        return proc.returncode
