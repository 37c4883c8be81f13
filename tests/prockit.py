"""Real udpreach processes on loopback for fault tests: start, watch logs, signal, stop.

Everything is bounded: every wait has a deadline, and `loopback_services` stops (SIGTERM,
then SIGKILL) every process it started, whatever happens in the test body.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import run_cli, udpreach_argv

from udpreach.demo import stop


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``udpreach ARGS`` in the background, stdout and stderr into *log*."""
    with log.open("ab") as fh:
        return subprocess.Popen(udpreach_argv(*args), stdout=fh, stderr=subprocess.STDOUT)


def python_output(code: str, timeout: float = 60) -> str:
    """What ``python -c code`` prints, in a fresh interpreter (for what a process imports
    or holds from its start); a failure raises with its stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=True
    )
    return proc.stdout


def wait_for(pred: Any, what: str, timeout: float, every: float = 0.05) -> Any:
    """Poll *pred* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def wait_log(path: Path, pattern: str, timeout: float, count: int = 1) -> list[re.Match[str]]:
    """Wait until *pattern* matches at least *count* times in the log file at *path*."""

    def found() -> list[re.Match[str]] | None:
        text = path.read_text(errors="replace") if path.exists() else ""
        hits = list(re.finditer(pattern, text))
        return hits if len(hits) >= count else None

    hits: list[re.Match[str]] = wait_for(found, f"{pattern!r} x{count} in {path.name}", timeout)
    return hits


def free_udp_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Services:
    """A probe (coordinator) and an agent as real processes on loopback."""

    tmp: Path
    secret: Path
    db: Path
    host: str
    port: int
    agent_ports: list[int]
    agent_name: str
    probe: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    extra: list[subprocess.Popen[Any]] = field(default_factory=list)
    probe_args: tuple[str, ...] = ()
    agent_listen: str = "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def probe_log(self) -> Path:
        return self.tmp / "probe.log"

    @property
    def agent_log(self) -> Path:
        return self.tmp / "agent.log"

    def start_probe(self, port: int | None = None) -> None:
        """Start a probe on 127.0.0.1:PORT (0: any) and wait until it listens."""
        ready = self.tmp / f"ready-{time.monotonic_ns()}.json"
        self.probe = start(
            ["probe", "--control", f"127.0.0.1:{port if port is not None else self.port}",
             "--secret-file", str(self.secret), "--db", str(self.db), "--source", "127.0.0.2",
             "--ready-file", str(ready), *self.probe_args],
            self.probe_log,
        )  # fmt: skip
        proc = self.probe

        def bound() -> dict[str, Any] | None:
            assert proc.poll() is None, f"probe exited: {self.logs()}"
            return (
                json.loads(ready.read_text()) if ready.exists() and ready.stat().st_size else None
            )

        addr = wait_for(bound, "the probe to listen", 20)
        self.host, self.port = addr["host"], int(addr["port"])

    def start_agent(self) -> None:
        self.agent = start(
            ["agent", "--coordinator", self.endpoint, "--secret-file", str(self.secret),
             "--port", ",".join(map(str, self.agent_ports)), "--listen", self.agent_listen,
             "--name", self.agent_name],
            self.agent_log,
        )  # fmt: skip

    def run_argv(self, *args: str) -> list[str]:
        return udpreach_argv(
            "run", "--coordinator", self.endpoint, "--secret-file", str(self.secret),
            "--agent", self.agent_name, "--wait", "20", *args,
        )  # fmt: skip

    def spawn_run(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            self.run_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.extra.append(proc)
        return proc

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, timeout=timeout)

    def agents(self) -> list[str]:
        proc = run_cli(
            "agents", "--coordinator", self.endpoint, "--secret-file", str(self.secret), "--json"
        )
        if proc.returncode != 0:
            return []
        return [a["name"] for a in json.loads(proc.stdout)["agents"]]

    def logs(self) -> str:
        out = []
        for p in (self.probe_log, self.agent_log):
            if p.exists():
                tail = "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                out.append(f"--- {p.name}\n{tail}")
        return "\n".join(out)


@contextmanager
def loopback_services(
    tmp: Path,
    secret: Path,
    *,
    agent_ports: int = 1,
    name: str = "fault-agent",
    probe_args: tuple[str, ...] = (),
    agent: bool = True,
    agent_listen: str = "127.0.0.1",
) -> Iterator[Services]:
    """A probe on 127.0.0.1 (sending from 127.0.0.2) and an agent on 127.0.0.1 (or
    ``agent_listen``)."""
    svc = Services(
        tmp=tmp, secret=secret, db=tmp / "runs.sqlite3", host="127.0.0.1", port=0,
        agent_ports=free_udp_ports(agent_ports, agent_listen), agent_name=name,
        probe_args=probe_args, agent_listen=agent_listen,
    )  # fmt: skip
    with ExitStack() as stack:
        stack.callback(lambda: [stop(p, signal.SIGKILL) for p in svc.extra])
        stack.callback(lambda: stop(svc.probe))
        stack.callback(lambda: stop(svc.agent))
        svc.start_probe(0)
        if agent:
            svc.start_agent()
        yield svc


class Background:
    """Run *fn* in a thread; `result` joins it (bounded) and re-raises what it raised, so
    a failure there fails the test instead of becoming a stray thread warning."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self._error: BaseException | None = None
        self._value: Any = None

        def body() -> None:
            try:
                self._value = fn(*args)
            except BaseException as exc:  # handed to the test thread in result()
                self._error = exc

        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()

    def result(self, timeout: float) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"background task still running after {timeout}s"
        if self._error is not None:
            raise self._error
        return self._value


# --- a pseudo-terminal, as a person runs the CLI --------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-B]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass
class PtyResult:
    """What a command wrote to its terminal, and how it ended."""

    returncode: int
    raw: str  # everything written, escape sequences included
    seconds: float

    @property
    def text(self) -> str:
        """The output without escape sequences and carriage returns (each redraw of a live
        line becomes a line of its own)."""
        return strip_ansi(self.raw).replace("\r\n", "\n").replace("\r", "\n")

    def segments(self) -> list[str]:
        """Every stretch of text between line breaks and carriage returns."""
        return [s for s in self.text.split("\n") if s.strip()]


def run_pty(
    argv: list[str],
    *,
    cols: int,
    rows: int = 50,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    interrupt_when: Any = None,
    interrupts: int = 1,
    interrupt_gap: float = 0.0,
) -> PtyResult:
    """Run *argv* on a fresh pseudo-terminal of *cols* x *rows* (stdin, stdout and stderr
    all on it) and collect what it writes until it exits.

    Args:
        env: variables to set on top of ours (TERM defaults to xterm-256color; COLUMNS,
            LINES and NO_COLOR are removed unless given here).
        interrupt_when: a predicate on the output so far; the first time it holds, the child
            gets SIGINT *interrupts* times, *interrupt_gap* seconds apart (as Ctrl-C does).
    """
    import fcntl
    import os
    import select
    import struct
    import termios

    e = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    e["TERM"] = "xterm-256color"
    e.update(env or {})
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, env=e, start_new_session=True
    )
    os.close(slave)
    out = bytearray()
    fired = False
    try:
        deadline = t0 + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{argv[2:4]} still running after {timeout}s: {bytes(out)!r}")
            ready, _, _ = select.select([master], [], [], min(left, 0.05))
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed its end
                    data = b""
                if not data:
                    break
                out += data
            if (
                not fired
                and interrupt_when is not None
                and interrupt_when(out.decode(errors="replace"))
            ):
                fired = True
                for i in range(interrupts):
                    if i:
                        time.sleep(interrupt_gap)
                    proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        stop(proc)
        os.close(master)
    if interrupt_when is not None:
        assert fired, f"the moment to interrupt never came: {bytes(out)!r}"
    return PtyResult(code, out.decode(errors="replace"), time.monotonic() - t0)
