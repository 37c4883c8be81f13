"""ICMP errors: the error queue and raw ICMP sockets on loopback, and hostile bytes."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import select
import socket
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probe.icmp import (
    IP_RECVERR,
    IPV6_RECVERR,
    SO_EE_ORIGIN_ICMP,
    SO_EE_ORIGIN_ICMP6,
    SO_EE_ORIGIN_LOCAL,
    SOL_IP,
    SOL_IPV6,
    ErrQueueMessage,
    IcmpError,
    LocalError,
    QuotedError,
    describe_icmp,
    drain_error_queue,
    enable_recverr,
    parse_errqueue_message,
    parse_icmp_packet,
    parse_recverr,
)
from probe.packet import UdpPacketBuilder, internet_checksum

TIMEOUT = 2.0


# --- helpers --------------------------------------------------------------------------


def udp_socket(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.bind((host, 0))
    except OSError as exc:
        sock.close()
        pytest.skip(f"{host} is not usable here: {exc}")
    return sock


def closed_port(family: int, host: str) -> int:
    """A port that nothing listens on (bound, then released)."""
    with udp_socket(family, host) as sock:
        port: int = sock.getsockname()[1]
    return port


def wait_for_errors(sock: socket.socket, count: int) -> list[ErrQueueMessage]:
    """Drain the error queue until ``count`` messages arrived or TIMEOUT passed."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLERR)
    messages: list[ErrQueueMessage] = []
    deadline = time.monotonic() + TIMEOUT
    while len(messages) < count and (left := deadline - time.monotonic()) > 0:
        poller.poll(int(left * 1000) + 1)
        messages += drain_error_queue(sock)
    return messages


def extended_err(
    errno_: int, origin: int, type_: int, code: int, info: int = 0, offender: bytes = b""
) -> bytes:
    return struct.pack("=IBBBBII", errno_, origin, type_, code, 0, info, 0) + offender


def sockaddr_in(address: str) -> bytes:
    return struct.pack("=H2s4s8x", socket.AF_INET, b"\x00\x00", socket.inet_aton(address))


def sockaddr_in6(address: str) -> bytes:
    packed = ipaddress.IPv6Address(address).packed
    return struct.pack("=H2s4s16sI", socket.AF_INET6, b"\x00\x00", bytes(4), packed, 0)


def icmpv4_error(
    quoted: bytes,
    *,
    type_: int = 3,
    code: int = 3,
    src: str = "198.19.2.1",
    dst: str = "198.19.0.1",
) -> bytes:
    """An IPv4 packet carrying an ICMP error that quotes ``quoted``, as a raw socket sees it."""
    body = struct.pack("!BBHI", type_, code, 0, 0) + quoted
    body = body[:2] + struct.pack("!H", internet_checksum(body)) + body[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0xC0,
        20 + len(body),
        0,
        0,
        64,
        1,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return header + body


def icmpv6_error(quoted: bytes, *, type_: int = 1, code: int = 4) -> bytes:
    """An ICMPv6 error quoting ``quoted`` (checksum left 0: the kernel checks it, not us)."""
    return struct.pack("!BBHI", type_, code, 0, 0) + quoted


def ipv6_header(src: str, dst: str, next_header: int, payload_length: int) -> bytes:
    return struct.pack(
        "!IHBB16s16s",
        0x6000_0000,
        payload_length,
        next_header,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )


QUOTED_V4 = UdpPacketBuilder("198.19.0.1", "198.19.100.7").build(40_000, 5000, b"token-0123456789")
VALID_V4 = icmpv4_error(QUOTED_V4[:28])
UDP_V6 = UdpPacketBuilder("2001:2:0:99::1", "2001:2:0:99::7").build(
    40_000, 5000, b"token-0123456789"
)
VALID_V6 = icmpv6_error(ipv6_header("2001:2:0:99::1", "2001:2:0:99::7", 17, len(UDP_V6)) + UDP_V6)


# --- error queue on loopback (no privilege) -------------------------------------------


def test_error_queue_ipv4_port_unreachable_names_the_cell() -> None:
    # Two source sockets, two closed destination ports: each error comes back on the socket
    # that sent the datagram, naming its destination, so (bound port, destination port)
    # identifies the cell and the payload the attempt.
    targets = [closed_port(socket.AF_INET, "127.0.0.1") for _ in range(2)]
    with (
        udp_socket(socket.AF_INET, "127.0.0.1") as a,
        udp_socket(socket.AF_INET, "127.0.0.1") as b,
    ):
        for sock, target, token in ((a, targets[0], b"token-a"), (b, targets[1], b"token-b")):
            enable_recverr(sock)
            sock.sendto(token, ("127.0.0.1", target))
        for sock, target, token in ((a, targets[0], b"token-a"), (b, targets[1], b"token-b")):
            (message,) = wait_for_errors(sock, 1)
            assert message.payload == token
            assert message.destination == ("127.0.0.1", target)
            assert message.error == IcmpError(
                type=3, code=3, offender="127.0.0.1", errno=errno.ECONNREFUSED, origin=2
            )
            assert not message.truncated


def test_error_queue_ipv6_port_unreachable() -> None:
    target = closed_port(socket.AF_INET6, "::1")
    with udp_socket(socket.AF_INET6, "::1") as sock:
        enable_recverr(sock)
        sock.sendto(b"token-v6", ("::1", target))
        (message,) = wait_for_errors(sock, 1)
    assert message.payload == b"token-v6"
    assert message.destination == ("::1", target)
    assert message.error == IcmpError(
        type=1, code=4, offender="::1", errno=errno.ECONNREFUSED, origin=SO_EE_ORIGIN_ICMP6
    )
    assert isinstance(message.error, IcmpError)
    assert message.error.ipv6


def test_error_queue_dual_stack_socket_reports_ipv4_offender() -> None:
    target = closed_port(socket.AF_INET, "127.0.0.1")
    with udp_socket(socket.AF_INET6, "::") as sock:
        enable_recverr(sock)
        sock.sendto(b"mapped", ("::ffff:127.0.0.1", target))
        (message,) = wait_for_errors(sock, 1)
    assert message.destination == ("::ffff:127.0.0.1", target)
    assert message.error == IcmpError(
        type=3, code=3, offender="127.0.0.1", errno=errno.ECONNREFUSED, origin=SO_EE_ORIGIN_ICMP
    )


def test_drain_error_queue_returns_at_once_when_empty() -> None:
    with udp_socket(socket.AF_INET, "127.0.0.1") as sock:
        enable_recverr(sock)
        started = time.monotonic()
        assert drain_error_queue(sock) == []
        assert time.monotonic() - started < TIMEOUT / 2


def test_error_queue_marks_truncated_payloads() -> None:
    target = closed_port(socket.AF_INET, "127.0.0.1")
    with udp_socket(socket.AF_INET, "127.0.0.1") as sock:
        enable_recverr(sock)
        sock.sendto(b"x" * 100, ("127.0.0.1", target))
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLERR)
        assert poller.poll(int(TIMEOUT * 1000))
        (message,) = drain_error_queue(sock, bufsize=10)
    assert message.payload == b"x" * 10
    assert message.truncated


# --- parse_recverr on synthetic control messages --------------------------------------


def test_parse_recverr_ipv4_icmp() -> None:
    data = extended_err(113, SO_EE_ORIGIN_ICMP, 3, 13, offender=sockaddr_in("198.19.100.1"))
    assert parse_recverr(SOL_IP, IP_RECVERR, data) == IcmpError(
        type=3, code=13, offender="198.19.100.1", errno=113, origin=SO_EE_ORIGIN_ICMP
    )


def test_parse_recverr_ipv6_icmp_with_mtu() -> None:
    data = extended_err(90, SO_EE_ORIGIN_ICMP6, 2, 0, 1280, sockaddr_in6("2001:2:0:99::1"))
    error = parse_recverr(SOL_IPV6, IPV6_RECVERR, data)
    assert error == IcmpError(2, 0, "2001:2:0:99::1", 90, SO_EE_ORIGIN_ICMP6, info=1280)


def test_parse_recverr_without_offender() -> None:
    unspec = struct.pack("=H14x", socket.AF_UNSPEC)
    for offender in (b"", unspec, sockaddr_in("1.2.3.4")[:6]):
        error = parse_recverr(SOL_IP, IP_RECVERR, extended_err(111, 2, 3, 3, offender=offender))
        assert isinstance(error, IcmpError)
        assert error.offender is None


def test_parse_recverr_local_error_is_not_an_icmp_error() -> None:
    data = extended_err(errno.EMSGSIZE, SO_EE_ORIGIN_LOCAL, 0, 0, info=1500)
    assert parse_recverr(SOL_IP, IP_RECVERR, data) == LocalError(errno.EMSGSIZE, 1500)


def test_parse_recverr_ignores_other_messages() -> None:
    icmp = extended_err(111, SO_EE_ORIGIN_ICMP, 3, 3, offender=sockaddr_in("1.2.3.4"))
    assert parse_recverr(SOL_IP, 8, icmp) is None  # IP_PKTINFO, not IP_RECVERR
    assert parse_recverr(SOL_IPV6, IP_RECVERR, icmp) is None
    assert parse_recverr(SOL_IP, IP_RECVERR, icmp[:15]) is None
    assert parse_recverr(SOL_IP, IP_RECVERR, extended_err(0, 5, 0, 0)) is None  # zerocopy


def test_parse_errqueue_message_picks_the_recverr_message() -> None:
    ancdata = [
        (SOL_IP, 8, b"\x00" * 12),
        (SOL_IP, IP_RECVERR, extended_err(111, 2, 3, 3, offender=sockaddr_in("198.19.98.7"))),
    ]
    message = parse_errqueue_message(b"tok", ancdata, socket.MSG_TRUNC, ("198.19.0.2", 5000))
    assert message == ErrQueueMessage(
        b"tok", ("198.19.0.2", 5000), IcmpError(3, 3, "198.19.98.7", 111, 2), truncated=True
    )
    assert parse_errqueue_message(b"", [], 0, None).error is None


@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=80))
def test_parse_recverr_never_raises(level: int, type_: int, data: bytes) -> None:
    for lv, ty in ((level, type_), (SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)):
        assert parse_recverr(lv, ty, data) is None or isinstance(
            parse_recverr(lv, ty, data), IcmpError | LocalError
        )


# --- parse_icmp_packet on synthetic packets -------------------------------------------


def test_parse_icmpv4_port_unreachable() -> None:
    assert parse_icmp_packet(VALID_V4, ipv6=False, from_addr="198.19.2.1") == QuotedError(
        type=3,
        code=3,
        offender="198.19.2.1",
        inner_src="198.19.0.1",
        inner_dst="198.19.100.7",
        src_port=40_000,
        dst_port=5000,
        proto=17,
    )


def test_parse_icmpv4_whole_quote_and_short_read() -> None:
    whole = icmpv4_error(QUOTED_V4, type_=3, code=13)
    parsed = parse_icmp_packet(whole, ipv6=False, from_addr="198.19.2.1")
    assert parsed is not None
    assert (parsed.type, parsed.code, parsed.src_port) == (3, 13, 40_000)
    assert parsed.quote == b"token-0123456789"  # the whole payload: its MAC can be checked
    # A receive buffer that cut the message short still yields the ports, and what it
    # holds of the quote.
    short = parse_icmp_packet(whole[:52], ipv6=False, from_addr="198.19.2.1")
    assert short is not None
    assert short == dataclasses.replace(parsed, quote=b"")  # cut inside the UDP header


def test_parse_icmpv4_time_exceeded_and_parameter_problem() -> None:
    for type_ in (11, 12):
        parsed = parse_icmp_packet(
            icmpv4_error(QUOTED_V4[:28], type_=type_, code=0), ipv6=False, from_addr="x"
        )
        assert parsed is not None
        assert parsed.type == type_


def test_parse_icmpv4_rejects() -> None:
    def with_quote_byte(index: int, value: int) -> bytes:
        quoted = bytearray(QUOTED_V4[:28])
        quoted[index] = value
        return icmpv4_error(bytes(quoted))

    cases = {
        "echo reply": icmpv4_error(QUOTED_V4[:28], type_=0, code=0),
        "redirect": icmpv4_error(QUOTED_V4[:28], type_=5, code=1),
        "quotes TCP": with_quote_byte(9, 6),
        "quotes a later fragment": with_quote_byte(7, 0x10),
        "quote not IPv4": with_quote_byte(0, 0x65),
        "quote too short for ports": icmpv4_error(QUOTED_V4[:23]),
        "bad checksum": VALID_V4[:-1] + bytes([VALID_V4[-1] ^ 0xFF]),
        "outer not ICMP": VALID_V4[:9] + b"\x11" + VALID_V4[10:],
        "outer not IPv4": b"\x65" + VALID_V4[1:],
        "outer length too small": VALID_V4[:2] + b"\x00\x14" + VALID_V4[4:],
        "empty": b"",
    }
    for name, packet in cases.items():
        assert parse_icmp_packet(packet, ipv6=False, from_addr="x") is None, name


def test_parse_icmpv6_port_unreachable() -> None:
    assert parse_icmp_packet(VALID_V6, ipv6=True, from_addr="2001:2:0:99::fe") == QuotedError(
        type=1,
        code=4,
        offender="2001:2:0:99::fe",
        inner_src="2001:2:0:99::1",
        inner_dst="2001:2:0:99::7",
        src_port=40_000,
        dst_port=5000,
        proto=17,
        ipv6=True,
        quote=b"token-0123456789",
    )


def test_parse_icmpv6_skips_extension_headers() -> None:
    hop_by_hop = bytes([60, 0]) + bytes(6)  # next: destination options, 8 bytes
    dest_options = bytes([44, 1]) + bytes(14)  # next: fragment, 16 bytes
    fragment = bytes([17, 0]) + struct.pack("!HI", 0x0001, 7)  # offset 0, more fragments
    quoted = ipv6_header("2001:2:0:99::1", "2001:2:0:99::7", 0, 0)
    quoted += hop_by_hop + dest_options + fragment + UDP_V6[:8]
    for type_, code in ((1, 1), (2, 0), (3, 0), (4, 0)):
        parsed = parse_icmp_packet(
            icmpv6_error(quoted, type_=type_, code=code), ipv6=True, from_addr="r"
        )
        assert parsed is not None
        assert (parsed.type, parsed.code, parsed.src_port, parsed.dst_port) == (
            type_,
            code,
            40_000,
            5000,
        )


def test_parse_icmpv6_rejects() -> None:
    header = ipv6_header("2001:2:0:99::1", "2001:2:0:99::7", 17, len(UDP_V6))
    later_fragment = bytes([17, 0]) + struct.pack("!HI", 0x0008, 7)  # offset 1
    many_options = b"".join(bytes([60, 0]) + bytes(6) for _ in range(20))
    cases = {
        "echo reply": icmpv6_error(header + UDP_V6, type_=129, code=0),
        "neighbour advert": icmpv6_error(header + UDP_V6, type_=136, code=0),
        "quotes TCP": icmpv6_error(header[:6] + b"\x06" + header[7:] + UDP_V6),
        "quotes ESP": icmpv6_error(header[:6] + b"\x32" + header[7:] + bytes(16)),
        "later fragment": icmpv6_error(
            ipv6_header("2001:2:0:99::1", "2001:2:0:99::7", 44, 16) + later_fragment + UDP_V6[:8]
        ),
        "endless options": icmpv6_error(
            ipv6_header("2001:2:0:99::1", "2001:2:0:99::7", 60, 0) + many_options + UDP_V6[:8]
        ),
        "quote not IPv6": icmpv6_error(b"\x45" + header[1:] + UDP_V6),
        "quote too short": icmpv6_error(header + UDP_V6[:3]),
        "header only": VALID_V6[:8],
        "empty": b"",
    }
    for name, packet in cases.items():
        assert parse_icmp_packet(packet, ipv6=True, from_addr="x") is None, name


def assert_parses_or_none(packet: bytes) -> None:
    for ipv6 in (False, True):
        result = parse_icmp_packet(packet, ipv6=ipv6, from_addr="x")
        assert result is None or isinstance(result, QuotedError)


@given(st.binary(max_size=200))
def test_parse_icmp_packet_never_raises_on_random_bytes(packet: bytes) -> None:
    assert_parses_or_none(packet)


@given(
    st.sampled_from([VALID_V4, VALID_V6, icmpv4_error(QUOTED_V4)]),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=8),
    st.integers(0, 200),
    st.binary(max_size=20),
)
def test_parse_icmp_packet_never_raises_on_mutations(
    valid: bytes, flips: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    mutated = bytearray(valid)
    for index, value in flips:
        if index < len(mutated):
            mutated[index] = value
    assert_parses_or_none(bytes(mutated[:cut]) + tail)
    assert_parses_or_none(bytes(mutated) + tail)


def test_describe_icmp() -> None:
    assert describe_icmp(3, 13, ipv6=False) == "administratively prohibited"
    assert describe_icmp(1, 4, ipv6=True) == "port unreachable"
    assert describe_icmp(3, 99, ipv6=False) == "ICMP type 3 code 99"


# --- raw ICMP sockets on loopback (root) ----------------------------------------------


def raw_icmp_socket(family: int) -> socket.socket:
    proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    try:
        sock = socket.socket(family, socket.SOCK_RAW, proto)
    except PermissionError:
        pytest.skip("raw ICMP sockets need CAP_NET_RAW (run as root)")
    sock.settimeout(TIMEOUT)
    return sock


def receive_quote(
    raw: socket.socket, *, ipv6: bool, src_port: int, dst_port: int
) -> QuotedError | None:
    """Read the raw socket until the quote of our datagram arrives (other tests' ICMP too)."""
    deadline = time.monotonic() + TIMEOUT
    for _ in range(1000):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        raw.settimeout(left)
        try:
            packet, address = raw.recvfrom(65535)
        except TimeoutError:
            break
        quote = parse_icmp_packet(packet, ipv6=ipv6, from_addr=address[0])
        if quote is not None and (quote.src_port, quote.dst_port) == (src_port, dst_port):
            return quote
    return None


@pytest.mark.parametrize(
    ("family", "host", "expected_type_code"),
    [(socket.AF_INET, "127.0.0.1", (3, 3)), (socket.AF_INET6, "::1", (1, 4))],
    ids=["ipv4", "ipv6"],
)
def test_raw_icmp_socket_sees_port_unreachable(
    family: int, host: str, expected_type_code: tuple[int, int]
) -> None:
    target = closed_port(family, host)
    with raw_icmp_socket(family) as raw, udp_socket(family, host) as sender:
        src_port = sender.getsockname()[1]
        sender.sendto(b"token-raw", (host, target))
        quote = receive_quote(
            raw, ipv6=family == socket.AF_INET6, src_port=src_port, dst_port=target
        )
    assert quote is not None, "no port-unreachable quoting our datagram arrived"
    assert (quote.type, quote.code) == expected_type_code
    assert (quote.offender, quote.inner_src, quote.inner_dst) == (host, host, host)
    assert quote.proto == 17
