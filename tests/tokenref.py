"""The datagram's authentication written from its layout alone (see ``udpreach.token``):
the reference the codec's fast paths and the agent's batch path are checked against."""

from __future__ import annotations

import hashlib
import hmac

from udpreach.token import Cell, Reject


def reference_mac(run_key: bytes, dst: int, src: int, attempt: int) -> bytes:
    """64 bits of SHAKE128(domain || key || dst || attempt || src >> 4) at 8 * (src & 15)."""
    stream = hashlib.shake_128(
        b"udpreach/v2 datagram mac\0"
        + run_key
        + dst.to_bytes(2, "big")
        + bytes([attempt])
        + (src >> 4).to_bytes(2, "big")
    ).digest(128)
    return stream[8 * (src & 15) : 8 * (src & 15) + 8]


def reference_verify(run_key: bytes, size: int, data: bytes) -> Cell | Reject:
    """What a received datagram is, one datagram at a time."""
    if len(data) != size:
        return Reject.MALFORMED
    tag = hashlib.blake2b(b"udpreach/v1 tag", key=run_key, digest_size=3).digest()
    dst, src, attempt = int.from_bytes(data[3:5], "big"), int.from_bytes(data[5:7], "big"), data[7]
    if data[:3] != tag or data[16:] != bytes(size - 16) or attempt == 0:
        return Reject.BAD_MAC
    if not hmac.compare_digest(reference_mac(run_key, dst, src, attempt), data[8:16]):
        return Reject.BAD_MAC
    return Cell(dst, src, attempt)
