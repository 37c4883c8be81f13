"""Sending from chosen source ports: the synchronous socket work of the probe.

Theory of operation: in *bind* mode (no privilege needed) the probe opens one UDP socket per
source port, binds it to (source address, port), sends that port's datagrams to every
destination port, and keeps the socket open for a short linger so that an ICMP error the
path sends back (a firewall's reject) is queued on it (IP_RECVERR); when the linger is over
the error queue is drained and the socket closed. A port that cannot be bound (in use on
this host, or privileged) makes its cells ``untested``, never ``blocked``.

All methods are synchronous and do a bounded amount of work; the trio shell calls them in
batches between checkpoints and paces them.
"""

from __future__ import annotations

import _socket
import errno
import resource
import select
import socket
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from probe.icmp import (
    IPV6_RECVERR,
    MSG_ERRQUEUE,
    RECVERR_ANCBUFSIZE,
    SOL_IP,
    SOL_IPV6,
    IcmpError,
    LocalError,
    parse_errqueue_message,
)
from udpreach.core.sweep import IcmpReport

IP_RECVERR = 11
_NONBLOCK_DGRAM = socket.SOCK_DGRAM | getattr(socket, "SOCK_NONBLOCK", 0)
_ERRQ_FLAGS = MSG_ERRQUEUE | socket.MSG_DONTWAIT

_RETRYABLE_SEND = {
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EHOSTDOWN,
    errno.EACCES,
    errno.EPROTO,
}


#: An ICMP error that quoted one of our datagrams (the engine's event type).
IcmpEvent = IcmpReport


@dataclass
class GroupResult:
    """What happened to one source port's datagrams."""

    sent: list[int]  # destination ports actually sent to
    untested: str | None = None  # why the port could not be used at all
    backpressure: bool = False  # the kernel ran out of buffer: retry the rest later


#: A batch of datagrams: groups of ``(dst port, source ports, payloads)`` sent in that order
#: (or the same as a mapping ``{dst: (source ports, payloads)}``), the payloads in the order
#: of the source ports. A destination port may have several groups (different attempts).
Group = tuple[int, Sequence[int], Sequence[bytes]]
CellBatch = Sequence[Group] | Mapping[int, tuple[Sequence[int], Sequence[bytes]]]

#: What ``send_cells`` reports when not everything went out: one result per source port of
#: the batch, in first-appearance order.
BatchResults = list[tuple[int, GroupResult]]


def groups_of(batch: CellBatch) -> list[Group]:
    """A batch's groups in sending order, whichever form it came in."""
    if isinstance(batch, Mapping):
        return [(dst, srcs, payloads) for dst, (srcs, payloads) in batch.items()]
    return list(batch)


def by_source(batch: CellBatch) -> dict[int, list[tuple[int, bytes]]]:
    """A batch regrouped per source port: ``{src: [(dst, payload), ...]}``, in batch order."""
    out: dict[int, list[tuple[int, bytes]]] = {}
    for dst, srcs, payloads in groups_of(batch):
        for src, payload in zip(map(int, srcs), payloads, strict=True):
            items = out.get(src)
            if items is None:
                out[src] = [(dst, payload)]
            else:
                items.append((dst, payload))
    return out


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards *wanted*; return the usable limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return int(soft)


def route_source(target: str, port: int = 9) -> str:
    """The local address the kernel would use to reach *target* (sends nothing)."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((target, port))
        return str(s.getsockname()[0])


def route_mtu(target: str, ipv6: bool) -> int:
    """The path MTU the kernel knows towards ``target`` (its route's, or what it learnt);
    1500 where it will not say."""
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    level, option = (socket.IPPROTO_IPV6, 24) if ipv6 else (socket.IPPROTO_IP, 14)  # IP_MTU
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))  # nothing is sent: a route lookup
            return max(68, int(s.getsockopt(level, option)))
    except OSError:
        return 1500


class BindSender:
    """Bind-per-source-port sender with ICMP error capture."""

    mode = "bind"

    def __init__(self, source: str, target: str, *, linger: float = 0.05) -> None:
        self.source = source
        self.target = target
        self.family = socket.AF_INET6 if ":" in target else socket.AF_INET
        self.linger = linger
        limit = raise_fd_limit(65536 + 1024)
        self.max_open = max(64, min(60000, limit - 512))
        self._open: deque[tuple[float, int, _socket.socket]] = deque()
        # The same sockets by source port: a port sent from again while its socket lingers
        # (the rest of a group the kernel's buffer held back) reuses it; binding anew would
        # fail with "in use" against our own socket and make the cells "untested".
        self._lingering: dict[int, _socket.socket] = {}
        self.icmp_seen = 0

    def free_slots(self) -> int:
        """How many more source ports may be opened before the oldest must be reaped."""
        return self.max_open - len(self._open)

    def oldest_age(self, now: float) -> float:
        return now - self._open[0][0] if self._open else 0.0

    def send_group(self, src: int, items: Sequence[tuple[int, bytes]], now: float) -> GroupResult:
        """Send one source port's datagrams: ``items`` are (dst port, payload)."""
        reused = self._lingering.get(src)
        if reused is not None:
            s = reused
        else:
            # The plain C socket type: socket.socket's Python-level __init__ costs a third more.
            s = _socket.socket(self.family, _NONBLOCK_DGRAM)
            try:
                if self.family == socket.AF_INET6:
                    s.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
                else:
                    s.setsockopt(SOL_IP, IP_RECVERR, 1)
                s.bind((self.source, src))
            except OSError as exc:
                s.close()
                if exc.errno == errno.EADDRINUSE:
                    return GroupResult([], "source port in use on the probe host")
                if exc.errno in (errno.EACCES, errno.EPERM):
                    return GroupResult([], "binding this source port is not permitted here")
                return GroupResult([], f"cannot bind source port: {exc.strerror or exc}")
        sent: list[int] = []
        result = GroupResult(sent)
        target = self.target
        for dst, payload in items:
            for _ in range(3):
                try:
                    s.sendto(payload, (target, dst))
                    sent.append(dst)
                    break
                except OSError as exc:
                    if exc.errno in _RETRYABLE_SEND:
                        continue  # an earlier datagram's queued error surfaced here: retry
                    if exc.errno in (errno.ENOBUFS, errno.EAGAIN):
                        result.backpressure = True
                        break
                    if exc.errno == errno.EPERM:
                        result.untested = "sending refused on the probe host (local firewall)"
                        break
                    result.untested = f"send failed: {exc.strerror or exc}"
                    break
            if result.backpressure or result.untested:
                break
        if reused is None:
            self._open.append((now, src, s))
            self._lingering[src] = s
        return result

    def send_cells(
        self, batch: CellBatch, now: float, pace: tuple[int, float] | None = None
    ) -> BatchResults | None:
        """Send a batch (see ``CellBatch``): one socket per source port, as ``send_group``;
        with ``pace`` (burst, spacing), bursts of that many datagrams ``spacing`` apart.

        Returns:
            None when every datagram went out, else one ``GroupResult`` per source port.
        """
        groups = by_source(batch)
        if pace is None:
            results = [(src, self.send_group(src, items, now)) for src, items in groups.items()]
        else:
            burst, spacing = max(1, pace[0]), pace[1]
            clock = time.perf_counter
            results = []
            due = 0.0
            in_burst = burst
            for src, items in groups.items():
                if in_burst >= burst:
                    while (t := clock()) < due:
                        pass
                    due, in_burst = t + spacing, 0
                results.append((src, self.send_group(src, items, now)))
                in_burst += len(items)
        for src, res in results:
            if len(res.sent) != len(groups[src]):
                return results
        return None

    def _drain(self, src: int, s: _socket.socket) -> list[IcmpEvent]:
        out: list[IcmpEvent] = []
        messages = []
        for _ in range(64):
            try:
                messages.append(
                    parse_errqueue_message(*s.recvmsg(2048, RECVERR_ANCBUFSIZE, _ERRQ_FLAGS))
                )
            except OSError:  # BlockingIOError: the queue is empty
                break
        for m in messages:
            err = m.error
            if isinstance(err, IcmpError):
                dst = m.destination[1]  # where we sent it; the socket's port is the source
                pmtu = (err.type, err.code) in ((3, 4), (2, 0))
                out.append(
                    IcmpEvent(
                        dst,
                        src,
                        err.type,
                        err.code,
                        err.offender or "?",
                        quote=m.payload,  # what the error quoted, after the UDP header
                        mtu=err.info if pmtu else 0,
                        ipv6=err.ipv6,
                    )
                )
            elif isinstance(err, LocalError):
                continue  # never left this host; the cell stays pending and is retried
        self.icmp_seen += len(out)
        return out

    def reap(self, now: float, *, everything: bool = False) -> list[IcmpEvent]:
        """Close sockets older than the linger (or all), collecting their ICMP errors.

        One ``poll`` asks which of them have anything on their error queue (the kernel
        reports POLLERR for exactly those), so only those are read: most sockets of a sweep
        have nothing, and a failed ``recvmsg`` per socket cost more than the send.
        """
        events: list[IcmpEvent] = []
        q = self._open
        done: list[tuple[float, int, _socket.socket]] = []
        while q and (everything or now - q[0][0] >= self.linger):
            done.append(q.popleft())
        if not done:
            return events
        poller = select.poll()
        register = poller.register
        for _, _, s in done:
            register(s, 0)  # POLLERR and POLLHUP are reported whatever is asked for
        flagged = {fd for fd, ev in poller.poll(0) if ev & select.POLLERR}
        for _, src, s in done:
            if s.fileno() in flagged:
                events.extend(self._drain(src, s))
            self._lingering.pop(src, None)
            s.close()
        return events

    def close(self) -> None:
        self._lingering.clear()
        while self._open:
            self._open.popleft()[2].close()
