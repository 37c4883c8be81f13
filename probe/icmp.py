"""ICMP errors, mapped back to the probe's cells.

Theory of operation
-------------------
A cell is (destination port, source port). An ICMP error that comes back for a datagram
turns its cell from ``blocked`` into ``rejected``, so the probe must find out which
datagram an error quotes. There are two ways to hear about errors:

* **Error queue (no privilege).** With ``IP_RECVERR`` (``IPV6_RECVERR`` for IPv6) set on a
  UDP socket, Linux queues every ICMP error for a datagram sent from that socket, connected
  or not. ``recvmsg(..., MSG_ERRQUEUE)`` returns the offending datagram's UDP payload, its
  original destination as the message's address, and a control message holding a
  ``struct sock_extended_err`` followed by the offender's address (the router or host that
  sent the ICMP). The source port is not in the message: it is the socket's own bound port.
  So in bind mode (one socket per source port) a cell is identified by (the socket's bound
  port, the destination port in the message's address), and the payload, which carries the
  datagram's token, says which attempt it was. Caveat: a router that quotes only the
  8-byte UDP header (the RFC 792 minimum) leaves the payload empty; the ports still name
  the cell. :func:`parse_errqueue_message` turns one ``recvmsg`` result into an
  :class:`ErrQueueMessage`.

* **Raw ICMP socket (CAP_NET_RAW).** When the probe sends through a raw socket it owns no
  UDP socket per source port, so it listens on ``socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)``
  (which delivers the outer IPv4 header too) or ``socket(AF_INET6, SOCK_RAW,
  IPPROTO_ICMPV6)`` (which delivers from the ICMPv6 header on) and reads the quoted IP + UDP
  headers itself: :func:`parse_icmp_packet`. Such a socket sees every ICMP message for the
  host, so the caller keeps only quotes whose addresses and ports it sent.

Everything that parses bytes from the network returns ``None`` on anything it does not
understand, truncated or hostile; it never raises. Linux byte order and struct layouts are
assumed (the error queue is a Linux feature).

A pitfall for the socket shell, not handled here: on a socket with ``IP_RECVERR``, a queued
error also sets the socket's pending error, so one ordinary ``recv``/``recvfrom`` may fail
with ``ConnectionRefusedError`` (or another errno) even though the socket is unconnected.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "IPV6_RECVERR",
    "IP_RECVERR",
    "MSG_ERRQUEUE",
    "RECVERR_ANCBUFSIZE",
    "SOL_IP",
    "SOL_IPV6",
    "SO_EE_ORIGIN_ICMP",
    "SO_EE_ORIGIN_ICMP6",
    "SO_EE_ORIGIN_LOCAL",
    "TIMESTAMP_ANCBUFSIZE",
    "ErrQueueMessage",
    "IcmpError",
    "LocalError",
    "QuotedError",
    "arrival_time",
    "describe_icmp",
    "drain_error_queue",
    "enable_recverr",
    "enable_timestamps",
    "parse_errqueue_message",
    "parse_icmp_packet",
    "parse_recverr",
]

# Linux values; the socket module lacks some of them.
SOL_IP: Final[int] = getattr(socket, "SOL_IP", 0)
SOL_IPV6: Final[int] = getattr(socket, "SOL_IPV6", 41)
IP_RECVERR: Final[int] = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR: Final[int] = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE: Final[int] = getattr(socket, "MSG_ERRQUEUE", 0x2000)
MSG_DONTWAIT: Final[int] = getattr(socket, "MSG_DONTWAIT", 0x40)
SO_EE_ORIGIN_NONE: Final = 0
SO_EE_ORIGIN_LOCAL: Final = 1
SO_EE_ORIGIN_ICMP: Final = 2
SO_EE_ORIGIN_ICMP6: Final = 3

# struct sock_extended_err, host byte order: errno, origin, type, code, pad, info, data.
_EXTENDED_ERR = struct.Struct("=IBBBBII")
_SOCKADDR_IN = struct.Struct("=H2s4s")  # family (host order), port, address
_SOCKADDR_IN6 = struct.Struct("=H2s4s16sI")  # family, port, flowinfo, address, scope id
_U16 = struct.Struct("!H")

#: ``ancbufsize`` for ``recvmsg(..., MSG_ERRQUEUE)``: the extended error plus the largest
#: offender address, with room to spare.
RECVERR_ANCBUFSIZE: Final = socket.CMSG_SPACE(_EXTENDED_ERR.size + 64)

# SO_TIMESTAMPNS (the generic value; the socket module has no name for it): the kernel
# stamps each datagram it queues with its arrival time (CLOCK_REALTIME), handed back as a
# control message of the same number. The engine times a router's ICMP limit by its errors'
# arrivals; read late by a busy probe host, errors of one burst looked a refill apart.
_SO_TIMESTAMPNS: Final = 35
_TIMESPEC = struct.Struct("@ll")
TIMESTAMP_ANCBUFSIZE: Final = socket.CMSG_SPACE(_TIMESPEC.size)
_STALE_STAMP: Final = 60.0  # a stamp older than this (or in the future) is not believed

_ICMPV4_ERRORS: Final = frozenset({3, 11, 12})
_ICMPV6_ERRORS: Final = frozenset({1, 2, 3, 4})
_IPPROTO_ICMP: Final = 1
_IPPROTO_UDP: Final = 17
_MAX_EXTENSION_HEADERS: Final = 8


@dataclass(frozen=True)
class IcmpError:
    """An ICMP error from the error queue (origin ``SO_EE_ORIGIN_ICMP`` or ``_ICMP6``).

    ``offender`` is the address that sent the ICMP message (an IPv4-mapped IPv6 address is
    given in dotted IPv4 form), or None when the kernel did not say. ``info`` is
    ``ee_info``: the next-hop MTU for "fragmentation needed" / "packet too big".
    """

    type: int
    code: int
    offender: str | None
    errno: int
    origin: int
    info: int = 0

    @property
    def ipv6(self) -> bool:
        """True for an ICMPv6 error (types and codes follow RFC 4443, not RFC 792)."""
        return self.origin == SO_EE_ORIGIN_ICMP6


@dataclass(frozen=True)
class LocalError:
    """An error the local stack raised for a sent datagram (origin ``SO_EE_ORIGIN_LOCAL``).

    Nothing came back from the path: the datagram never left (e.g. ``EMSGSIZE`` with the
    path MTU in ``info``). The probe treats such a cell as untested, never as rejected.
    """

    errno: int
    info: int = 0


@dataclass(frozen=True)
class QuotedError:
    """An ICMP error read on a raw ICMP socket, with the UDP datagram it quotes."""

    type: int
    code: int
    offender: str
    inner_src: str
    inner_dst: str
    src_port: int
    dst_port: int
    proto: int = _IPPROTO_UDP
    ipv6: bool = False
    quote: bytes = b""  # the quoted UDP payload, as much of it as the error carried
    mtu: int = 0  # next-hop MTU of "fragmentation needed" / "packet too big", else 0


@dataclass(frozen=True)
class ErrQueueMessage:
    """One message from a UDP socket's error queue.

    ``destination`` is where the offending datagram was sent (host, port); the source port
    is the socket's bound port. ``error`` is None when no recognised control message came
    with it. ``truncated`` means the payload did not fit the receive buffer.
    """

    payload: bytes
    destination: tuple[str, int]
    error: IcmpError | LocalError | None
    truncated: bool = False


def _offender(data: bytes) -> str | None:
    """The address in a ``sockaddr_in``/``sockaddr_in6`` (SO_EE_OFFENDER), or None."""
    if len(data) < 2:
        return None
    (family,) = struct.unpack_from("=H", data)
    if family == socket.AF_INET and len(data) >= _SOCKADDR_IN.size:
        _, _, raw4 = _SOCKADDR_IN.unpack_from(data)
        return str(ipaddress.IPv4Address(raw4))
    if family == socket.AF_INET6 and len(data) >= _SOCKADDR_IN6.size:
        _, _, _, raw6, _ = _SOCKADDR_IN6.unpack_from(data)
        address = ipaddress.IPv6Address(raw6)
        if address.ipv4_mapped is not None:  # an IPv4 ICMP on a dual-stack socket
            return str(address.ipv4_mapped)
        return str(address)
    return None  # AF_UNSPEC: the kernel did not record an offender


def parse_recverr(level: int, type_: int, data: bytes) -> IcmpError | LocalError | None:
    """Parse one control message from ``recvmsg(..., MSG_ERRQUEUE)``.

    Args:
        level, type_, data: one ``(cmsg_level, cmsg_type, cmsg_data)`` from the ancillary data.

    Returns:
        An :class:`IcmpError` for an ICMP or ICMPv6 origin; a :class:`LocalError` for a local
        origin (the datagram never left, so the caller must not count it as a reject); None
        for other control messages, other origins (zerocopy, timestamping) and truncated data.
    """
    if (level, type_) not in ((SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)):
        return None
    if len(data) < _EXTENDED_ERR.size:
        return None
    errno, origin, icmp_type, code, _pad, info, _data = _EXTENDED_ERR.unpack_from(data)
    if origin in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
        offender = _offender(data[_EXTENDED_ERR.size :])
        return IcmpError(icmp_type, code, offender, errno, origin, info)
    if origin == SO_EE_ORIGIN_LOCAL:
        return LocalError(errno, info)
    return None


def parse_errqueue_message(
    payload: bytes, ancdata: list[tuple[int, int, bytes]], msg_flags: int, address: Any
) -> ErrQueueMessage:
    """Turn one ``socket.recvmsg(..., MSG_ERRQUEUE)`` result into an :class:`ErrQueueMessage`.

    Call it as ``parse_errqueue_message(*sock.recvmsg(bufsize, RECVERR_ANCBUFSIZE,
    MSG_ERRQUEUE))`` (the trio socket's ``recvmsg`` returns the same tuple).
    """
    error: IcmpError | LocalError | None = None
    for level, type_, data in ancdata:
        error = parse_recverr(level, type_, data)
        if error is not None:
            break
    if isinstance(address, tuple) and len(address) >= 2:
        destination = (str(address[0]), int(address[1]))
    else:
        destination = ("", 0)
    return ErrQueueMessage(payload, destination, error, bool(msg_flags & socket.MSG_TRUNC))


def enable_timestamps(sock: Any) -> bool:
    """Ask the kernel to stamp ``sock``'s datagrams with their arrival (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def arrival_time(ancdata: Any, wall: float, now: float) -> float | None:
    """When a datagram arrived, on the clock that reads ``now`` while the wall clock reads
    ``wall``, from its kernel stamp in ``ancdata`` (``recvmsg``'s control messages); None
    without a believable one."""
    for level, type_, data in ancdata:
        if level == socket.SOL_SOCKET and type_ == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            ago = wall - (int(sec) + int(nsec) * 1e-9)
            if -0.001 <= ago <= _STALE_STAMP:
                return now - max(0.0, ago)
    return None


def enable_recverr(sock: socket.socket) -> None:
    """Ask the kernel to queue ICMP errors on ``sock`` (an AF_INET or AF_INET6 UDP socket).

    On an AF_INET6 socket, IP_RECVERR is set as well so that errors for IPv4-mapped
    destinations are queued too (best effort).
    """
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_IP, IP_RECVERR, 1)
    else:
        sock.setsockopt(SOL_IP, IP_RECVERR, 1)


def drain_error_queue(
    sock: socket.socket, *, bufsize: int = 2048, limit: int = 1024
) -> list[ErrQueueMessage]:
    """Read what is in ``sock``'s error queue now, without waiting (at most ``limit`` messages).

    For synchronous callers; the trio shell awaits ``recvmsg(..., MSG_ERRQUEUE)`` instead
    (an error-queue entry wakes readers, as POLLERR).
    """
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLERR)  # POLLERR: a queued error is pending
    messages: list[ErrQueueMessage] = []
    for _ in range(limit):
        if not poller.poll(0):
            break
        try:
            result = sock.recvmsg(bufsize, RECVERR_ANCBUFSIZE, MSG_ERRQUEUE | MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, TimeoutError):
            break
        messages.append(parse_errqueue_message(*result))
    return messages


def _icmpv4_checksum_ok(message: bytes) -> bool:
    value = int.from_bytes(message, "big")
    if len(message) & 1:
        value <<= 8
    # A valid message sums to 0xFFFF (residue 0); an all-zero message is not valid.
    return value != 0 and value % 0xFFFF == 0


def _parse_icmpv4(packet: bytes, from_addr: str) -> QuotedError | None:
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0x0F) * 4
    (total_length,) = _U16.unpack_from(packet, 2)
    (fragment,) = _U16.unpack_from(packet, 6)
    if ihl < 20 or packet[9] != _IPPROTO_ICMP or fragment & 0x1FFF:
        return None
    if total_length < ihl + 8:
        return None
    if total_length <= len(packet):
        message = packet[ihl:total_length]
        if not _icmpv4_checksum_ok(message):
            return None
    else:  # a short read: parse what arrived, nothing to check the sum against
        message = packet[ihl:]
    if len(message) < 8 or message[0] not in _ICMPV4_ERRORS:
        return None
    icmp_type, code = message[0], message[1]
    inner = message[8:]
    if len(inner) < 20 or inner[0] >> 4 != 4:
        return None
    inner_ihl = (inner[0] & 0x0F) * 4
    (inner_fragment,) = _U16.unpack_from(inner, 6)
    if inner_ihl < 20 or inner[9] != _IPPROTO_UDP or inner_fragment & 0x1FFF:
        return None  # not UDP, or a later fragment without the UDP header
    if len(inner) < inner_ihl + 4:
        return None
    src_port, dst_port = struct.unpack_from("!HH", inner, inner_ihl)
    (inner_total,) = _U16.unpack_from(inner, 2)
    quote = inner[inner_ihl + 8 : max(inner_ihl + 8, min(len(inner), inner_total))]
    mtu = _U16.unpack_from(message, 6)[0] if (icmp_type, code) == (3, 4) else 0
    return QuotedError(
        type=icmp_type,
        code=code,
        offender=from_addr,
        inner_src=str(ipaddress.IPv4Address(inner[12:16])),
        inner_dst=str(ipaddress.IPv4Address(inner[16:20])),
        src_port=src_port,
        dst_port=dst_port,
        proto=_IPPROTO_UDP,
        ipv6=False,
        quote=bytes(quote),
        mtu=mtu,
    )


def _parse_icmpv6(packet: bytes, from_addr: str) -> QuotedError | None:
    if len(packet) < 8 or packet[0] not in _ICMPV6_ERRORS:
        return None
    icmp_type, code = packet[0], packet[1]
    inner = packet[8:]
    if len(inner) < 40 or inner[0] >> 4 != 6:
        return None
    next_header = inner[6]
    offset = 40
    for _ in range(_MAX_EXTENSION_HEADERS + 1):
        if next_header == _IPPROTO_UDP:
            break
        if len(inner) < offset + 8:  # every extension header is at least 8 bytes
            return None
        if next_header in (0, 43, 60):  # hop-by-hop, routing, destination options
            header_length = (inner[offset + 1] + 1) * 8
        elif next_header == 44:  # fragment
            (fragment,) = _U16.unpack_from(inner, offset + 2)
            if fragment >> 3:
                return None  # a later fragment: no UDP header in it
            header_length = 8
        elif next_header == 51:  # authentication header
            header_length = (inner[offset + 1] + 2) * 4
        else:  # ESP, no next header, another protocol
            return None
        next_header = inner[offset]
        offset += header_length
    else:
        return None
    if len(inner) < offset + 4:
        return None
    src_port, dst_port = struct.unpack_from("!HH", inner, offset)
    (payload_length,) = _U16.unpack_from(inner, 4)
    quote = inner[offset + 8 : max(offset + 8, min(len(inner), 40 + payload_length))]
    mtu = struct.unpack_from("!I", packet, 4)[0] if icmp_type == 2 else 0
    return QuotedError(
        type=icmp_type,
        code=code,
        offender=from_addr,
        inner_src=str(ipaddress.IPv6Address(inner[8:24])),
        inner_dst=str(ipaddress.IPv6Address(inner[24:40])),
        src_port=src_port,
        dst_port=dst_port,
        proto=_IPPROTO_UDP,
        ipv6=True,
        quote=bytes(quote),
        mtu=min(mtu, 0xFFFF),
    )


def parse_icmp_packet(packet: bytes, *, ipv6: bool, from_addr: str) -> QuotedError | None:
    """Parse what a raw ICMP socket received into the error and the UDP datagram it quotes.

    Args:
        packet: for IPv4 (``IPPROTO_ICMP``), the outer IPv4 header + ICMP message; for IPv6
            (``IPPROTO_ICMPV6``), the ICMPv6 message alone.
        ipv6: which of the two.
        from_addr: the sender of the ICMP message (``recvfrom``'s address), the offender.

    Returns:
        A :class:`QuotedError` for an ICMP error (IPv4 types 3, 11, 12; IPv6 types 1-4) that
        quotes a UDP datagram, else None: other ICMP messages, other quoted protocols,
        later fragments, truncated or malformed input, and (IPv4) a bad ICMP checksum when
        the whole message is present. The kernel checks ICMPv6 checksums on raw sockets.
        Never raises.
    """
    if ipv6:
        return _parse_icmpv6(packet, from_addr)
    return _parse_icmpv4(packet, from_addr)


_DESCRIPTIONS_V4: Final[dict[tuple[int, int], str]] = {
    (3, 0): "net unreachable",
    (3, 1): "host unreachable",
    (3, 2): "protocol unreachable",
    (3, 3): "port unreachable",
    (3, 4): "fragmentation needed",
    (3, 9): "net administratively prohibited",
    (3, 10): "host administratively prohibited",
    (3, 13): "administratively prohibited",
    (11, 0): "TTL exceeded in transit",
    (12, 0): "parameter problem",
}
_DESCRIPTIONS_V6: Final[dict[tuple[int, int], str]] = {
    (1, 0): "no route to destination",
    (1, 1): "administratively prohibited",
    (1, 3): "address unreachable",
    (1, 4): "port unreachable",
    (1, 5): "source address failed policy",
    (1, 6): "reject route",
    (2, 0): "packet too big",
    (3, 0): "hop limit exceeded in transit",
    (4, 0): "parameter problem",
}


def describe_icmp(type_: int, code: int, *, ipv6: bool) -> str:
    """A short human name for an ICMP type and code, e.g. ``"port unreachable"``."""
    table = _DESCRIPTIONS_V6 if ipv6 else _DESCRIPTIONS_V4
    return table.get((type_, code), f"ICMP{'v6' if ipv6 else ''} type {type_} code {code}")
