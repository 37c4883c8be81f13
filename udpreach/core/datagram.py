"""The notification-shaped datagram: an opaque blob that authenticates one cell attempt.

Theory of operation: a mail server's push datagram carries only the client's opaque
context blob (16 bytes by default). Ours looks the same on the wire, and inside it is::

    0..2   run tag     3 bytes, derived from the run key (tells "another run" apart)
    3..4   dst port    the destination port the probe aimed at (big-endian)
    5..6   src port    the source port the probe sent from (NAT may rewrite the real one)
    7      attempt     1..255
    8..15  MAC         64 bits of a keyed SHAKE128 stream named by dst port, attempt and
                       src port (below)
    16..   padding     zero bytes up to --size (must be exactly that)

The run key is derived from the shared secret and fresh nonces from both the coordinator and
the agent, so a datagram can only be credited to the run it was made for, and nobody without
the secret can make one that counts. The run tag and the padding are public and checked as
they are; the MAC is compared in constant time. Verification keeps no state about what it
has seen: de-duplication is the caller's business (see ``agent.core``).

The MAC is a pseudorandom function of the cell attempt, laid out so that a batch costs
almost nothing per datagram. The MACs of 16 neighbouring source ports are one 128-byte
"chunk"::

    chunk(dst, attempt, src >> 4) = SHAKE128(MAC_DOMAIN || run key || dst (2 bytes)
                                             || attempt (1) || src >> 4 (2)), 128 bytes
    MAC(dst, src, attempt)        = chunk[8 * (src & 15) : 8 * (src & 15) + 8]

(keyed SHAKE is a PRF, as in NIST's KMAC; one chunk is one squeeze of the sponge). One
hashlib call makes 16 MACs, where a keyed hash per datagram cost a call each (1-1.5 us,
the probe's largest Python cost per datagram). Both ends keep the chunks they made in a
table per (dst, attempt), at most ``max_tables`` of them (the oldest go first), in memory
that costs only what is used. ``encode_block`` gathers a batch's MACs from it with numpy;
``check_many`` verifies a received chunk of datagrams against it in one loop and answers
with a verdict per datagram (None for genuine) rather than a Cell. Only the probe's own
encoding and genuine datagrams make or fill a table. A datagram with the wrong length, run
tag, attempt 0 or padding costs no hashing at all; a forgery that copies a genuine tag
costs one chunk made for it alone (2-4 us here, two or three keyed BLAKE2b hashes) and no
memory. A codec that has been retired (its run has ended) keeps no table at all.
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import TYPE_CHECKING

from udpreach.core.block import Block

if TYPE_CHECKING:
    import numpy as np

HEADER = 8
MAC_LEN = 8
MIN_SIZE = HEADER + MAC_LEN  # 16
MAX_SIZE = 65507  # the largest UDP payload over IPv4
MAX_ATTEMPT = 255
MAC_DOMAIN = b"udpreach/v2 datagram mac\0"
CHUNK_SHIFT = 4
CHUNK_PORTS = 1 << CHUNK_SHIFT  # source ports per chunk of MACs
CHUNK_BYTES = CHUNK_PORTS * MAC_LEN  # 128: within one SHAKE128 squeeze (168 bytes)
CHUNKS = 65536 >> CHUNK_SHIFT  # per (dst port, attempt)
# (dst port, attempt) tables kept, then the oldest go: at most 32 MiB of MACs (512 KiB a
# table if every source port is used). 64 is the most destination ports a run may have at
# a full sweep (plan.MAX_CELLS), so only larger runs to sparser source ports, whose batches
# are slow per datagram anyway, make a table's chunks more than once.
MAX_TABLES = 64
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


def _check_cells(dst_port: int, src_ports: Sequence[int] | np.ndarray, attempt: int) -> None:
    if not 1 <= attempt <= MAX_ATTEMPT:
        raise ValueError(f"attempt must be 1-{MAX_ATTEMPT}, got {attempt}")
    if not 0 <= dst_port <= 0xFFFF:
        raise ValueError(f"destination port must be 0-65535, got {dst_port}")
    if src_ports and (min(src_ports) < 0 or max(src_ports) > 0xFFFF):
        bad = next(s for s in src_ports if not 0 <= s <= 0xFFFF)
        raise ValueError(f"source port must be 0-65535, got {bad}")


class TokenCodec:
    """Encodes and verifies the datagrams of one run (one key, one size)."""

    def __init__(
        self, run_key: bytes, size: int = MIN_SIZE, *, max_tables: int = MAX_TABLES
    ) -> None:
        """``max_tables``: how many (dst port, attempt) MAC tables to keep (0: none, every
        chunk of MACs made when wanted)."""
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f"datagram size must be {MIN_SIZE}-{MAX_SIZE} bytes, got {size}")
        self.size = size
        self.tag = run_tag(run_key)
        self._xof = hashlib.shake_128(MAC_DOMAIN + run_key)
        self._padding = bytes(size - MIN_SIZE)
        # (dst << 8 | attempt) -> its _Table. Only the probe's own encoding and genuine
        # datagrams make or fill one: what a forger sends is checked against a chunk made
        # for it and kept nowhere.
        self._tables: dict[int, _Table] = {}
        self.max_tables = max(0, max_tables)

    def retire(self) -> None:
        """Free the MAC tables of a run that has ended and keep none from now on (its codec
        only names replays of it: a chunk per datagram, as for a forgery)."""
        self._tables.clear()
        self.max_tables = 0

    def _table(self, dst_port: int, attempt: int) -> _Table | None:
        """The MAC table of one (dst port, attempt), made if there is room (None if not)."""
        key = dst_port << 8 | attempt
        table = self._tables.get(key)
        if table is None and self.max_tables:
            while len(self._tables) >= self.max_tables:
                del self._tables[next(iter(self._tables))]  # the oldest
            table = self._tables[key] = _Table()
        return table

    def _chunk(self, dst_port: int, attempt: int, hi: int) -> bytes:
        """The MACs of source ports ``hi << 4`` to ``(hi << 4) + 15``: 128 bytes."""
        m = self._xof.copy()
        m.update(bytes((dst_port >> 8, dst_port & 0xFF, attempt, hi >> 8, hi & 0xFF)))
        return m.digest(CHUNK_BYTES)

    def _fill(self, table: _Table, dst_port: int, attempt: int, his: Iterable[int]) -> None:
        """Make chunks ``his`` of the table of (dst port, attempt)."""
        macs, made = table.macs, table.made
        copy = self._xof.copy
        ports = port_bytes()
        cell = bytes((dst_port >> 8, dst_port & 0xFF, attempt))
        for hi in his:
            m = copy()
            m.update(cell + ports[hi])
            at = hi * CHUNK_BYTES
            macs[at : at + CHUNK_BYTES] = m.digest(CHUNK_BYTES)
            made[hi] = 1

    def prepare(self, dst_port: int, attempt: int, his: Iterable[int]) -> None:
        """Make the chunks ``his`` of the table of (dst port, attempt) now, those not made
        yet: the probe does this in time it would otherwise spin away, and ``encode_block``
        then only gathers. Nothing happens for a codec that keeps no table."""
        table = self._table(dst_port, attempt)
        if table is None:
            return
        made = table.made
        self._fill(table, dst_port, attempt, [hi for hi in his if not made[hi]])

    def mac(self, dst_port: int, src_port: int, attempt: int) -> bytes:
        """The MAC of one cell attempt.

        Raises:
            ValueError: a port outside 0-65535 or an attempt outside 0-255.
        """
        if not (0 <= dst_port <= 0xFFFF and 0 <= src_port <= 0xFFFF and 0 <= attempt <= 0xFF):
            raise ValueError(f"no such cell attempt: {dst_port}, {src_port}, {attempt}")
        hi, at = src_port >> CHUNK_SHIFT, (src_port & (CHUNK_PORTS - 1)) * MAC_LEN
        table = self._table(dst_port, attempt)
        if table is None:
            return self._chunk(dst_port, attempt, hi)[at : at + MAC_LEN]
        if not table.made[hi]:
            self._fill(table, dst_port, attempt, (hi,))
        at += hi * CHUNK_BYTES
        return table.macs[at : at + MAC_LEN]

    def encode(self, dst_port: int, src_port: int, attempt: int) -> bytes:
        """The datagram for one cell attempt.

        Raises:
            struct.error: a port outside 0-65535 or an attempt outside 0-255 (attempt 0 is
                encoded, for tests: the agent rejects it).
        """
        cell = _CELL.pack(dst_port, src_port, attempt)
        return self.tag + cell + self.mac(dst_port, src_port, attempt) + self._padding

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
        self, dst_port: int, src_ports: Sequence[int] | np.ndarray, attempt: int
    ) -> Block:
        """``encode_many`` as one ``Block``: the probe's batch form, laid out for the whole
        batch at once with numpy (the MACs gathered from the table).

        Raises:
            ValueError: as ``encode_many``.
        """
        import numpy as np  # the probe's path only: the agent never imports numpy

        _check_cells(dst_port, (), attempt)
        n = len(src_ports)
        if not n:
            return Block(b"", self.size)
        srcs = np.asarray(src_ports, dtype=np.int64)
        if srcs.min() < 0 or srcs.max() > 0xFFFF:
            _check_cells(dst_port, src_ports, attempt)  # names the bad port
        table = self._table(dst_port, attempt) or _Table()  # a codec that keeps none: scratch
        made = np.frombuffer(table.made, dtype=np.uint8)
        his = srcs >> CHUNK_SHIFT
        missing = his[made[his] == 0]
        if len(missing):  # each missing chunk once (np.unique is slower, hashing)
            need = np.zeros(CHUNKS, dtype=bool)
            need[missing] = True
            self._fill(table, dst_port, attempt, np.flatnonzero(need).tolist())
        rows = np.zeros((n, self.size), dtype=np.uint8)
        rows[:, :3] = np.frombuffer(self.tag, dtype=np.uint8)
        rows[:, 3] = dst_port >> 8
        rows[:, 4] = dst_port & 0xFF
        rows[:, 5] = srcs >> 8
        rows[:, 6] = srcs & 0xFF
        rows[:, 7] = attempt
        macs = np.frombuffer(table.macs, dtype=np.uint64)[srcs]
        rows[:, HEADER:MIN_SIZE] = macs.view(np.uint8).reshape(n, MAC_LEN)
        return Block(rows.tobytes(), self.size)

    def mac_block(
        self, dst_port: int, src_ports: Sequence[int] | np.ndarray, attempt: int
    ) -> bytes:
        """The MACs of ``encode_many(dst_port, src_ports, attempt)``, back to back.

        Raises:
            ValueError: as ``encode_many``.
        """
        _check_cells(dst_port, src_ports, attempt)
        if not src_ports:
            return b""
        table = self._table(dst_port, attempt) or _Table()  # a codec that keeps none: scratch
        macs, made = table.macs, table.made
        out: list[bytes] = []
        add = out.append
        for s in src_ports:
            hi = s >> CHUNK_SHIFT
            if not made[hi]:
                self._fill(table, dst_port, attempt, (hi,))
            at = s * MAC_LEN
            add(macs[at : at + MAC_LEN])
        return b"".join(out)

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

    def verify_quote(self, quote: bytes) -> Cell | None:
        """The cell attempt an ICMP error's quote authenticates, or None.

        A router quotes our datagram, whole or cut short (RFC 1812: as much as fits in 576
        bytes). The first ``MIN_SIZE`` bytes (tag, cell, MAC) must be there and genuine, and
        whatever of the zero padding came along must be zeros. Never raises.
        """
        if len(quote) < MIN_SIZE or len(quote) > self.size:
            return None
        if quote[:3] != self.tag or not quote[7] or any(quote[MIN_SIZE:]):
            return None
        dst, src, attempt = _CELL.unpack_from(quote, 3)
        # A chunk made for this quote alone: a forged quote makes no table.
        hi, at = src >> CHUNK_SHIFT, (src & (CHUNK_PORTS - 1)) * MAC_LEN
        mac = self._chunk(dst, attempt, hi)[at : at + MAC_LEN]
        if not hmac.compare_digest(mac, quote[HEADER:MIN_SIZE]):
            return None
        return Cell(dst, src, attempt)

    def check(self, data: bytes) -> Reject | None:
        """``verify``'s verdict without the Cell: None if *data* is genuine (``check_many``
        of one datagram)."""
        return self.check_many((data,))[0]

    def check_many(self, datagrams: Iterable[bytes]) -> list[Reject | None]:
        """``check`` for each of *datagrams*, in order, at a lower cost each. Never raises.

        The receive path's verification: one loop for a whole chunk, and verdicts that are
        the Reject members themselves (None: genuine), so no object is made per verdict.
        """
        size = self.size
        tag = self.tag
        padding = self._padding
        padded = bool(padding)
        compare = hmac.compare_digest
        malformed, bad_mac = Reject.MALFORMED, Reject.BAD_MAC
        unpack = _CELL.unpack_from
        tables = self._tables
        key = -1  # the (dst, attempt) whose table (or None) is at hand
        table: _Table | None = None
        out: list[Reject | None] = []
        append = out.append
        for data in datagrams:
            if len(data) != size:
                append(malformed)
                continue
            # Attempt 0 is never sent by a probe; the tag and the padding are public: none
            # of them can make a datagram genuine, so none of them is worth a MAC.
            if data[:3] != tag or not data[7] or (padded and data[MIN_SIZE:] != padding):
                append(bad_mac)
                continue
            dst, src, attempt = unpack(data, 3)
            if dst << 8 | attempt != key:
                key = dst << 8 | attempt
                table = tables.get(key)
            hi = src >> CHUNK_SHIFT
            at = src * MAC_LEN
            # The MAC is always compared in full (constant time).
            if table is not None and table.made[hi]:
                append(
                    None
                    if compare(table.macs[at : at + MAC_LEN], data[HEADER:MIN_SIZE])
                    else bad_mac
                )
                continue
            chunk = self._chunk(dst, attempt, hi)
            off = at - hi * CHUNK_BYTES
            if not compare(chunk[off : off + MAC_LEN], data[HEADER:MIN_SIZE]):
                append(bad_mac)  # kept nowhere: a forger makes this cost one chunk, no memory
                continue
            append(None)
            if table is None:
                table = self._table(dst, attempt)  # genuine: worth a table, if there is room
            if table is not None:
                table.macs[hi * CHUNK_BYTES : (hi + 1) * CHUNK_BYTES] = chunk
                table.made[hi] = 1
        return out


class _Table:
    """The MACs of one (dst port, attempt) for every source port, made a chunk at a time.

    The MACs are in anonymous memory the kernel zeroes page by page on first touch, so a
    table costs real memory only for the source ports it has been used for (a bytearray
    would be zeroed, all 512 KiB of it, when made).
    """

    __slots__ = ("macs", "made")

    def __init__(self) -> None:
        self.macs = mmap.mmap(-1, 65536 * MAC_LEN)
        self.made = bytearray(CHUNKS)  # 1 where that chunk is in ``macs``
