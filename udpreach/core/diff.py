"""The diff between two run documents (schema ``udpreach/diff-v1``): which cells changed
verdict from run A to run B.

Theory of operation: both documents describe their cells as maximal ranges sorted by
(dst_port, first), so the diff is one merge pass per destination port over two sorted
interval lists; no cell is visited on its own.

* Only the cells planned in both runs are compared. Cells planned in one run only are not
  changes (a ``random:N`` sweep would otherwise "change" every cell it skipped); they are
  listed apart, as ``only_a``/``only_b`` ranges, and ``compared`` counts the cells actually
  compared. A change is a change of verdict, ``unknown`` included.
* Real paths rate-limit ICMP errors, so a silent cell of a ``blocked`` range may be a
  reject whose error was suppressed; such a range counts those cells as ``icmp_limited``
  (how many, not which). A cell that moves between ``rejected`` and a blocked range with
  ``icmp_limited`` cells is listed under ``uncertain``, not ``changes``, when that range's
  count covers every cell of it that moved: an unchanged policy measured twice must diff
  empty. Where more cells moved than the count can explain, the move is a change.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from udpreach.core import schema
from udpreach.core.intervals import Range, ranges_by_dst, subtract, union

DIFF_SCHEMA = schema.DIFF


def diff_runs(doc_a: dict[str, Any], doc_b: dict[str, Any]) -> dict[str, Any]:
    """The contract's diff document: the cells whose verdict changed from A to B.

    Returns:
        ``{"schema": "udpreach/diff-v1", "run_a", "run_b", "changes": [{"dst_port",
        "first", "last", "before", "after"}], "uncertain": [same form], "compared",
        "compared_ranges", "dst_ports", "only_a", "only_b"}``; ``changes`` and
        ``uncertain`` are maximal ranges sorted by (dst_port, first), and no cell is in
        both. Only the cells planned in both runs are compared (``compared`` counts them,
        ``compared_ranges`` lists them, ``dst_ports`` names their destination ports); the
        others are listed in ``only_a`` and ``only_b``. Those three lists hold ranges
        ``{"dst_port", "first", "last"}``.
    """
    by_a = ranges_by_dst(doc_a.get("ranges", []))
    by_b = ranges_by_dst(doc_b.get("ranges", []))
    only_a: list[Range] = []
    only_b: list[Range] = []
    shared: list[Range] = []
    compared = 0
    both: list[int] = []
    # Every piece where the verdicts differ: (dst, lo, hi, range in A, range in B).
    moved: list[tuple[int, int, int, Range, Range]] = []
    for d in sorted(set(by_a) | set(by_b)):
        ra, rb = by_a.get(d, []), by_b.get(d, [])
        ia = union((int(r["first"]), int(r["last"])) for r in ra)
        ib = union((int(r["first"]), int(r["last"])) for r in rb)
        a_only = subtract(ia, ib)
        only_a += [{"dst_port": d, "first": a, "last": b} for a, b in a_only]
        only_b += [{"dst_port": d, "first": a, "last": b} for a, b in subtract(ib, ia)]
        shared += [{"dst_port": d, "first": a, "last": b} for a, b in subtract(ia, a_only)]
        i = j = 0
        seen = False
        while i < len(ra) and j < len(rb):
            x, y = ra[i], rb[j]
            lo, hi = max(int(x["first"]), int(y["first"])), min(int(x["last"]), int(y["last"]))
            if lo <= hi:
                seen = True
                compared += hi - lo + 1
                if x["verdict"] != y["verdict"]:
                    moved.append((d, lo, hi, x, y))
            if int(x["last"]) < int(y["last"]):
                i += 1
            else:
                j += 1
        if seen:
            both.append(d)

    explained = _explained_by_icmp_limits(moved)
    changes: list[Range] = []
    uncertain: list[Range] = []
    for d, lo, hi, x, y in moved:
        out = uncertain if _limited_side(x, y) in explained else changes
        _append(out, d, lo, hi, str(x["verdict"]), str(y["verdict"]))
    return {
        "schema": DIFF_SCHEMA,
        "run_a": doc_a.get("run_id"),
        "run_b": doc_b.get("run_id"),
        "changes": changes,
        "uncertain": uncertain,
        "compared": compared,
        "compared_ranges": shared,
        "dst_ports": both,
        "only_a": only_a,
        "only_b": only_b,
    }


def _icmp_limited(r: Range) -> int:
    try:
        return max(0, int(r.get("icmp_limited") or 0))
    except (TypeError, ValueError):
        return 0


_Side = tuple[str, int, int]  # ("a" or "b", dst_port, first): one range of one run


def _limited_side(x: Range, y: Range) -> _Side | None:
    """For a move between rejected and blocked: the blocked range, when it has
    icmp_limited cells; else None."""
    pair = (x["verdict"], y["verdict"])
    if pair == ("rejected", "blocked") and _icmp_limited(y):
        return ("b", int(y["dst_port"]), int(y["first"]))
    if pair == ("blocked", "rejected") and _icmp_limited(x):
        return ("a", int(x["dst_port"]), int(x["first"]))
    return None


def _explained_by_icmp_limits(moved: list[tuple[int, int, int, Range, Range]]) -> set[_Side]:
    """The blocked ranges whose icmp_limited count covers every cell of theirs that moved
    to or from rejected."""
    moved_cells: dict[_Side, int] = defaultdict(int)
    limit: dict[_Side, int] = {}
    for _, lo, hi, x, y in moved:
        side = _limited_side(x, y)
        if side is not None:
            moved_cells[side] += hi - lo + 1
            limit[side] = _icmp_limited(x if side[0] == "a" else y)
    return {side for side, n in moved_cells.items() if n <= limit[side]}


def _append(out: list[Range], d: int, lo: int, hi: int, before: str, after: str) -> None:
    if out:
        p = out[-1]
        if (p["dst_port"], p["before"], p["after"]) == (d, before, after) and p["last"] + 1 == lo:
            p["last"] = hi
            return
    out.append({"dst_port": d, "first": lo, "last": hi, "before": before, "after": after})
