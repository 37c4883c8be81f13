"""The notification-shaped datagram: an opaque blob that authenticates one cell attempt.

Theory of operation: a mail server's push datagram carries only the client's opaque
context blob (16 bytes by default). Ours looks the same on the wire, and inside it is::

    0..2   run tag     3 bytes, derived from the run key (tells "another run" apart)
    3..4   dst port    the destination port the probe aimed at (big-endian)
    5..6   src port    the source port the probe sent from (NAT may rewrite the real one)
    7      attempt     1..255
    8..15  MAC         64-bit keyed BLAKE2b over bytes 0..7 and the padding
    16..   padding     zero bytes up to --size (covered by the MAC)

The run key is derived from the shared secret and fresh nonces from both the coordinator and
the agent, so a datagram can only be credited to the run it was made for, and nobody without
the secret can make one that counts. Verification does the same work for every datagram of
the right length (one MAC, one constant-time compare) and keeps no state: de-duplication is
the caller's business (see ``agent.core``).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import Enum

HEADER = 8
MAC_LEN = 8
MIN_SIZE = HEADER + MAC_LEN  # 16
MAX_SIZE = 65507  # the largest UDP payload over IPv4
MAX_ATTEMPT = 255
_CELL = struct.Struct(">HHB")


class Reject(Enum):
    """Why a datagram was not credited."""

    MALFORMED = "malformed"  # wrong length for this run (truncated, oversize, empty)
    OTHER_RUN = "other_run"  # a genuine datagram of another (earlier) run: a replay
    BAD_MAC = "bad_mac"  # a MAC that does not verify: forged or corrupted
    DUPLICATE = "duplicate"  # a genuine datagram already counted (replay or network duplicate)


def derive_run_key(secret: bytes, run_id: str, coord_nonce: bytes, agent_nonce: bytes) -> bytes:
    """Per-run datagram key: HMAC-SHA256 of the run id and both sides' fresh nonces."""
    msg = b"udpreach/v1 run-key\0" + run_id.encode() + b"\0" + coord_nonce + agent_nonce
    return hmac.new(secret, msg, hashlib.sha256).digest()


def run_tag(run_key: bytes) -> bytes:
    """The 3-byte tag that opens every datagram of the run."""
    return hashlib.blake2b(b"udpreach/v1 tag", key=run_key, digest_size=3).digest()


@dataclass(frozen=True, slots=True)
class Cell:
    """What a verified datagram says: which cell and attempt it was sent for."""

    dst_port: int
    src_port: int
    attempt: int


class TokenCodec:
    """Encodes and verifies the datagrams of one run (one key, one size)."""

    def __init__(self, run_key: bytes, size: int = MIN_SIZE) -> None:
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f"datagram size must be {MIN_SIZE}-{MAX_SIZE} bytes, got {size}")
        self.size = size
        self.tag = run_tag(run_key)
        self._mac = hashlib.blake2b(key=run_key, digest_size=MAC_LEN)
        self._padding = bytes(size - MIN_SIZE)

    def encode(self, dst_port: int, src_port: int, attempt: int) -> bytes:
        """The datagram for one cell attempt."""
        header = self.tag + _CELL.pack(dst_port, src_port, attempt)
        m = self._mac.copy()
        m.update(header)
        if self._padding:
            m.update(self._padding)
        return header + m.digest() + self._padding

    def owns(self, data: bytes) -> bool:
        """True if *data* is a genuine datagram of this run (used to name other runs)."""
        return data[:3] == self.tag and isinstance(self.verify(data), Cell)

    def verify(self, data: bytes) -> Cell | Reject:
        """Check one received datagram; never raises.

        Returns:
            the Cell it authenticates, or why it is rejected (never DUPLICATE: no state here).
        """
        if len(data) != self.size:
            return Reject.MALFORMED
        m = self._mac.copy()
        m.update(data[:HEADER])
        if self._padding:
            m.update(data[MIN_SIZE:])
        if not hmac.compare_digest(m.digest(), data[HEADER:MIN_SIZE]):
            return Reject.BAD_MAC
        dst, src, attempt = _CELL.unpack_from(data, 3)
        if attempt == 0:
            return Reject.BAD_MAC  # never sent by a probe; only a key-holder could make it
        return Cell(dst, src, attempt)
