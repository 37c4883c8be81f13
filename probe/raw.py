"""The privileged sender: every source port through one raw socket.

Theory of operation
-------------------
Bind mode (:class:`probe.sender.BindSender`) pays for a socket, a bind and a close per source
port and cannot use a port that something on the probe host has bound. With CAP_NET_RAW the
probe writes the UDP header itself (:class:`probe.packet.UdpPacketBuilder`) and hands whole
packets to one raw socket, so any source port is usable, busy or not:

* IPv4: ``socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`` (IP_HDRINCL implied): IPv4 header + UDP
  header + payload, DF set, checksums filled in. Such a socket never receives anything.
* IPv6: ``socket(AF_INET6, SOCK_RAW, IPPROTO_UDP)`` bound to the source address (the UDP
  checksum covers it): UDP header + payload; the kernel writes the IPv6 header. A raw UDP
  socket would also get a copy of every UDP datagram the host receives, so a BPF program
  that accepts nothing is attached to it and its receive buffer is made tiny.

Packets go out in batches through ``sendmmsg(2)`` (called through ctypes: the socket module
has no binding), one system call for up to 1024 datagrams; per-datagram ``sendto`` is the
fallback where libc lacks it. On loopback and veth the kernel does the receiving side's work
inside that call, so the kernel, not Python, bounds the rate.

No UDP socket exists for a source port, so the kernel has nowhere to queue an ICMP error for
it: the sender listens on a raw ICMP (ICMPv6) socket instead, filtered in the kernel to error
types, and :meth:`RawSender.reap` drains it without blocking. That socket sees every ICMP
error reaching the host, so an error counts only when the datagram it quotes went from our
source address to our target, to a destination port we sent to, from a source port we sent
from; the quoted UDP header names the cell.

The source address must be one of this host's (checked when the sender is made): the probe
never forges another host's address, and the ICMP errors must come back to it.
"""

from __future__ import annotations

import _socket
import contextlib
import ctypes
import errno
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np

from probe.icmp import (
    TIMESTAMP_ANCBUFSIZE,
    arrival_time,
    enable_timestamps,
    parse_icmp_packet,
)
from probe.packet import UdpPacketBuilder, fragment_ipv4
from probe.sender import (
    IDLE_GUARD,
    BatchResults,
    BindSender,
    CellBatch,
    Group,
    GroupResult,
    IcmpEvent,
    Idle,
    groups_of,
    route_mtu,
)
from udpreach.core.block import Block
from udpreach.core.errors import ConfigError
from udpreach.net.libc import IOVEC_WORDS, MMSGHDR_WORDS, libc_function

__all__ = ["MODES", "RawSender", "make_sender", "raw_available"]

#: The send modes ``make_sender`` accepts.
MODES: Final = ("auto", "raw", "bind")

_NONBLOCK: Final = getattr(socket, "SOCK_NONBLOCK", 0)
_SOL_RAW: Final = 255
_ICMP_FILTER: Final = 1  # SOL_RAW option: a bit mask of ICMP types to drop
_ICMP6_FILTER: Final = 1  # IPPROTO_ICMPV6 option: a 256-bit map of types to drop
_SO_ATTACH_FILTER: Final = 26
_SO_RCVBUFFORCE: Final = 33
_SO_SNDBUFFORCE: Final = 32
_ICMP_ERRORS: Final = (3, 11, 12)  # destination unreachable, time exceeded, parameter problem
_ICMP6_ERRORS: Final = (1, 2, 3, 4)  # unreachable, too big, time exceeded, parameter problem
_IPPROTO_ICMPV6: Final = getattr(socket, "IPPROTO_ICMPV6", 58)
_ICMP_RCVBUF: Final = 4 * 1024 * 1024
_SNDBUF: Final = 4 * 1024 * 1024
_MAX_VLEN: Final = 1024  # UIO_MAXIOV: the most messages one sendmmsg takes
_DRAIN_LIMIT: Final = 16384  # ICMP messages read per reap: bounded work per call
_FREE_SLOTS: Final = 1 << 20  # no per-port sockets: never a reason to wait
_RETRY_LIMIT: Final = 8

_NO_PERMISSION = "raw sockets need CAP_NET_RAW (run the probe as root, or use --send-mode bind)"


# -- sendmmsg through ctypes ---------------------------------------------------------------

_SendMmsg = Callable[[int, int, int, int], int]


def _load_sendmmsg() -> _SendMmsg | None:
    fn = libc_function("sendmmsg", [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int])
    if fn is None:
        return None

    def call(fd: int, msgvec: int, vlen: int, flags: int) -> int:
        return int(fn(fd, msgvec, vlen, flags))

    return call


_sendmmsg: _SendMmsg | None = _load_sendmmsg()


def _address_of(data: bytes) -> int:
    # ctypes.c_char_p over a bytes object points at its buffer without copying; the caller
    # keeps ``data`` alive for as long as the address is used.
    address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert address is not None
    return address


class _Packed:
    """Packets laid out for one ``sendmmsg`` batch (``hdr`` None: sent one by one)."""

    __slots__ = ("data", "hdr", "iov", "packets")

    def __init__(
        self,
        packets: Sequence[bytes],
        data: bytes,
        iov: np.ndarray | None,
        hdr: np.ndarray | None,
    ) -> None:
        self.packets = packets
        self.data = data  # the buffer the iovecs point into: kept alive here
        self.iov = iov
        self.hdr = hdr


class _Transmitter:
    """Sends a list of packets through one raw socket, sendmmsg where possible."""

    def __init__(self, sock: _socket.socket, destination: tuple[str, int], ipv6: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.destination = destination
        if ipv6:
            name = struct.pack(
                "=H2s4s16sI",
                socket.AF_INET6,
                b"\0\0",
                b"\0" * 4,
                socket.inet_pton(socket.AF_INET6, destination[0]),
                0,
            )
        else:
            name = struct.pack(
                "=H2s4s8s", socket.AF_INET, b"\0\0", socket.inet_aton(destination[0]), b""
            )
        self._name = ctypes.create_string_buffer(name, len(name))
        self._name_addr = ctypes.addressof(self._name)
        self._name_len = len(name)
        self.syscalls = 0

    def pack(self, packets: Sequence[bytes]) -> _Packed:
        """Lay ``packets`` out for ``sendmmsg``: one buffer, its iovecs and message headers.

        A ``Block`` already is the buffer, and its packets' places are arithmetic.
        """
        if _sendmmsg is None or len(packets) < 2:
            return _Packed(packets, b"", None, None)
        n = len(packets)
        iov = np.empty((n, IOVEC_WORDS), dtype=np.uint64)
        if isinstance(packets, Block):
            # One buffer, alive as long as the _Packed: the iovecs point into it.
            data = packets.data
            base = _address_of(data)
            size = packets.size
            iov[:, 0] = np.arange(base, base + n * size, size, dtype=np.uint64)
            iov[:, 1] = size
        else:
            data = b"".join(packets)
            base = _address_of(data)
            lengths = np.fromiter(map(len, packets), dtype=np.uint64, count=n)
            iov[:, 1] = lengths
            iov[:, 0] = base
            iov[1:, 0] += np.cumsum(lengths[:-1], dtype=np.uint64)
        iov_addr = iov.ctypes.data
        hdr = np.zeros((n, MMSGHDR_WORDS), dtype=np.uint64)
        hdr[:, 0] = self._name_addr
        hdr[:, 1] = self._name_len
        hdr[:, 2] = np.arange(iov_addr, iov_addr + iov.nbytes, 8 * IOVEC_WORDS, dtype=np.uint64)
        hdr[:, 3] = 1
        return _Packed(packets, data, iov, hdr)

    def send_packed(
        self,
        packed: _Packed,
        start: int,
        pace: tuple[int, float] | None = None,
        idle: Idle | None = None,
    ) -> tuple[int, int]:
        """Send ``packed`` from packet ``start`` on, in order, until one fails; with
        ``pace`` (burst, spacing), in bursts of that many packets at least ``spacing``
        seconds apart, start to start (spun: sleeping is not that fine-grained; ``idle``
        is given the time to each burst first).

        Returns:
            (how many went out from ``start``, the errno of the next one or 0).
        """
        sendmmsg = _sendmmsg
        if packed.hdr is None or sendmmsg is None:
            return self._send_each(packed.packets[start:])
        n = len(packed.packets)
        hdr_addr = packed.hdr.ctypes.data
        done = start
        interrupted = 0
        chunk, spacing = pace if pace is not None else (_MAX_VLEN, 0.0)
        chunk = max(1, min(chunk, _MAX_VLEN))
        clock = time.perf_counter
        due = 0.0
        while done < n:
            count = min(n - done, chunk)
            if spacing:
                if idle is not None and due - clock() > IDLE_GUARD:
                    idle(due - IDLE_GUARD)
                while (t := clock()) < due:
                    pass
                due = t + spacing
            self.syscalls += 1
            sent = sendmmsg(self.fd, hdr_addr + 8 * MMSGHDR_WORDS * done, count, 0)
            if sent > 0:
                done += sent
                continue
            err = ctypes.get_errno()
            if err == errno.EINTR and interrupted < _RETRY_LIMIT:
                interrupted += 1
                continue
            return done - start, err or errno.EIO
        return done - start, 0

    def _send_each(self, packets: Sequence[bytes]) -> tuple[int, int]:
        sendto = self.sock.sendto
        destination = self.destination
        for i, packet in enumerate(packets):
            self.syscalls += 1
            try:
                sendto(packet, destination)
            except InterruptedError:
                try:
                    sendto(packet, destination)
                except OSError as exc:
                    return i, exc.errno or errno.EIO
            except OSError as exc:
                return i, exc.errno or errno.EIO
        return len(packets), 0


def _attach_drop_all(sock: _socket.socket) -> None:
    # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k} = ret #0 (BPF_RET | BPF_K).
    program = ctypes.create_string_buffer(struct.pack("=HBBI", 0x06, 0, 0, 0), 8)
    fprog = struct.pack("=HxxxxxxQ", 1, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def _set_buffer(sock: _socket.socket, force: int, plain: int, size: int) -> None:
    for option in (force, plain):  # the FORCE variant ignores rmem_max/wmem_max (root)
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
            return
        except OSError:
            continue


def _open_icmp(ipv6: bool) -> _socket.socket:
    if ipv6:
        sock = _socket.socket(socket.AF_INET6, socket.SOCK_RAW | _NONBLOCK, _IPPROTO_ICMPV6)
        blocked = [0xFFFFFFFF] * 8  # bit set: drop that type
        for t in _ICMP6_ERRORS:
            blocked[t >> 5] &= ~(1 << (t & 31))
        # Best effort: unfiltered still works, the parser ignores what is not an error.
        with contextlib.suppress(OSError):
            sock.setsockopt(_IPPROTO_ICMPV6, _ICMP6_FILTER, struct.pack("=8I", *blocked))
    else:
        sock = _socket.socket(socket.AF_INET, socket.SOCK_RAW | _NONBLOCK, socket.IPPROTO_ICMP)
        mask = 0xFFFFFFFF
        for t in _ICMP_ERRORS:
            mask &= ~(1 << t)
        with contextlib.suppress(OSError):
            sock.setsockopt(_SOL_RAW, _ICMP_FILTER, struct.pack("=I", mask))
    sock.setblocking(False)
    _set_buffer(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, _ICMP_RCVBUF)
    enable_timestamps(sock)  # best effort: without, an error arrived when it was read
    return sock


def _open_send(ipv6: bool, source: str) -> _socket.socket:
    if ipv6:
        sock = _socket.socket(socket.AF_INET6, socket.SOCK_RAW | _NONBLOCK, socket.IPPROTO_UDP)
        try:
            sock.bind((source, 0))
            with contextlib.suppress(OSError):
                _attach_drop_all(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)  # the kernel's minimum
        except BaseException:
            sock.close()
            raise
    else:
        sock = _socket.socket(socket.AF_INET, socket.SOCK_RAW | _NONBLOCK, socket.IPPROTO_RAW)
    sock.setblocking(False)
    _set_buffer(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, _SNDBUF)
    return sock


def _check_local(source: str, ipv6: bool) -> None:
    """Raise OSError (EADDRNOTAVAIL) unless ``source`` is an address of this host."""
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((source, 0))


def raw_available(ipv6: bool = False) -> str | None:
    """None when this process can open the raw sockets `RawSender` needs, else the reason.

    Args:
        ipv6: check the IPv6 sockets instead of the IPv4 ones.
    """
    try:
        if ipv6:
            opened = [
                _socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP),
                _socket.socket(socket.AF_INET6, socket.SOCK_RAW, _IPPROTO_ICMPV6),
            ]
        else:
            opened = [
                _socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
                _socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
            ]
    except PermissionError:
        return _NO_PERMISSION
    except OSError as exc:
        return f"cannot open a raw socket: {exc.strerror or exc}"
    for sock in opened:
        sock.close()
    return None


class RawSender:
    """Sends from any source port through one raw socket; ICMP errors from a raw ICMP socket.

    The same interface as :class:`probe.sender.BindSender`.

    Raises (constructor):
        PermissionError: no CAP_NET_RAW.
        OSError: ``source`` is not an address of this host, or a socket cannot be opened.
        ValueError: the addresses do not parse or their families differ.
    """

    mode = "raw"

    def __init__(self, source: str, target: str, *, linger: float = 0.05) -> None:
        self.builder = UdpPacketBuilder(source, target)
        self.ipv6 = self.builder.ipv6
        # The text form parse_icmp_packet produces, to compare quoted addresses with.
        self.source = str(ipaddress.ip_address(source))
        self.target = str(ipaddress.ip_address(target))
        self.family = self.builder.family
        self.linger = linger
        _check_local(self.source, self.ipv6)
        self._icmp = _open_icmp(self.ipv6)
        try:
            self._sock = _open_send(self.ipv6, self.source)
        except BaseException:
            self._icmp.close()
            raise
        self._tx = _Transmitter(self._sock, self.builder.destination, self.ipv6)
        # Which source ports and destination ports this sender has used: an ICMP error for
        # a datagram we never sent is someone else's.
        self._sent_src = bytearray(65536)
        self._sent_src_np = np.frombuffer(self._sent_src, dtype=np.uint8)
        self._sent_dst: set[int] = set()
        self.sent = 0
        self.icmp_seen = 0
        self.icmp_foreign = 0
        self.closed = False
        # The path MTU as the kernel knows it (the route's), lowered by every "fragmentation
        # needed" that comes back: a bigger IPv4 datagram goes out in fragments.
        self.path_mtu = route_mtu(self.target, self.ipv6)
        self._ident = int.from_bytes(np.random.default_rng().bytes(2), "big") or 1

    @property
    def syscalls(self) -> int:
        """System calls made to send so far (a batching measure for benchmarks)."""
        return self._tx.syscalls

    def free_slots(self) -> int:
        """A large constant: no per-port sockets, so nothing to wait for."""
        return _FREE_SLOTS

    def oldest_age(self, now: float) -> float:
        return 0.0

    # No socket per source port, so nothing to open ahead (``BindSender.prepare``).
    spare_wanted = 0
    # Work for the waits between paced bursts (see ``probe.sender.Idle``).
    idle: Idle | None = None

    def spare_room(self) -> int:
        return 0

    def trim_spares(self) -> None:
        pass

    def prepare(self, until: float, clock: Callable[[], float] | None = None) -> int:
        return 0

    def send_group(self, src: int, items: Sequence[tuple[int, bytes]], now: float) -> GroupResult:
        """Send one source port's datagrams: ``items`` are (dst port, payload).

        A refused datagram (local firewall, too large) leaves only its own cell unsent, with
        the reason in ``untested``; a full kernel buffer stops the group (``backpressure``).
        """
        self._check_open()
        build = self.builder.build
        sendto = self._sock.sendto
        destination = self._tx.destination
        sent: list[int] = []
        result = GroupResult(sent)
        for dst, payload in items:
            packet = build(src, dst, payload)
            for _ in range(_RETRY_LIMIT):
                try:
                    sendto(packet, destination)
                    sent.append(dst)
                    break
                except InterruptedError:
                    continue
                except OSError as exc:
                    err = exc.errno or errno.EIO
                    if err in (errno.ENOBUFS, errno.EAGAIN):
                        result.backpressure = True
                    elif result.untested is None:
                        result.untested = _reason(err)
                    break
            if result.backpressure:
                break
        self._tx.syscalls += len(items)
        self.sent += len(sent)
        self._sent_src[src] = 1
        self._sent_dst.update(sent)
        if result.backpressure:
            result.untested = None  # retried later; a refusal shows up again then
        return result

    def send_cells(
        self, batch: CellBatch, now: float = 0.0, pace: tuple[int, float] | None = None
    ) -> BatchResults | None:
        """Send a batch (see ``CellBatch``) through ``sendmmsg``, one destination port after
        another, in the batch's order.

        Returns:
            None when every datagram went out (the fast path). Otherwise one
            ``GroupResult`` per source port of the batch: ``backpressure`` marks a source
            port some of whose datagrams were not sent because the kernel ran out of buffer
            (send them again later); ``untested`` one the probe host refused to send for (a
            local firewall, a datagram too large to leave unfragmented).

        Raises:
            ValueError: a port out of range or a payload too long.
            OSError: the sender is closed.
        """
        self._check_open()
        packets: Sequence[bytes]
        builder = self.builder
        blocks: list[Block] = []
        groups = groups_of(batch)
        if not self.ipv6 and any(
            _payload_size(payloads) + 28 > self.path_mtu for _, _, payloads in groups
        ):
            return self._send_fragmented(groups)
        for dst, srcs, payloads in groups:
            if not isinstance(payloads, Block):  # payloads one by one: the general path
                break
            blocks.append(builder.build_block(srcs, dst, payloads))
        if blocks and len(blocks) == len(groups) and len({b.size for b in blocks}) == 1:
            packets = blocks[0] if len(blocks) == 1 else Block.join(blocks)
        else:
            built: list[bytes] = []
            for dst, srcs, payloads in groups:
                built += builder.build_many(srcs, dst, payloads)
            packets = built
        # The ports are valid now (the builders checked them). Marked before sending: an ICMP
        # error for them is never "foreign".
        for dst, srcs, _ in groups:
            self._sent_src_np[np.asarray(srcs, dtype=np.intp)] = 1
            self._sent_dst.add(dst)
        tx = self._tx
        packed = tx.pack(packets)
        if pace:
            done, err = tx.send_packed(packed, 0, pace, self.idle)
        else:
            done, err = tx.send_packed(packed, 0)
        failed: dict[int, str] = {}
        while err and err not in (errno.ENOBUFS, errno.EAGAIN):
            failed[done] = _reason(err)
            more, err = tx.send_packed(packed, done + 1)
            done += 1 + more
        self.sent += done - len(failed)
        if done == len(packets) and not failed:
            return None
        return self._partial(groups, done, failed)

    def _send_fragmented(self, groups: list[Group]) -> BatchResults | None:
        """Datagrams over the path MTU, as a UDP socket sends them: each cut into fragments
        (``fragment_ipv4``) sent together; what fits still goes whole with DF."""
        tx = self._tx
        results: dict[int, GroupResult] = {}
        stop = False
        for dst, srcs_any, payloads in groups:
            srcs = [int(s) for s in srcs_any]
            packets = self.builder.build_many(srcs, dst, payloads)
            self._sent_dst.add(dst)
            for src, packet in zip(srcs, packets, strict=True):
                result = results.setdefault(src, GroupResult([]))
                if stop:
                    result.backpressure = True
                    continue
                self._sent_src[src] = 1
                self._ident = self._ident % 0xFFFF + 1
                frags = fragment_ipv4(packet, self.path_mtu, self._ident)
                done, err = tx.send_packed(tx.pack(frags), 0)
                if done == len(frags):
                    result.sent.append(dst)
                    self.sent += 1
                elif err in (errno.ENOBUFS, errno.EAGAIN):
                    result.backpressure = True
                    stop = True
                elif result.untested is None:
                    result.untested = _reason(err)
        if all(not r.backpressure and r.untested is None for r in results.values()):
            return None
        for result in results.values():
            if result.backpressure:
                result.untested = None
        return list(results.items())

    @staticmethod
    def _partial(groups: list[Group], done: int, failed: dict[int, str]) -> BatchResults:
        # Packet i is the i-th (dst, src) of the batch in iteration order, as built above.
        order = [(int(src), dst) for dst, srcs, _ in groups for src in srcs]
        results: dict[int, GroupResult] = {}
        for i, (src, dst) in enumerate(order):
            result = results.get(src)
            if result is None:
                result = results[src] = GroupResult([])
            if i >= done:
                result.backpressure = True  # left unsent: retried later
            elif i in failed:
                if result.untested is None:
                    result.untested = failed[i]
            else:
                result.sent.append(dst)
        for result in results.values():
            if result.backpressure:
                result.untested = None  # a refusal shows up again when it is retried
        return list(results.items())

    def _check_open(self) -> None:
        # sendmmsg goes by file descriptor number, which a closed socket may have passed on
        # to another socket by now: refuse rather than write into someone else's.
        if self.closed:
            raise OSError(errno.EBADF, "the raw sender is closed")

    def reap(self, now: float, *, everything: bool = False) -> list[IcmpEvent]:
        """The ICMP errors that arrived for our datagrams since the last call (never waits)."""
        events: list[IcmpEvent] = []
        if self.closed:
            return events
        recvmsg = self._icmp.recvmsg
        ipv6 = self.ipv6
        source, target = self.source, self.target
        sent_src, sent_dst = self._sent_src, self._sent_dst
        wall = time.time()
        for _ in range(_DRAIN_LIMIT):
            try:
                data, ancdata, _flags, address = recvmsg(2048, TIMESTAMP_ANCBUFSIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            quoted = parse_icmp_packet(data, ipv6=ipv6, from_addr=str(address[0]))
            if quoted is None:
                continue
            if quoted.mtu and quoted.inner_src == source and quoted.inner_dst == target:
                # As the kernel does for its own sockets: later datagrams fit the hop.
                self.path_mtu = max(_MIN_MTU, min(self.path_mtu, quoted.mtu))
            if (
                quoted.inner_src != source
                or quoted.inner_dst != target
                or not sent_src[quoted.src_port]
                or quoted.dst_port not in sent_dst
            ):
                self.icmp_foreign += 1
                continue
            events.append(
                IcmpEvent(
                    quoted.dst_port,
                    quoted.src_port,
                    quoted.type,
                    quoted.code,
                    quoted.offender,
                    quote=quoted.quote,
                    mtu=quoted.mtu,
                    ipv6=quoted.ipv6,
                    at=arrival_time(ancdata, wall, now) if ancdata else None,
                )
            )
        self.icmp_seen += len(events)
        return events

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._sock.close()
        self._icmp.close()


log = logging.getLogger("udpreach.probe")
_MIN_MTU = 68  # IPv4's minimum


def _payload_size(payloads: Sequence[bytes]) -> int:
    """The largest payload of a group (a Block's are all one size)."""
    if isinstance(payloads, Block):
        return payloads.size
    return max(map(len, payloads), default=0)


def _reason(err: int) -> str:
    if err in (errno.EPERM, errno.EACCES):
        return "sending refused on the probe host (local firewall)"
    if err == errno.EMSGSIZE:
        return "datagram larger than the probe host's interface MTU"
    if err in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return "no route to the agent from the probe host"
    return f"send failed: {errno.errorcode.get(err, str(err))}"


def make_sender(mode: str, source: str, target: str, linger: float) -> RawSender | BindSender:
    """The sender for a send mode: ``raw``, ``bind``, or ``auto`` (raw when possible).

    Raises:
        ConfigError: an unknown mode, or ``raw`` where raw sockets cannot be used.
    """
    if mode not in MODES:
        raise ConfigError(f"send mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "bind":
        return BindSender(source, target, linger=linger)
    ipv6 = ":" in target
    reason = raw_available(ipv6)
    if reason is None:
        try:
            return RawSender(source, target, linger=linger)
        except OSError as exc:
            reason = f"cannot send raw from {source}: {exc.strerror or exc}"
    if mode == "raw":
        raise ConfigError(f"send mode raw: {reason}")
    log.warning("send mode auto: bind mode for this run (%s)", reason)
    return BindSender(source, target, linger=linger)
