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

Both ends handle one datagram per cell attempt, so the per-datagram cost is kept close to
the MAC's own: one BLAKE2b compression per 16-byte datagram (the key block, tag and port
are fed in once per batch). ``mac_block`` makes a batch's MACs for one destination port in
one loop, the source ports coming from a table of 2-byte encodings; ``encode_block`` lays
the datagrams out around them for the whole batch (the probe's form), ``encode_many``
returns them one by one. On the receiving end, ``check_many`` verifies a chunk of
datagrams in one loop and answers with a verdict per datagram (None for genuine) rather
than a Cell.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cache

from udpreach.block import Block

HEADER = 8
MAC_LEN = 8
MIN_SIZE = HEADER + MAC_LEN  # 16
MAX_SIZE = 65507  # the largest UDP payload over IPv4
MAX_ATTEMPT = 255
_CELL = struct.Struct(">HHB")


@cache
def port_bytes() -> tuple[bytes, ...]:
    """The 2-byte big-endian encoding of every port, indexed by port (built on first use)."""
    return tuple(p.to_bytes(2, "big") for p in range(65536))


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


def _check_cells(dst_port: int, src_ports: Sequence[int], attempt: int) -> None:
    if not 1 <= attempt <= MAX_ATTEMPT:
        raise ValueError(f"attempt must be 1-{MAX_ATTEMPT}, got {attempt}")
    if not 0 <= dst_port <= 0xFFFF:
        raise ValueError(f"destination port must be 0-65535, got {dst_port}")
    if src_ports and (min(src_ports) < 0 or max(src_ports) > 0xFFFF):
        bad = next(s for s in src_ports if not 0 <= s <= 0xFFFF)
        raise ValueError(f"source port must be 0-65535, got {bad}")


class TokenCodec:
    """Encodes and verifies the datagrams of one run (one key, one size)."""

    def __init__(self, run_key: bytes, size: int = MIN_SIZE) -> None:
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f"datagram size must be {MIN_SIZE}-{MAX_SIZE} bytes, got {size}")
        self.size = size
        self.tag = run_tag(run_key)
        self._mac = hashlib.blake2b(key=run_key, digest_size=MAC_LEN)
        self._tagged = self._mac.copy()  # the MAC state with the run tag fed in (encoding)
        self._tagged.update(self.tag)
        self._padding = bytes(size - MIN_SIZE)

    def encode(self, dst_port: int, src_port: int, attempt: int) -> bytes:
        """The datagram for one cell attempt.

        Raises:
            struct.error: a port outside 0-65535 or an attempt outside 0-255 (attempt 0 is
                encoded, for tests: the agent rejects it).
        """
        cell = _CELL.pack(dst_port, src_port, attempt)
        m = self._tagged.copy()
        m.update(cell)
        padding = self._padding
        if padding:
            m.update(padding)
            return self.tag + cell + m.digest() + padding
        return self.tag + cell + m.digest()

    def encode_many(self, dst_port: int, src_ports: Sequence[int], attempt: int) -> list[bytes]:
        """``[self.encode(dst_port, s, attempt) for s in src_ports]``, from ``mac_block``.

        Raises:
            ValueError: a port outside 0-65535 or an attempt outside 1-255 (unlike ``encode``,
                attempt 0 is refused: no probe sends it).
        """
        macs = self.mac_block(dst_port, src_ports, attempt)
        ports = port_bytes()
        prefix = self.tag + ports[dst_port]
        att = bytes((attempt,))
        padding = self._padding
        return [
            prefix + ports[s] + att + macs[i : i + MAC_LEN] + padding
            for i, s in zip(range(0, len(macs), MAC_LEN), src_ports, strict=True)
        ]

    def encode_block(
        self, dst_port: int, src_ports: Sequence[int], attempt: int, macs: bytes | None = None
    ) -> Block:
        """``encode_many`` as one ``Block``: the probe's batch form.

        Only the MAC is made datagram by datagram (``macs``, when given, are those of
        ``mac_block`` for the same arguments, made earlier); the datagrams themselves are
        laid out for the whole batch at once with numpy.

        Raises:
            ValueError: as ``encode_many``, or ``macs`` of the wrong length.
        """
        import numpy as np  # the probe's path only: the agent never imports numpy

        n = len(src_ports)
        if macs is None:
            macs = self.mac_block(dst_port, src_ports, attempt)
        else:
            _check_cells(dst_port, src_ports, attempt)
        if len(macs) != n * MAC_LEN:
            raise ValueError(f"{len(macs)} bytes of MACs for {n} datagrams")
        if not n:
            return Block(b"", self.size)
        srcs = np.asarray(src_ports, dtype=np.int64)
        rows = np.zeros((n, self.size), dtype=np.uint8)
        rows[:, :3] = np.frombuffer(self.tag, dtype=np.uint8)
        rows[:, 3] = dst_port >> 8
        rows[:, 4] = dst_port & 0xFF
        rows[:, 5] = srcs >> 8
        rows[:, 6] = srcs & 0xFF
        rows[:, 7] = attempt
        rows[:, HEADER:MIN_SIZE] = np.frombuffer(macs, dtype=np.uint8).reshape(n, MAC_LEN)
        return Block(rows.tobytes(), self.size)

    def mac_block(self, dst_port: int, src_ports: Sequence[int], attempt: int) -> bytes:
        """The MACs of ``encode_many(dst_port, src_ports, attempt)``, back to back.

        Raises:
            ValueError: as ``encode_many``.
        """
        _check_cells(dst_port, src_ports, attempt)
        if not src_ports:
            return b""
        ports = port_bytes()
        base = self._mac.copy()
        base.update(self.tag + ports[dst_port])
        copy = base.copy
        att = bytes((attempt,))
        padding = self._padding
        macs: list[bytes] = []
        add_mac = macs.append
        for s in src_ports:
            m = copy()
            m.update(ports[s] + att)
            if padding:
                m.update(padding)
            add_mac(m.digest())
        return b"".join(macs)

    def owns(self, data: bytes) -> bool:
        """True if *data* is a genuine datagram of this run (used to name other runs)."""
        return data[:3] == self.tag and self.check(data) is None

    def verify(self, data: bytes) -> Cell | Reject:
        """Check one received datagram; never raises.

        Returns:
            the Cell it authenticates, or why it is rejected (never DUPLICATE: no state here).
        """
        why = self.check(data)
        if why is not None:
            return why
        return Cell(*_CELL.unpack_from(data, 3))

    def check(self, data: bytes) -> Reject | None:
        """``verify``'s verdict without the Cell: None if *data* is genuine.

        The same steps as one round of ``check_many``'s loop (tests hold both to the same
        reference).
        """
        if len(data) != self.size:
            return Reject.MALFORMED
        m = self._mac.copy()
        m.update(data[:HEADER])
        if self._padding:
            m.update(data[MIN_SIZE:])
        if hmac.compare_digest(m.digest(), data[HEADER:MIN_SIZE]) and data[7]:
            return None
        return Reject.BAD_MAC

    def check_many(self, datagrams: Iterable[bytes]) -> list[Reject | None]:
        """``check`` for each of *datagrams*, in order, at a lower cost each. Never raises.

        The receive path's verification: one loop for a whole chunk, and verdicts that are
        the Reject members themselves (None: genuine), so no object is made per verdict.
        """
        size = self.size
        copy = self._mac.copy
        padded = bool(self._padding)
        compare = hmac.compare_digest
        malformed, bad_mac = Reject.MALFORMED, Reject.BAD_MAC
        out: list[Reject | None] = []
        append = out.append
        for data in datagrams:
            if len(data) != size:
                append(malformed)
                continue
            m = copy()
            m.update(data[:HEADER])
            if padded:
                m.update(data[MIN_SIZE:])
            # The MAC is always compared in full (constant time); attempt 0 (byte 7) is never
            # sent by a probe, so only a key-holder could make one: a bad MAC as well.
            if compare(m.digest(), data[HEADER:MIN_SIZE]) and data[7]:
                append(None)
            else:
                append(bad_mac)
        return out
