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
CAP_NET_RAW allows), with ``--max-rate`` and ``--max-bytes-rate`` at the bench's
``--rate`` (the default byte ceiling, a tenth of a gigabit, would hold 44-byte datagrams to
284k/s and make every batch smaller than the datagram ceiling does), and these alternate:

* ``udpreach run --json`` for a full sweep (1024-65535) to one port, timed from the CLI
  process's start to its exit with the verdicts printed, in each send mode;
* the baseline: a plain stdlib sender (bind + sendto + close per source port) against a
  plain receiver that counts distinct source ports and stops when all 64,512 arrived;
* hping3 sending the same 64,512 datagrams (``--udp -s 1024 -c 64512 -i u1``), when
  installed, against the same receiver;
* the kernel's ceiling: C sending prebuilt raw packets through ``sendmmsg``
  (``kernel_ref.c``), against the same receiver. Each round of the rotation pairs its send
  rate with udpreach's raw run of that round, seconds apart, and the share of C is judged on
  the median of those pairs' ratios: the machine's speed drifts too much over a bench for a
  ratio of medians.

Then, on the lab (or loopback without root), the fastest mode's agent listens on 16 ports
and sweeps to 1, 4 and 16 of them alternate: the cost per cell should stay flat. The peak
memory (VmHWM) of that probe and agent is read from /proc before they stop.

The **policer rows** (lab only): the router polices all UDP from the probe at N datagrams
per second with a burst of 5 packets (``limit rate over N/second burst 5 packets drop``),
and a full sweep to one port runs through it, for N = 5,000 and 50,000, alternating with the
same sweep without the policer. The physical minimum is 64,512/N seconds; the run's fixed
cost is the unpoliced sweep's median; the ratio is a run's time over their sum. The run
document says what the pacer found (``loss.limiter_rate``, ``loss.rate_backoffs``), and
every cell must come out open (the policy drops nothing for good): a cell that does not is
a wrong verdict, counted.

The send phase's own rate is read from the probe's debug log: the bench starts the probe
through ``bench.probe_hook``, which logs one line per stage of the engine as it settles
(datagrams sent, from the stage's start to its last datagram). A sender-only measurement
(RawSender/BindSender in a bare process, no engine) shows how much of that rate the engine
keeps. Finally ``udpreach --help`` start-up time.

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

from bench.probe_hook import StageRecord, parse_stage_lines
from udpreach.core.errors import UdpreachError
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
BENCH_DEADLINE = 30 * 60.0
POLICER_RATES = (5_000, 50_000)  # datagrams/s the router lets through (issue 14, item 7)
POLICER_BURST = 5  # packets: a policer's burst allowance is often a handful
BENCH_DATAGRAM_BYTES = 16 + 48  # the bench's payload and the larger (IPv6) headers
SECTIONS = ("help", "loopback", "lab", "senders", "scale", "policer")

# Targets the report is judged against (printed PASS/MISS; the bench never fails on them).
# Issue 13 ("must not regress") and issue 14, item 7 ("as fast as the path allows").
TARGET_LAB_RATIO = 0.6  # lab end to end (raw) / stdlib baseline
TARGET_BIND_RATIO = 1.0  # bind mode end to end / stdlib baseline (the unprivileged path)
TARGET_C_SHARE = 0.90  # send phase / C sendmmsg, same-round pairs
TARGET_US_PER_CELL_16 = 5.0  # "16 destination ports at about 5 us per cell"
US_PER_CELL_SLACK = 1.1  # "about": within 10%
TARGET_POLICER_RATIO = 1.5  # time / (64,512/N + the fixed cost)
TARGET_HELP_SECONDS = 0.150
TARGET_AGENT_MB = 100.0

_SECONDS = re.compile(r"seconds=([0-9.]+)")

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

# The senders alone, no engine: prints the seconds the send loop took. "raw-many" and
# "bind" send as the runner does: groups of (dst, source ports, payloads), a batch per
# BATCH_SECONDS of sending at the run's rate (the pacer's batch); the payloads are made
# beforehand. "raw-group" sends one source port's group per call.
_SENDER_ONLY = r"""
import sys, time
import numpy as np
from probe.raw import RawSender
from probe.sender import BindSender
from udpreach.core.datagram import TokenCodec
from udpreach.core.pacing import BATCH_SECONDS
kind, src, dst = sys.argv[1:4]
port, first, last, rate = (int(a) for a in sys.argv[4:8])
codec = TokenCodec(bytes(32), 16)
srcs = np.arange(first, last + 1, dtype=np.intp)
if kind == "bind":
    sender = BindSender(src, dst, linger=0.0)
else:
    sender = RawSender(src, dst)
if kind in ("raw-many", "bind"):
    payloads = codec.encode_block(port, srcs, 1)
    step = max(1, int(rate * BATCH_SECONDS))
    t0 = time.perf_counter()
    for i in range(0, len(srcs), step):
        sender.send_cells([(port, srcs[i : i + step], payloads[i : i + step])], 0.0)
        if kind == "bind":
            sender.reap(time.monotonic())
else:
    batch = [(sp, [(port, codec.encode(port, sp, 1))]) for sp in srcs.tolist()]
    t0 = time.perf_counter()
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
    # From a udpreach run's document (None for the other tools):
    wrong: int | None = None  # cells not open, where the policy lets everything through
    sent: int | None = None  # datagrams the run sent (probe_stats.sent)
    limiter: float | None = None  # loss.limiter_rate: the policer's rate the pacer found
    backoffs: int | None = None  # loss.rate_backoffs
    rounds: int | None = None  # probe_stats.rounds

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


def probe_cmd() -> list[str]:
    """How to start the probe: ``udpreach`` through ``bench.probe_hook``, which adds the
    engine's stage lines to its debug log (see there)."""
    return [sys.executable, "-m", "bench.probe_hook"]


def _hook_env() -> dict[str, str]:
    """The environment the probe starts in: ``bench`` importable from any directory (it is
    not installed; ``ip netns exec`` keeps the environment)."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
        probe_args: Sequence[str] = (),
    ) -> None:
        self.place = place
        self.mode = mode
        self.ports = list(ports)
        self.dir = workdir / f"{place.name}-{mode}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.secret = secret
        self.rate = rate
        self.send_mode_supported = send_mode_supported
        self.probe_args = list(probe_args)
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
            *probe_cmd(), "probe", "--control", f"{place.probe_addr}:0",
            "--secret-file", str(self.secret), "--db", str(self.dir / "runs.sqlite3"),
            "--source", place.probe_addr, "--ready-file", str(ready),
            "--log-level", "debug", "--max-rate", str(max(self.rate, 1)), *mode_args,
            *self.probe_args,
        ]  # fmt: skip
        with self.probe_log.open("wb") as log:
            self.probe = subprocess.Popen(
                place.argv("probe", argv), stdout=log, stderr=subprocess.STDOUT, env=_hook_env()
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
            run_id = str(doc["run_id"])
        except (ValueError, KeyError, TypeError):
            raise BenchError("udpreach run printed no JSON document") from None
        loss = doc.get("loss") or {}
        stats = doc.get("probe_stats") or {}
        notes = [] if mode == self.mode else [f"ran in {mode} mode"]
        if cells != opened:  # every path of the bench lets everything through
            notes.append(f"{cells - opened} wrong")
        limiter = loss.get("limiter_rate")
        return Sample(
            seconds,
            cells,
            opened,
            self._round1_rate(run_id),
            "; ".join(notes),
            wrong=cells - opened,
            sent=_int_or_none(stats.get("sent")),
            limiter=float(limiter) if isinstance(limiter, int | float) else None,
            backoffs=_int_or_none(loss.get("rate_backoffs")),
            rounds=_int_or_none(stats.get("rounds")),
        )

    def _round1_rate(self, run_id: str) -> float | None:
        """The send phase's rate: round 1 of the sweep, from the probe's stage lines."""
        for rec in self.stages(run_id):
            if rec.stage == "sweep" and rec.round == 1 and rec.send_seconds > 0:
                return rec.sent / rec.send_seconds
        return None

    def stages(self, run_id: str) -> list[StageRecord]:
        """The stage lines the probe logged for ``run_id`` (see ``bench.probe_hook``)."""
        try:
            with self.probe_log.open("rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return []
        return [r for r in parse_stage_lines(text) if r.run_id == run_id]

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


def sender_only(place: Place, kind: str, port: int, rate: int) -> Sample:
    argv = [
        sys.executable, "-c", _SENDER_ONLY, kind, place.probe_addr, place.agent_addr,
        str(port), str(FIRST_PORT), str(LAST_PORT), str(rate),
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
        self.sections = set(args.only or SECTIONS)
        self.hping3 = shutil.which("hping3")
        probe_help = self._probe_help()
        self.send_mode_supported = "--send-mode" in probe_help
        # The probe's byte-rate ceiling (default a tenth of a gigabit: 284k datagrams/s of
        # 44 bytes) would cap the sweeps below --rate and make their batches 3.5 times
        # smaller than the datagram ceiling does. The bench measures at the datagram ceiling
        # alone, as it did before the byte ceiling existed: that ceiling in bytes.
        self.probe_args: list[str] = []
        if "--max-bytes-rate" in probe_help:
            self.probe_args = ["--max-bytes-rate", str(self.rate * BENCH_DATAGRAM_BYTES)]
            self.results.notes.append(
                f"probe --max-bytes-rate {self.rate * BENCH_DATAGRAM_BYTES} (--max-rate in "
                f"{BENCH_DATAGRAM_BYTES}-byte datagrams; the default caps 44-byte ones at 284k/s)"
            )
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
    def _probe_help() -> str:
        try:
            return subprocess.run(
                [*udpreach_cmd(), "probe", "--help"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                env={**os.environ, "COLUMNS": "200"},
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def log(self, text: str) -> None:
        self.console.log(text)

    def alternate(self, jobs: Sequence[tuple[Series, Callable[[], Sample]]]) -> None:
        """Run every job ``repeat`` times, rotating the order each round."""
        for rnd in range(self.repeat):
            self.log(f"round {rnd + 1} of {self.repeat}: load {_load()}")
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
            "send rate: for udpreach runs, round 1 of the sweep (the probe's stage lines, "
            "bench.probe_hook); for the other rows, the sender's own send loop"
        )
        self.results.notes.append(f"load before: {_load()}")
        with contextlib.ExitStack() as keep:
            if self.args.keep is None:
                work = Path(keep.enter_context(tempfile.TemporaryDirectory(prefix="udpreach-")))
            else:
                work = self.args.keep
                work.mkdir(parents=True, exist_ok=True)
            os.chmod(work, 0o700)
            from udpreach.secret import new_secret

            secret = new_secret(work / "secret")
            wants_c = "loopback" in self.sections or "lab" in self.sections
            if not self.raw_reason and wants_c:
                self.kernel_ref = build_kernel_reference(work, self)
            compile_bytecode()
            if "help" in self.sections:
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
        self.results.notes.append(f"load after: {_load()}")
        return self.results

    def help_startup(self) -> None:
        """``udpreach --help`` at 80 and at 60 columns, taken in turn (typer renders both;
        before the help pages were rendered by typer, the 80-column one was a stored page)."""
        wide = self.results.get("help", "udpreach --help start-up (80 columns)", "-")
        narrow = self.results.get("help:typer", "udpreach --help start-up (60 columns)", "-")
        argv = [*udpreach_cmd(), "--help"]
        if len(argv) > 2:  # `python -m udpreach`: no console script
            self.results.notes.append("no udpreach console script: --help ran as python -m")

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
            self.alternate([(wide, timer("80")), (narrow, timer("60"))])
        finally:
            self.repeat = saved

    def path(self, place: Place, work: Path, secret: Path, *, scale_here: bool) -> None:
        """Every measurement on one path; the fastest mode's agent also serves the scaling
        and (in the lab) the policer rows."""
        fast = self.modes[-1]
        p = place.name
        runs_here = p in self.sections
        scale_here = scale_here and "scale" in self.sections
        policer_here = place.lab is not None and "policer" in self.sections
        senders_here = "senders" in self.sections
        if not (runs_here or scale_here or policer_here or senders_here):
            return
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
            for mode in self.modes if runs_here else [fast]:
                ports_for = fast_ports if mode == fast else bind_ports
                stack = Stack(
                    place,
                    mode,
                    ports_for,
                    work,
                    secret,
                    self.rate,
                    self.send_mode_supported,
                    self.probe_args,
                )
                cleanup.callback(stack.stop)
                stack.start()
                stacks[mode] = stack
            if runs_here:
                self.end_to_end(place, stacks, receiver_port)
            if senders_here:
                self.senders(place, receiver_port)
            if scale_here:
                self.scale(stacks[fast])
            if policer_here:
                assert place.lab is not None
                self.policer(place.lab, stacks[fast])

    def end_to_end(self, place: Place, stacks: dict[str, Stack], receiver_port: int) -> None:
        """udpreach in each mode, its fixed cost, and the plain tools, alternating."""
        res = self.results
        p = place.name
        fast = self.modes[-1]
        jobs: list[tuple[Series, Callable[[], Sample]]] = []
        for mode, stack in stacks.items():
            series = res.get(f"{p}:udpreach:{mode}", f"udpreach run, {mode} mode", p)
            jobs.append((series, _bind_sweep(stack, 1)))
        fixed = res.get(f"{p}:fixed", f"udpreach run, {fast} mode, {FIXED_COST_PORTS} src ports", p)
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

    def senders(self, place: Place, receiver_port: int) -> None:
        """The senders alone, in a bare process: what the engine and runner keep of them."""
        p = place.name
        jobs: list[tuple[Series, Callable[[], Sample]]] = []
        kinds = ["bind"] + ([] if self.raw_reason else ["raw-group", "raw-many"])
        for kind in kinds:
            label = {
                "bind": "BindSender.send_cells alone",
                "raw-group": "RawSender.send_group alone",
                "raw-many": "RawSender.send_cells alone",
            }[kind]
            jobs.append(
                (
                    self.results.get(f"{p}:sender:{kind}", label, p),
                    _bind_sender(place, kind, receiver_port, self.rate),
                )
            )
        self.alternate(jobs)

    def scale(self, stack: Stack) -> None:
        """Sweeps to 1, 4 and 16 destination ports, alternating; then peak memory."""
        res = self.results
        p = stack.place.name
        jobs = [
            (
                res.get(f"scale:{n}", f"udpreach run, {stack.mode}, {n} dst port(s)", p),
                _bind_sweep(stack, n),
            )
            for n in SCALE_PORTS
        ]
        self.alternate(jobs)
        if jobs[-1][0].samples:  # the peak means something only after them
            res.memory = stack.peak_mb()
            res.memory_where = f"{p}, {stack.mode} mode, after {SCALE_PORTS[-1]}-port sweeps"
        else:
            res.notes.append("peak memory not measured: no 16-port sweep completed")

    def policer(self, lab: Lab, stack: Stack) -> None:
        """A full sweep through the router policing the probe's UDP at N/s, for each N,
        alternating with the same sweep unpoliced (the run's fixed cost)."""
        res = self.results
        jobs: list[tuple[Series, Callable[[], Sample]]] = [
            (
                res.get("policer:none", f"udpreach run, {stack.mode}, no policer", "lab"),
                _policed(lab, stack, None),
            )
        ]
        for n in POLICER_RATES:
            jobs.append(
                (
                    res.get(
                        f"policer:{n}",
                        f"udpreach run, {stack.mode}, policer {n:,}/s burst {POLICER_BURST}",
                        "lab",
                    ),
                    _policed(lab, stack, n),
                )
            )
        self.alternate(jobs)


def policer_policy(rate: int, probe_addr: str) -> str:
    """The router's forward rule policing all UDP from the probe at ``rate``/s."""
    family = "ip6" if ":" in probe_addr else "ip"
    return (
        f"{family} saddr {probe_addr} meta l4proto udp "
        f"limit rate over {rate}/second burst {POLICER_BURST} packets drop"
    )


def policed_sweep(lab: Lab, stack: Stack, rate: int | None) -> Sample:
    """One full sweep to one port with the policer at ``rate`` (None: no policer); the
    router's policy is empty again afterwards, whatever happened."""
    try:
        lab.load_policy(policer_policy(rate, stack.place.probe_addr) if rate else "")
    except UdpreachError as exc:
        raise BenchError(f"policy not loaded: {exc}") from None
    try:
        return stack.sweep(1)
    finally:
        if rate:
            lab.load_policy("")


def _load() -> str:
    """The load averages (1, 5, 15 min) and the CPU count, as ``uptime`` says them."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def _bind_sweep(stack: Stack, n: int, src_ports: str | None = None) -> Callable[[], Sample]:
    if src_ports is None:
        return lambda: stack.sweep(n)
    return lambda: stack.sweep(n, src_ports)


def _bind_sender(place: Place, kind: str, port: int, rate: int) -> Callable[[], Sample]:
    return lambda: sender_only(place, kind, port, rate)


def _policed(lab: Lab, stack: Stack, rate: int | None) -> Callable[[], Sample]:
    return lambda: policed_sweep(lab, stack, rate)


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
    for n, ser in scale:
        rate = ser.median_rate()
        if rate:
            ratios.add_row(ser.path, f"send phase us/cell, {n} port(s)", f"{1e6 / rate:.1f}")
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
    policer = policer_rows(results)
    if policer:
        table = Table(title="policer rows (lab): a full sweep through a policer of N/s, burst 5")
        for col in (
            "N/s",
            "median",
            "min-max",
            "physical min",
            "fixed cost",
            "ratio",
            "limiter_rate",
            "rate_backoffs",
            "sent",
            "rounds",
            "wrong cells",
            "runs",
        ):
            table.add_column(col, justify="left" if col == "N/s" else "right")
        for row in policer:
            table.add_row(
                f"{row.rate:,}",
                _fmt_s(row.median),
                row.spread,
                _fmt_s(row.minimum),
                _fmt_s(row.fixed),
                f"{row.ratio:.2f}" if row.ratio is not None else "-",
                row.limiters,
                row.backoffs,
                row.sent,
                row.rounds,
                f"{row.wrong}" + (f" of {row.cells:,}" if row.cells else ""),
                f"{row.runs}",
            )
        console.print(table)
    render_targets(results, console, policer)


@dataclass
class PolicerRow:
    """One policer rate's runs, judged against the physical minimum and the fixed cost."""

    rate: int
    median: float | None
    spread: str
    minimum: float
    fixed: float | None
    ratio: float | None
    limiters: str
    backoffs: str
    sent: str
    rounds: str
    wrong: int
    cells: int
    runs: int


def _values(values: Sequence[float | int | None], fmt: Callable[[float], str]) -> str:
    """A median and range of what the runs reported ("-" where none did)."""
    have = [float(v) for v in values if v is not None]
    if not have:
        return "-"
    lo, hi = min(have), max(have)
    mid = fmt(statistics.median(have))
    return mid if lo == hi else f"{mid} ({fmt(lo)}-{fmt(hi)})"


def policer_rows(results: Results) -> list[PolicerRow]:
    """The policer rows: each N's median time over 64,512/N plus the fixed cost (the median
    of the same sweep without the policer, in the same rotation)."""
    s = results.series
    none = s.get("policer:none")
    fixed = none.median() if none is not None else None
    rows = []
    for n in POLICER_RATES:
        ser = s.get(f"policer:{n}")
        if ser is None or not (ser.samples or ser.failures):
            continue
        median = ser.median()
        cells = ser.cells() or SWEEP
        minimum = cells / n
        ratio = median / (minimum + fixed) if median is not None and fixed is not None else None
        values = [x.seconds for x in ser.samples]
        rows.append(
            PolicerRow(
                rate=n,
                median=median,
                spread=f"{min(values):.2f}-{max(values):.2f}" if values else "-",
                minimum=minimum,
                fixed=fixed,
                ratio=ratio,
                limiters=_values([x.limiter for x in ser.samples], lambda v: f"{v:,.0f}"),
                backoffs=_values([x.backoffs for x in ser.samples], lambda v: f"{v:.0f}"),
                sent=_values([x.sent for x in ser.samples], lambda v: f"{v:,.0f}"),
                rounds=_values([x.rounds for x in ser.samples], lambda v: f"{v:.0f}"),
                wrong=sum(x.wrong or 0 for x in ser.samples),
                cells=sum(x.cells for x in ser.samples),
                runs=len(ser.samples),
            )
        )
    return rows


def render_targets(results: Results, console: Console, policer: list[PolicerRow]) -> None:
    s = results.series
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
    pairs_c = _paired(s.get("lab:udpreach:raw"), s.get("lab:sender:c"))
    one_port = statistics.median(pairs_c) if pairs_c else None
    judge(
        f"raw send phase >= {TARGET_C_SHARE:.0%} of C sendmmsg (lab, 1 port, same-round pairs)",
        one_port,
        lambda v: v >= TARGET_C_SHARE,
        f"{one_port:.0%} ({min(pairs_c):.0%}-{max(pairs_c):.0%})" if pairs_c else "",
    )
    sixteen = s.get(f"scale:{SCALE_PORTS[-1]}")
    per_cell = None
    if sixteen is not None and (m := sixteen.median()) is not None and sixteen.cells():
        per_cell = m / sixteen.cells() * 1e6
    judge(
        f"{SCALE_PORTS[-1]} dst ports: about {TARGET_US_PER_CELL_16:g} us/cell end to end "
        f"(<= {TARGET_US_PER_CELL_16 * US_PER_CELL_SLACK:.1f})",
        per_cell,
        lambda v: v <= TARGET_US_PER_CELL_16 * US_PER_CELL_SLACK,
        f"{per_cell:.1f} us" if per_cell is not None else "",
    )
    for path in ("lab", "loopback"):
        bind = _ratio(s.get(f"{path}:udpreach:bind"), s.get(f"{path}:stdlib"))
        judge(
            f"{path}: bind mode end to end / stdlib baseline <= {TARGET_BIND_RATIO:g}",
            bind,
            lambda v: v <= TARGET_BIND_RATIO,
            f"{bind:.2f}" if bind is not None else "",
        )
    for row in policer:
        limit = TARGET_POLICER_RATIO
        judge(
            f"policer {row.rate:,}/s: time / (64,512/N + fixed cost) <= {limit:g}",
            row.ratio,
            lambda v: v <= TARGET_POLICER_RATIO,
            f"{row.ratio:.2f}" if row.ratio is not None else "",
        )
    if policer:
        wrong = sum(row.wrong for row in policer)
        judge(
            "policer runs: zero wrong cells (every cell open)",
            float(wrong),
            lambda v: v == 0,
            f"{wrong} of {sum(row.cells for row in policer):,}",
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
        "schema": "udpreach/bench-v2",
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
                        "wrong": x.wrong,
                        "sent": x.sent,
                        "limiter_rate": x.limiter,
                        "rate_backoffs": x.backoffs,
                        "rounds": x.rounds,
                    }
                    for x in s.samples
                ],
                "failures": s.failures,
            }
            for key, s in results.series.items()
        },
        "policer": [
            {
                "rate": row.rate,
                "median_seconds": row.median,
                "physical_minimum": row.minimum,
                "fixed_cost": row.fixed,
                "ratio": row.ratio,
                "wrong": row.wrong,
            }
            for row in policer_rows(results)
        ],
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
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=None,
        help="measure only these sections: help, the end-to-end rotation on loopback or in "
        "the lab, the senders alone, the 1/4/16-port scaling, the policer rows (lab)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the samples here")
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="work in this directory and keep it (the probes' and agents' logs)",
    )
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
