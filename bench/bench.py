"""``make bench``: how fast a full sweep is, next to what plain tools and the kernel manage.

Theory of operation
-------------------
Every figure is the median of at least ``--repeat`` (default 5) runs taken in this one
invocation, and the runs that are compared with each other alternate (A B C D, B C D A, ...)
so that whatever else the machine is doing at the time lands on all of them alike.

Two paths, each with the same measurements:

* **loopback**: probe on 127.0.0.2, agent on 127.0.0.1, in this host's namespace;
* **lab** (root with nftables): the real-firewall lab (`udpreach.lab`) with an empty policy,
  probe and agent in their namespaces and the router forwarding between them; ``udpreach
  run`` is started from the probe's namespace.

On each path a long-lived probe and agent run per send mode (bind, and raw where
CAP_NET_RAW allows), and these alternate:

* ``udpreach run --json`` for a full sweep (1024-65535) to one port, timed from the CLI
  process's start to its exit with the verdicts printed, in each send mode;
* the baseline: a plain stdlib sender (bind + sendto + close per source port) against a
  plain receiver that counts distinct source ports and stops when all 64,512 arrived;
* hping3 sending the same 64,512 datagrams (``--udp -s 1024 -c 64512 -i u1``), when
  installed, against the same receiver;
* the kernel's ceiling: C sending prebuilt raw packets through ``sendmmsg``, against the
  same receiver. Each round of the rotation pairs its send rate with udpreach's raw run of
  that round, seconds apart, and the share of C is judged on the median of those pairs'
  ratios: the machine's speed drifts too much over a bench for a ratio of medians.

Then, on the lab (or loopback without root), the fastest mode's agent listens on 16 ports
and sweeps to 1, 4 and 16 of them alternate: the cost per cell should stay flat. The peak
memory (VmHWM) of that probe and agent is read from /proc before they stop. The probe runs
with ``--log-level debug``; its "round 1: sent N groups in X s" lines give the send phase's
own rate. A sender-only measurement (RawSender/BindSender in a bare process, no runner)
shows how much of that rate the runner keeps. Finally ``udpreach --help`` start-up time.

Everything is bounded: each process has a timeout, the whole bench a deadline; processes
are stopped and the lab is torn down on any exit, including Ctrl-C and SIGTERM. Only
loopback and the lab's 198.18.0.0/15 addresses are ever sent to.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from rich.console import Console, JustifyMethod
from rich.table import Table

from udpreach.demo import stop
from udpreach.lab import Lab, lab_available

FIRST_PORT, LAST_PORT = 1024, 65535
SWEEP = LAST_PORT - FIRST_PORT + 1  # 64,512 source ports
SCALE_PORTS = (1, 4, 16)
FIXED_COST_PORTS = 64  # a run this small is almost all fixed cost (start-up, handshakes)
FIXED_COST_SPEC = f"{FIRST_PORT}-{FIRST_PORT + FIXED_COST_PORTS - 1}"
LAB_AGENT_PORT = 5000  # the fast stack's agent listens on 5000-5015 in the lab
LAB_BIND_AGENT_PORT = 6000
LAB_RECEIVER_PORT = 5999
RUN_TIMEOUT = 180.0
START_TIMEOUT = 30.0
BENCH_DEADLINE = 15 * 60.0

# Targets the report is judged against (printed PASS/MISS; the bench never fails on them).
TARGET_LAB_RATIO = 1.0
TARGET_RAW_RATE = 250_000.0
TARGET_C_SHARE = 0.70  # the 250k/s is 70% of the C limit on its machine
TARGET_HELP_SECONDS = 0.150
TARGET_AGENT_MB = 100.0

_SECONDS = re.compile(r"seconds=([0-9.]+)")
_ROUND1 = re.compile(r"round 1: sent (\d+) groups in ([0-9.]+)s")

Role = Literal["agent", "probe"]


# -- helper processes (run with this interpreter, in either namespace) -------------------

# Counts distinct source ports until `want` arrived, the deadline passed, or stdin closed;
# prints "<count> <monotonic time of completion or of stopping>".
_RECEIVER = r"""
import select, socket, sys, time
addr, port, want, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
for opt in (33, socket.SO_RCVBUF):  # SO_RCVBUFFORCE as root, like the agent
    try:
        s.setsockopt(socket.SOL_SOCKET, opt, 16 << 20)
        break
    except OSError:
        pass
s.bind((addr, port))
s.setblocking(False)
seen = bytearray(65536)
n = 0
done = None
print("ready", flush=True)
deadline = time.monotonic() + limit
stop = False
while n < want and not stop:
    left = deadline - time.monotonic()
    if left <= 0:
        break
    ready, _, _ = select.select([s, sys.stdin], [], [], left)
    if sys.stdin in ready:
        stop = True
    try:
        while True:
            _, a = s.recvfrom(2048)
            if not seen[a[1]]:
                seen[a[1]] = 1
                n += 1
    except BlockingIOError:
        pass
print(n, time.monotonic(), flush=True)
"""

# The baseline: what a careful script would do without udpreach.
_STDLIB_SENDER = r"""
import socket, sys, time
src, dst = sys.argv[1], sys.argv[2]
port, first, last = (int(a) for a in sys.argv[3:6])
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
payload = bytes(16)
failed = 0
t0 = time.perf_counter()
for sport in range(first, last + 1):
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.bind((src, sport))
        s.sendto(payload, (dst, port))
    except OSError:
        failed += 1
    finally:
        s.close()
print(f"seconds={time.perf_counter() - t0:.6f} failed={failed}")
"""

# The senders alone, no runner: prints the seconds the send loop took.
_SENDER_ONLY = r"""
import sys, time
from probe.raw import RawSender
from probe.sender import BindSender
from udpreach.core.datagram import TokenCodec
kind, src, dst, port, first, last = sys.argv[1:4] + [int(a) for a in sys.argv[4:7]]
codec = TokenCodec(bytes(32), 16)
batch = [(sp, [(port, codec.encode(port, sp, 1))]) for sp in range(first, last + 1)]
if kind == "bind":
    sender = BindSender(src, dst, linger=0.0)
else:
    sender = RawSender(src, dst)
srcs = [sp for sp, _ in batch]
payloads = codec.encode_block(port, srcs, 1)  # made beforehand, as the list above
t0 = time.perf_counter()
if kind == "raw-many":  # as the runner sends: Blocks of payloads, up to 4096 per batch
    for i in range(0, len(batch), 4096):
        sender.send_cells({port: (srcs[i : i + 4096], payloads[i : i + 4096])})
else:
    for i, (sp, items) in enumerate(batch):
        sender.send_group(sp, items, 0.0)
        if i % 512 == 511:
            sender.reap(time.monotonic())
elapsed = time.perf_counter() - t0
sender.reap(time.monotonic(), everything=True)
sender.close()
print(f"seconds={elapsed:.6f}")
"""


# The kernel's ceiling for comparison: prebuilt raw IPv4/UDP packets through sendmmsg, 1024
# per call, from C (no interpreter in the way). argv: source, destination, destination port.
_KERNEL_REFERENCE_C = Path(__file__).with_name("kernel_ref.c")


def build_kernel_reference(work: Path, bench: Bench) -> Path | None:
    """Compile the C reference sender; None (with a note) where there is no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        bench.results.notes.append("no C compiler: the kernel-ceiling row is missing")
        return None
    source, binary = work / "kernel_ref.c", work / "kernel_ref"
    source.write_text(_KERNEL_REFERENCE_C.read_text())
    try:
        proc = subprocess.run(
            [cc, "-O2", "-o", str(binary), str(source)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        bench.results.notes.append(f"kernel-ceiling reference not built: {exc}")
        return None
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["?"])[0]
        bench.results.notes.append(f"kernel-ceiling reference not built: {first}")
        return None
    return binary


# -- results -----------------------------------------------------------------------------


@dataclass
class Sample:
    """One timed run."""

    seconds: float
    cells: int  # cells (datagrams) the run was about
    delivered: int  # confirmed at the far end (open cells / distinct source ports seen)
    send_rate: float | None = None  # datagrams/s of the send phase, where known
    note: str = ""
    round: int = -1  # which round of ``Bench.alternate`` took it

    @property
    def complete(self) -> bool:
        return self.delivered >= self.cells


@dataclass
class Series:
    """The samples of one measurement."""

    key: str
    label: str
    path: str
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self) -> float | None:
        values = [s.seconds for s in self.samples]
        return statistics.median(values) if values else None

    def median_rate(self) -> float | None:
        rates = [s.send_rate for s in self.samples if s.send_rate]
        return statistics.median(rates) if rates else None

    def cells(self) -> int:
        return self.samples[0].cells if self.samples else 0


@dataclass
class Results:
    series: dict[str, Series] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)  # "probe"/"agent" -> MB
    memory_where: str = ""
    notes: list[str] = field(default_factory=list)

    def get(self, key: str, label: str, path: str) -> Series:
        if key not in self.series:
            self.series[key] = Series(key, label, path)
        return self.series[key]


class BenchError(Exception):
    """A measurement could not be taken (recorded as a failure, the bench goes on)."""


# -- places: loopback or the lab ---------------------------------------------------------


@dataclass
class Place:
    """Where the probe and the agent run, and with which addresses."""

    name: str
    probe_addr: str
    agent_addr: str
    lab: Lab | None = None

    def argv(self, role: Role, argv: list[str]) -> list[str]:
        return self.lab.ns_argv(role, argv) if self.lab is not None else argv


def compile_bytecode() -> None:
    """Byte-compile udpreach as ``pip install`` does; this tree may be an editable install
    run with PYTHONDONTWRITEBYTECODE, which would otherwise recompile on every start."""
    import compileall

    import agent
    import probe
    import udpreach

    for pkg in (udpreach, agent, probe):
        compileall.compile_dir(str(Path(pkg.__file__ or ".").parent), quiet=2, force=False)


def udpreach_cmd() -> list[str]:
    """How to start the CLI: the console script next to this interpreter, if installed."""
    script = Path(sys.executable).with_name("udpreach")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "udpreach"]


def free_ports(addr: str, count: int) -> list[int]:
    """``count`` UDP ports free on ``addr`` right now (the kernel's choice)."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(s)
            s.bind((addr, 0))
        return sorted(int(s.getsockname()[1]) for s in held)
    finally:
        for s in held:
            s.close()


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) / 1024 if m else None


class Stack:
    """A probe (one send mode) and an agent on one place, alive across many runs."""

    def __init__(
        self,
        place: Place,
        mode: str,
        ports: Sequence[int],
        workdir: Path,
        secret: Path,
        rate: int,
        send_mode_supported: bool,
    ) -> None:
        self.place = place
        self.mode = mode
        self.ports = list(ports)
        self.dir = workdir / f"{place.name}-{mode}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.secret = secret
        self.rate = rate
        self.send_mode_supported = send_mode_supported
        self.name = f"bench-{place.name}-{mode}"
        self.endpoint = ""
        self.probe: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.probe_log = self.dir / "probe.log"
        self._log_offset = 0

    def start(self) -> None:
        ready = self.dir / "ready.json"
        place = self.place
        mode_args = ["--send-mode", self.mode] if self.send_mode_supported else []
        argv = [
            *udpreach_cmd(), "probe", "--control", f"{place.probe_addr}:0",
            "--secret-file", str(self.secret), "--db", str(self.dir / "runs.sqlite3"),
            "--source", place.probe_addr, "--ready-file", str(ready),
            "--log-level", "debug", "--max-rate", str(max(self.rate, 1)), *mode_args,
        ]  # fmt: skip
        with self.probe_log.open("wb") as log:
            self.probe = subprocess.Popen(
                place.argv("probe", argv), stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not (ready.exists() and ready.stat().st_size):
            if self.probe.poll() is not None:
                raise BenchError(f"probe ({self.mode}) exited: {self._tail(self.probe_log)}")
            if time.monotonic() > deadline:
                raise BenchError(f"probe ({self.mode}) did not start listening")
            time.sleep(0.05)
        bound = json.loads(ready.read_text())
        self.endpoint = f"{bound['host']}:{bound['port']}"
        agent_argv = [
            *udpreach_cmd(), "agent", "--coordinator", self.endpoint,
            "--secret-file", str(self.secret), "--port", ",".join(map(str, self.ports)),
            "--listen", place.agent_addr, "--name", self.name, "--log-level", "info",
        ]  # fmt: skip
        with (self.dir / "agent.log").open("wb") as log:
            self.agent = subprocess.Popen(
                place.argv("agent", agent_argv), stdout=log, stderr=subprocess.STDOUT
            )

    def sweep(self, dst_count: int, src_ports: str = f"{FIRST_PORT}-{LAST_PORT}") -> Sample:
        """One sweep to the first ``dst_count`` of the agent's ports, timed end to end."""
        dst = ",".join(map(str, self.ports[:dst_count]))
        argv = [
            *udpreach_cmd(), "run", "--coordinator", self.endpoint,
            "--secret-file", str(self.secret), "--agent", self.name, "--wait", "30",
            "--json", "--dst-ports", dst, "--src-ports", src_ports, "--rate", str(self.rate),
        ]  # fmt: skip
        self._log_offset = self.probe_log.stat().st_size if self.probe_log.exists() else 0
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                self.place.argv("probe", argv),
                capture_output=True,
                timeout=RUN_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"udpreach run timed out after {RUN_TIMEOUT:g}s") from None
        seconds = time.monotonic() - t0
        if proc.returncode not in (0, 1):
            err = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise BenchError(f"udpreach run exit {proc.returncode}: {' '.join(err)}")
        try:
            doc = json.loads(proc.stdout)
            summary = doc["summary"]
            cells, opened = int(summary["cells"]), int(summary["open"])
            mode = str(doc.get("probe", {}).get("send_mode", "?"))
        except (ValueError, KeyError, TypeError):
            raise BenchError("udpreach run printed no JSON document") from None
        note = "" if mode == self.mode else f"ran in {mode} mode"
        return Sample(seconds, cells, opened, self._round1_rate(dst_count), note)

    def _round1_rate(self, dst_count: int) -> float | None:
        try:
            with self.probe_log.open("rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return None
        m = _ROUND1.search(text)
        if m is None or float(m.group(2)) <= 0:
            return None
        return int(m.group(1)) * dst_count / float(m.group(2))

    def peak_mb(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, proc in (("probe", self.probe), ("agent", self.agent)):
            if proc is not None and proc.poll() is None:
                mb = _vm_hwm_mb(proc.pid)
                if mb is not None:
                    out[role] = mb
        return out

    def stop(self) -> None:
        for proc in (self.agent, self.probe):
            if proc is not None:
                stop(proc)

    @staticmethod
    def _tail(path: Path) -> str:
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no output"


# -- the plain tools ---------------------------------------------------------------------


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0.0))
        if not ready:
            raise BenchError("receiver did not answer in time")
        chunk = os.read(fd, 1)
        if not chunk:
            raise BenchError("receiver exited early")
        line += chunk
    return line.decode().strip()


def timed_receive(place: Place, port: int, send_argv: list[str], send_timeout: float) -> Sample:
    """Start the counting receiver, then the sender; time from sender start to all received."""
    receiver = subprocess.Popen(
        place.argv(
            "agent",
            [sys.executable, "-c", _RECEIVER, place.agent_addr, str(port), str(SWEEP), "120"],
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        if _read_line(receiver, 15.0) != "ready":
            raise BenchError("receiver did not start")
        t0 = time.monotonic()
        try:
            sender = subprocess.run(
                place.argv("probe", send_argv),
                capture_output=True,
                timeout=send_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"sender timed out after {send_timeout:g}s") from None
        sent_at = time.monotonic()
        own = _SECONDS.search(sender.stdout.decode(errors="replace"))
        send_seconds = float(own.group(1)) if own else sent_at - t0
        # Whatever is still in flight gets a moment; then the receiver is told to stop.
        with contextlib.suppress(subprocess.TimeoutExpired):
            receiver.wait(timeout=1.0)
        if receiver.poll() is None and receiver.stdin is not None:
            receiver.stdin.close()
        count_s, done_s = _read_line(receiver, 10.0).split()
        count, done = int(count_s), float(done_s)
        if count == 0:
            tail = sender.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise BenchError(f"nothing arrived (sender exit {sender.returncode}: {' '.join(tail)})")
        note = ""
        if sender.returncode not in (0, 1):
            note = f"sender exit {sender.returncode}"
        if count < SWEEP:
            done = max(done, sent_at)
            note = f"{SWEEP - count} lost"
        return Sample(done - t0, SWEEP, count, SWEEP / max(send_seconds, 1e-9), note)
    finally:
        if receiver.stdin is not None and not receiver.stdin.closed:
            receiver.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            receiver.wait(timeout=5)
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(timeout=5)
        if receiver.stdout is not None:
            receiver.stdout.close()


def stdlib_baseline(place: Place, port: int) -> Sample:
    argv = [
        sys.executable, "-c", _STDLIB_SENDER, place.probe_addr, place.agent_addr, str(port),
        str(FIRST_PORT), str(LAST_PORT),
    ]  # fmt: skip
    return timed_receive(place, port, argv, RUN_TIMEOUT)


def hping3_run(place: Place, port: int, hping3: str) -> Sample:
    # -s: first source port, incremented per packet; -i u1: 1 microsecond between packets
    # (--flood ignores -c); -a: the probe's address (one of its own); -d 16: payload bytes.
    argv = [
        hping3, "--udp", "-p", str(port), "-s", str(FIRST_PORT), "-c", str(SWEEP),
        "-i", "u1", "-d", "16", "-a", place.probe_addr, "-q", place.agent_addr,
    ]  # fmt: skip
    return timed_receive(place, port, argv, RUN_TIMEOUT)


def sender_only(place: Place, kind: str, port: int) -> Sample:
    argv = [
        sys.executable, "-c", _SENDER_ONLY, kind, place.probe_addr, place.agent_addr,
        str(port), str(FIRST_PORT), str(LAST_PORT),
    ]  # fmt: skip
    return timed_receive(place, port, argv, RUN_TIMEOUT)


# -- the schedule ------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.results = Results()
        self.deadline = time.monotonic() + float(args.deadline)
        self.repeat = int(args.repeat)
        self.rate = int(args.rate)
        self.hping3 = shutil.which("hping3")
        self.send_mode_supported = self._cli_has_send_mode()
        from probe.raw import raw_available

        self.raw_reason = raw_available()
        if self.hping3 is not None and self.raw_reason is not None:
            self.results.notes.append(f"hping3 not run: it needs raw sockets ({self.raw_reason})")
            self.hping3 = None
        if not self.send_mode_supported:
            self.raw_reason = self.raw_reason or "this udpreach has no --send-mode"
        self.modes = ["bind"] if self.raw_reason else ["bind", "raw"]
        self.kernel_ref: Path | None = None

    @staticmethod
    def _cli_has_send_mode() -> bool:
        try:
            out = subprocess.run(
                [*udpreach_cmd(), "probe", "--help"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                env={**os.environ, "COLUMNS": "200"},
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
        return "--send-mode" in out

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def log(self, text: str) -> None:
        self.console.log(text)

    def alternate(self, jobs: Sequence[tuple[Series, Callable[[], Sample]]]) -> None:
        """Run every job ``repeat`` times, rotating the order each round."""
        for rnd in range(self.repeat):
            k = rnd % len(jobs)
            for series, job in [*jobs[k:], *jobs[:k]]:
                if self.out_of_time():
                    series.failures.append("skipped: bench deadline")
                    continue
                try:
                    sample = job()
                except BenchError as exc:
                    series.failures.append(str(exc))
                    self.log(f"[red]{series.path} {series.label}: {exc}")
                    continue
                sample.round = rnd
                series.samples.append(sample)
                extra = f" ({sample.note})" if sample.note else ""
                self.log(
                    f"{series.path:8} {series.label:34} {sample.seconds:7.3f}s "
                    f"{sample.delivered}/{sample.cells}{extra}"
                )

    def run(self) -> Results:
        self.results.notes.append(f"udpreach run --rate {self.rate}; {self.repeat} runs each")
        self.results.notes.append(
            "send rate: for udpreach runs, round 1 of the probe's send phase (its debug log);"
            " for the other rows, the sender's own send loop"
        )
        with tempfile.TemporaryDirectory(prefix="udpreach-bench-") as tmp:
            work = Path(tmp)
            os.chmod(work, 0o700)
            from udpreach.secret import new_secret

            secret = new_secret(work / "secret")
            self.kernel_ref = None if self.raw_reason else build_kernel_reference(work, self)
            compile_bytecode()
            self.help_startup()
            lab_reason = lab_available() if not self.args.skip_lab else "--skip-lab"
            if not self.args.skip_loopback:
                place = Place("loopback", "127.0.0.2", "127.0.0.1")
                self.path(place, work, secret, scale_here=lab_reason is not None)
            if lab_reason is None:
                with Lab.create("") as lab:
                    info = lab.info
                    place = Place("lab", info.probe_addr, info.agent_addr, lab)
                    self.path(place, work, secret, scale_here=True)
            else:
                self.results.notes.append(f"lab skipped: {lab_reason}")
        return self.results

    def help_startup(self) -> None:
        """``udpreach --help``: the stored page (80+ columns), and typer rendering it (a
        narrow terminal), taken in turn."""
        stored = self.results.get("help", "udpreach --help start-up", "-")
        typer = self.results.get(
            "help:typer", "udpreach --help start-up, rendered by typer (60 columns)", "-"
        )
        argv = [*udpreach_cmd(), "--help"]
        if len(argv) > 2:  # `python -m udpreach`: click names it otherwise, typer answers
            self.results.notes.append(
                "no udpreach console script: both --help rows are typer rendering the page"
            )

        def timer(columns: str) -> Callable[[], Sample]:
            env = {**os.environ, "COLUMNS": columns}

            def once() -> Sample:
                t0 = time.monotonic()
                proc = subprocess.run(argv, capture_output=True, timeout=30, env=env, check=False)
                seconds = time.monotonic() - t0
                if proc.returncode != 0:
                    raise BenchError(f"udpreach --help exit {proc.returncode}")
                return Sample(seconds, 1, 1)

            once()  # warm the page cache
            return once

        saved, self.repeat = self.repeat, max(self.repeat, 7)
        try:
            self.alternate([(stored, timer("80")), (typer, timer("60"))])
        finally:
            self.repeat = saved

    def path(self, place: Place, work: Path, secret: Path, *, scale_here: bool) -> None:
        """Every measurement on one path; the fastest mode's agent also serves the scaling."""
        res = self.results
        fast = self.modes[-1]
        if place.lab is None:
            ports = free_ports(place.agent_addr, 16 + len(self.modes))
            receiver_port = ports.pop()
            fast_ports = ports[:16]
            bind_ports = ports[16:17]
        else:
            receiver_port = LAB_RECEIVER_PORT
            fast_ports = list(range(LAB_AGENT_PORT, LAB_AGENT_PORT + 16))
            bind_ports = [LAB_BIND_AGENT_PORT]
        stacks: dict[str, Stack] = {}
        with contextlib.ExitStack() as cleanup:
            for mode in self.modes:
                ports_for = fast_ports if mode == fast else bind_ports
                stack = Stack(
                    place, mode, ports_for, work, secret, self.rate, self.send_mode_supported
                )
                cleanup.callback(stack.stop)
                stack.start()
                stacks[mode] = stack
            p = place.name
            jobs: list[tuple[Series, Callable[[], Sample]]] = []
            for mode, stack in stacks.items():
                series = res.get(f"{p}:udpreach:{mode}", f"udpreach run, {mode} mode", p)
                jobs.append((series, _bind_sweep(stack, 1)))
            fixed = res.get(
                f"{p}:fixed", f"udpreach run, {fast} mode, {FIXED_COST_PORTS} src ports", p
            )
            jobs.append((fixed, _bind_sweep(stacks[fast], 1, FIXED_COST_SPEC)))
            jobs.append(
                (
                    res.get(f"{p}:stdlib", "stdlib bind+sendto+close", p),
                    lambda: stdlib_baseline(place, receiver_port),
                )
            )
            if self.hping3:
                hping3 = self.hping3
                jobs.append(
                    (
                        res.get(f"{p}:hping3", "hping3 -i u1", p),
                        lambda: hping3_run(place, receiver_port, hping3),
                    )
                )
            elif shutil.which("hping3") is None:
                res.notes.append("hping3 not installed: its rows are missing")
            if self.kernel_ref is not None:
                # In the same rotation as udpreach's runs: each round gives a pair of send
                # rates taken seconds apart, robust to this machine's drift (see _paired).
                ref = self.kernel_ref
                jobs.append(
                    (
                        res.get(f"{p}:sender:c", "C sendmmsg raw (kernel ceiling)", p),
                        lambda: timed_receive(
                            place,
                            receiver_port,
                            [str(ref), place.probe_addr, place.agent_addr, str(receiver_port)],
                            RUN_TIMEOUT,
                        ),
                    )
                )
            self.alternate(jobs)

            sender_jobs: list[tuple[Series, Callable[[], Sample]]] = []
            kinds = ["bind"] + ([] if self.raw_reason else ["raw-group", "raw-many"])
            for kind in kinds:
                label = {
                    "bind": "BindSender.send_group alone",
                    "raw-group": "RawSender.send_group alone",
                    "raw-many": "RawSender.send_cells alone",
                }[kind]
                sender_jobs.append(
                    (
                        res.get(f"{p}:sender:{kind}", label, p),
                        _bind_sender(place, kind, receiver_port),
                    )
                )
            self.alternate(sender_jobs)

            if scale_here:
                stack = stacks[fast]
                scale_jobs = [
                    (
                        res.get(f"scale:{n}", f"udpreach run, {fast}, {n} dst port(s)", p),
                        _bind_sweep(stack, n),
                    )
                    for n in SCALE_PORTS
                ]
                self.alternate(scale_jobs)
                if scale_jobs[-1][0].samples:  # the peak means something only after them
                    res.memory = stack.peak_mb()
                    res.memory_where = f"{p}, {fast} mode, after {SCALE_PORTS[-1]}-port sweeps"
                else:
                    res.notes.append("peak memory not measured: no 16-port sweep completed")


def _bind_sweep(stack: Stack, n: int, src_ports: str | None = None) -> Callable[[], Sample]:
    if src_ports is None:
        return lambda: stack.sweep(n)
    return lambda: stack.sweep(n, src_ports)


def _bind_sender(place: Place, kind: str, port: int) -> Callable[[], Sample]:
    return lambda: sender_only(place, kind, port)


# -- the report --------------------------------------------------------------------------


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value / 1000:,.0f}k/s"


def _ratio(a: Series | None, b: Series | None) -> float | None:
    if a is None or b is None:
        return None
    ma, mb = a.median(), b.median()
    if ma is None or mb is None or mb <= 0:
        return None
    return ma / mb


def render(results: Results, console: Console) -> None:
    table = Table(title="udpreach bench: medians of alternating runs", show_lines=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("path", "left"),
        ("measurement", "left"),
        ("median", "right"),
        ("us/cell", "right"),
        ("send rate", "right"),
        ("delivered", "right"),
        ("runs", "right"),
        ("min-max", "right"),
        ("notes", "left"),
    )
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for series in results.series.values():
        median = series.median()
        cells = series.cells()
        per_cell = f"{median / cells * 1e6:.1f}" if median is not None and cells > 1 else "-"
        values = [s.seconds for s in series.samples]
        spread = f"{min(values):.3f}-{max(values):.3f}" if values else "-"
        delivered = f"{min(s.delivered for s in series.samples)}/{cells}" if series.samples else "-"
        notes = sorted({s.note for s in series.samples if s.note} | set(series.failures[:2]))
        table.add_row(
            series.path,
            series.label,
            _fmt_s(median),
            per_cell,
            _fmt_rate(series.median_rate()),
            delivered if cells > 1 else "-",
            f"{len(series.samples)}",
            spread,
            "; ".join(notes)[:80],
        )
    console.print(table)

    s = results.series
    ratios = Table(title="ratios of medians")
    ratios.add_column("path")
    ratios.add_column("ratio")
    ratios.add_column("value", justify="right")
    for path in ("loopback", "lab"):
        raw, bind = s.get(f"{path}:udpreach:raw"), s.get(f"{path}:udpreach:bind")
        stdlib, hping = s.get(f"{path}:stdlib"), s.get(f"{path}:hping3")
        pairs = [
            ("udpreach raw / stdlib baseline", raw, stdlib),
            ("udpreach bind / stdlib baseline", bind, stdlib),
            ("udpreach raw / udpreach bind", raw, bind),
            ("udpreach (best) / hping3", raw or bind, hping),
            ("hping3 / stdlib baseline", hping, stdlib),
        ]
        for name, a, b in pairs:
            value = _ratio(a, b)
            if value is not None:
                ratios.add_row(path, name, f"{value:.2f}")
        # The send phase against what C gets out of the same kernel on the same path.
        ceiling = s.get(f"{path}:sender:c")
        pairs_c = _paired(raw, ceiling)
        if pairs_c:
            ratios.add_row(
                path,
                "send rate: udpreach raw, 1 port / C sendmmsg (median of same-round pairs)",
                f"{statistics.median(pairs_c):.2f} ({min(pairs_c):.2f}-{max(pairs_c):.2f})",
            )
        senders = [
            (f"udpreach raw, {n} port{'s' if n > 1 else ''}", s.get(f"scale:{n}"))
            for n in SCALE_PORTS
        ]
        for name, ser in senders:
            value = _rate_ratio(ser, ceiling) if ser is not None and ser.path == path else None
            if value is not None:
                ratios.add_row(path, f"send rate: {name} / C sendmmsg (medians)", f"{value:.2f}")
    # A run's fixed costs (process start, handshakes, settling) dominate one port; the
    # marginal cost of a further cell is what must stay flat as ports are added.
    scale = [(n, ser) for n in SCALE_PORTS if (ser := s.get(f"scale:{n}")) and ser.median()]
    for (n_a, a), (n_b, b) in pairwise(scale):
        ma, mb = a.median() or 0.0, b.median() or 0.0
        extra = b.cells() - a.cells()
        if extra > 0:
            ratios.add_row(
                b.path,
                f"marginal us/cell, {n_a} -> {n_b} ports",
                f"{(mb - ma) / extra * 1e6:.1f}",
            )
    if len(scale) >= 2:
        first, last = scale[0][1], scale[-1][1]
        per_first = (first.median() or 0.0) / max(first.cells(), 1)
        per_last = (last.median() or 0.0) / max(last.cells(), 1)
        if per_first > 0:
            ratios.add_row(
                last.path,
                f"us/cell, {scale[-1][0]} ports / {scale[0][0]} port",
                f"{per_last / per_first:.2f}",
            )
    console.print(ratios)

    targets = Table(title="targets")
    targets.add_column("target")
    targets.add_column("measured", justify="right")
    targets.add_column("verdict")

    def judge(name: str, value: float | None, ok: Callable[[float], bool], shown: str) -> None:
        if value is None:
            targets.add_row(name, "not measured", "[yellow]n/a")
        else:
            targets.add_row(name, shown, "[green]PASS" if ok(value) else "[red]MISS")

    lab_best = s.get("lab:udpreach:raw") or s.get("lab:udpreach:bind")
    ratio = _ratio(lab_best, s.get("lab:stdlib"))
    judge(
        f"lab end to end / stdlib baseline <= {TARGET_LAB_RATIO:g}",
        ratio,
        lambda v: v <= TARGET_LAB_RATIO,
        f"{ratio:.2f}" if ratio is not None else "",
    )
    rates = [
        r
        for key in (
            "lab:udpreach:raw",
            "loopback:udpreach:raw",
            *(f"scale:{n}" for n in SCALE_PORTS),
        )
        if (ser := s.get(key)) is not None and "raw" in ser.label
        if (r := ser.median_rate()) is not None
    ]
    raw_rate = max(rates) if rates else None
    # Shown beside the fastest rate C itself reached here: where that is below the target
    # too, the machine cannot meet it, and the share of C below is what says something.
    c_rates = [r for p in ("lab", "loopback") if (r := _median_rate(s.get(f"{p}:sender:c")))]
    c_best = f" (C: {_fmt_rate(max(c_rates))})" if c_rates else ""
    judge(
        f"raw send phase >= {TARGET_RAW_RATE / 1000:.0f}k/s (probe log, round 1)",
        raw_rate,
        lambda v: v >= TARGET_RAW_RATE,
        _fmt_rate(raw_rate) + c_best,
    )
    pairs_c = _paired(s.get("lab:udpreach:raw"), s.get("lab:sender:c"))
    one_port = statistics.median(pairs_c) if pairs_c else None
    judge(
        f"raw send phase >= {TARGET_C_SHARE:.0%} of C sendmmsg (lab, 1 port, same-round pairs)",
        one_port,
        lambda v: v >= TARGET_C_SHARE,
        f"{one_port:.0%} ({min(pairs_c):.0%}-{max(pairs_c):.0%})" if pairs_c else "",
    )
    helps = s.get("help")
    help_s = helps.median() if helps else None
    judge(
        f"udpreach --help < {TARGET_HELP_SECONDS * 1000:.0f} ms",
        help_s,
        lambda v: v < TARGET_HELP_SECONDS,
        f"{help_s * 1000:.0f} ms" if help_s is not None else "",
    )
    agent_mb = results.memory.get("agent")
    judge(
        f"agent peak memory < {TARGET_AGENT_MB:.0f} MB (16 x 64,512 cells)",
        agent_mb,
        lambda v: v < TARGET_AGENT_MB,
        f"{agent_mb:.1f} MB" if agent_mb is not None else "",
    )
    console.print(targets)
    if results.memory:
        mem = ", ".join(f"{role} {mb:.1f} MB" for role, mb in sorted(results.memory.items()))
        console.print(f"peak memory (VmHWM), {results.memory_where}: {mem}")
    for note in dict.fromkeys(results.notes):  # in order, once each
        console.print(f"note: {note}")


def _paired(a: Series | None, b: Series | None) -> list[float]:
    """Send rate of ``a`` over that of ``b`` for each round of the rotation both have a
    sample of (the two runs of a pair are seconds apart: slow drift of the machine's
    speed, up to 40% here, cancels out of each ratio where it would not out of medians)."""
    if a is None or b is None:
        return []
    rates_b = {x.round: x.send_rate for x in b.samples if x.send_rate}
    return [
        x.send_rate / rb
        for x in a.samples
        if x.send_rate and (rb := rates_b.get(x.round)) and x.round >= 0
    ]


def _median_rate(a: Series | None) -> float | None:
    return a.median_rate() if a is not None else None


def _rate_ratio(a: Series | None, b: Series | None) -> float | None:
    """Ratio of the median send rates of two series, if both have one."""
    ra = a.median_rate() if a is not None else None
    rb = b.median_rate() if b is not None else None
    return ra / rb if ra and rb else None


def to_json(results: Results) -> dict[str, Any]:
    return {
        "schema": "udpreach/bench-v1",
        "series": {
            key: {
                "label": s.label,
                "path": s.path,
                "median_seconds": s.median(),
                "median_send_rate": s.median_rate(),
                "samples": [
                    {
                        "seconds": x.seconds,
                        "cells": x.cells,
                        "delivered": x.delivered,
                        "send_rate": x.send_rate,
                        "round": x.round,
                        "note": x.note,
                    }
                    for x in s.samples
                ],
                "failures": s.failures,
            }
            for key, s in results.series.items()
        },
        "memory_mb": results.memory,
        "notes": results.notes,
    }


# -- entry point -------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: processes stop, the lab goes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (>= 1)")
    parser.add_argument(
        "--rate", type=int, default=1_000_000, help="udpreach run --rate (datagrams/s)"
    )
    parser.add_argument("--skip-lab", action="store_true", help="loopback only")
    parser.add_argument("--skip-loopback", action="store_true", help="lab only")
    parser.add_argument("--json", type=Path, default=None, help="also write the samples here")
    parser.add_argument(
        "--deadline", type=float, default=BENCH_DEADLINE, help="seconds before skipping the rest"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.rate < 1:
        parser.error("--repeat and --rate must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    signal.signal(signal.SIGTERM, _on_sigterm)
    bench = Bench(args, console)
    if bench.raw_reason:
        bench.results.notes.append(f"raw mode not measured: {bench.raw_reason}")
    if args.repeat < 5:
        bench.results.notes.append(f"only {args.repeat} runs each (at least 5 for a report)")
    started = time.monotonic()
    try:
        results = bench.run()
    except KeyboardInterrupt:
        console.print("[red]interrupted: partial results")
        results = bench.results
    console.print()
    render(results, console)
    console.print(f"bench took {time.monotonic() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
