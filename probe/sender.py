"""Sending from chosen source ports: the synchronous socket work of the probe.

Theory of operation: in *bind* mode (no privilege needed) the probe opens one UDP socket per
source port, binds it to (source address, port), sends that port's datagrams to every
destination port, and keeps the socket open for a short linger so that an ICMP error the
path sends back (a firewall's reject) is queued on it (IP_RECVERR); when the linger is over
the error queue is drained and the socket closed. A port that cannot be bound (in use on
this host, or privileged) makes its cells ``untested``, never ``blocked``.

Closing was a sixth of the probe's time in a bind-mode sweep (17.5% of py-spy's samples:
the kernel tears the socket down on the way out of ``close``), so spent sockets are closed
on a thread of their own (``_Closer``), on the other core while this one opens and sends:
their descriptors are detached from their socket objects, handed over in chunks and closed
with ``close_range`` over each run of consecutive numbers (one system call, and the GIL
released once, for hundreds of them).
That is safe because every number in such a run is one of the handed-over descriptors,
which nothing else owns. Binding a source port whose previous socket is still waiting to be
closed waits for the closer (the port is not "in use"); the file descriptor budget counts
the waiting ones.

Opening a socket (``socket`` and ``setsockopt``, 5 us here) is the next largest cost after the
send, and the probe often has time it would otherwise spin away: the pilot sends one
datagram every half millisecond, and short waits are spun because trio's timers are not that
fine. In that time the sender opens *spare* sockets (IP_RECVERR on, not bound yet), as many
as the runner says the next sends will need (``spare_wanted``, at most ``SPARE_MAX`` and
within the descriptor budget); binding takes one from the pool when there is one. A full
sweep's first round opens about a fifth of its sockets this way, in time the pilot spent
spinning.

All methods are synchronous and do a bounded amount of work; the trio shell calls them in
batches between checkpoints and paces them.
"""

from __future__ import annotations

import _socket
import errno
import os
import resource
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
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
SPARE_MAX = 16384  # spare sockets opened ahead at most (2.6 kB of kernel slab each: 43 MB)
SPARE_GUARD = 2e-5  # a spare socket is opened only this long before a paced send is due
IDLE_GUARD = 4e-5  # ``idle`` work is handed only waits longer than this, and ends this early
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

#: Work a sender is given for its waits between paced sends (the runner's: the engine's
#: ``prepare``), called with the ``time.perf_counter()`` it must return by.
Idle = Callable[[float], object]


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


def _aligned_sources(batch: Sequence[Group]) -> list[int] | None:
    """The source ports every group of ``batch`` shares, each once, in order; else None."""
    first = batch[0][1]
    srcs = first.tolist() if hasattr(first, "tolist") else [int(s) for s in first]
    for _, other, _ in batch[1:]:
        if other is not first:
            other_list = other.tolist() if hasattr(other, "tolist") else [int(s) for s in other]
            if other_list != srcs:
                return None
    if len(set(srcs)) != len(srcs):
        return None
    return srcs


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


def fd_runs(fds: Sequence[int]) -> list[tuple[int, int]]:
    """``fds`` as runs of consecutive numbers ``(first, last)``, in ascending order."""
    out: list[tuple[int, int]] = []
    if not fds:
        return out
    ordered = sorted(fds)
    first = prev = ordered[0]
    for fd in ordered[1:]:
        if fd != prev + 1:
            out.append((first, prev))
            first = fd
        prev = fd
    out.append((first, prev))
    return out


class _Closer:
    """Closes handed-over file descriptors on a thread of its own (see the module's text).

    ``pending`` is how many are handed over and not closed yet; ``holds(port)`` says whether
    a source port's socket is among them; ``closed`` counts the chunks closed. They are kept
    under one lock, taken once per chunk.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._chunks: deque[tuple[list[int], list[int]] | None] = deque()
        self._ports: dict[int, int] = {}  # source port -> sockets of it waiting to be closed
        self.pending = 0
        self.closed = 0  # chunks closed so far
        self._thread: threading.Thread | None = None

    def close_later(self, fds: list[int], ports: list[int]) -> None:
        if not fds:
            return
        with self._cond:
            held = self._ports
            for port in ports:
                held[port] = held.get(port, 0) + 1
            self.pending += len(fds)
            self._chunks.append((fds, ports))
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="udpreach-closer", daemon=True
                )
                self._thread.start()

    def holds(self, port: int) -> bool:
        with self._cond:
            return port in self._ports

    def wait(self, at_most: int = 0, timeout: float = 5.0) -> bool:
        """Block until no more than ``at_most`` descriptors wait (False: ``timeout`` passed)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.pending <= at_most, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Close everything handed over (waiting at most ``timeout``) and end the thread."""
        self.wait(0, timeout)
        with self._cond:
            if self._thread is not None:
                self._chunks.append(None)
                self._cond.notify_all()
                self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._chunks))
                chunk = self._chunks.popleft()
            if chunk is None:
                return
            fds, ports = chunk
            for first, last in fd_runs(fds):
                os.closerange(first, last + 1)  # close_range(2): releases the GIL once
            with self._cond:
                held = self._ports
                for port in ports:
                    left = held[port] - 1
                    if left:
                        held[port] = left
                    else:
                        del held[port]
                self.pending -= len(fds)
                self.closed += 1
                self._cond.notify_all()


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
        self._closer = _Closer()
        if self.family == socket.AF_INET6:
            self._recverr = (SOL_IPV6, IPV6_RECVERR)
        else:
            self._recverr = (SOL_IP, IP_RECVERR)
        self.icmp_seen = 0
        # Sockets opened ahead, not bound yet (see the module's text); the runner says how
        # many the next sends will want.
        self._spare: list[_socket.socket] = []
        self.spare_wanted = 0
        self._spares_failed = False  # no more descriptors once: no spares from then on
        self.idle: Idle | None = None  # work for the waits between paced sends

    def free_slots(self) -> int:
        """How many more source ports may be opened before the oldest must be reaped."""
        return self.max_open - len(self._open)

    def oldest_age(self, now: float) -> float:
        return now - self._open[0][0] if self._open else 0.0

    def _new_socket(self) -> _socket.socket:
        """A new unbound socket with IP_RECVERR on (OSError if there can be none)."""
        # The plain C socket type: socket.socket's Python-level __init__ costs a third more.
        s = _socket.socket(self.family, _NONBLOCK_DGRAM)
        try:
            s.setsockopt(*self._recverr, 1)
        except OSError:
            s.close()
            raise
        return s

    def _bound_socket(self, src: int) -> _socket.socket:
        """A socket bound to ``src`` with IP_RECVERR on, a spare one if there is one
        (OSError if it cannot be bound)."""
        spare = self._spare
        s = spare.pop() if spare else self._new_socket()
        try:
            s.bind((self.source, src))
        except OSError:
            spare.append(s)  # a failed bind leaves it unbound: the next port can have it
            raise
        return s

    def spare_room(self) -> int:
        """How many more spare sockets are wanted and fit the descriptor budget."""
        if self._spares_failed:
            return 0
        budget = self.max_open - len(self._open) - self._closer.pending
        return min(self.spare_wanted, SPARE_MAX, budget) - len(self._spare)

    def trim_spares(self) -> None:
        """Close the spare sockets beyond what is wanted now (the rate fell, the stage
        ended): a run never holds descriptors it will not use."""
        keep = max(0, min(self.spare_wanted, SPARE_MAX))
        spare = self._spare
        if len(spare) > keep:
            fds = [s.detach() for s in spare[keep:]]
            del spare[keep:]
            self._closer.close_later(fds, [-1] * len(fds))  # no port: never waited on

    def prepare(self, until: float, clock: Callable[[], float] = time.perf_counter) -> int:
        """Open spare sockets until ``clock()`` reaches ``until`` or none is wanted;
        returns how many. Time the caller would otherwise spin or sleep away."""
        room = self.spare_room()
        if room <= 0:
            return 0
        spare = self._spare
        made = 0
        try:
            while made < room and clock() < until:
                spare.append(self._new_socket())
                made += 1
        except OSError:  # out of descriptors or kernel memory: the sends open their own
            self._spares_failed = True
        return made

    def _spin_until(self, due: float, clock: Callable[[], float]) -> float:
        """Wait for a paced send until ``due``, opening spare sockets meanwhile (then doing
        the ``idle`` work, if there is time left)."""
        if self.spare_wanted:
            self.prepare(due - SPARE_GUARD, clock)
        if self.idle is not None and due - clock() > IDLE_GUARD:
            self.idle(due - IDLE_GUARD)
        while (t := clock()) < due:
            pass
        return t

    def _bind(self, src: int) -> _socket.socket | GroupResult:
        """A new socket bound to ``src`` with IP_RECVERR on, or why there is none."""
        closer = self._closer
        for _ in range(2):
            closed = closer.closed
            try:
                return self._bound_socket(src)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    # Our own spent socket, waiting to be closed (or closed just now)?
                    if closer.holds(src) or closer.closed != closed:
                        closer.wait()
                        continue
                    return GroupResult([], "source port in use on the probe host")
                if exc.errno in (errno.EACCES, errno.EPERM):
                    return GroupResult([], "binding this source port is not permitted here")
                return GroupResult([], f"cannot bind source port: {exc.strerror or exc}")
        return GroupResult([], "source port in use on the probe host")

    def send_group(self, src: int, items: Sequence[tuple[int, bytes]], now: float) -> GroupResult:
        """Send one source port's datagrams: ``items`` are (dst port, payload)."""
        reused = self._lingering.get(src)
        if reused is not None:
            s = reused
        else:
            bound = self._bind(src)
            if isinstance(bound, GroupResult):
                return bound
            s = bound
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

    def _make_room(self, count: int) -> None:
        """Wait for the closer if ``count`` more sockets would pass the descriptor budget."""
        closer = self._closer
        # Spare sockets are open already: only the rest of ``count`` makes new descriptors.
        held = len(self._open) + max(count, len(self._spare))
        if closer.pending and held + closer.pending > self.max_open:
            closer.wait(max(0, self.max_open - held))

    def send_cells(
        self, batch: CellBatch, now: float, pace: tuple[int, float] | None = None
    ) -> BatchResults | None:
        """Send a batch (see ``CellBatch``): one socket per source port, as ``send_group``;
        with ``pace`` (burst, spacing), bursts of that many datagrams ``spacing`` apart.

        Returns:
            None when every datagram went out, else one ``GroupResult`` per source port.
        """
        if pace is None and not isinstance(batch, Mapping) and batch:
            srcs = _aligned_sources(batch)
            if srcs is not None:
                return self._send_aligned(batch, srcs, now)
        groups = by_source(batch)
        self._make_room(len(groups))
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
                    due, in_burst = self._spin_until(due, clock) + spacing, 0
                results.append((src, self.send_group(src, items, now)))
                in_burst += len(items)
        for src, res in results:
            if len(res.sent) != len(groups[src]):
                return results
        return None

    def _send_aligned(
        self, batch: Sequence[Group], srcs: list[int], now: float
    ) -> BatchResults | None:
        """``send_cells`` for the usual batch: every group has the same source ports, each
        once (one socket per port sends to every destination port in group order). Per
        port only the system calls and a dictionary lookup; a port where anything fails goes
        through ``send_group`` for the rest of its datagrams, and the results are built only
        when something did not go out."""
        self._make_room(len(srcs))
        dsts = [g[0] for g in batch]
        target = self.target
        lingering, remember = self._lingering, self._open.append
        bound = self._bound_socket
        failed: list[tuple[int, GroupResult]] = []
        addrs = [(target, d) for d in dsts]
        cols = [list(g[2]) for g in batch]
        width = len(addrs)
        for i, src in enumerate(srcs):
            s = lingering.get(src)
            j = 0
            try:
                if s is None:
                    s = bound(src)
                    remember((now, src, s))
                    lingering[src] = s
                for j in range(width):
                    s.sendto(cols[j][i], addrs[j])
            except OSError:
                rest = [(dsts[k], cols[k][i]) for k in range(j, width)]
                res = self.send_group(src, rest, now)
                res.sent[:0] = dsts[:j]
                failed.append((i, res))
        if all(len(res.sent) == len(dsts) for _, res in failed):
            return None
        results: BatchResults = [(src, GroupResult(list(dsts))) for src in srcs]
        for i, res in failed:
            results[i] = (srcs[i], res)
        return results

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
        lingering = self._lingering
        fds: list[int] = []
        ports: list[int] = []
        for _, src, s in done:
            if s.fileno() in flagged:
                events.extend(self._drain(src, s))
            lingering.pop(src, None)
            fds.append(s.detach())  # closed by the closer; the socket object owns it no more
            ports.append(src)
        self._closer.close_later(fds, ports)
        return events

    def close(self) -> None:
        """Close every socket (waiting a bounded time for the closer to finish)."""
        self._lingering.clear()
        self.spare_wanted = 0
        self.trim_spares()  # all of them, with nothing wanted
        fds: list[int] = []
        ports: list[int] = []
        while self._open:
            _, src, s = self._open.popleft()
            fds.append(s.detach())
            ports.append(src)
        self._closer.close_later(fds, ports)
        self._closer.stop()
