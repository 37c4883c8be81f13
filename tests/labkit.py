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
- Real-path conditions on the router (`udp_delay`: a delay line for UDP only; `set_mtu`),
  what the router saw (`rule_counters`, `conntrack_flows`), a policy swapped in while a run
  goes (`swap_policy_after`), and `nft_jhash` (which source ports an nft ``jhash`` picks).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
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


# --- real-path conditions on the router -------------------------------------------------

DELAY_IF = "udpdelay0"
_DELAY_TABLE = 100  # the routing table (and rule priority) that sends UDP to the delay line
ICMP_DELAY_IF = "icmpdelay0"
_ICMP_DELAY_TABLE = 101  # ... and the router's own ICMP errors to the probe, to theirs

# Runs in the router's namespace: a TUN device that holds every IP packet routed into it for
# `delay` seconds and then writes it back, unchanged, as if it had arrived on the TUN device;
# the router forwards it on to the agent. First in, first out, so the order is kept. Bounded
# in time (`lifetime`) and in packets held (`limit`: a full line drops, as a queue does);
# stops when its stdin closes and prints what it did as JSON. It runs at a raised priority:
# a router forwards in the kernel, ahead of the processes on the hosts around it.
_DELAY_LINE = r"""
import collections, contextlib, fcntl, json, math, os, select, struct, sys, time
cfg = json.loads(sys.argv[1])
with contextlib.suppress(OSError):
    os.nice(-10)
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", cfg["name"].encode(), IFF_TUN | IFF_NO_PI))
print("ready", flush=True)
delay, limit = cfg["delay"], cfg["limit"]
held = collections.deque()
stats = {"in": 0, "out": 0, "overflow": 0, "write_errors": 0, "late_max": 0.0}
poller = select.poll()
poller.register(fd, select.POLLIN)
poller.register(sys.stdin.fileno(), select.POLLIN | select.POLLHUP)
end = time.monotonic() + cfg["lifetime"]
running = True
while running and time.monotonic() < end:
    now = time.monotonic()
    wait = held[0][0] + delay - now if held else 0.2
    for got, _ in poller.poll(max(0, math.ceil(wait * 1000))):
        if got != fd:
            running = False
    for _ in range(256):
        try:
            pkt = os.read(fd, 65536)
        except BlockingIOError:
            break
        stats["in"] += 1
        if len(held) < limit:
            held.append((time.monotonic(), pkt))
        else:
            stats["overflow"] += 1
    now = time.monotonic()
    while held and held[0][0] + delay <= now:
        t, pkt = held.popleft()
        stats["late_max"] = max(stats["late_max"], now - t - delay)
        try:
            os.write(fd, pkt)
            stats["out"] += 1
        except OSError:
            stats["write_errors"] += 1
stats["held_at_end"] = len(held)
print(json.dumps(stats), flush=True)
"""


@dataclass
class DelayLine:
    """A running `udp_delay`; ``stats`` (packets in, out, dropped...) once it has stopped."""

    delay: float
    stats: dict[str, Any]


@contextmanager
def udp_delay(lab: Lab, delay: float, *, limit: int = 200_000) -> Iterator[DelayLine]:
    """Delay every UDP datagram from the probe's side by ``delay`` seconds on the router; TCP
    (the control connection) and ICMP keep the direct path.

    The kernel's own ``tc netem`` would do this, but kernels without ``sch_netem`` exist (this
    project's CI VMs among them), so the router routes UDP arriving from the probe's side
    (policy routing: ``ip rule iif probe0 ipproto udp``) into a TUN device whose reader holds
    each packet for ``delay`` and writes it back; the router then forwards it to the agent.
    The firewall's forward chain sees each datagram twice, first from ``probe0`` (where the
    policy's ``iifname "probe0"`` rules act), then from the TUN device. Reverse-path filtering
    is turned off on the router because a re-injected packet arrives on the TUN device, not
    where its source lives: lab plumbing, no kindness to udpreach (the router's rp_filter
    default is already 0 on most kernels).
    """
    rule = f"iif {lab.info.router_probe_if} ipproto udp"
    with _delay_line(lab, delay, DELAY_IF, _DELAY_TABLE, rule, limit=limit) as line:
        yield line


@contextmanager
def icmp_delay(lab: Lab, delay: float, *, limit: int = 200_000) -> Iterator[DelayLine]:
    """Delay the router's own ICMP errors to the probe by ``delay`` seconds (a router that
    makes its errors on a slow path, or a long way back); everything else keeps the direct
    path. The same delay line as ``udp_delay``: the router's errors are routed into it
    (``ip rule iif lo ipproto icmp to <probe>``: locally made packets), and come back out of
    it with the router's own address as their source, which the router takes on that device
    only with ``accept_local`` (lab plumbing again); it then forwards them to the probe."""
    info = lab.info
    rule = f"iif lo ipproto icmp to {info.probe_addr}"
    with _delay_line(
        lab, delay, ICMP_DELAY_IF, _ICMP_DELAY_TABLE, rule, limit=limit,
        src=info.router_probe_side, accept_local=True,
    ) as line:  # fmt: skip
        yield line


@contextmanager
def _delay_line(
    lab: Lab,
    delay: float,
    ifname: str,
    table: int,
    rule: str,
    *,
    limit: int,
    src: str | None = None,
    accept_local: bool = False,
) -> Iterator[DelayLine]:
    """A TUN delay line on the router for the packets ``rule`` (an ``ip rule`` selector)
    routes into it, through routing table ``table`` (and the rule's priority)."""
    cfg = json.dumps({"name": ifname, "delay": delay, "limit": limit, "lifetime": 900.0})
    line = subprocess.Popen(
        lab.ns_argv("router", [sys.executable, "-c", _DELAY_LINE, cfg]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    result = DelayLine(delay, {})
    try:
        assert line.stdout is not None
        _await_line(line.stdout.fileno(), b"ready", timeout=10.0)
        settings = [(key, "rp_filter", 0) for key in ("all", ifname)]
        if accept_local:
            settings.append((ifname, "accept_local", 1))
        for key, name, value in settings:
            path = f"/proc/sys/net/ipv4/conf/{key}/{name}"
            lab.run("router", ["sh", "-c", f"echo {value} > {path}"], check=True)
        route = f"route add default dev {ifname} table {table}"
        batch = [
            f"link set {ifname} txqueuelen 10000 up",
            route + (f" src {src}" if src else ""),
            f"rule add {rule} lookup {table} priority {table}",
        ]
        lab.run("router", ["ip", "-batch", "-"], input="\n".join(batch) + "\n", check=True)
        yield result
    finally:
        lab.run("router", ["ip", "rule", "del", "priority", str(table)])
        try:
            out, err = line.communicate(input=b"", timeout=10.0)
            last = out.decode().strip().splitlines()[-1:] if out else []
            if line.returncode == 0 and last and last[0].startswith("{"):
                result.stats = json.loads(last[0])
            else:
                result.stats = {"error": err.decode()[-2000:], "exit": line.returncode}
        finally:
            if line.poll() is None:
                line.kill()
                line.wait(timeout=5.0)


def set_mtu(lab: Lab, mtu: int, *, side: str = "agent") -> None:
    """Set the MTU of the router's interface towards ``side`` (``agent`` or ``probe``): the
    small hop of a tunnel or PPPoE link."""
    ifname = lab.info.router_agent_if if side == "agent" else lab.info.router_probe_if
    lab.run("router", ["ip", "link", "set", "dev", ifname, "mtu", str(mtu)], check=True)


def rule_counters(lab: Lab) -> dict[str, int]:
    """Packets counted by each router rule that has a ``counter`` and a ``comment``, by
    comment."""
    proc = lab.run("router", ["nft", "-j", "list", "ruleset"], check=True)
    out: dict[str, int] = {}
    for item in json.loads(proc.stdout).get("nftables", []):
        rule = item.get("rule")
        if not isinstance(rule, dict) or "comment" not in rule:
            continue
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
                out[rule["comment"]] = out.get(rule["comment"], 0) + expr["counter"]["packets"]
    return out


_CONNTRACK_UDP = re.compile(r"\budp\b.*?src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)")


def conntrack_flows(lab: Lab, src: str | None = None) -> set[Cell]:
    """The UDP flows the router's connection tracking holds (from ``src``, the probe's
    address by default), as (dst port, src port) cells: the flows it admitted."""
    src = src or lab.info.probe_addr
    proc = lab.run("router", ["cat", "/proc/net/nf_conntrack"], check=True)
    flows: set[Cell] = set()
    for line in proc.stdout.splitlines():
        m = _CONNTRACK_UDP.search(line)
        if m and m.group(1) == src:
            flows.add((int(m.group(4)), int(m.group(3))))
    return flows


@dataclass
class PolicySwap:
    """A policy swapped in by `swap_policy_after`: when, and after how many datagrams."""

    at: float | None = None  # time.monotonic() of the swap
    seen: int = 0  # datagrams the old policy's counters had counted then
    error: str | None = None


@contextmanager
def _once_counted(
    lab: Lab, datagrams: int, act: Callable[[PolicySwap, int], None], timeout: float, name: str
) -> Iterator[PolicySwap]:
    """Run ``act(swap, seen)`` in a thread as soon as the router's rule counters
    (`rule_counters`) have counted ``datagrams``, for the body of the ``with``; gives up
    after ``timeout``. A failure is kept in ``swap.error`` for the test to report."""
    swap = PolicySwap()
    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                seen = sum(rule_counters(lab).values())
                if seen >= datagrams:
                    act(swap, seen)
                    return
                time.sleep(0.005)
            swap.error = f"the policy counted fewer than {datagrams} datagrams"
        except Exception as exc:  # reported by the test, which owns the failure
            swap.error = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    try:
        yield swap
    finally:
        stop.set()
        thread.join(timeout=timeout)


def swap_policy_after(
    lab: Lab, policy: str, datagrams: int, *, timeout: float = 60.0
) -> AbstractContextManager[PolicySwap]:
    """Load ``policy`` into the router (atomically, `Lab.load_policy`) as soon as the current
    policy's rule counters (`rule_counters`) have counted ``datagrams``: a reload in the
    middle of a run, at a point fixed by traffic rather than by a guess at timing. Runs in a
    thread for the body of the ``with``; gives up after ``timeout``."""

    def act(swap: PolicySwap, seen: int) -> None:
        lab.load_policy(policy)
        swap.at, swap.seen = time.monotonic(), seen

    return _once_counted(lab, datagrams, act, timeout, "policy-swap")


def outage_after(
    lab: Lab, policy: str, datagrams: int, seconds: float, *, timeout: float = 60.0
) -> AbstractContextManager[PolicySwap]:
    """An outage in the middle of a run: once ``policy``'s rule counters have counted
    ``datagrams``, the router drops everything it would forward for ``seconds`` (a link
    down, a reload that flushed its rules first), then ``policy`` is back. ``at`` is when
    the drop began; ``seen`` the datagrams counted then."""

    def act(swap: PolicySwap, seen: int) -> None:
        lab.load_policy("drop\n")
        swap.at, swap.seen = time.monotonic(), seen
        time.sleep(seconds)
        lab.load_policy(policy)

    return _once_counted(lab, datagrams, act, timeout + seconds, "outage")


def nft_jhash(value: int, nbytes: int, mod: int, seed: int) -> int:
    """What nft's ``jhash <field> mod MOD seed SEED`` gives for a field of ``nbytes`` bytes
    (1-4; a port is 2) holding ``value``: the kernel's jhash() of the field's bytes in network
    order (a field this short is all tail: byte i adds ``k[i] << 8*i`` to ``a``, then the
    final mix), scaled into ``mod`` buckets as the kernel does (``reciprocal_scale``)."""
    assert 1 <= nbytes <= 4
    mask = 0xFFFFFFFF

    def rol(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & mask

    a = b = c = (0xDEADBEEF + nbytes + seed) & mask
    for i, byte in enumerate(value.to_bytes(nbytes, "big")):
        a = (a + (byte << (8 * i))) & mask
    # __jhash_final(a, b, c)
    c = ((c ^ b) - rol(b, 14)) & mask
    a = ((a ^ c) - rol(c, 11)) & mask
    b = ((b ^ a) - rol(a, 25)) & mask
    c = ((c ^ b) - rol(b, 16)) & mask
    a = ((a ^ c) - rol(c, 4)) & mask
    b = ((b ^ a) - rol(a, 14)) & mask
    c = ((c ^ b) - rol(b, 24)) & mask
    return (c * mod) >> 32
