"""The per-cell ledger: what was sent, what arrived, which verdict each cell ends with.

Theory of operation: a cell is (destination port, source port). The ledger keeps, per
planned destination port, flat arrays indexed by source port (65,536 slots), so a full
16-port sweep costs about 12 MB and no Python object per cell. Events come in from the shell
(sent, receipt, ICMP error, could-not-send) and only move a cell forward:

    pending --receipt--> open            (a receipt always wins, even after an ICMP error)
    pending --ICMP-----> rejected        (settled: not retried)
    pending --bind/send refused--> untested
    pending --run ends, every attempt spent--> blocked
    pending --run ends early--> unknown

``ranges()`` compresses the planned cells of each destination port into maximal runs of
consecutive source ports sharing verdict, ``translated`` flag and ICMP or reason details,
exactly as the contract's ``ranges`` list wants them.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

SLOTS = 65536


class Verdict(StrEnum):
    OPEN = "open"
    BLOCKED = "blocked"
    REJECTED = "rejected"
    UNTESTED = "untested"
    UNKNOWN = "unknown"


VERDICTS = tuple(v.value for v in Verdict)

PENDING = 0
_CODE = {Verdict.OPEN: 1, Verdict.BLOCKED: 2, Verdict.REJECTED: 3, Verdict.UNTESTED: 4}
_CODE_UNKNOWN = 5
_NAME = {1: "open", 2: "blocked", 3: "rejected", 4: "untested", 5: "unknown", 0: "unknown"}


@dataclass(frozen=True)
class IcmpInfo:
    type: int
    code: int
    sender: str

    def as_json(self) -> dict[str, Any]:
        return {"type": self.type, "code": self.code, "from": self.sender}


class _Column:
    """The arrays of one destination port."""

    __slots__ = ("first", "icmp", "obs_addr", "obs_port", "received", "sent", "state", "xlat")

    def __init__(self) -> None:
        self.state = bytearray(SLOTS)
        self.sent = array("H", bytes(2 * SLOTS))
        self.received = array("H", bytes(2 * SLOTS))
        self.first = bytearray(SLOTS)  # lowest attempt number credited (0: none)
        self.xlat = bytearray(SLOTS)  # 1: the agent saw another source port than we sent
        self.icmp = array("H", bytes(2 * SLOTS))  # index into the ICMP table, 0: none
        self.obs_addr = array("H", bytes(2 * SLOTS))  # index into the address table
        self.obs_port = array("H", bytes(2 * SLOTS))


class Ledger:
    """Every planned cell of one run and the evidence gathered for it."""

    def __init__(self, dst_ports: Sequence[int], src_ports: Sequence[int]) -> None:
        self.dst_ports = tuple(dst_ports)
        self.src_ports = tuple(src_ports)
        self._cols = {d: _Column() for d in self.dst_ports}
        self._planned_src = bytearray(SLOTS)
        for s in self.src_ports:
            self._planned_src[s] = 1
        self._icmp: list[IcmpInfo | None] = [None]
        self._icmp_index: dict[IcmpInfo, int] = {}
        self._addrs: list[str] = [""]
        self._addr_index: dict[str, int] = {}
        self._reasons: dict[tuple[int, int], str] = {}
        self.cells = len(self.dst_ports) * len(self.src_ports)
        self.open = 0
        self.settled = 0
        self.sent_total = 0
        self.received_total = 0
        self.unplanned_receipts = 0
        self.closed = False

    # -- events -------------------------------------------------------------------------

    def planned(self, dst: int, src: int) -> bool:
        return dst in self._cols and self._planned_src[src] == 1

    def note_sent(self, dst: int, src: int) -> None:
        col = self._cols[dst]
        if col.sent[src] < 0xFFFF:
            col.sent[src] += 1
        self.sent_total += 1

    def note_receipt(self, dst: int, src: int, attempt: int, addr: str, port: int) -> bool:
        """Credit one authenticated, de-duplicated datagram. Returns True if the cell is new."""
        col = self._cols.get(dst)
        if col is None or not 0 <= src < SLOTS or not self._planned_src[src]:
            self.unplanned_receipts += 1
            return False
        self.received_total += 1
        if col.received[src] < 0xFFFF:
            col.received[src] += 1
        if port != src:
            col.xlat[src] = 1
        new = col.first[src] == 0
        if new or attempt < col.first[src]:
            col.first[src] = min(attempt, 255)
        if new:
            col.obs_addr[src] = self._addr_idx(addr)
            col.obs_port[src] = port
        state = col.state[src]
        if state != _CODE[Verdict.OPEN]:
            if state == PENDING:
                self.settled += 1
            col.state[src] = _CODE[Verdict.OPEN]
            self.open += 1
        return new

    def note_icmp(self, dst: int, src: int, info: IcmpInfo) -> bool:
        """An ICMP error quoted our datagram for this cell. Returns True if it settled it."""
        col = self._cols.get(dst)
        if col is None or not 0 <= src < SLOTS or not self._planned_src[src]:
            return False
        if col.icmp[src] == 0:
            col.icmp[src] = self._icmp_idx(info)
        if col.state[src] == PENDING:
            col.state[src] = _CODE[Verdict.REJECTED]
            self.settled += 1
            return True
        return False

    def unsettle_icmp(self, unreliable: Callable[[IcmpInfo], bool]) -> int:
        """Return to pending every rejected cell whose ICMP error *unreliable* disowns
        (port-unreachable from the agent's own host once the agent has died). How many."""
        rejected = _CODE[Verdict.REJECTED]
        n = 0
        for d in self.dst_ports:
            col = self._cols[d]
            for s in self.src_ports:
                if col.state[s] == rejected:
                    info = self._icmp[col.icmp[s]]
                    if info is not None and unreliable(info):
                        col.state[s] = PENDING
                        col.icmp[s] = 0
                        self.settled -= 1
                        n += 1
        return n

    def note_untested(self, src: int, reason: str, dsts: Iterable[int] | None = None) -> None:
        """The probe could not send from this source port (to these destinations)."""
        for d in self.dst_ports if dsts is None else dsts:
            col = self._cols[d]
            if col.state[src] == PENDING:
                col.state[src] = _CODE[Verdict.UNTESTED]
                self._reasons[(d, src)] = reason
                self.settled += 1

    def _addr_idx(self, addr: str) -> int:
        i = self._addr_index.get(addr)
        if i is None:
            if len(self._addrs) >= 0xFFFF:
                return 0
            i = len(self._addrs)
            self._addrs.append(addr)
            self._addr_index[addr] = i
        return i

    def _icmp_idx(self, info: IcmpInfo) -> int:
        i = self._icmp_index.get(info)
        if i is None:
            if len(self._icmp) >= 0xFFFF:
                return 1
            i = len(self._icmp)
            self._icmp.append(info)
            self._icmp_index[info] = i
        return i

    # -- queries ------------------------------------------------------------------------

    def unresolved(self) -> list[tuple[int, int]]:
        """Pending cells (no receipt, no ICMP, not untested), as (dst, src) pairs."""
        out: list[tuple[int, int]] = []
        for d in self.dst_ports:
            st = self._cols[d].state
            out.extend((d, s) for s in self.src_ports if st[s] == PENDING)
        return out

    def attempts(self, dst: int, src: int) -> int:
        return self._cols[dst].sent[src]

    def verdict(self, dst: int, src: int) -> str:
        return _NAME[self._cols[dst].state[src]]

    def first_attempt_histogram(self) -> dict[int, int]:
        """How many credited cells were first seen at each attempt number."""
        hist: dict[int, int] = {}
        for d in self.dst_ports:
            first = self._cols[d].first
            for s in self.src_ports:
                a = first[s]
                if a:
                    hist[a] = hist.get(a, 0) + 1
        return hist

    def observed_addresses(self) -> list[str]:
        return self._addrs[1:]

    def finish(self, *, complete: bool) -> None:
        """Settle every pending cell: blocked if the run finished its plan, else unknown."""
        final = _CODE[Verdict.BLOCKED] if complete else _CODE_UNKNOWN
        for d in self.dst_ports:
            st = self._cols[d].state
            for s in self.src_ports:
                if st[s] == PENDING:
                    st[s] = final
        self.settled = self.cells
        self.closed = True

    def summary(self) -> dict[str, int]:
        counts = dict.fromkeys(VERDICTS, 0)
        for d in self.dst_ports:
            st = self._cols[d].state
            for s in self.src_ports:
                counts[_NAME[st[s]]] += 1
        return {"cells": self.cells, **counts}

    def ranges(self, *, settled_only: bool = False) -> list[dict[str, Any]]:
        """The contract's ``ranges``: maximal, sorted, every planned cell exactly once.

        Args:
            settled_only: leave pending cells out (for checkpoints during a run); otherwise
                a pending cell is reported as ``unknown``.
        """
        return list(self._iter_ranges(settled_only))

    def _iter_ranges(self, settled_only: bool) -> Iterator[dict[str, Any]]:
        srcs = self.src_ports
        for d in self.dst_ports:
            col = self._cols[d]
            st, xl, ic = col.state, col.xlat, col.icmp
            cur: list[Any] | None = None  # [first, last, key, sent, received, obs...]
            for s in srcs:
                code = st[s]
                if settled_only and code == PENDING:
                    if cur is not None:
                        yield self._range_doc(d, cur)
                        cur = None
                    continue
                key = (
                    code or _CODE_UNKNOWN,
                    xl[s],
                    ic[s] if code == 3 else 0,
                    self._reasons.get((d, s)) if code == 4 else None,
                )
                if cur is not None and cur[1] + 1 == s and cur[2] == key:
                    cur[1] = s
                    cur[3] += col.sent[s]
                    cur[4] += col.received[s]
                    if col.first[s]:
                        self._widen(cur, col, s)
                else:
                    if cur is not None:
                        yield self._range_doc(d, cur)
                    cur = [s, s, key, col.sent[s], col.received[s], None, 0, 0]
                    if col.first[s]:
                        self._widen(cur, col, s)
            if cur is not None:
                yield self._range_doc(d, cur)

    @staticmethod
    def _widen(cur: list[Any], col: _Column, s: int) -> None:
        port = col.obs_port[s]
        addr = col.obs_addr[s]
        if cur[5] is None:
            cur[5] = {addr}
            cur[6] = cur[7] = port
        else:
            cur[5].add(addr)
            cur[6] = min(cur[6], port)
            cur[7] = max(cur[7], port)

    def _range_doc(self, dst: int, cur: list[Any]) -> dict[str, Any]:
        code, xlat, icmp_i, reason = cur[2]
        doc: dict[str, Any] = {
            "dst_port": dst,
            "first": cur[0],
            "last": cur[1],
            "verdict": _NAME[code],
            "translated": bool(xlat),
            "sent": cur[3],
            "received": cur[4],
        }
        if code == 3:
            info = self._icmp[icmp_i]
            if info is not None:
                doc["icmp"] = info.as_json()
        if code == 4:
            doc["reason"] = reason or "could not send"
        if cur[5] is not None:
            doc["observed"] = {
                "addresses": sorted(self._addrs[i] for i in cur[5] if i),
                "first_port": cur[6],
                "last_port": cur[7],
            }
        return doc
