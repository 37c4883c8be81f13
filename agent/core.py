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
"""

from __future__ import annotations

from collections import Counter, deque

from udpreach.control import encode_receipts
from udpreach.token import Cell, Reject, TokenCodec

BATCH_RECORDS = 8192  # flush when a batch gets this big, whatever the timer says
RECENT_RUNS = 4


class AgentRun:
    """One run's receive state on the agent."""

    def __init__(self, run_id: str, codec: TokenCodec, previous: deque[TokenCodec]) -> None:
        self.run_id = run_id
        self.codec = codec
        self._previous = previous
        self._seen: dict[int, bytearray] = {}
        self._seen_high: set[tuple[int, int, int]] = set()
        self._records = bytearray()
        self._addrs: dict[str, int] = {}
        self._ready: list[bytes] = []
        self.accepted = 0
        self.rejected: Counter[str] = Counter()

    def on_datagram(self, data: bytes, addr: str, port: int) -> Cell | Reject:
        """Handle one datagram from (addr, port). Never raises."""
        got = self.codec.verify(data)
        if isinstance(got, Reject):
            if got is not Reject.DUPLICATE and any(c.owns(data) for c in self._previous):
                got = Reject.OTHER_RUN
            self.rejected[got.value] += 1
            return got
        if got.attempt <= 8:
            col = self._seen.get(got.dst_port)
            if col is None:
                col = self._seen[got.dst_port] = bytearray(65536)
            bit = 1 << (got.attempt - 1)
            if col[got.src_port] & bit:
                self.rejected[Reject.DUPLICATE.value] += 1
                return Reject.DUPLICATE
            col[got.src_port] |= bit
        else:
            key = (got.dst_port, got.src_port, got.attempt)
            if key in self._seen_high:
                self.rejected[Reject.DUPLICATE.value] += 1
                return Reject.DUPLICATE
            self._seen_high.add(key)
        self.accepted += 1
        ai = self._addrs.get(addr)
        if ai is None:
            if len(self._addrs) >= 255:
                self._seal()  # a batch names at most 255 source addresses
            ai = self._addrs[addr] = len(self._addrs)
        self._records.append(ai)
        self._records += data[3:8]
        self._records += port.to_bytes(2, "big")
        return got

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
            self._previous.append(run.codec)
            self.current = None
        return run

    def on_datagram(self, data: bytes, addr: str, port: int) -> Cell | Reject:
        run = self.current
        if run is None:
            self.idle_rejected["no_run"] += 1
            return Reject.OTHER_RUN
        return run.on_datagram(data, addr, port)
