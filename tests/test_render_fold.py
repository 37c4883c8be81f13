"""Folding long range lists for the reports: a folded table never loses or double-counts a
cell, keeps what it can exact, and fits the cap."""

from __future__ import annotations

import itertools

from docsamples import docs
from hypothesis import given, settings
from hypothesis import strategies as st

from udpreach.render.fold import fold


def _check(doc: dict, cap: int, sampled: bool) -> None:
    ranges = doc["ranges"]
    folded = fold(ranges, cap, sampled=sampled)
    shown = folded.rows
    if folded.hidden == 0:
        # Every cell in exactly one row, with its verdict counted there.
        assert sum(r.cells for r in shown) == doc["summary"]["cells"]
        for verdict in ("open", "blocked", "rejected", "untested", "unknown"):
            assert sum(r.counts.get(verdict, 0) for r in shown) == doc["summary"][verdict]
        assert sum(r.ranges for r in shown) == len(ranges)
        assert sum(r.sent for r in shown) == sum(r["sent"] for r in ranges)
    else:
        assert len(shown) == cap
    # Rows are in order and do not overlap; each lies within its destination port.
    keys = [(r.dst_port, r.first, r.last) for r in shown]
    assert keys == sorted(keys)
    for a, b in itertools.pairwise(shown):
        if a.dst_port == b.dst_port:
            assert a.last < b.first
    assert len(shown) <= max(cap, len({r["dst_port"] for r in ranges}))
    # Nothing folded that fits: then the rows are the ranges themselves.
    if len(ranges) <= cap:
        assert not folded.folded
        assert [(r.dst_port, r.first, r.last, r.label) for r in shown] == [
            (x["dst_port"], x["first"], x["last"], x["verdict"]) for x in ranges
        ]
        assert all(r.exact and r.source is not None for r in shown)
    # A row that claims one verdict holds only that verdict.
    for r in shown:
        if r.label != "mixed":
            assert r.counts == {r.label: r.cells}


@settings(max_examples=300, deadline=None)
@given(doc=docs(), cap=st.integers(1, 12), sampled=st.booleans())
def test_folding_keeps_every_cell(doc: dict, cap: int, sampled: bool) -> None:
    _check(doc, cap, sampled)


def test_an_interleaved_stretch_keeps_the_verdict_around_its_unknown_cells() -> None:
    # Open and unknown interleaved, then a rejected band interleaved with unknown, then
    # open again: three rows, one per band, none claiming more than it holds.
    ranges = []
    for band, verdict in (((1024, 20000), "open"), ((20001, 30000), "rejected"),
                          ((30001, 65535), "open")):  # fmt: skip
        a, b = band
        for s in range(a, b + 1, 2):
            ranges.append({"dst_port": 5000, "first": s, "last": s, "verdict": verdict,
                           "translated": False, "sent": 1, "received": 0})  # fmt: skip
            if s + 1 <= b:
                ranges.append({"dst_port": 5000, "first": s + 1, "last": s + 1,
                               "verdict": "unknown", "translated": False, "sent": 0,
                               "received": 0})  # fmt: skip
    folded = fold(ranges, 40)
    assert folded.how == "unknown"
    assert [(r.first, r.last, sorted(r.counts)) for r in folded.rows] == [
        (1024, 20000, ["open", "unknown"]),
        (20001, 30000, ["rejected", "unknown"]),
        (30001, 65535, ["open", "unknown"]),
    ]
