"""Raw UDP packets for the probe's privileged sender.

Theory of operation
-------------------
With CAP_NET_RAW the probe sends from any source port without binding 64,512 sockets: it
writes the headers itself and hands the bytes to a raw socket.

* IPv4: ``socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`` implies IP_HDRINCL, so a packet is the
  IPv4 header + UDP header + payload. The header is filled in completely (id 0 with DF set,
  total length, header checksum) even though Linux rewrites the id and checksum itself.
* IPv6: ``socket(AF_INET6, SOCK_RAW, IPPROTO_UDP)`` has the kernel build the IPv6 header,
  so a packet is the UDP header + payload. The kernel does *not* fill in the UDP checksum
  on such a socket (IPV6_CHECKSUM is off by default) and a UDP checksum is mandatory over
  IPv6, so it is computed here. The pseudo-header names the source address, so the raw
  socket must be bound to ``src_ip`` or the receiver drops every packet as corrupt.

Speed comes from arithmetic modulo 0xFFFF. The ones'-complement sum of 16-bit big-endian
words is congruent to the whole byte string read as one big-endian integer, modulo 0xFFFF
(because 2**16 = 1 mod 0xFFFF), and ``int.from_bytes`` plus one ``%`` runs in C. Everything
that is fixed for a (source address, destination address, payload length) -- the IPv4
header, the pseudo-header's share of the UDP checksum -- is computed once and cached; the
per-packet work is one ``int.from_bytes`` over the payload (each payload carries its own
MAC), one modulo and one ``struct.pack``. Since the pseudo-header always contributes the
protocol number, the UDP sum is never zero, and ``0xFFFF - (residue % 0xFFFF)`` lands in
1..0xFFFF: the "a computed 0 is sent as 0xFFFF" rule of RFC 768 comes for free.

For a packet whose payload does not change, :func:`with_src_port` moves it to another
source port by the incremental update of RFC 1624 (two bytes of port, two of checksum).

A datagram larger than the path allows goes out the way a server's ordinary UDP socket sends
it (Linux's default, ``IP_PMTUDISC_WANT``): whole with DF set while it fits the path MTU the
sender knows, else cut into IPv4 fragments (DF clear, one identification, offsets in 8-byte
units): :func:`fragment_ipv4`. An ``IP_HDRINCL`` socket never fragments by itself.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Sequence

import numpy as np

from udpreach.core.block import Block

__all__ = [
    "IPV4_HEADER_LEN",
    "MAX_PAYLOAD_IPV4",
    "MAX_PAYLOAD_IPV6",
    "UDP_HEADER_LEN",
    "UdpPacketBuilder",
    "checksum_update",
    "fragment_ipv4",
    "internet_checksum",
    "udp_checksum_ipv4",
    "udp_checksum_ipv6",
    "with_src_port",
]

IPV4_HEADER_LEN = 20
UDP_HEADER_LEN = 8
IPPROTO_UDP = 17
#: The largest payload whose IPv4 total length still fits in 16 bits.
MAX_PAYLOAD_IPV4 = 0xFFFF - IPV4_HEADER_LEN - UDP_HEADER_LEN
#: The largest payload whose UDP length still fits in 16 bits (no jumbograms).
MAX_PAYLOAD_IPV6 = 0xFFFF - UDP_HEADER_LEN

_IPV4_DF = 0x4000
_UDP_HEADER = struct.Struct("!HHHH")
_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_U16 = struct.Struct("!H")


def _residue(data: bytes) -> int:
    """The ones'-complement sum of ``data`` as 16-bit words, modulo 0xFFFF.

    An odd trailing byte is padded with a zero byte on the right (RFC 1071).
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    return value % 0xFFFF


def internet_checksum(data: bytes) -> int:
    """The RFC 1071 internet checksum of ``data`` (odd length padded with a zero byte).

    Returns the ones'-complement of the ones'-complement sum, 0..0xFFFF. This is the plain
    checksum (as in the IPv4 header); the UDP rule "send 0 as 0xFFFF" is not applied.
    """
    value = int.from_bytes(data, "big")
    if value == 0:
        return 0xFFFF  # the sum of all-zero words is +0, whose complement is 0xFFFF
    if len(data) & 1:
        value <<= 8
    # A non-zero sum folds to 1..0xFFFF; residue 0 therefore stands for 0xFFFF.
    return (0xFFFF - value % 0xFFFF) % 0xFFFF


def _udp_final(residue: int) -> int:
    # The sum includes the protocol number, so it is never +0: residue 0 means a sum of
    # 0xFFFF, a computed checksum of 0, which UDP transmits as 0xFFFF.
    return 0xFFFF - residue % 0xFFFF


def _check_segment(udp_segment: bytes) -> None:
    if not UDP_HEADER_LEN <= len(udp_segment) <= 0xFFFF:
        raise ValueError(f"a UDP segment is 8..65535 bytes, got {len(udp_segment)}")


def _zero_checksum_field(udp_segment: bytes) -> bytes:
    return udp_segment[:6] + b"\x00\x00" + udp_segment[8:]


def udp_checksum_ipv4(src: bytes, dst: bytes, udp_segment: bytes) -> int:
    """The UDP checksum of ``udp_segment`` sent from ``src`` to ``dst`` over IPv4.

    Args:
        src: the 4-byte source address.
        dst: the 4-byte destination address.
        udp_segment: UDP header + payload; its checksum field (bytes 6-7) is ignored.

    Returns:
        The checksum to put in the header, 1..0xFFFF (a computed 0 is returned as 0xFFFF).

    Raises:
        ValueError: an address is not 4 bytes, or the segment is not 8..65535 bytes.
    """
    if len(src) != 4 or len(dst) != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    _check_segment(udp_segment)
    pseudo = _residue(src + dst) + IPPROTO_UDP + len(udp_segment)
    return _udp_final(pseudo + _residue(_zero_checksum_field(udp_segment)))


def udp_checksum_ipv6(src: bytes, dst: bytes, udp_segment: bytes) -> int:
    """The UDP checksum of ``udp_segment`` sent from ``src`` to ``dst`` over IPv6 (RFC 8200).

    Args:
        src: the 16-byte source address.
        dst: the 16-byte destination address.
        udp_segment: UDP header + payload; its checksum field (bytes 6-7) is ignored.

    Returns:
        The checksum to put in the header, 1..0xFFFF (a computed 0 is returned as 0xFFFF).

    Raises:
        ValueError: an address is not 16 bytes, or the segment is not 8..65535 bytes.
    """
    if len(src) != 16 or len(dst) != 16:
        raise ValueError("IPv6 addresses are 16 bytes")
    _check_segment(udp_segment)
    # Pseudo-header: src, dst, 32-bit upper-layer length, 3 zero bytes, next header.
    pseudo = _residue(src + dst) + len(udp_segment) + IPPROTO_UDP
    return _udp_final(pseudo + _residue(_zero_checksum_field(udp_segment)))


def checksum_update(checksum: int, old_word: int, new_word: int) -> int:
    """RFC 1624 (eqn. 3) update of a checksum when one 16-bit word changes.

    ``HC' = ~(~HC + ~m + m')``. For UDP a result of 0 is returned as 0xFFFF; callers must
    not pass a UDP checksum of 0 (it means "no checksum" and stays 0, see :func:`with_src_port`).
    """
    total = (~checksum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF) or 0xFFFF


def with_src_port(packet: bytes, src_port: int, *, udp_offset: int) -> bytes:
    """The same packet from another source port, by incremental checksum update.

    Args:
        packet: a packet from :meth:`UdpPacketBuilder.build` (or any UDP packet).
        src_port: the new source port, 0..65535.
        udp_offset: where the UDP header starts (20 for IPv4 packets, 0 for IPv6).

    Raises:
        ValueError: the port is out of range or the packet is too short.
    """
    _check_port(src_port, "source")
    end = udp_offset + UDP_HEADER_LEN
    if udp_offset < 0 or len(packet) < end:
        raise ValueError("packet too short for a UDP header at that offset")
    (old_port,) = _U16.unpack_from(packet, udp_offset)
    (checksum,) = _U16.unpack_from(packet, udp_offset + 6)
    if checksum != 0:  # 0: an IPv4 datagram sent without a checksum; leave it so
        checksum = checksum_update(checksum, old_port, src_port)
    out = bytearray(packet)
    _U16.pack_into(out, udp_offset, src_port)
    _U16.pack_into(out, udp_offset + 6, checksum)
    return bytes(out)


def fragment_ipv4(packet: bytes, mtu: int, ident: int) -> list[bytes]:
    """Cut a whole IPv4 packet (header of 20 bytes, as ``UdpPacketBuilder`` makes) into
    fragments of at most ``mtu`` bytes; a packet that fits is returned as it is.

    Args:
        ident: the IP identification of every fragment (non-zero: the kernel assigns its own
            to an IP_HDRINCL packet whose id is 0, which would scatter the fragments).

    Raises:
        ValueError: an MTU below IPv4's minimum of 68, or an id outside 1..65535.
    """
    if len(packet) <= mtu:
        return [packet]
    if mtu < 68:
        raise ValueError(f"an IPv4 MTU is at least 68, got {mtu}")
    if not 1 <= ident <= 0xFFFF:
        raise ValueError(f"an IP identification is 1..65535 here, got {ident}")
    header = bytearray(packet[:IPV4_HEADER_LEN])
    data = packet[IPV4_HEADER_LEN:]
    step = (mtu - IPV4_HEADER_LEN) // 8 * 8
    out = []
    for offset in range(0, len(data), step):
        chunk = data[offset : offset + step]
        more = offset + step < len(data)
        struct.pack_into("!H", header, 2, IPV4_HEADER_LEN + len(chunk))
        struct.pack_into("!H", header, 4, ident)
        struct.pack_into("!H", header, 6, (0x2000 if more else 0) | (offset // 8))
        struct.pack_into("!H", header, 10, 0)
        struct.pack_into("!H", header, 10, internet_checksum(bytes(header)))
        out.append(bytes(header) + chunk)
    return out


def _check_port(port: int, which: str) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"{which} port out of range 0..65535: {port}")


class UdpPacketBuilder:
    """Builds UDP packets from one source address to one destination address.

    IPv4 packets carry the IPv4 header (for an ``IPPROTO_RAW`` socket, sent to
    ``(dst_ip, 0)``); IPv6 packets are the UDP segment only (for an ``AF_INET6, SOCK_RAW,
    IPPROTO_UDP`` socket bound to ``(src_ip, 0)``, sent to ``(dst_ip, 0)``). Over IPv6 the
    ``ttl`` is not part of the packet: set ``IPV6_UNICAST_HOPS`` on the socket instead.
    """

    def __init__(self, src_ip: str, dst_ip: str, *, ttl: int = 64) -> None:
        """Prepare the fixed parts for one address pair.

        Args:
            src_ip: the source address, IPv4 or IPv6 text.
            dst_ip: the destination address, of the same family.
            ttl: IPv4 time to live, 1..255.

        Raises:
            ValueError: an address does not parse, the families differ, or ttl is out of range.
        """
        src = ipaddress.ip_address(src_ip)
        dst = ipaddress.ip_address(dst_ip)
        if src.version != dst.version:
            raise ValueError(f"address families differ: {src_ip} -> {dst_ip}")
        if not 1 <= ttl <= 255:
            raise ValueError(f"ttl out of range 1..255: {ttl}")
        self.src_ip = src_ip
        self.dst_ip = dst_ip
        self.ttl = ttl
        self.ipv6 = src.version == 6
        self.family = socket.AF_INET6 if self.ipv6 else socket.AF_INET
        #: Offset of the UDP header in a built packet.
        self.udp_offset = 0 if self.ipv6 else IPV4_HEADER_LEN
        self.max_payload = MAX_PAYLOAD_IPV6 if self.ipv6 else MAX_PAYLOAD_IPV4
        self._src = src.packed
        self._dst = dst.packed
        self._addr_residue = _residue(self._src + self._dst)
        # payload length -> (bytes before the UDP header, checksum residue of everything
        # fixed for that length except the ports).
        self._by_length: dict[int, tuple[bytes, int]] = {}

    def _fixed(self, payload_len: int) -> tuple[bytes, int]:
        cached = self._by_length.get(payload_len)
        if cached is not None:
            return cached
        if not 0 <= payload_len <= self.max_payload:
            raise ValueError(f"payload length out of range 0..{self.max_payload}: {payload_len}")
        udp_len = UDP_HEADER_LEN + payload_len
        # Pseudo-header (addresses, protocol, length) plus the UDP header's length field.
        residue = self._addr_residue + IPPROTO_UDP + 2 * udp_len
        if self.ipv6:
            prefix = b""
        else:
            fields = (0x45, 0, IPV4_HEADER_LEN + udp_len, 0, _IPV4_DF, self.ttl, IPPROTO_UDP)
            header = _IPV4_HEADER.pack(*fields, 0, self._src, self._dst)
            prefix = _IPV4_HEADER.pack(*fields, internet_checksum(header), self._src, self._dst)
        if len(self._by_length) >= 64:  # bounded: a run uses one or two payload sizes
            self._by_length.clear()
        self._by_length[payload_len] = (prefix, residue)
        return prefix, residue

    def build(self, src_port: int, dst_port: int, payload: bytes) -> bytes:
        """One packet: IPv4 header + UDP header + payload, or for IPv6 UDP header + payload.

        Raises:
            ValueError: a port is out of range or the payload too long.
        """
        _check_port(src_port, "source")
        _check_port(dst_port, "destination")
        prefix, residue = self._fixed(len(payload))
        udp_len = UDP_HEADER_LEN + len(payload)
        checksum = _udp_final(residue + src_port + dst_port + _residue(payload))
        return prefix + _UDP_HEADER.pack(src_port, dst_port, udp_len, checksum) + payload

    def build_many(
        self, src_ports: Sequence[int], dst_port: int, payloads: Sequence[bytes]
    ) -> list[bytes]:
        """Packets to one destination port, one per (source port, payload) pair.

        The fast path for a sweep: validation happens once for the batch, and when every
        payload has the same length (the usual case) each packet costs one sum over its
        payload and one ``struct.pack`` of the whole packet.

        Raises:
            ValueError: a port is out of range, a payload too long, or ``src_ports`` and
                ``payloads`` differ in length.
        """
        if len(src_ports) != len(payloads):
            raise ValueError(f"{len(src_ports)} source ports for {len(payloads)} payloads")
        if not len(src_ports):
            return []
        _check_port(dst_port, "destination")
        if min(src_ports) < 0 or max(src_ports) > 0xFFFF:
            raise ValueError("source port out of range 0..65535")
        lengths = set(map(len, payloads))
        if len(lengths) != 1:
            return [
                self.build(sp, dst_port, pl) for sp, pl in zip(src_ports, payloads, strict=True)
            ]
        (length,) = lengths
        src_ports = [int(sp) for sp in src_ports]  # numpy integers would overflow the sums
        prefix, residue = self._fixed(length)
        pack = struct.Struct(f"!{len(prefix)}sHHHH{length}s").pack
        udp_len = UDP_HEADER_LEN + length
        base = residue + dst_port
        from_bytes = int.from_bytes
        if length & 1:  # an odd trailing byte is padded on the right: shift its sum by 8
            sums = [
                base + sp + (from_bytes(pl, "big") << 8)
                for sp, pl in zip(src_ports, payloads, strict=True)
            ]
        else:
            sums = [
                base + sp + from_bytes(pl, "big")
                for sp, pl in zip(src_ports, payloads, strict=True)
            ]
        return [
            pack(prefix, sp, dst_port, udp_len, 0xFFFF - total % 0xFFFF, pl)
            for sp, total, pl in zip(src_ports, sums, payloads, strict=True)
        ]

    def build_block(self, src_ports: Sequence[int], dst_port: int, payloads: Block) -> Block:
        """``build_many`` for payloads of one length in a ``Block``, as one ``Block``.

        Whole-array work: the checksums are word sums over the batch, and no Python object
        is made per packet.

        Raises:
            ValueError: as ``build_many``.
        """
        n = len(src_ports)
        if n != len(payloads):
            raise ValueError(f"{n} source ports for {len(payloads)} payloads")
        _check_port(dst_port, "destination")
        length = payloads.size
        prefix, residue = self._fixed(length)
        plen = len(prefix) + UDP_HEADER_LEN + length
        if not n:
            return Block(b"", plen)
        srcs = np.asarray(src_ports, dtype=np.int64)
        if srcs.min() < 0 or srcs.max() > 0xFFFF:
            raise ValueError("source port out of range 0..65535")
        body = np.frombuffer(payloads.data, dtype=np.uint8).reshape(n, length)
        if length & 1:  # an odd trailing byte is padded with a zero on the right
            body = np.concatenate([body, np.zeros((n, 1), dtype=np.uint8)], axis=1)
        words = body.view(">u2").sum(axis=1, dtype=np.int64)
        checksum = 0xFFFF - (residue + dst_port + srcs + words) % 0xFFFF
        out = np.empty((n, plen), dtype=np.uint8)
        at = len(prefix)
        if at:
            out[:, :at] = np.frombuffer(prefix, dtype=np.uint8)
        udp_len = UDP_HEADER_LEN + length
        out[:, at] = srcs >> 8
        out[:, at + 1] = srcs & 0xFF
        out[:, at + 2] = dst_port >> 8
        out[:, at + 3] = dst_port & 0xFF
        out[:, at + 4] = udp_len >> 8
        out[:, at + 5] = udp_len & 0xFF
        out[:, at + 6] = checksum >> 8
        out[:, at + 7] = checksum & 0xFF
        out[:, at + UDP_HEADER_LEN :] = body[:, :length]
        return Block(out.tobytes(), plen)

    def with_src_port(self, packet: bytes, src_port: int) -> bytes:
        """``packet`` (built by this builder) moved to ``src_port``; see :func:`with_src_port`."""
        return with_src_port(packet, src_port, udp_offset=self.udp_offset)

    @property
    def destination(self) -> tuple[str, int]:
        """The address to pass to ``sendto`` on the raw socket (port 0: raw sockets have none)."""
        return (self.dst_ip, 0)

    def __repr__(self) -> str:
        return f"UdpPacketBuilder({self.src_ip!r}, {self.dst_ip!r}, ttl={self.ttl})"
