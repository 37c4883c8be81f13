"""Folding a list of ranges into at most N rows a person can read.

Theory of operation: the run document is exact (every cell once, maximal ranges), and so
it can be long: an interrupted sweep in random order leaves tens of thousands of one-port
ranges, open and unknown interleaved; a ``random:500`` plan makes a range of every sampled
port. A report shows at most ``cap`` rows and never hides that it folded: a folded row
names its span, its cells per verdict and how many ranges it stands for, and the report
says where the exact list is (CSV, JSON). Folding is presentation only; nothing here
changes a document.

The list is folded only as far as needed to fit, in this order:

1. *Gaps* (sampled plans only): neighbouring ranges of one destination port that differ only
   in position (same verdict and details) become one row across the untested ports between
   them: "40012-49987, 76 sampled ports, blocked".
2. *Unknown*: within runs of thin rows (fewer cells than a threshold ``t``), consecutive
   rows whose verdicts agree apart from ``unknown`` become one row ("open and unknown
   interleaved"), so an interrupted sweep keeps its shape: an open stretch, a rejected
   stretch, another open stretch.
3. *Mixed*: each run of thin rows becomes one row, whatever its verdicts.

Rows with at least ``t`` cells stay as they are: they are the structure worth seeing, and
``t`` is the smallest threshold that makes the rows fit (binary search over doublings: the
row count only falls as ``t`` grows). A list a few times too long is folded as little as
that; a list many times too long (``FRAGMENTED`` times the cap: an interrupted or lossy
run) starts at the width of a matrix column (1/64 of a destination port's planned cells),
because ranges narrower than that are noise at this scale and would only crowd out the
folds. If even folding everything leaves more than ``cap`` rows (more destination ports
than rows), the first ``cap`` are shown and the rest counted as hidden.

A folded row keeps what its ranges say beyond their verdicts: the distinct ICMP details and
untested reasons (up to ``DETAILS`` of each), translated, inferred and icmp_limited counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from udpreach.core.intervals import Range, merge_key

COLUMNS = 64  # a range narrower than 1/COLUMNS of a destination port's cells is thin
FRAGMENTED = 4  # ... when the list has more than FRAGMENTED times the rows shown
DETAILS = 3  # distinct ICMP details and reasons a folded row keeps
_NEVER = 2**17  # a threshold no range reaches: every row thin


@dataclass
class Row:
    """One displayed row: one document range, or several folded into one.

    ``counts`` has the cells per label (a verdict, or "before -> after" for a diff);
    ``source`` is a range whose details hold for the whole row (the only range, or the
    first of ranges that differ only in position), else None.
    """

    dst_port: int
    first: int
    last: int
    cells: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    ranges: int = 0
    sent: int = 0
    received: int = 0
    inferred: int = 0
    icmp_limited: int = 0
    translated: int = 0
    source: Range | None = None
    icmp: list[Any] = field(default_factory=list)  # distinct ICMP details (up to DETAILS)
    reasons: list[str] = field(default_factory=list)  # distinct untested reasons
    more_details: bool = False  # more distinct ICMP details or reasons than kept
    sampled: bool = False  # from a sampled plan: the ports its span skips were not planned

    @property
    def label(self) -> str:
        """The row's one label, or ``mixed``."""
        return next(iter(self.counts)) if len(self.counts) == 1 else "mixed"

    @property
    def exact(self) -> bool:
        """The row is one document range, as it is."""
        return self.ranges == 1

    @property
    def spans_gaps(self) -> bool:
        """The row's span holds ports that were not planned (a sampled plan)."""
        return self.last - self.first + 1 > self.cells


@dataclass
class Folded:
    rows: list[Row]
    ranges: int  # ranges in the list that was folded
    hidden: int = 0  # rows left out after folding as far as possible
    how: str | None = None  # None (exact), "gaps", "unknown" or "mixed"

    @property
    def folded(self) -> bool:
        return self.how is not None or self.hidden > 0


_Item = tuple[int, int, int, str, int, list[Range]]  # dst, first, last, label, cells, ranges


def fold(
    ranges: Sequence[Range],
    cap: int,
    *,
    label: Callable[[Range], str] | None = None,
    wildcard: str | None = "unknown",
    sampled: bool = False,
) -> Folded:
    """At most ``cap`` rows for ``ranges`` (sorted by dst_port, first), folded as little
    as fits (see the module comment).

    Args:
        label: what a row's cells are counted by (None: the verdict).
        wildcard: the label that agrees with any other in step 2 (None: skip step 2).
        sampled: the ranges come from a sampled plan (step 1 applies).
    """
    out = _fold(ranges, cap, label, wildcard, sampled)
    if sampled:
        for row in out.rows:
            row.sampled = True
    return out


def _fold(
    ranges: Sequence[Range],
    cap: int,
    label: Callable[[Range], str] | None,
    wildcard: str | None,
    sampled: bool,
) -> Folded:
    items: list[_Item] = []
    append = items.append
    for r in ranges:  # the one pass over every range: kept plain, it is most of the cost
        first, last = int(r["first"]), int(r["last"])
        lab = str(r["verdict"]) if label is None else label(r)
        append((int(r["dst_port"]), first, last, lab, last - first + 1, [r]))
    if len(items) <= cap:
        return Folded([_row(it) for it in items], len(ranges))
    how = None
    if sampled:
        items = _merge_gaps(items)
        how = "gaps"
        if len(items) <= cap:
            return Folded([_row(it) for it in items], len(ranges), how=how)
    floor = 2
    if len(items) > FRAGMENTED * cap:
        dsts = len({it[0] for it in items})
        floor = max(2, -(-sum(it[4] for it in items) // (dsts * COLUMNS)))
    thresholds = [floor << k for k in range(18) if floor << k < _NEVER] + [_NEVER]
    modes = ["unknown", "mixed"] if wildcard is not None else ["mixed"]
    for mode in modes:
        t = _smallest_threshold(items, cap, mode, wildcard, thresholds)
        if t is not None:
            groups = _groups(items, t, mode, wildcard)
            return Folded([_merge_row(g) for g in groups], len(ranges), how=mode)
    groups = _groups(items, _NEVER, "mixed", wildcard)
    rows = [_merge_row(g) for g in groups[:cap]]
    return Folded(rows, len(ranges), hidden=len(groups) - len(rows), how="mixed")


def _n(r: Range) -> int:
    return int(r["last"]) - int(r["first"]) + 1


def _merge_gaps(items: list[_Item]) -> list[_Item]:
    out: list[_Item] = []
    prev_key: dict[str, Any] | None = None
    for it in items:
        key = merge_key(it[5][0])
        if out and out[-1][0] == it[0] and key == prev_key:
            d, first, _, lab, n, rs = out[-1]
            out[-1] = (d, first, it[2], lab, n + it[4], rs + it[5])
        else:
            out.append(it)
            prev_key = key
    return out


def _count(items: list[_Item], t: int, mode: str, wildcard: str | None, cap: int) -> int:
    """How many rows threshold t gives (stops counting past cap)."""
    rows = 0
    dst = -1
    in_run = False
    run_label: str | None = None
    for d, _, _, lab, n, _ in items:
        if d != dst:
            dst, in_run = d, False
        if n >= t:
            rows += 1
            in_run = False
        elif not in_run:
            rows += 1
            in_run = True
            run_label = None if lab == wildcard else lab
        elif mode == "unknown" and lab != wildcard:
            if run_label is None:
                run_label = lab
            elif lab != run_label:
                rows += 1
                run_label = lab
        if rows > cap:
            break
    return rows


def _smallest_threshold(
    items: list[_Item], cap: int, mode: str, wildcard: str | None, thresholds: list[int]
) -> int | None:
    lo, hi = 0, len(thresholds) - 1
    if _count(items, thresholds[hi], mode, wildcard, cap) > cap:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if _count(items, thresholds[mid], mode, wildcard, cap) <= cap:
            hi = mid
        else:
            lo = mid + 1
    return thresholds[lo]


def _groups(items: list[_Item], t: int, mode: str, wildcard: str | None) -> list[list[_Item]]:
    """The same walk as ``_count``, keeping the groups."""
    out: list[list[_Item]] = []
    dst = -1
    in_run = False
    run_label: str | None = None
    for it in items:
        d, _, _, lab, n, _ = it
        if d != dst:
            dst, in_run = d, False
        if n >= t:
            out.append([it])
            in_run = False
        elif not in_run:
            out.append([it])
            in_run = True
            run_label = None if lab == wildcard else lab
        elif mode == "unknown" and lab != wildcard and run_label is not None and lab != run_label:
            out.append([it])
            run_label = lab
        else:
            out[-1].append(it)
            if lab != wildcard and run_label is None:
                run_label = lab
    return out


def _row(it: _Item) -> Row:
    return _merge_row([it])


def _merge_row(group: Iterable[_Item]) -> Row:
    group = list(group)
    d, first = group[0][0], group[0][1]
    row = Row(d, first, group[-1][2])
    key = merge_key(group[0][5][0])
    alike = True  # every range shares the first one's details
    counts = row.counts
    sent = received = 0
    for _, _, _, lab, n, rs in group:
        row.cells += n
        counts[lab] = counts.get(lab, 0) + n
        row.ranges += len(rs)
        for r in rs:
            sent += _int(r.get("sent"))
            received += _int(r.get("received"))
            if "inferred" in r:
                row.inferred += _int(r["inferred"])
            if "icmp_limited" in r:
                row.icmp_limited += _int(r["icmp_limited"])
            if r.get("translated"):
                row.translated += _n(r)
            if alike and r is not group[0][5][0]:
                alike = merge_key(r) == key
            icmp, reason = r.get("icmp"), r.get("reason")
            if icmp is None and reason is None:
                continue
            if icmp is not None and icmp not in row.icmp:
                if len(row.icmp) < DETAILS:
                    row.icmp.append(icmp)
                else:
                    row.more_details = True
            if reason is not None and str(reason) not in row.reasons:
                if len(row.reasons) < DETAILS:
                    row.reasons.append(str(reason))
                else:
                    row.more_details = True
    row.sent, row.received = sent, received
    if alike:
        row.source = group[0][5][0]
    return row


def _int(v: Any) -> int:
    return v if type(v) is int else 0  # not bool, not anything else a document may hold
