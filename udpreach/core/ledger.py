"""The per-cell ledger: what was sent, what arrived, which verdict each cell ends with.

Theory of operation: a cell is (destination port, source port). The ledger keeps, per
planned destination port, flat arrays indexed by source port (65,536 slots), so a full
16-port sweep costs about 12 MB and no Python object per cell. Each field is one buffer for
all destination ports (``_Columns``), port after port: a batch of receipts is booked with
one pass of array operations whatever the number of ports it names (for 16 ports a pass
per port cost 0.38-0.57 us a receipt; one pass costs 0.11). Events come in from the shell
(sent, receipt, ICMP error, could-not-send) and only move a cell forward:

    pending --receipt--> open            (a receipt always wins, even after an ICMP error)
    pending --verified ICMP--> rejected  (settled: not retried)
    pending --unverified ICMP--> pending (weak evidence: kept, still retried)
    pending --bind/send refused--> untested
    pending --run ends, every attempt spent--> blocked (rejected, unverified, on weak evidence)
    pending --run ends early--> unknown

Each cell also says *how* it got its verdict: from evidence of its own (0), inferred from
confirming samples of its range (1), or silent only while an ICMP sender on the path was
rate-limiting and not confirmed within the run's budget (2). Receipts are checked against
what was sent: a receipt for an attempt never sent, or more receipts than datagrams, is
refused and counted (``refused_receipts``), never credited.

``ranges()`` compresses the planned cells of each destination port into maximal runs of
consecutive source ports sharing verdict, ``translated`` flag and ICMP or reason details,
exactly as the contract's ``ranges`` list wants them.
"""

from __future__ import annotations

import json
import re
import struct
import sys
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import compress, groupby
from typing import TYPE_CHECKING, Any

from udpreach.core.schema import VERDICTS, IcmpDetailsJson, Range, Summary, Verdict

if TYPE_CHECKING:
    import numpy as np


SLOTS = 65536
_RUNS = re.compile(rb"(.)\1*", re.DOTALL)  # maximal runs of one byte value
_SKIP = 0xFF  # a key byte for slots that belong in no range (unplanned, or left out)

__all__ = ["VERDICTS", "IcmpInfo", "Ledger", "Verdict"]  # the verdicts: udpreach.core.schema

PENDING = 0
OPEN = 1  # the state code of a credited cell
_CODE = {Verdict.OPEN: OPEN, Verdict.BLOCKED: 2, Verdict.REJECTED: 3, Verdict.UNTESTED: 4}
_CODE_UNKNOWN = 5
_NAME = {1: "open", 2: "blocked", 3: "rejected", 4: "untested", 5: "unknown", 0: "unknown"}


def _table(mapping: dict[int, int], default: int | None = None) -> bytes:
    """A ``bytes.translate`` table: ``mapping`` where given, else identity (or ``default``)."""
    return bytes(mapping.get(i, i if default is None else default) for i in range(256))


def _and(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bytes:
    """Byte-wise AND of two equally long byte strings, at C speed."""
    n = len(a)
    return (int.from_bytes(a, "little") & int.from_bytes(b, "little")).to_bytes(n, "little")


_IS_PENDING = _table({PENDING: 1}, default=0)  # state -> 1 where pending, else 0

# A receipt in its wire form (``control.RECEIPT``): addr index, dst, src sent, attempt,
# observed port.
_RECORD_STRUCT = struct.Struct(">BHHBH")


@cache
def _record_dtype() -> np.dtype[Any]:
    """The numpy form of ``_RECORD_STRUCT`` (numpy is imported on first use: the CLI's
    history commands read ledgers without ever booking a batch)."""
    import numpy as np

    return np.dtype([("ai", "u1"), ("dst", ">u2"), ("src", ">u2"), ("att", "u1"), ("port", ">u2")])


SNAPSHOT_MAGIC = b"udpreach-ledger/2\n"
_SNAPSHOT_V1 = b"udpreach-ledger/1\n"  # before the ``how`` column: still read
_BYTE_COLUMNS = ("state", "first", "xlat", "how")
OBSERVED, INFERRED, ICMP_LIMITED = 0, 1, 2  # the values of the ``how`` column
_WORD_COLUMNS = ("sent", "received", "icmp", "obs_addr", "obs_port")


class SnapshotError(ValueError):
    """A ledger snapshot that cannot be read back."""


@dataclass(frozen=True)
class IcmpInfo:
    """An ICMP error's details. ``verified``: its quote carried our datagram's MAC."""

    type: int
    code: int
    sender: str
    verified: bool = True

    def as_json(self) -> IcmpDetailsJson:
        return {
            "type": self.type,
            "code": self.code,
            "from": self.sender,
            "verified": self.verified,
        }


@cache
def _zero_base() -> np.ndarray:
    import numpy as np

    zeros = np.zeros(SLOTS, dtype=np.uint16)
    zeros.flags.writeable = False
    return zeros


@dataclass(frozen=True)
class ColumnView:
    """numpy views of one destination port's arrays, indexed by source port."""

    state: np.ndarray  # uint8: PENDING or a verdict code
    sent: np.ndarray  # uint16: datagrams sent (the cell's attempts are 1..sent)
    received: np.ndarray  # uint16: receipts credited (each attempt once)
    first: np.ndarray  # uint8: lowest attempt credited, 0 for none
    icmp: np.ndarray  # uint16: index of its ICMP details, 0 for none
    how: np.ndarray  # uint8: OBSERVED, INFERRED or ICMP_LIMITED
    base: np.ndarray  # uint16: attempts of earlier epochs (0 in the first)


def _numpy_views(cols: _Columns | _Column, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """numpy views (no copies) of the named fields: the word columns (``_WORD_COLUMNS``)
    as uint16, the others as uint8."""
    import numpy as np

    return {
        n: np.frombuffer(getattr(cols, n), dtype=np.uint16 if n in _WORD_COLUMNS else np.uint8)
        for n in names
    }


class _Columns:
    """The arrays of every destination port, each field one buffer for all of them (the
    ``i``-th port's slots at ``i * SLOTS``), so that a batch of receipts for many ports is
    booked in one pass of array operations over them all (``Ledger.note_receipts_packed``)."""

    def __init__(self, count: int) -> None:
        n = count * SLOTS
        self.state = bytearray(n)  # PENDING or a verdict code
        self.first = bytearray(n)  # lowest attempt number credited (0: none)
        self.xlat = bytearray(n)  # 1: the agent saw another source port than we sent
        self.how = bytearray(n)  # OBSERVED, INFERRED or ICMP_LIMITED
        self.sent = array("H", bytes(2 * n))
        self.received = array("H", bytes(2 * n))
        self.icmp = array("H", bytes(2 * n))  # index into the ICMP table, 0: none
        self.obs_addr = array("H", bytes(2 * n))  # index into the address table
        self.obs_port = array("H", bytes(2 * n))


@dataclass
class _Flat:
    """numpy views of ``_Columns``: a cell (dst, src) is index ``column[dst] * SLOTS + src``."""

    column: np.ndarray  # int32 per dst port: its column, -1 for none
    state: np.ndarray
    first: np.ndarray
    xlat: np.ndarray
    how: np.ndarray
    sent: np.ndarray
    received: np.ndarray
    obs_addr: np.ndarray
    obs_port: np.ndarray
    base: np.ndarray | None  # attempts of earlier epochs (None in the first)


class _Column:
    """One destination port's arrays: memoryviews of its slots in ``_Columns`` (items,
    slices and numpy views as of bytearrays and ``array("H")``; ``bytes(...)`` for the rest)."""

    __slots__ = (
        "first",
        "how",
        "icmp",
        "obs_addr",
        "obs_port",
        "received",
        "sent",
        "state",
        "xlat",
    )

    def __init__(self, columns: _Columns, i: int) -> None:
        at = slice(i * SLOTS, (i + 1) * SLOTS)
        self.state = memoryview(columns.state)[at]
        self.sent = memoryview(columns.sent)[at]
        self.received = memoryview(columns.received)[at]
        self.first = memoryview(columns.first)[at]
        self.xlat = memoryview(columns.xlat)[at]
        self.how = memoryview(columns.how)[at]
        self.icmp = memoryview(columns.icmp)[at]
        self.obs_addr = memoryview(columns.obs_addr)[at]
        self.obs_port = memoryview(columns.obs_port)[at]


def compress_snapshot(parts: Sequence[bytes]) -> bytes:
    """A ledger snapshot from ``Ledger.snapshot_parts`` (safe in another thread: it only
    reads its own copy)."""
    return SNAPSHOT_MAGIC + zlib.compress(b"".join(parts), 1)


class Ledger:
    """Every planned cell of one run and the evidence gathered for it."""

    def __init__(self, dst_ports: Sequence[int], src_ports: Sequence[int]) -> None:
        self.dst_ports = tuple(dst_ports)
        self.src_ports = tuple(src_ports)
        self._all = _Columns(len(self.dst_ports))
        self._cols = {d: _Column(self._all, i) for i, d in enumerate(self.dst_ports)}
        self._col_index = {d: i for i, d in enumerate(self.dst_ports)}
        self._planned_src = bytearray(SLOTS)
        for s in self.src_ports:
            self._planned_src[s] = 1
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None  # see _batch_arrays
        # Byte masks over the 65,536 source-port slots, for the C-speed queries below.
        self._planned_ff = bytes(self._planned_src.translate(_table({1: 0xFF}, default=0)))
        self._unplanned_ff = bytes(self._planned_src.translate(_table({0: 0xFF}, default=0)))
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
        self.refused_receipts = 0  # for attempts never sent, or beyond one per datagram
        self.stale_receipts = 0  # for attempts of an earlier epoch (see ``new_epoch``)
        self.closed = False
        # The address the probe sends from: a datagram credited from another address was
        # translated on the way, as one from another source port ("" : not known).
        self.expected_source = ""
        self._base: dict[int, np.ndarray] = {}  # per dst: attempts of earlier epochs
        self._rbase: dict[int, np.ndarray] = {}  # per dst: receipts of earlier epochs
        self._base_all: np.ndarray | None = None  # the same for every column (their rows)
        self._flat: _Flat | None = None  # see _flat_arrays
        # Of the last batch (``note_receipts_packed``): which records were credited, and
        # which of those were for their cell's latest attempt (only those date from when it
        # was last sent: the engine's delay measure).
        self.last_accepted: np.ndarray | None = None
        self.last_latest: np.ndarray | None = None

    def _batch_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """numpy's view of the planned source ports, and a scratch array that finds a port
        repeated within a batch (made on the first batch)."""
        if self._arrays is None:
            import numpy as np

            planned = np.frombuffer(self._planned_src, dtype=np.uint8)
            self._arrays = (planned, np.zeros(SLOTS, dtype=np.intp))
        return self._arrays

    def _flat_arrays(self) -> _Flat:
        """numpy's views of every column at once (made on the first batch)."""
        if self._flat is None:
            import numpy as np

            cols = self._all
            column = np.full(SLOTS, -1, dtype=np.int32)  # dst port -> its column, -1: none
            column[list(self.dst_ports)] = np.arange(len(self.dst_ports), dtype=np.int32)
            self._flat = _Flat(
                column=column,
                base=self._base_all,
                **_numpy_views(
                    cols,
                    ("state", "first", "xlat", "how", "sent", "received", "obs_addr", "obs_port"),
                ),
            )
        return self._flat

    # -- events -------------------------------------------------------------------------

    def planned(self, dst: int, src: int) -> bool:
        return dst in self._cols and self._planned_src[src] == 1

    def note_sent(self, dst: int, src: int) -> None:
        col = self._cols[dst]
        if col.sent[src] < 0xFFFF:
            col.sent[src] += 1
        self.sent_total += 1

    def note_sent_many(self, dst: int, srcs: Sequence[int] | np.ndarray) -> None:
        """One more attempt sent for each cell (dst, s) of ``srcs``."""
        import numpy as np

        if not len(srcs):
            return
        _, slot = self._batch_arrays()
        sent = np.frombuffer(self._cols[dst].sent, dtype=np.uint16)
        cells = np.asarray(srcs, dtype=np.intp)
        index = np.arange(len(cells))
        slot[cells] = index
        if np.array_equal(slot[cells], index):  # no port twice: the usual case
            was = sent[cells]
            sent[cells] = was + (was < 0xFFFF)
        else:
            cells, times = np.unique(cells, return_counts=True)
            sent[cells] = np.minimum(sent[cells] + times, 0xFFFF)
        self.sent_total += len(index)

    def note_receipts(
        self,
        records: Iterable[tuple[int, int, int, int, int]],
        addrs: Sequence[str],
        attempt_of_interest: int,
    ) -> list[int]:
        """Credit receipts given as tuples ``(addr index, dst, src, attempt, observed port)``:
        ``note_receipts_packed`` for records not in wire form."""
        if len(addrs) > 255:
            raise ValueError("at most 255 addresses per batch, as on the wire")
        wire: list[bytes] = []
        nonsense = 0
        for ai, dst, src, attempt, port in records:
            if not (0 <= dst <= 0xFFFF and 0 <= src <= 0xFFFF and 0 <= port <= 0xFFFF):
                nonsense += 1  # cannot be on the wire: only ever unplanned
                continue
            wire.append(_RECORD_STRUCT.pack(min(ai, len(addrs)), dst, src, min(attempt, 255), port))
        self.unplanned_receipts += nonsense
        interest = min(attempt_of_interest, 255)
        fresh: list[int] = self.note_receipts_packed(b"".join(wire), addrs, interest).tolist()
        return fresh

    def note_receipts_packed(
        self,
        records: bytes | memoryview,
        addrs: Sequence[str],
        attempt_of_interest: int | None = None,
    ) -> np.ndarray:
        """Credit a batch of receipts in their wire form (``control.RECEIPT`` records).

        The coordinator's hot path: whole-batch array operations, with the effect of
        crediting the records one by one in order. A receipt for an unplanned cell, or for
        attempt 0 (never sent), only counts as unplanned. An address index past ``addrs``
        names the address ``"?"``. A cell credited for the first time keeps the address and
        port of its first record in the batch; its first attempt is the lowest credited.

        Returns:
            the source ports (an integer array) of the cells this batch credited for the
            first time with ``attempt == attempt_of_interest`` (None: with the cell's latest
            attempt sent; the engine's per-window delivery count), in the order of their
            first records.
        """
        import numpy as np

        planned, _ = self._batch_arrays()
        rec = np.frombuffer(records, dtype=_record_dtype())
        n = len(rec)
        if n == 0:
            return np.zeros(0, dtype=np.intp)
        flat = self._flat_arrays()
        src = rec["src"].astype(np.intp)
        att = rec["att"]
        column = flat.column[rec["dst"]]  # -1: not a planned destination port
        k = np.flatnonzero((column >= 0) & (planned[src] != 0) & (att != 0))
        latest = np.zeros(n, dtype=bool)  # the record is for its cell's latest attempt
        accepted = np.zeros(n, dtype=bool)  # the record was credited (not refused)
        self.last_accepted = accepted
        self.last_latest = latest
        refused = stale = 0
        # Per address index (the last one: past the batch's list), whether it is another
        # address than the probe's own.
        foreign = np.full(256, bool(self.expected_source))
        foreign[: len(addrs)] = [
            bool(self.expected_source) and a != self.expected_source for a in addrs
        ]
        open_code = _CODE[Verdict.OPEN]
        received = opened = settled = 0
        # Every field of every column is one array (``_Columns``): a cell is one index.
        cell = column[k].astype(np.intp) * SLOTS + src[k]
        rc, sent = flat.received, flat.sent
        a = att[k].astype(np.int64)
        # Only what was sent can be received, once per datagram: an attempt beyond the
        # cell's sends, or a receipt beyond its datagrams, is refused (never credited).
        fits = a <= sent[cell]
        old = np.zeros(len(k), dtype=bool)
        if flat.base is not None:  # an earlier epoch's attempt: not evidence any more
            old = (a <= flat.base[cell]) & fits
            stale = int(np.count_nonzero(old))
            fits &= ~old
        ordered = np.sort(cell)
        once = not bool((ordered[1:] == ordered[:-1]).any())  # no cell twice: the usual case
        if once:
            fits &= rc[cell] < sent[cell]
        else:  # the n-th receipt of a cell in this batch needs n more datagrams
            # (counting only its receipts that passed the attempt check above)
            cand = np.flatnonzero(fits)
            order = cand[np.argsort(cell[cand], kind="stable")]
            cc = cell[order]
            if len(cc):
                start = np.r_[0, np.flatnonzero(cc[1:] != cc[:-1]) + 1]
                rank = np.arange(len(cc)) - np.repeat(start, np.diff(np.r_[start, len(cc)]))
                nth = np.zeros(len(cell), dtype=np.int64)
                nth[order] = rank
                fits &= rc[cell].astype(np.int64) + nth < sent[cell]
        refused = int(np.count_nonzero(~fits)) - stale
        k, cell = k[fits], cell[fits]
        first_recs = k[:0]  # the records that credited a cell for the first time
        if len(k):
            latest[k] = att[k].astype(np.int64) == sent[cell]
            accepted[k] = True
            received = len(k)
            if once:  # (then neither is any cell of what it credits)
                cells, first_rec, lowest = cell, np.arange(len(cell)), att[k]
                r = rc[cell]
                rc[cell] = r + (r < 0xFFFF)
            else:
                cells, first_rec, which, count = np.unique(
                    cell, return_index=True, return_inverse=True, return_counts=True
                )
                rc[cells] = np.minimum(rc[cells].astype(np.int64) + count, 0xFFFF)
                lowest = np.full(len(cells), 255, dtype=np.uint8)
                np.minimum.at(lowest, which, att[k])
            port = rec["port"][k].astype(np.intp)
            moved = cell[(port != src[k]) | foreign[rec["ai"][k]]]
            if len(moved):
                flat.xlat[moved] = 1
            before = flat.first[cells]
            new = before == 0
            flat.first[cells] = np.where(new, lowest, np.minimum(before, lowest))
            first_recs, new_cells = k[first_rec[new]], cells[new]
            was = flat.state[cells]
            opened = int(np.count_nonzero(was != open_code))
            settled = int(np.count_nonzero(was == PENDING))
            flat.state[cells] = open_code
            flat.how[cells] = OBSERVED
        fresh = np.zeros(0, dtype=np.intp)
        if len(first_recs):
            # Addresses enter the table on first credit, in batch order, as one by one (with
            # a repeated cell the first records come in cell order: sort).
            order = first_recs if once else np.sort(first_recs)
            ai = np.minimum(rec["ai"], len(addrs))
            named = ai[order]
            if bool((named == named[0]).all()):  # one address (the usual case)
                first_named = [int(named[0])]
            else:
                seen, at = np.unique(named, return_index=True)
                first_named = seen[np.argsort(at)].tolist()
            names = [*addrs, "?"]
            lut = np.zeros(len(addrs) + 1, dtype=np.uint16)
            for i in first_named:
                lut[i] = self._addr_idx(names[i])
            flat.obs_addr[new_cells] = lut[ai[first_recs]]
            flat.obs_port[new_cells] = rec["port"][first_recs]
            if attempt_of_interest is None:
                fresh = src[order[latest[order]]]
            else:
                fresh = src[order[att[order] == attempt_of_interest]]
        self.unplanned_receipts += n - received - refused - stale
        self.stale_receipts += stale
        self.refused_receipts += refused
        self.received_total += received
        self.open += opened
        self.settled += settled
        return fresh

    def current(self, dst: int, src: int, attempt: int) -> bool:
        """Whether evidence about this attempt counts in this epoch (see ``new_epoch``)."""
        base = self._base.get(dst)
        return base is None or attempt > int(base[src])

    def new_epoch(self) -> Ledger:
        """A fresh ledger for a repeat of the sweep (the path changed during the run).

        Attempt numbers go on from this one's (the agent de-duplicates by attempt), and only
        evidence about later attempts counts in the new one: a late receipt of the first
        sweep is stale there, not a verdict.
        """
        import numpy as np

        new = Ledger(self.dst_ports, self.src_ports)
        new.expected_source = self.expected_source
        new._all.sent[:] = self._all.sent
        new._all.received[:] = self._all.received
        base = np.frombuffer(self._all.sent, dtype=np.uint16).copy()
        new._base_all = base
        rbase = np.frombuffer(self._all.received, dtype=np.uint16).copy()
        for i, d in enumerate(self.dst_ports):
            new._base[d] = base[i * SLOTS : (i + 1) * SLOTS]
            new._rbase[d] = rbase[i * SLOTS : (i + 1) * SLOTS]
        new.sent_total = self.sent_total
        new.received_total = self.received_total
        new.refused_receipts = self.refused_receipts
        new.unplanned_receipts = self.unplanned_receipts
        new.stale_receipts = self.stale_receipts
        return new

    def note_receipt(self, dst: int, src: int, attempt: int, addr: str, port: int) -> bool:
        """Credit one authenticated, de-duplicated datagram. Returns True if the cell is new."""
        if not 0 <= src < SLOTS:
            self.unplanned_receipts += 1
            return False
        attempt = min(attempt, 255)
        return bool(self.note_receipts([(0, dst, src, attempt, port)], [addr], attempt))

    def note_icmp(self, dst: int, src: int, info: IcmpInfo) -> bool:
        """An ICMP error quoted our datagram for this cell. Returns True if it settled it.

        A verified error (its quote carried our MAC) settles a pending cell as rejected. An
        unverified one (headers only: anyone can forge it) is kept as weak evidence and
        settles nothing: the cell is still retried, and a verified error replaces it.
        """
        col = self._cols.get(dst)
        if col is None or not 0 <= src < SLOTS or not self._planned_src[src]:
            return False
        held = self._icmp[col.icmp[src]]
        if held is None or (info.verified and not held.verified):
            col.icmp[src] = self._icmp_idx(info)
        if not info.verified:
            return False
        if col.state[src] == PENDING:
            col.state[src] = _CODE[Verdict.REJECTED]
            self.settled += 1
            return True
        return False

    def unsettle_icmp(self, unreliable: Callable[[IcmpInfo], bool]) -> int:
        """Return to pending every rejected cell whose ICMP error *unreliable* disowns
        (port-unreachable from the agent's own host once the agent has died). How many."""
        rejected = _CODE[Verdict.REJECTED]
        is_rejected = _table({rejected: 1}, default=0)
        n = 0
        for d in self.dst_ports:
            col = self._cols[d]
            mask = _and(col.state.tobytes().translate(is_rejected), self._planned_src)
            for s in compress(range(SLOTS), mask):
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
                col.how[src] = OBSERVED
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

    def _pending_mask(self, dst: int) -> bytes:
        """1 at each planned source port whose cell (dst, s) is pending, else 0."""
        return _and(self._cols[dst].state.tobytes().translate(_IS_PENDING), self._planned_src)

    def unresolved_srcs(self, dst: int) -> list[int]:
        """Source ports of the pending cells of one destination port, ascending."""
        return list(compress(range(SLOTS), self._pending_mask(dst)))

    def unresolved(self) -> list[tuple[int, int]]:
        """Pending cells (no receipt, no ICMP, not untested), as (dst, src) pairs."""
        return [(d, s) for d in self.dst_ports for s in self.unresolved_srcs(d)]

    def attempts(self, dst: int, src: int) -> int:
        return self._cols[dst].sent[src]

    def view(self, dst: int) -> ColumnView:
        """numpy views of one destination port's arrays (writes go to the ledger)."""
        base = self._base.get(dst)
        return ColumnView(
            base=base if base is not None else _zero_base(),
            **_numpy_views(self._cols[dst], ("state", "sent", "received", "first", "icmp", "how")),
        )

    def planned_mask(self) -> np.ndarray:
        """A boolean array over the 65,536 source-port slots: True where planned."""
        planned, _ = self._batch_arrays()
        mask: np.ndarray = planned != 0
        return mask

    def icmp_indexes(self, wanted: Callable[[IcmpInfo], bool]) -> list[int]:
        """The ``icmp`` indexes of the ICMP details ``wanted`` accepts."""
        return [i for i, info in enumerate(self._icmp) if info is not None and wanted(info)]

    def icmp_info(self, index: int) -> IcmpInfo | None:
        """The ICMP details behind a cell's ``icmp`` index (0: none)."""
        return self._icmp[index] if 0 <= index < len(self._icmp) else None

    def settle(
        self,
        dst: int,
        srcs: np.ndarray,
        verdict: Verdict,
        how: int,
        icmp: IcmpInfo | None = None,
    ) -> int:
        """Give pending cells ``(dst, s)`` of ``srcs`` a verdict the run inferred (rejected or
        blocked, from confirming samples of their range). Returns how many it settled."""
        import numpy as np

        v = self.view(dst)
        cells = np.asarray(srcs, dtype=np.intp)
        cells = cells[(v.state[cells] == PENDING) & self.planned_mask()[cells]]
        if not len(cells):
            return 0
        v.state[cells] = _CODE[verdict]
        v.how[cells] = how
        if icmp is not None:
            v.icmp[cells] = self._icmp_idx(icmp)
        self.settled += len(cells)
        return len(cells)

    def mark(self, dst: int, srcs: np.ndarray, how: int) -> None:
        """Say how pending cells will get their verdict when the run ends (``how`` column)."""
        import numpy as np

        v = self.view(dst)
        cells = np.asarray(srcs, dtype=np.intp)
        v.how[cells[v.state[cells] == PENDING]] = how

    def verdict(self, dst: int, src: int) -> str:
        return _NAME[self._cols[dst].state[src]]

    def first_attempt_histogram(self) -> dict[int, int]:
        """How many credited cells were first seen at each attempt number (counted from the
        start of this epoch)."""
        hist: dict[int, int] = {}
        if self._base:
            import numpy as np

            planned = self.planned_mask()
            for d in self.dst_ports:
                v = self.view(d)
                first = v.first.astype(np.int64) - v.base
                seen = planned & (v.first > 0) & (first > 0)
                values, counts = np.unique(first[seen], return_counts=True)
                for a, k in zip(values.tolist(), counts.tolist(), strict=True):
                    hist[a] = hist.get(a, 0) + k
            return hist
        for d in self.dst_ports:
            first = _and(self._cols[d].first, self._planned_ff)
            for a in range(1, max(first) + 1):
                k = first.count(a)
                if k:
                    hist[a] = hist.get(a, 0) + k
        return hist

    def observed_addresses(self) -> list[str]:
        return self._addrs[1:]

    def finish(self, *, complete: bool) -> None:
        """Settle every pending cell: blocked if the run finished its plan (rejected, not
        verified, where only unverified ICMP errors came back for it), else unknown."""
        final = _CODE[Verdict.BLOCKED] if complete else _CODE_UNKNOWN
        for d in self.dst_ports:
            col = self._cols[d]
            st = col.state
            if complete:
                import numpy as np

                state = np.frombuffer(st, dtype=np.uint8)
                weak = (
                    (state == PENDING)
                    & (np.frombuffer(self._planned_src, dtype=np.uint8) != 0)
                    & (np.frombuffer(col.icmp, dtype=np.uint16) != 0)
                )
                if weak.any():
                    state[weak] = _CODE[Verdict.REJECTED]
            # Each pending byte is 1 in the mask; times ``final`` (< 256) it becomes ``final``
            # without carrying into its neighbours, and OR puts it where the 0 was.
            fill = int.from_bytes(self._pending_mask(d), "little") * final
            st[:] = (int.from_bytes(st, "little") | fill).to_bytes(SLOTS, "little")
        self.settled = self.cells
        self.closed = True

    def summary(self) -> Summary:
        counts = dict.fromkeys(VERDICTS, 0)
        per_dst = len(self.src_ports)
        for d in self.dst_ports:
            st = _and(self._cols[d].state, self._planned_ff)
            seen = 0
            for code in (1, 2, 3, 4, _CODE_UNKNOWN):
                k = st.count(code)
                counts[_NAME[code]] += k
                seen += k
            counts["unknown"] += per_dst - seen  # pending cells of an unfinished ledger
        return {
            "cells": self.cells,
            "open": counts["open"],
            "blocked": counts["blocked"],
            "rejected": counts["rejected"],
            "untested": counts["untested"],
            "unknown": counts["unknown"],
        }

    # -- snapshots (checkpoints) ------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Everything the ledger knows, compressed: what the coordinator checkpoints
        (``compress_snapshot(self.snapshot_parts())``).

        Theory: a checkpoint in the middle of a round meets the settled cells scattered (the
        sweep goes in random order), where ``ranges()`` would make a dict per fragment, tens
        of thousands of them. The arrays themselves compress at C speed, whatever the
        pattern; ``from_snapshot`` turns them back into a ledger (and ranges) when, rarely,
        an interrupted run is read.
        """
        return compress_snapshot(self.snapshot_parts())

    def snapshot_parts(self) -> list[bytes]:
        """A copy of what ``snapshot`` compresses: cheap (memory copies), so that the
        coordinator takes it between two batches and compresses it in a worker thread
        (16 destination ports: about 3 ms here, where compressing takes about 30)."""
        header = {
            "byteorder": sys.byteorder,
            "dst_ports": list(self.dst_ports),
            "addrs": self._addrs,
            "icmp": [
                None if i is None else [i.type, i.code, i.sender, i.verified] for i in self._icmp
            ],
            "reasons": [[d, s, r] for (d, s), r in self._reasons.items()],
            "counters": [self.open, self.settled, self.sent_total, self.received_total],
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        parts = [len(head).to_bytes(4, "big"), head]
        for d in self.dst_ports:
            col = self._cols[d]
            parts += [bytes(getattr(col, name)) for name in _BYTE_COLUMNS]
            parts += [getattr(col, name).tobytes() for name in _WORD_COLUMNS]
        return parts

    @classmethod
    def from_snapshot(cls, data: bytes, src_ports: Sequence[int]) -> Ledger:
        """The ledger a ``snapshot`` was taken of (``src_ports``: the plan's).

        Raises:
            SnapshotError: not a snapshot, or a damaged one.
        """
        byte_columns: tuple[str, ...]
        if data.startswith(SNAPSHOT_MAGIC):
            byte_columns = _BYTE_COLUMNS
        elif data.startswith(_SNAPSHOT_V1):
            byte_columns = _BYTE_COLUMNS[:3]
        else:
            raise SnapshotError("not a ledger snapshot")
        try:
            inflate = zlib.decompressobj()
            raw = inflate.decompress(data[len(SNAPSHOT_MAGIC) :])
            if not inflate.eof or inflate.unused_data:
                raise SnapshotError("ledger snapshot is truncated or has trailing bytes")
            n = int.from_bytes(raw[:4], "big")
            header = json.loads(raw[4 : 4 + n])
            led = cls([int(d) for d in header["dst_ports"]], src_ports)
            pos = 4 + n
            for d in led.dst_ports:
                col = led._cols[d]
                for name in byte_columns:
                    getattr(col, name)[:] = raw[pos : pos + SLOTS]
                    pos += SLOTS
                for name in _WORD_COLUMNS:
                    words = array("H")
                    words.frombytes(raw[pos : pos + 2 * SLOTS])
                    if header["byteorder"] != sys.byteorder:
                        words.byteswap()
                    getattr(col, name)[:] = words
                    pos += 2 * SLOTS
            if pos != len(raw):
                raise SnapshotError("ledger snapshot has the wrong length")
            led._addrs = [str(a) for a in header["addrs"]]
            led._addr_index = {a: i for i, a in enumerate(led._addrs) if i}
            led._icmp = [
                None if i is None else IcmpInfo(int(i[0]), int(i[1]), str(i[2]), *map(bool, i[3:4]))
                for i in header["icmp"]
            ]
            led._icmp_index = {info: i for i, info in enumerate(led._icmp) if info is not None}
            led._reasons = {(int(d), int(s)): str(r) for d, s, r in header["reasons"]}
            led.open, led.settled, led.sent_total, led.received_total = (
                int(v) for v in header["counters"]
            )
        except (zlib.error, ValueError, KeyError, TypeError, IndexError) as exc:
            raise SnapshotError(f"damaged ledger snapshot: {exc}") from None
        return led

    def ranges(self, *, settled_only: bool = False) -> list[Range]:
        """The contract's ``ranges``: maximal, sorted, every planned cell exactly once.

        Args:
            settled_only: leave pending cells out (for checkpoints during a run); otherwise
                a pending cell is reported as ``unknown``.
        """
        return list(self._iter_ranges(settled_only))

    def _iter_ranges(self, settled_only: bool) -> Iterator[Range]:
        # One key byte per source-port slot: the verdict code in bits 0-2, the translated
        # flag in bit 3, _SKIP for slots in no range. Maximal runs of equal key bytes are
        # found by the regex engine; only rejected and untested runs are split further,
        # by ICMP error and by reason. Sums and extremes over a run are C-speed slices.
        pending_to = _table({PENDING: _SKIP if settled_only else _CODE_UNKNOWN})
        unplanned = int.from_bytes(self._unplanned_ff, "little")
        for d in self.dst_ports:
            col = self._cols[d]
            reason_of: dict[int, str] | None = None  # this port's untested reasons, if needed
            key = int.from_bytes(col.state.tobytes().translate(pending_to), "little")
            key |= int.from_bytes(col.xlat, "little") << 3  # 0/1 bytes: no carry
            keys = (key | unplanned).to_bytes(SLOTS, "little")
            for m in _RUNS.finditer(keys):
                k = keys[m.start()]
                if k == _SKIP:
                    continue
                code, xlat = k & 7, k >> 3
                first, end = m.start(), m.end()
                if code == 3:
                    for icmp_i, group in groupby(range(first, end), col.icmp.__getitem__):
                        cells = list(group)
                        yield self._range(d, col, cells[0], cells[-1] + 1, code, xlat, icmp_i)
                elif code == 4:
                    if reason_of is None:
                        reason_of = {s: r for (rd, s), r in self._reasons.items() if rd == d}
                    for reason, group in groupby(range(first, end), reason_of.get):
                        cells = list(group)
                        yield self._range(d, col, cells[0], cells[-1] + 1, code, xlat, 0, reason)
                else:
                    yield self._range(d, col, first, end, code, xlat)

    def _range(
        self,
        dst: int,
        col: _Column,
        first: int,
        end: int,
        code: int,
        xlat: int,
        icmp_i: int = 0,
        reason: str | None = None,
    ) -> Range:
        sent = sum(col.sent[first:end])
        received = sum(col.received[first:end])
        base = self._base.get(dst)
        if base is not None:
            # A repeat of the sweep (the path changed): its verdicts rest on its own datagrams,
            # so a range counts those (a blocked range never says "received" of the first).
            sent -= int(base[first:end].sum())
            received -= int(self._rbase[dst][first:end].sum())
        doc: Range = {
            "dst_port": dst,
            "first": first,
            "last": end - 1,
            "verdict": _NAME[code],
            "translated": bool(xlat),
            "sent": sent,
            "received": received,
        }
        if code == 3:
            info = self._icmp[icmp_i]
            if info is not None:
                doc["icmp"] = info.as_json()
        if code in (2, 3):
            how = col.how[first:end].tobytes()
            inferred = how.count(INFERRED)
            if inferred:
                doc["inferred"] = inferred
            limited = how.count(ICMP_LIMITED) if code == 2 else 0
            if limited:
                doc["icmp_limited"] = limited
        if code == 4:
            doc["reason"] = reason or "could not send"
        if code == 1:  # exactly the credited cells (first > 0) are open
            ports = col.obs_port[first:end]
            doc["observed"] = {
                "addresses": sorted(self._addrs[i] for i in set(col.obs_addr[first:end]) if i),
                "first_port": min(ports),
                "last_port": max(ports),
            }
        return doc
