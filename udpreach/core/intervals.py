"""Interval and range algebra: the small set operations every consumer of run documents
shares (expectations, the diff, recommendations, the store, the reports).

Theory of operation: a run document describes its cells as *ranges*, dicts with
``dst_port``, ``first``, ``last`` (a closed span of source ports) and a verdict with its
details; an *interval* is a bare ``(first, last)`` pair. Everything here works on sorted
lists of disjoint closed intervals or on ranges grouped by destination port, in one merge
pass, never cell by cell: a full sweep is 64,512 cells a destination port.

A plan is *sampled* when its source ports are a scatter rather than a few spans (what
``random:N`` makes): the gaps between planned ports were never tested, so a report may
summarise the ranges between them, but it must say that it did (see ``is_sampled``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from udpreach.core.ledger import VERDICTS
from udpreach.core.portspec import parse_ports, ranges_of

Interval = tuple[int, int]
Range = dict[str, Any]

COUNTERS = ("sent", "received", "inferred", "icmp_limited")
_POSITION = ("dst_port", "first", "last")
_UNKEYED = frozenset((*COUNTERS, *_POSITION, "observed"))

# A plan is sampled when it has at least this many separate spans of source ports and
# they average fewer than SAMPLED_MEAN_SPAN ports each: random:N for N up to about 7/8 of
# the high ports; a hand-written list of a few spans never is.
SAMPLED_MIN_SPANS = 32
SAMPLED_MEAN_SPAN = 8


def ranges_by_dst(ranges: Iterable[Range]) -> dict[int, list[Range]]:
    """Group ranges by destination port (ascending), each group sorted by ``first``."""
    groups: dict[int, list[Range]] = defaultdict(list)
    for r in ranges:
        groups[int(r["dst_port"])].append(r)
    return {d: sorted(groups[d], key=lambda r: int(r["first"])) for d in sorted(groups)}


def n_cells(r: Range) -> int:
    """Number of cells (source ports) in one range."""
    return int(r["last"]) - int(r["first"]) + 1


def cut_range(r: Range, first: int, last: int) -> Range:
    """The part of range ``r`` over source ports ``first..last`` (inside ``r``).

    The counters (``sent``, ``received``, ``inferred``, ``icmp_limited``) are apportioned by
    cell count with cumulative rounding, so the pieces of one range always add up to the
    range's totals; ``observed`` (what the agent saw over the whole range) is dropped from a
    partial cut.
    """
    f, n = int(r["first"]), int(r["last"]) - int(r["first"]) + 1
    out = dict(r)
    out["first"], out["last"] = first, last
    if first == f and last == f + n - 1:
        return out
    out.pop("observed", None)
    for k in COUNTERS:
        if k in r:
            total = int(r[k])
            out[k] = total * (last - f + 1) // n - total * (first - f) // n
    return out


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Merge neighbours into maximal ranges and sort by (dst_port, first).

    Two ranges merge when they are adjacent on one destination port and agree on every key
    other than ``first``, ``last``, the counters (which add up) and ``observed`` (what the
    agent saw: addresses united, port span widened).
    """
    ordered = sorted(ranges, key=lambda r: (int(r["dst_port"]), int(r["first"])))
    out: list[Range] = []
    prev_key: dict[str, Any] | None = None
    last: Range = {}
    for r in ordered:
        key = merge_key(r)
        if (
            out
            and prev_key == key
            and last["dst_port"] == r["dst_port"]
            and int(last["last"]) + 1 == int(r["first"])
        ):
            last["last"] = r["last"]
            for k in COUNTERS:
                if k in last or k in r:
                    last[k] = int(last.get(k, 0)) + int(r.get(k, 0))
            if "observed" in r:
                last["observed"] = _merge_observed(last.get("observed"), r["observed"])
        else:
            last = dict(r)
            out.append(last)
            prev_key = key
    return out


def freeze(v: Any) -> Any:
    """A hashable, order-independent form of a JSON value (dicts and lists)."""
    if isinstance(v, dict):
        return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(freeze(x) for x in v)
    return v


def merge_key(r: Range) -> dict[str, Any]:
    """What two neighbouring ranges must share to be one range (compare with ``==``: a
    dict, since a full sweep's tens of thousands of ranges make sorting each one's keys
    the cost of the whole merge)."""
    return {k: v for k, v in r.items() if k not in _UNKEYED}


def _merge_observed(a: Any, b: Any) -> Any:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return a if isinstance(a, dict) else b
    try:
        return {
            "addresses": sorted(set(a["addresses"]) | set(b["addresses"])),
            "first_port": min(a["first_port"], b["first_port"]),
            "last_port": max(a["last_port"], b["last_port"]),
        }
    except (KeyError, TypeError):
        return a


def subtract(base: Sequence[Interval], holes: Sequence[Interval]) -> list[Interval]:
    """``base`` minus ``holes``; both sorted lists of disjoint closed intervals."""
    out: list[Interval] = []
    j = 0
    for a, b in base:
        while j < len(holes) and holes[j][1] < a:
            j += 1
        pos, k = a, j
        while k < len(holes) and holes[k][0] <= b:
            ha, hb = holes[k]
            if ha > pos:
                out.append((pos, ha - 1))
            pos = max(pos, hb + 1)
            if hb >= b:
                break
            k += 1
        if pos <= b:
            out.append((pos, b))
    return out


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, merged union of closed intervals (touching intervals merge)."""
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1] + 1:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def spec_of(intervals: Iterable[Interval]) -> str:
    """A port SPEC for intervals: ``1024-2047,5000``."""
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in union(intervals))


def cells_of(intervals: Iterable[Interval]) -> int:
    """Number of ports in disjoint intervals."""
    return sum(b - a + 1 for a, b in intervals)


def planned_intervals(plan: dict[str, Any]) -> dict[int, list[Interval]]:
    """The planned cells of a plan, per destination port, as source-port intervals.

    Raises:
        PortSpecError: the plan's ``src_ports`` is not a concrete SPEC (``random:N``
            cannot be expanded again after the run).
    """
    src = ranges_of(parse_ports(str(plan["src_ports"])))
    return {int(d): list(src) for d in sorted(set(plan["dst_ports"]))}


def summarize(ranges: Iterable[Range]) -> dict[str, int]:
    """The ``summary`` block (cells and a count per verdict) for a list of ranges."""
    counts = dict.fromkeys(("cells", *VERDICTS), 0)
    for r in ranges:
        n = int(r["last"]) - int(r["first"]) + 1
        counts["cells"] += n
        counts[str(r["verdict"])] = counts.get(str(r["verdict"]), 0) + n
    return counts


def is_sampled(spans: Sequence[Interval]) -> bool:
    """Whether source ports planned as these spans are a sample (``random:N``) rather than
    a few deliberate spans. See SAMPLED_MIN_SPANS."""
    return len(spans) >= SAMPLED_MIN_SPANS and cells_of(spans) < SAMPLED_MEAN_SPAN * len(spans)


def planned_spans(ranges: Iterable[Range]) -> list[Interval]:
    """The source-port spans a document's ranges cover (over all destination ports)."""
    return union((int(r["first"]), int(r["last"])) for r in ranges)
