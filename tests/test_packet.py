"""Raw UDP packet building: checksums against a plain reference, headers, and real sends."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probe.packet import (
    MAX_PAYLOAD_IPV4,
    MAX_PAYLOAD_IPV6,
    UdpPacketBuilder,
    checksum_update,
    internet_checksum,
    udp_checksum_ipv4,
    udp_checksum_ipv6,
    with_src_port,
)
from udpreach.core.block import Block

TIMEOUT = 2.0


def ones_sum(data: bytes) -> int:
    """The textbook RFC 1071 loop: add 16-bit words, fold the carries back in."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_v4(src: bytes, dst: bytes, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, 17, length)


def pseudo_v6(src: bytes, dst: bytes, length: int) -> bytes:
    return src + dst + struct.pack("!I3xB", length, 17)


ports = st.integers(0, 65535)
payloads = st.binary(max_size=200)
v4_addresses = st.ip_addresses(v=4).map(str)
v6_addresses = st.ip_addresses(v=6).map(str)


# --- checksums ------------------------------------------------------------------------


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0xFFFF - 0xDDF2


def test_udp_checksum_known_vector() -> None:
    # 198.18.0.31:20 -> 198.18.0.30:10, payload "Hi": 0x2af1, worked out by hand with
    # RFC 1071's word sum over the pseudo-header and segment.
    segment = bytes.fromhex("0014000a000a0000") + b"Hi"
    src, dst = socket.inet_aton("198.18.0.31"), socket.inet_aton("198.18.0.30")
    assert udp_checksum_ipv4(src, dst, segment) == 0x2AF1
    packet = UdpPacketBuilder("198.18.0.31", "198.18.0.30").build(20, 10, b"Hi")
    assert packet[20:] == bytes.fromhex("0014000a000a2af1") + b"Hi"


def test_ipv4_header_known_vector() -> None:
    # The classic worked example of the IPv4 header checksum, moved into the benchmarking
    # range: 198.18.0.1 -> .199, length 0x73, DF, TTL 64, UDP: checksum 0xad8d.
    packet = UdpPacketBuilder("198.18.0.1", "198.18.0.199").build(1, 2, bytes(0x73 - 28))
    assert packet[:20] == bytes.fromhex("45000073000040004011ad8dc6120001c61200c7")


def test_udp_checksum_zero_is_sent_as_ffff() -> None:
    # Pick the payload word that makes the computed checksum 0: it must go out as 0xFFFF.
    src = dst = socket.inet_aton("198.19.0.1")
    header = struct.pack("!HHHH", 1000, 2000, 10, 0)
    partial = ones_sum(pseudo_v4(src, dst, 10) + header)
    word = (0xFFFF - partial) & 0xFFFF  # the total then folds to 0xFFFF: checksum 0
    segment = header + struct.pack("!H", word)
    assert ones_sum(pseudo_v4(src, dst, 10) + segment) == 0xFFFF
    assert udp_checksum_ipv4(src, dst, segment) == 0xFFFF
    built = UdpPacketBuilder("198.19.0.1", "198.19.0.1").build(1000, 2000, struct.pack("!H", word))
    assert built[26:28] == b"\xff\xff"


@given(st.binary(max_size=300))
def test_internet_checksum_matches_reference(data: bytes) -> None:
    assert internet_checksum(data) == 0xFFFF - ones_sum(data)


@given(v4_addresses, v4_addresses, st.binary(min_size=8, max_size=300))
def test_udp_checksum_ipv4_matches_reference(src: str, dst: str, segment: bytes) -> None:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    zeroed = segment[:6] + b"\x00\x00" + segment[8:]
    expected = (0xFFFF - ones_sum(pseudo_v4(s, d, len(segment)) + zeroed)) or 0xFFFF
    assert udp_checksum_ipv4(s, d, segment) == expected


@given(v6_addresses, v6_addresses, st.binary(min_size=8, max_size=300))
def test_udp_checksum_ipv6_matches_reference(src: str, dst: str, segment: bytes) -> None:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    zeroed = segment[:6] + b"\x00\x00" + segment[8:]
    expected = (0xFFFF - ones_sum(pseudo_v6(s, d, len(segment)) + zeroed)) or 0xFFFF
    assert udp_checksum_ipv6(s, d, segment) == expected


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=40))
def test_checksum_update_matches_recompute(old: int, new: int, rest: bytes) -> None:
    # As in UDP, the data always holds a non-zero word (the pseudo-header's protocol).
    before = struct.pack("!H", old) + b"\x00\x11" + rest
    after = struct.pack("!H", new) + b"\x00\x11" + rest
    checksum = (0xFFFF - ones_sum(before)) or 0xFFFF
    assert checksum_update(checksum, old, new) == ((0xFFFF - ones_sum(after)) or 0xFFFF)


def test_checksum_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        udp_checksum_ipv4(b"\x00" * 16, b"\x00" * 4, bytes(8))
    with pytest.raises(ValueError, match="16 bytes"):
        udp_checksum_ipv6(b"\x00" * 4, b"\x00" * 16, bytes(8))
    with pytest.raises(ValueError, match="segment"):
        udp_checksum_ipv4(b"\x00" * 4, b"\x00" * 4, bytes(7))


# --- built packets --------------------------------------------------------------------


@given(v4_addresses, v4_addresses, ports, ports, payloads, st.integers(1, 255))
def test_ipv4_packet_fields_and_sums(
    src: str, dst: str, sport: int, dport: int, payload: bytes, ttl: int
) -> None:
    packet = UdpPacketBuilder(src, dst, ttl=ttl).build(sport, dport, payload)
    header, segment = packet[:20], packet[20:]
    vihl, tos, total, ident, frag, ttl_, proto, _, s, d = struct.unpack("!BBHHHBBH4s4s", header)
    # Version 4, 20-byte header, total length, id 0, DF with offset 0, TTL, UDP.
    expected = (0x45, 0, len(packet), 0, 0x4000, ttl, 17)
    assert (vihl, tos, total, ident, frag, ttl_, proto) == expected
    assert (socket.inet_ntoa(s), socket.inet_ntoa(d)) == (src, dst)
    assert ones_sum(header) == 0xFFFF  # a valid IPv4 header sums to -0
    assert struct.unpack("!HHH", segment[:6]) == (sport, dport, 8 + len(payload))
    assert segment[6:8] != b"\x00\x00"  # 0 would mean "no checksum"
    assert ones_sum(pseudo_v4(s, d, len(segment)) + segment) == 0xFFFF
    assert segment[8:] == payload


@given(v6_addresses, v6_addresses, ports, ports, payloads)
def test_ipv6_segment_fields_and_sums(
    src: str, dst: str, sport: int, dport: int, payload: bytes
) -> None:
    segment = UdpPacketBuilder(src, dst).build(sport, dport, payload)
    assert struct.unpack("!HHH", segment[:6]) == (sport, dport, 8 + len(payload))
    assert segment[6:8] != b"\x00\x00"
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    assert ones_sum(pseudo_v6(s, d, len(segment)) + segment) == 0xFFFF
    assert segment[8:] == payload


@given(
    st.sampled_from([("127.0.0.1", "198.19.2.9"), ("::1", "2001:2:0:99::9")]),
    st.lists(st.tuples(ports, st.binary(min_size=16, max_size=16)), max_size=40),
    ports,
    st.integers(0, 3),
)
def test_build_many_equals_build(
    addresses: tuple[str, str], items: list[tuple[int, bytes]], dport: int, trim: int
) -> None:
    builder = UdpPacketBuilder(*addresses)
    src_ports = [p for p, _ in items]
    same_length = [pl[trim:] for _, pl in items]  # odd and even lengths
    assert builder.build_many(src_ports, dport, same_length) == [
        builder.build(p, dport, pl) for p, pl in zip(src_ports, same_length, strict=True)
    ]
    block = builder.build_block(src_ports, dport, Block(b"".join(same_length), 16 - trim))
    assert list(block) == builder.build_many(src_ports, dport, same_length)
    mixed = [pl[: i % 17] for i, (_, pl) in enumerate(items)]
    assert builder.build_many(src_ports, dport, mixed) == [
        builder.build(p, dport, pl) for p, pl in zip(src_ports, mixed, strict=True)
    ]


@given(
    st.sampled_from([("127.0.0.1", "198.19.2.9"), ("::1", "2001:2:0:99::9")]),
    ports,
    ports,
    ports,
    payloads,
)
def test_with_src_port_equals_build(
    addresses: tuple[str, str], old: int, new: int, dport: int, payload: bytes
) -> None:
    builder = UdpPacketBuilder(*addresses)
    moved = builder.with_src_port(builder.build(old, dport, payload), new)
    assert moved == builder.build(new, dport, payload)


def test_with_src_port_keeps_a_zero_checksum() -> None:
    # An IPv4 datagram sent without a checksum stays without one.
    packet = bytearray(UdpPacketBuilder("198.19.0.1", "198.19.0.2").build(1, 2, b"abc"))
    packet[26:28] = b"\x00\x00"
    moved = with_src_port(bytes(packet), 999, udp_offset=20)
    assert moved[20:22] == struct.pack("!H", 999)
    assert moved[26:28] == b"\x00\x00"


def test_largest_payloads() -> None:
    v4 = UdpPacketBuilder("198.19.0.1", "198.19.0.2").build(1, 2, bytes(MAX_PAYLOAD_IPV4))
    assert len(v4) == 0xFFFF
    v6 = UdpPacketBuilder("::1", "::2").build(1, 2, bytes(MAX_PAYLOAD_IPV6))
    assert len(v6) == 0xFFFF


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="families differ"):
        UdpPacketBuilder("127.0.0.1", "::1")
    with pytest.raises(ValueError, match="does not appear to be"):
        UdpPacketBuilder("127.0.0.1", "not-an-address")
    with pytest.raises(ValueError, match="ttl"):
        UdpPacketBuilder("127.0.0.1", "127.0.0.1", ttl=0)
    builder = UdpPacketBuilder("127.0.0.1", "127.0.0.1")
    with pytest.raises(ValueError, match="source port"):
        builder.build(65536, 1, b"")
    with pytest.raises(ValueError, match="destination port"):
        builder.build(1, -1, b"")
    with pytest.raises(ValueError, match="payload length"):
        builder.build(1, 1, bytes(MAX_PAYLOAD_IPV4 + 1))
    with pytest.raises(ValueError, match="source port"):
        builder.build_many([1, 70000], 1, [b"", b""])
    with pytest.raises(ValueError, match="payloads"):
        builder.build_many([1, 2], 1, [b""])
    with pytest.raises(ValueError, match="too short"):
        with_src_port(b"\x00" * 10, 1, udp_offset=20)
    assert builder.build_many([], 1, []) == []


# --- real sends over loopback (root) --------------------------------------------------


def raw_socket(family: int, proto: int) -> socket.socket:
    try:
        sock = socket.socket(family, socket.SOCK_RAW, proto)
    except PermissionError:
        pytest.skip("raw sockets need CAP_NET_RAW (run as root)")
    sock.settimeout(TIMEOUT)
    return sock


def receiver(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.bind((host, 0))
    except OSError as exc:
        sock.close()
        pytest.skip(f"{host} is not usable here: {exc}")
    return sock


def corrupt(packet: bytes, udp_offset: int) -> bytes:
    broken = bytearray(packet)
    broken[udp_offset + 6] ^= 0x5A
    return bytes(broken)


def test_raw_ipv4_send_reaches_a_udp_socket() -> None:
    src_port = 47_001
    with receiver(socket.AF_INET, "127.0.0.1") as rx:
        dst_port = rx.getsockname()[1]
        builder = UdpPacketBuilder("127.0.0.1", "127.0.0.1")
        with raw_socket(socket.AF_INET, socket.IPPROTO_RAW) as tx:
            # A corrupted checksum first: the kernel must drop it, which shows the good
            # packet's checksum was verified and not taken on trust.
            bad = corrupt(builder.build(src_port, dst_port, b"corrupted"), builder.udp_offset)
            tx.sendto(bad, builder.destination)
            tx.sendto(builder.build(src_port, dst_port, b"notify-16-bytes!"), builder.destination)
        data, (host, port) = rx.recvfrom(2048)
    assert data == b"notify-16-bytes!"
    assert (host, port) == ("127.0.0.1", src_port)


def test_raw_ipv6_send_reaches_a_udp_socket() -> None:
    src_port = 47_002
    with receiver(socket.AF_INET6, "::1") as rx:
        dst_port = rx.getsockname()[1]
        builder = UdpPacketBuilder("::1", "::1")
        with raw_socket(socket.AF_INET6, socket.IPPROTO_UDP) as tx:
            tx.bind(("::1", 0))  # the source address is in the checksum's pseudo-header
            bad = corrupt(builder.build(src_port, dst_port, b"corrupted"), builder.udp_offset)
            tx.sendto(bad, builder.destination)
            tx.sendto(builder.build(src_port, dst_port, b"notify-16-bytes!"), builder.destination)
        data, address = rx.recvfrom(2048)
    assert data == b"notify-16-bytes!"
    assert address[:2] == ("::1", src_port)


# --- fragments: what a UDP socket does with a datagram over the path MTU -----------------


def _reassemble(frags: list[bytes]) -> bytes:
    parts = {}
    for f in frags:
        flags_off = struct.unpack_from("!H", f, 6)[0]
        parts[(flags_off & 0x1FFF) * 8] = f[20 : struct.unpack_from("!H", f, 2)[0]]
    out = b"".join(parts[k] for k in sorted(parts))
    return out


@pytest.mark.parametrize("mtu", [68, 576, 1280, 1500])
def test_fragment_ipv4_cuts_on_8_byte_boundaries_and_reassembles(mtu: int) -> None:
    from probe.packet import fragment_ipv4

    builder = UdpPacketBuilder("198.18.2.2", "198.18.1.2")
    packet = builder.build(40000, 5000, bytes(range(256)) * 12)  # 3,072-byte payload
    frags = fragment_ipv4(packet, mtu, 0x1234)
    assert len(frags) > 1
    assert all(len(f) <= mtu for f in frags)
    for i, f in enumerate(frags):
        total, ident, flags_off = struct.unpack_from("!HHH", f, 2)
        assert total == len(f)
        assert ident == 0x1234
        assert not flags_off & 0x4000  # DF clear: these are fragments
        assert bool(flags_off & 0x2000) == (i < len(frags) - 1)  # MF on all but the last
        assert internet_checksum(f[:20]) == 0  # a valid header checksum
        if i < len(frags) - 1:
            assert (total - 20) % 8 == 0
    assert _reassemble(frags) == packet[20:]  # the UDP datagram whole, checksum and all


def test_a_packet_that_fits_is_not_fragmented() -> None:
    from probe.packet import fragment_ipv4

    packet = UdpPacketBuilder("198.18.2.2", "198.18.1.2").build(40000, 5000, b"x" * 16)
    assert fragment_ipv4(packet, 1500, 7) == [packet]
    with pytest.raises(ValueError, match="68"):
        fragment_ipv4(packet + bytes(100), 60, 7)
