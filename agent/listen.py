"""The agent's UDP listeners: bind, size the receive buffer, drain into the receive core.

Theory of operation: the agent runs where mail clients run (Windows, macOS, Linux), so
nothing here depends on one system without a fallback:

- Reading: ``recvmmsg`` (``agent.mmsg``: 64 datagrams per system call) where it exists, which
  is LP64 little-endian Linux; ``recvfrom`` one datagram at a time everywhere else.
- The receive buffer: Linux's ``SO_RCVBUFFORCE`` lets root pass ``net.core.rmem_max``; every
  system has ``SO_RCVBUF``, which the kernel may cap. The size granted is reported as the
  kernel books it (Linux books twice what it is asked for and reports that).
- Errors while reading: a UDP socket can hold an error left by an ICMP message (Linux:
  ``ECONNREFUSED``; Windows: ``WSAECONNRESET``, ``ConnectionResetError``, after a port
  unreachable). It says nothing about the datagrams behind it, so it only ends the current
  drain pass; the listener wakes again at once while datagrams are waiting, and reads on.
- Binding: a port that cannot be bound is a configuration error with what to do about it
  (Windows reserves ranges for Hyper-V and WinNAT, where binding fails with WinError 10013;
  ports below 1024 need privileges on Linux; a port in use names the tool that shows who).

``Features`` says which of the fast paths to use; tests force the portable ones.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

from agent import mmsg
from agent.core import AgentCore, Datagram
from agent.mmsg import BatchReader
from udpreach.core.datagram import MAX_SIZE
from udpreach.core.errors import ConfigError

RCVBUF_WANTED = 16 * 1024 * 1024
DRAIN_MAX = 4096  # datagrams per drain pass before yielding to other tasks
DRAIN_CHUNK = mmsg.SLOTS  # datagrams handed to the core at once: one recvmmsg's worth
COALESCE = 0.001  # a pause between reads while datagrams trickle in (``coalesce_wait``)
COALESCE_AFTER = 0.002  # ... only this soon after the previous pass
BURST_RATE = 1_000_000  # datagrams a second a probe's batch may arrive at, for all we know
SKB_OVERHEAD = 2048  # bytes a kernel books per datagram beyond its payload (loopback: ~830)
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python's socket module does not name it
WSAEACCES = 10013  # what Windows says for a reserved (excluded) port
WSAEADDRINUSE = 10048


@dataclass(frozen=True)
class Features:
    """Which platform-specific calls the listeners use."""

    recvmmsg: bool
    rcvbufforce: bool
    rcvbuf_doubled: bool  # the kernel reports twice the buffer it was asked for (Linux)


def platform_features(platform: str = sys.platform) -> Features:
    linux = platform.startswith("linux")
    return Features(recvmmsg=linux and mmsg.available(), rcvbufforce=linux, rcvbuf_doubled=linux)


FEATURES = platform_features()


@functools.lru_cache(maxsize=4096)
def normalize_addr(addr: str) -> str:
    """'::ffff:198.18.2.2' -> '198.18.2.2'; strips IPv6 scope ids."""
    addr = addr.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass
class Listener:
    sock: socket.socket
    port: int
    rcvbuf: int
    batch: BatchReader | None = None  # recvmmsg where available (shared by the listeners)


def bind_error(exc: OSError, listen: str, port: int, platform: str = sys.platform) -> ConfigError:
    """A failed bind as one line that says what to do about it."""
    what = f"cannot listen on UDP {listen}:{port}"
    winerror = getattr(exc, "winerror", None)
    if winerror == WSAEACCES or exc.errno in (errno.EACCES, errno.EPERM):
        if platform == "win32":
            hint = (
                "Windows reserves port ranges (Hyper-V, WinNAT, Docker); see them with "
                "`netsh int ipv4 show excludedportrange protocol=udp` and choose a port "
                "outside them"
            )
        elif 0 < port < 1024:
            hint = (
                "ports below 1024 need root or CAP_NET_BIND_SERVICE; mail clients listen "
                "on 1024-65535"
            )
        else:
            hint = "a security policy forbids it"
        return ConfigError(f"{what}: permission denied; {hint}")
    if winerror == WSAEADDRINUSE or exc.errno == errno.EADDRINUSE:
        tool = {
            "win32": "netstat -ano -p udp",
            "darwin": "lsof -nP -iUDP",
        }.get(platform, "ss -uapn")
        return ConfigError(f"{what}: the port is in use by another program (`{tool}` shows it)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"{what}: {listen} is not an address of this host")
    return ConfigError(f"{what}: {exc.strerror or exc}")


def open_listeners(
    ports: Sequence[int], listen: str, features: Features | None = None
) -> list[Listener]:
    """Bind one UDP socket per port with a large receive buffer.

    Raises:
        ConfigError: a port cannot be bound (in use, reserved, not permitted).
    """
    feats = features or FEATURES
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    options = (SO_RCVBUFFORCE, socket.SO_RCVBUF) if feats.rcvbufforce else (socket.SO_RCVBUF,)
    out: list[Listener] = []
    try:
        for p in ports:
            s = socket.socket(family, socket.SOCK_DGRAM)
            out.append(Listener(s, p, 0))
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            for opt in options:
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, RCVBUF_WANTED)
                    break
                except OSError:
                    continue
            try:
                s.bind((listen, p))
            except OSError as exc:
                raise bind_error(exc, listen, p) from None
            s.setblocking(False)
            out[-1].port = s.getsockname()[1]
            granted = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            out[-1].rcvbuf = granted // 2 if feats.rcvbuf_doubled else granted
    except BaseException:
        for li in out:
            li.sock.close()
        raise
    if feats.recvmmsg and mmsg.available():
        reader = BatchReader()
        for li in out:
            li.batch = reader
    return out


class HasCore(Protocol):
    core: AgentCore


def drain(state: HasCore, listener: Listener, limit: int = DRAIN_MAX) -> int:
    """Read datagrams until the socket would block (or *limit*); returns how many.

    The core gets them DRAIN_CHUNK at a time (its per-datagram cost is lower in bulk), so at
    most that many are held at once, whatever their size. An error the socket holds (see the
    module's docstring) ends the pass without losing what was read.
    """
    core = state.core
    sock = listener.sock
    recvfrom = sock.recvfrom
    batch = listener.batch
    n = 0
    more = True
    while more and n < limit:
        chunk: list[Datagram] = []
        want = min(DRAIN_CHUNK, limit - n)
        if batch is not None:  # the chunk in one recvmmsg
            try:
                chunk.extend(batch.read(sock, want))
                more = len(chunk) == want
            except OSError:
                more = False  # e.g. a queued ICMP error on the socket; nothing to credit
        else:
            while len(chunk) < want:
                try:
                    chunk.append(recvfrom(MAX_SIZE + 1))
                except (BlockingIOError, InterruptedError):
                    more = False
                    break
                except OSError:
                    # A queued ICMP error (ECONNREFUSED; WSAECONNRESET on Windows), or
                    # anything else: the listener reads on at its next wake-up.
                    more = False
                    break
        n += len(chunk)
        if chunk:
            core.on_datagrams(chunk, normalize_addr)
    return n


def coalesce_wait(read: int, interval: float, rcvbuf: int, size: int) -> float:
    """How long a listener may pause before it waits for its socket again: ``COALESCE``
    or 0.

    Waking costs more than reading: an epoll round trip and a trio reschedule, tens of
    microseconds, where reading and checking a datagram costs about 2. A sweep arriving at
    70,000 datagrams a second woke the agent every 20 datagrams, and the wake-ups were
    about 40% of the agent's CPU. So after a pass that emptied the socket with fewer than a
    chunk (``read``), at most ``COALESCE_AFTER`` after the previous pass (datagrams are
    trickling in, not starting after a silence), the listener pauses and lets them gather.

    Only where the receive buffer (``rcvbuf`` bytes) holds four pauses' worth of datagrams
    of ``size`` bytes (each booked at up to ``SKB_OVERHEAD`` more) arriving at
    ``BURST_RATE``: a probe sends in batches at full speed with gaps between them, so the
    rate just seen says little about the next millisecond. An unprivileged agent's buffer
    under Linux's default ceiling (208 KiB) lost 1-4% of a loopback sweep to pauses sized by
    the rate just seen, where it lost 0-0.3% without pauses; so it never pauses, and root's
    16 MiB does. The recvmmsg path (Linux) pauses; elsewhere a timer may be coarser than the
    pause (Windows: 15.6 ms), so it does not.
    """
    if not 0 < read < DRAIN_CHUNK or not 0 < interval <= COALESCE_AFTER:
        return 0.0
    room = rcvbuf // (size + SKB_OVERHEAD)
    if room < 4 * BURST_RATE * COALESCE:
        return 0.0
    return COALESCE


@dataclass(frozen=True)
class FragmentCounters:
    """The host's counters of fragmented datagrams, IPv4 and IPv6 added up (Linux's
    ``/proc/net/snmp`` and ``snmp6``)."""

    failed: int  # never reassembled: ReasmFails (timed out, memory full, overlaps)
    timed_out: int  # of those, timed out: ReasmTimeout (a fragment never joined by the rest)
    bad_checksum: int  # UDP datagrams with a bad checksum: Udp InCsumErrors

    def lost_since(self, start: FragmentCounters) -> int:
        """Datagrams the host lost since ``start`` other than by a timeout: a full
        reassembly memory drops every new fragment, and overlapping fragments (IPv4's
        16-bit identification reused while an old fragment waits) are dropped or make a
        datagram whose checksum fails. An open cell's datagram may be among them."""
        return max(0, self.failed - self.timed_out - start.failed + start.timed_out) + max(
            0, self.bad_checksum - start.bad_checksum
        )

    def timeouts_since(self, start: FragmentCounters) -> int:
        return max(0, self.timed_out - start.timed_out)


def fragment_counters(
    path: str = "/proc/net/snmp", path6: str = "/proc/net/snmp6"
) -> FragmentCounters | None:
    """The host's ``FragmentCounters``, or None where it says none of them (not Linux).

    A firewall that drops by port drops only a datagram's first fragment: the others reach
    the agent's host, never reassemble, and hold its reassembly memory (4 MB) until they time
    out (30 s, IPv6 60 s). Each timeout is one such datagram, dropped on the way, and harms
    no other; but while the memory is full every fragmented datagram is lost, open or not,
    and the coordinator must know, or it would call open cells blocked.
    """
    v4, v6 = _snmp_counters(path), _snmp6_counters(path6)
    if "Ip:ReasmFails" not in v4 and "Ip6ReasmFails" not in v6:
        return None
    return FragmentCounters(
        v4.get("Ip:ReasmFails", 0) + v6.get("Ip6ReasmFails", 0),
        v4.get("Ip:ReasmTimeout", 0) + v6.get("Ip6ReasmTimeout", 0),
        v4.get("Udp:InCsumErrors", 0) + v6.get("Udp6InCsumErrors", 0),
    )


def _read_lines(path: str) -> list[list[str]]:
    try:
        with open(path) as fh:
            return [line.split() for line in fh]
    except OSError:
        return []


def _snmp_counters(path: str) -> dict[str, int]:
    """``/proc/net/snmp``: per table a line of names and a line of values, as
    ``{"Table:Name": value}`` (an empty dict if the file is not there)."""
    out: dict[str, int] = {}
    lines = _read_lines(path)
    for names, values in pairwise(lines):
        if names and values and names[0] == values[0]:  # a table's names, then its values
            for name, value in zip(names[1:], values[1:], strict=False):
                if value.lstrip("-").isdigit():
                    out[names[0] + name] = int(value)
    return out


def _snmp6_counters(path: str) -> dict[str, int]:
    """``/proc/net/snmp6``: a line per counter, as ``{name: value}``."""
    return {f[0]: int(f[1]) for f in _read_lines(path) if len(f) == 2 and f[1].isdigit()}
