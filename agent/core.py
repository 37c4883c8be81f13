"""The agent's receive core: verify, de-duplicate, count, batch. No sockets, no trio.

Theory of operation: the agent credits nothing itself; it tells the coordinator which
genuine datagrams arrived and from where. Every datagram is verified (one MAC, constant
time) against the current run's key. A genuine datagram is reported once per (cell, attempt):
a second copy (a network duplicate or a replay) is counted as a duplicate and dropped. The
de-duplication state is one byte per (destination port, source port) holding a bitmask of
attempts 1-8, plus a small set for higher attempts, allocated per destination port on first
use (about 64 KiB each). Datagrams that fail verification are checked against the few runs
that came before this one, only to say *why* they were rejected (a replay of another run, or
a forgery); nothing about them is stored.

The listeners hand datagrams over in chunks, as ``recvfrom`` returns them
(``on_datagrams``); that loop is the agent's per-datagram cost. It verifies the whole chunk
in one call (``TokenCodec.check_many``), keeps the column of the last destination port at
hand (a sweep sends runs of one port), and remembers which batch address index each raw
source address maps to, so an address is normalized once per receipt batch rather than once
per datagram. ``on_datagram`` does the same for one datagram.
"""

from __future__ import annotations

import struct
from collections import Counter, deque
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from udpreach.core.datagram import Cell, Reject, TokenCodec, port_bytes
from udpreach.core.framing import encode_receipts

BATCH_RECORDS = 8192  # flush when a batch gets this big, whatever the timer says
RECENT_RUNS = 4
MAX_BATCH_ADDRS = 255  # a receipt batch names at most this many source addresses

# What recvfrom returns: (data, (host, port)) or (data, (host, port, flowinfo, scope_id)).
Datagram = tuple[bytes, Any]

_CELL = struct.Struct(">HHB")  # dst port, src port, attempt: bytes 3..7 of a datagram
# attempt -> its bit in a cell's de-duplication byte; 0 above 8 (the set's business)
_ATTEMPT_BIT = bytes([0, *(1 << i for i in range(8))]) + bytes(256 - 9)
_REASON = {r: r.value for r in Reject}  # Enum's .value is a slow property lookup
_DUPLICATE = Reject.DUPLICATE.value
_data_of = itemgetter(0)


def _as_is(addr: str) -> str:
    return addr


class AgentRun:
    """One run's receive state on the agent."""

    def __init__(self, run_id: str, codec: TokenCodec, previous: deque[TokenCodec]) -> None:
        self.run_id = run_id
        self.codec = codec
        self._previous = previous
        self._seen: dict[int, bytearray] = {}  # dst port -> attempts 1-8 bitmask per src port
        self._seen_high: set[tuple[int, int, int]] = set()  # (dst, src, attempt) above 8
        self._records = bytearray()
        self._addrs: dict[str, int] = {}  # normalized address -> its index in the open batch
        self._raw_addrs: dict[str, int] = {}  # raw recvfrom host -> the same index
        self._ready: list[bytes] = []
        self.accepted = 0
        self.rejected: Counter[str] = Counter()

    def on_datagram(self, data: bytes, addr: str, port: int) -> Cell | Reject:
        """Handle one datagram from (addr, port), *addr* normalized. Never raises."""
        why = self.codec.check(data)
        if why is not None:
            return self._reject(data, why)
        dst, src, attempt = _CELL.unpack_from(data, 3)
        if not self._first_copy(dst, src, attempt):
            self.rejected[_DUPLICATE] += 1
            return Reject.DUPLICATE
        self.accepted += 1
        ai = self._addrs.get(addr)
        if ai is None:
            ai = self._new_addr(addr)
        self._records.append(ai)
        self._records += data[3:8]
        self._records += port.to_bytes(2, "big")
        return Cell(dst, src, attempt)

    def on_datagrams(
        self, datagrams: Sequence[Datagram], normalize: Callable[[str], str] = _as_is
    ) -> None:
        """Handle datagrams as ``recvfrom`` returns them, in order. Never raises.

        The same as ``on_datagram(data, normalize(addr[0]), addr[1])`` for each, at a lower
        cost: the body of ``_first_copy`` is inlined, and *normalize* runs once per raw
        address per receipt batch.
        """
        verdicts = self.codec.check_many(map(_data_of, datagrams))
        unpack = _CELL.unpack_from
        bits = _ATTEMPT_BIT
        seen = self._seen
        seen_high = self._seen_high
        records = self._records  # _seal() empties it in place: the name stays valid
        raw_addrs = self._raw_addrs
        ports = port_bytes()
        col_dst = -1  # the destination port whose column ``col`` is
        col = bytearray()
        accepted = 0
        for why, (data, addr) in zip(verdicts, datagrams, strict=True):
            if why is not None:
                self._reject(data, why)
                continue
            dst, src, attempt = unpack(data, 3)
            bit = bits[attempt]
            if bit:
                if dst != col_dst:
                    got = seen.get(dst)
                    if got is None:
                        got = seen[dst] = bytearray(65536)
                    col, col_dst = got, dst
                mask = col[src]
                if mask & bit:
                    self.rejected[_DUPLICATE] += 1
                    continue
                col[src] = mask | bit
            else:
                cell = (dst, src, attempt)
                if cell in seen_high:
                    self.rejected[_DUPLICATE] += 1
                    continue
                seen_high.add(cell)
            accepted += 1
            host = addr[0]
            ai = raw_addrs.get(host)
            if ai is None:
                norm = normalize(host)
                ai = self._addrs.get(norm)
                if ai is None:
                    ai = self._new_addr(norm)
                raw_addrs[host] = ai
            records.append(ai)
            records += data[3:8]
            records += ports[addr[1]]
        self.accepted += accepted

    def _reject(self, data: bytes, why: Reject) -> Reject:
        """Count a datagram that did not verify, naming a replay of a recent run as such."""
        for codec in self._previous:
            if codec.owns(data):
                why = Reject.OTHER_RUN
                break
        self.rejected[_REASON[why]] += 1
        return why

    def _first_copy(self, dst: int, src: int, attempt: int) -> bool:
        """Note a genuine (cell, attempt); False if it was noted before (a duplicate)."""
        bit = _ATTEMPT_BIT[attempt]
        if bit:
            col = self._seen.get(dst)
            if col is None:
                col = self._seen[dst] = bytearray(65536)
            if col[src] & bit:
                return False
            col[src] |= bit
            return True
        cell = (dst, src, attempt)
        if cell in self._seen_high:
            return False
        self._seen_high.add(cell)
        return True

    def _new_addr(self, addr: str) -> int:
        """The batch index for a normalized address the open batch does not name yet."""
        if len(self._addrs) >= MAX_BATCH_ADDRS:
            self._seal()
        ai = self._addrs[addr] = len(self._addrs)
        return ai

    def pending_records(self) -> int:
        return len(self._records) // 8

    def needs_flush(self) -> bool:
        return bool(self._ready) or len(self._records) >= BATCH_RECORDS * 8

    def _seal(self) -> None:
        if self._records:
            addrs = sorted(self._addrs, key=self._addrs.__getitem__)
            self._ready.append(encode_receipts(self.run_id, addrs, bytes(self._records)))
        self._records.clear()
        self._addrs.clear()
        self._raw_addrs.clear()

    def take_batches(self) -> list[bytes]:
        """The receipts gathered since the last call, encoded for the control channel."""
        self._seal()
        out, self._ready = self._ready, []
        return out

    def stats(self) -> dict[str, object]:
        return {"accepted": self.accepted, "rejected": dict(self.rejected)}


class AgentCore:
    """Which run is current, and the runs before it (to name replays)."""

    def __init__(self) -> None:
        self.current: AgentRun | None = None
        self._previous: deque[TokenCodec] = deque(maxlen=RECENT_RUNS)
        self.idle_rejected: Counter[str] = Counter()

    def start_run(self, run_id: str, codec: TokenCodec) -> AgentRun:
        self.end_run()
        self.current = AgentRun(run_id, codec, self._previous)
        return self.current

    def end_run(self) -> AgentRun | None:
        run = self.current
        if run is not None:
            run.codec.retire()  # from now on it only names replays: its tables can go
            self._previous.append(run.codec)
            self.current = None
        return run

    def on_datagram(self, data: bytes, addr: str, port: int) -> Cell | Reject:
        run = self.current
        if run is None:
            self.idle_rejected["no_run"] += 1
            return Reject.OTHER_RUN
        return run.on_datagram(data, addr, port)

    def on_datagrams(
        self, datagrams: Sequence[Datagram], normalize: Callable[[str], str] = _as_is
    ) -> None:
        """``on_datagram`` for each of *datagrams*, as ``recvfrom`` returns them."""
        run = self.current
        if run is None:
            if datagrams:
                self.idle_rejected["no_run"] += len(datagrams)
            return
        run.on_datagrams(datagrams, normalize)
