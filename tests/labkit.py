"""Test helpers for the real-firewall lab (`udpreach.lab`).

- `make_lab(policy, ipv6=False)`: a lab for one test, torn down whatever happens; skips the
  test, with the reason, where the lab cannot be built (not root, no nft, no namespaces).
- `exchange(lab, src_ports, ...)`: sends one datagram per source port from the probe's
  namespace to the agent's with plain sockets and reports, per source port, whether it
  arrived (and from which address and port) or which ICMP error came back to the sender.
- `expand_verdicts(doc)`: a ``udpreach/run-v1`` JSON document's ``ranges`` as per-cell
  verdicts; `mismatches(actual, expected_fn)`: where they differ from a policy's ground
  truth, as ranges.
- `demo_expected` / `demo_translated`: the ground truth of the bundled ``demo.nft``.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from udpreach.lab import Lab, lab_available

Cell = tuple[int, int]  # (dst_port, src_port)


def skip_without_lab() -> None:
    """Skip the calling test, with the reason, unless the lab can be built here."""
    reason = lab_available()
    if reason is not None:
        pytest.skip(f"real-firewall lab unavailable: {reason}")


@contextmanager
def make_lab(policy: str = "", *, ipv6: bool = False) -> Iterator[Lab]:
    """A fresh lab for the body of the ``with``; destroyed on the way out, always."""
    skip_without_lab()
    lab = Lab.create(policy, ipv6=ipv6)
    try:
        yield lab
    finally:
        lab.destroy()


# --- datagrams through the lab, with plain sockets --------------------------------------

# Runs in the agent's namespace: binds, says "ready", records every datagram (payload ->
# observed source) until its stdin closes, then drains and prints them as JSON.
_RECEIVER = r"""
import json, select, socket, sys
cfg = json.loads(sys.argv[1])
fam = socket.AF_INET6 if ":" in cfg["bind"] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((cfg["bind"], cfg["port"]))
print("ready", flush=True)
got = {}
def take():
    data, addr = s.recvfrom(2048)
    got[data.decode()] = [addr[0], addr[1]]
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [], cfg["limit"])
    if not ready:
        break
    if s in ready:
        take()
    if sys.stdin in ready and not sys.stdin.buffer.read1(1):
        s.setblocking(False)
        try:
            while True:
                take()
        except BlockingIOError:
            pass
        break
print(json.dumps(got), flush=True)
"""

# Runs in the probe's namespace: one connected socket per source port, IP_RECVERR on, one
# datagram each; then collects ICMP errors from the error queues until all sockets have one
# or the wait is over.
_SENDER = r"""
import json, select, socket, struct, sys, time
cfg = json.loads(sys.argv[1])
v6 = ":" in cfg["dst"]
fam = socket.AF_INET6 if v6 else socket.AF_INET
level, recverr = (socket.IPPROTO_IPV6, 25) if v6 else (socket.IPPROTO_IP, 11)
socks = {}
for sport in cfg["sports"]:
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(level, recverr, 1)
    s.bind((cfg["src"], sport))
    s.connect((cfg["dst"], cfg["dport"]))
    s.send(str(sport).encode())
    socks[s.fileno()] = (sport, s)
errors = {}
poller = select.poll()
for fd in socks:
    poller.register(fd, select.POLLERR)
deadline = time.monotonic() + cfg["wait"]
while len(errors) < len(socks) and (left := deadline - time.monotonic()) > 0:
    for fd, _ in poller.poll(left * 1000):
        sport, s = socks[fd]
        try:
            _, anc, _, _ = s.recvmsg(2048, 512, socket.MSG_ERRQUEUE)
        except BlockingIOError:
            continue
        for lvl, typ, data in anc:
            if (lvl, typ) != (level, recverr):
                continue
            eno, origin, itype, code = struct.unpack_from("=IBBB", data)
            off = data[16:]
            if v6:
                origin_addr = socket.inet_ntop(socket.AF_INET6, off[8:24])
            else:
                origin_addr = socket.inet_ntop(socket.AF_INET, off[4:8])
            errors[sport] = {"errno": eno, "type": itype, "code": code, "from": origin_addr}
        poller.unregister(fd)
print(json.dumps(errors))
"""


@dataclass(frozen=True)
class Outcome:
    """What happened to the one datagram sent from a source port."""

    received: bool
    observed: tuple[str, int] | None  # source address and port the agent saw
    icmp: Mapping[str, Any] | None  # errno, type, code, from: what the sender got back

    @property
    def verdict(self) -> str:
        if self.received:
            return "open"
        return "rejected" if self.icmp is not None else "blocked"


def exchange(
    lab: Lab,
    src_ports: Iterable[int],
    dst_port: int = 5000,
    *,
    ipv6: bool = False,
    wait: float = 0.5,
) -> dict[int, Outcome]:
    """Send one datagram from each source port, probe -> agent, and report what happened.

    ``wait`` bounds how long the sender waits for ICMP errors; every other wait is bounded
    too, so a broken lab fails the test instead of hanging it.
    """
    info = lab.info
    ports = sorted(src_ports)
    agent = info.agent_addr6 if ipv6 else info.agent_addr
    probe = info.probe_addr6 if ipv6 else info.probe_addr
    assert agent is not None
    assert probe is not None
    rcfg = json.dumps({"bind": agent, "port": dst_port, "limit": 10.0})
    scfg = json.dumps(
        {"src": probe, "dst": agent, "dport": dst_port, "sports": ports, "wait": wait}
    )
    receiver = subprocess.Popen(
        lab.ns_argv("agent", [sys.executable, "-c", _RECEIVER, rcfg]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert receiver.stdout is not None
        _await_line(receiver.stdout.fileno(), b"ready", timeout=5.0)
        sent = lab.run("probe", [sys.executable, "-c", _SENDER, scfg], timeout=wait + 10.0)
        assert sent.returncode == 0, sent.stderr
        out, err = receiver.communicate(input=b"", timeout=5.0)
        assert receiver.returncode == 0, err.decode()
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(timeout=5.0)
    got = json.loads(out)
    icmp = {int(k): v for k, v in json.loads(sent.stdout).items()}
    outcomes = {}
    for sport in ports:
        seen = got.get(str(sport))
        outcomes[sport] = Outcome(
            received=seen is not None,
            observed=(seen[0], seen[1]) if seen is not None else None,
            icmp=icmp.get(sport),
        )
    return outcomes


def _await_line(fd: int, expected: bytes, timeout: float) -> None:
    # Byte by byte with os.read, so nothing is left in a Python buffer that a later
    # communicate() would not see.
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            raise AssertionError(f"no {expected!r} from the receiver within {timeout}s")
        chunk = os.read(fd, 1)
        if not chunk:
            raise AssertionError(f"receiver exited before {expected!r} (got {line!r})")
        line += chunk
    assert line.strip() == expected, line


# --- verdicts ---------------------------------------------------------------------------


def expand_verdicts(doc: Mapping[str, Any]) -> dict[Cell, str]:
    """Per-cell verdicts from a ``udpreach/run-v1`` document's ``ranges``.

    Asserts the contract on the way: every cell appears once.
    """
    cells: dict[Cell, str] = {}
    for r in doc["ranges"]:
        for src in range(r["first"], r["last"] + 1):
            cell = (r["dst_port"], src)
            assert cell not in cells, f"cell {cell} covered twice"
            cells[cell] = r["verdict"]
    return cells


def mismatches(
    actual: Mapping[Cell, str], expected_fn: Callable[[int, int], str]
) -> list[tuple[int, int, int, str, str]]:
    """Cells whose verdict differs from ``expected_fn(dst_port, src_port)``, as maximal
    ranges ``(dst_port, first, last, actual, expected)`` (readable in an assert message)."""
    out: list[tuple[int, int, int, str, str]] = []
    for dst, src in sorted(actual):
        got, want = actual[(dst, src)], expected_fn(dst, src)
        if got == want:
            continue
        if out and out[-1][0] == dst and out[-1][2] == src - 1 and out[-1][3:] == (got, want):
            out[-1] = (dst, out[-1][1], src, got, want)
        else:
            out.append((dst, src, src, got, want))
    return out


# Ground truth of udpreach/policies/demo.nft (kept beside it by test_lab's demo test).
DEMO_BLOCKED = range(40000, 50000)
DEMO_REJECTED = range(30000, 31000)
DEMO_NATED = range(20000, 21000)
DEMO_NAT_PORTS = range(60000, 62000)


def demo_expected(dst_port: int, src_port: int) -> str:
    """The verdict the demo policy gives a cell (the same for every destination port)."""
    if src_port in DEMO_BLOCKED:
        return "blocked"
    if src_port in DEMO_REJECTED:
        return "rejected"
    return "open"


def demo_translated(src_port: int) -> bool:
    """Whether the demo policy rewrites this source port (masquerade into 60000-60999)."""
    return src_port in DEMO_NATED
