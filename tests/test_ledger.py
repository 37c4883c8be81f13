"""The ledger: verdict precedence, and ``ranges`` exactly as the contract describes them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpreach.core.framing import RECEIPT
from udpreach.core.ledger import VERDICTS, IcmpInfo, Ledger, SnapshotError

PROHIBITED = IcmpInfo(3, 13, "198.18.2.1")
UNREACHABLE = IcmpInfo(3, 3, "198.18.1.2")


def sent(led: Ledger, times: int = 4) -> Ledger:
    """Note ``times`` datagrams sent for every planned cell: only what was sent can be
    credited."""
    for d in led.dst_ports:
        for _ in range(times):
            led.note_sent_many(d, led.src_ports)
    return led


def expand(ranges: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(r["dst_port"], s) for r in ranges for s in range(r["first"], r["last"] + 1)]


def test_a_receipt_for_attempt_zero_credits_nothing() -> None:
    """No probe sends attempt 0 (the agent rejects it as a bad MAC): whatever names it is
    counted as unplanned, on both the single and the batch path."""
    led = Ledger([5000], [1024, 1025])
    assert not led.note_receipt(5000, 1024, 0, "198.18.2.2", 1024)
    assert led.note_receipts([(0, 5000, 1025, 0, 1025)], ["198.18.2.2"], 1) == []
    assert led.unplanned_receipts == 2
    assert led.open == 0
    assert led.observed_addresses() == []


def test_a_batch_in_wire_form_credits_as_record_by_record() -> None:
    """The coordinator's path: packed records, an address index past the batch's list
    (named "?"), several destination ports interleaved, a cell twice in one batch."""
    led = sent(Ledger([5000, 5001], range(1024, 1030)))
    records = [
        (1, 5001, 1025, 2, 1025),
        (0, 5000, 1024, 3, 40000),  # translated on the way
        (7, 5000, 1026, 2, 1026),  # no such address index
        (0, 5000, 1024, 2, 1024),  # again, at a lower attempt: the first attempt drops to 2
        (0, 5002, 1024, 2, 1024),  # unplanned destination port
        (0, 5000, 2000, 2, 2000),  # unplanned source port
    ]
    packed = b"".join(RECEIPT.pack(*r) for r in records)
    fresh = led.note_receipts_packed(packed, ["198.18.2.2", "198.19.0.9"], 2)
    assert fresh.tolist() == [1025, 1026]  # first credited at attempt 2, in batch order
    assert (led.open, led.received_total, led.unplanned_receipts) == (3, 4, 2)
    assert led.observed_addresses() == ["198.19.0.9", "198.18.2.2", "?"]
    assert led.first_attempt_histogram() == {2: 3}
    cells = {(r["dst_port"], r["first"]): r for r in led.ranges(settled_only=True)}
    assert cells[(5000, 1024)]["translated"]
    assert cells[(5000, 1024)]["received"] == 2
    assert not cells[(5000, 1026)]["translated"]
    assert led.note_receipts_packed(b"", [], 1).tolist() == []


def test_a_repeated_cell_in_one_column_keeps_batch_order() -> None:
    """One destination port, a cell twice: fresh ports and new addresses still come in the
    order of their first records, not in port order (a bug the review found)."""
    led = sent(Ledger([5000], [1024, 1025]))
    records = [(1, 5000, 1025, 1, 1025), (0, 5000, 1024, 1, 1024), (1, 5000, 1025, 2, 1025)]
    packed = b"".join(RECEIPT.pack(*r) for r in records)
    fresh = led.note_receipts_packed(packed, ["198.18.0.1", "198.18.0.2"], 1)
    assert fresh.tolist() == [1025, 1024]
    assert led.observed_addresses() == ["198.18.0.2", "198.18.0.1"]


def test_tuples_that_cannot_be_on_the_wire_count_as_unplanned() -> None:
    led = sent(Ledger([5000], [1024]))
    assert led.note_receipts([(0, 70000, 1024, 1, 1024), (0, 5000, 1024, 1, -1)], ["a"], 1) == []
    assert not led.note_receipt(70000, 1024, 1, "a", 1024)
    assert (led.unplanned_receipts, led.open) == (3, 0)
    sent(led, 255)
    assert led.note_receipts([(9, 5000, 1024, 300, 1024)], ["a"], 300) == [1024]  # 255 at most
    assert led.observed_addresses() == ["?"]


def test_a_damaged_snapshot_is_refused() -> None:
    led = sent(Ledger([5000], [1024]))
    led.note_receipt(5000, 1024, 1, "198.18.2.2", 1024)
    data = led.snapshot()
    for bad in (b"", b"junk", data[:-1], data[:30] + bytes(10) + data[40:], data + b"x"):
        with pytest.raises(SnapshotError):
            Ledger.from_snapshot(bad, [1024])


def test_contract_example() -> None:
    """The JSON document in contract.md: one open range, one blocked hole, one open range."""
    led = Ledger([5000], range(1024, 65536))
    for s in range(1024, 65536):
        blocked = 40000 <= s <= 49999
        for _ in range(3 if blocked else 1):
            led.note_sent(5000, s)
        if not blocked:
            assert led.note_receipt(5000, s, 1, "198.18.2.2", s)
    assert led.unresolved() == [(5000, s) for s in range(40000, 50000)]
    led.finish(complete=True)
    assert led.summary() == {
        "cells": 64512,
        "open": 54512,
        "blocked": 10000,
        "rejected": 0,
        "untested": 0,
        "unknown": 0,
    }
    ranges = led.ranges()
    assert [{k: r[k] for k in r if k != "observed"} for r in ranges] == [
        {"dst_port": 5000, "first": 1024, "last": 39999, "verdict": "open",
         "translated": False, "sent": 38976, "received": 38976},
        {"dst_port": 5000, "first": 40000, "last": 49999, "verdict": "blocked",
         "translated": False, "sent": 30000, "received": 0},
        {"dst_port": 5000, "first": 50000, "last": 65535, "verdict": "open",
         "translated": False, "sent": 15536, "received": 15536},
    ]  # fmt: skip
    assert ranges[0]["observed"] == {
        "addresses": ["198.18.2.2"],
        "first_port": 1024,
        "last_port": 39999,
    }
    assert "observed" not in ranges[1]


def test_receipt_beats_an_earlier_icmp_error() -> None:
    led = sent(Ledger([5000], [1024]))
    assert led.note_icmp(5000, 1024, PROHIBITED)
    assert led.verdict(5000, 1024) == "rejected"
    assert led.note_receipt(5000, 1024, 2, "198.19.0.1", 1024)
    assert led.verdict(5000, 1024) == "open"
    led.finish(complete=True)
    (r,) = led.ranges()
    assert r["verdict"] == "open"
    assert "icmp" not in r


def test_icmp_after_a_receipt_changes_nothing() -> None:
    led = sent(Ledger([5000], [1024]))
    led.note_receipt(5000, 1024, 1, "198.19.0.1", 1024)
    assert not led.note_icmp(5000, 1024, PROHIBITED)
    led.finish(complete=True)
    assert led.verdict(5000, 1024) == "open"


def test_icmp_settles_a_pending_cell() -> None:
    led = Ledger([5000], [1024, 1025])
    assert led.note_icmp(5000, 1024, PROHIBITED)
    assert not led.note_icmp(5000, 1024, UNREACHABLE)  # already settled
    assert led.unresolved() == [(5000, 1025)]
    led.finish(complete=True)
    assert led.ranges() == [
        {"dst_port": 5000, "first": 1024, "last": 1024, "verdict": "rejected",
         "translated": False, "sent": 0, "received": 0,
         "icmp": {"type": 3, "code": 13, "from": "198.18.2.1", "verified": True}},
        {"dst_port": 5000, "first": 1025, "last": 1025, "verdict": "blocked",
         "translated": False, "sent": 0, "received": 0},
    ]  # fmt: skip


def test_different_icmp_details_make_different_ranges() -> None:
    led = Ledger([5000], range(1024, 1030))
    for s in (1024, 1025):
        led.note_icmp(5000, s, PROHIBITED)
    for s in (1026, 1027):
        led.note_icmp(5000, s, UNREACHABLE)
    for s in (1028, 1029):
        led.note_icmp(5000, s, IcmpInfo(3, 13, "198.18.2.1"))  # equal to PROHIBITED
    led.finish(complete=True)
    got = [(r["first"], r["last"], r["icmp"]) for r in led.ranges()]
    assert got == [
        (1024, 1025, PROHIBITED.as_json()),
        (1026, 1027, UNREACHABLE.as_json()),
        (1028, 1029, PROHIBITED.as_json()),
    ]


def test_untested_carries_its_reason() -> None:
    led = Ledger([5000, 5001], range(1024, 1028))
    led.note_untested(1025, "address in use")
    led.note_untested(1026, "address in use")
    led.note_untested(1027, "permission denied", dsts=[5001])
    led.finish(complete=True)
    got = [
        (r["dst_port"], r["first"], r["last"], r["verdict"], r.get("reason")) for r in led.ranges()
    ]
    assert got == [
        (5000, 1024, 1024, "blocked", None),
        (5000, 1025, 1026, "untested", "address in use"),
        (5000, 1027, 1027, "blocked", None),
        (5001, 1024, 1024, "blocked", None),
        (5001, 1025, 1026, "untested", "address in use"),
        (5001, 1027, 1027, "untested", "permission denied"),
    ]


def test_untested_without_a_reason_still_says_why() -> None:
    led = Ledger([5000], [1024])
    led.note_untested(1024, "")
    (r,) = led.ranges()
    assert r["verdict"] == "untested"
    assert r["reason"]


def test_untested_does_not_override_a_settled_cell() -> None:
    led = sent(Ledger([5000], [1024, 1025]))
    led.note_receipt(5000, 1024, 1, "a", 1024)
    led.note_icmp(5000, 1025, PROHIBITED)
    led.note_untested(1024, "in use")
    led.note_untested(1025, "in use")
    assert [led.verdict(5000, s) for s in (1024, 1025)] == ["open", "rejected"]


def test_finish_complete_is_blocked_incomplete_is_unknown() -> None:
    for complete, verdict in ((True, "blocked"), (False, "unknown")):
        led = sent(Ledger([5000], [1024, 1025]))
        led.note_receipt(5000, 1024, 1, "a", 1024)
        led.finish(complete=complete)
        assert led.verdict(5000, 1025) == verdict
        assert led.summary()[verdict] == 1
        assert led.summary()["open"] == 1
        assert led.unresolved() == []


def test_pending_cells_read_as_unknown_or_are_left_out() -> None:
    led = sent(Ledger([5000], range(1024, 1030)))
    led.note_receipt(5000, 1024, 1, "a", 1024)
    led.note_receipt(5000, 1029, 1, "a", 1029)
    assert [(r["first"], r["last"], r["verdict"]) for r in led.ranges()] == [
        (1024, 1024, "open"),
        (1025, 1028, "unknown"),
        (1029, 1029, "open"),
    ]
    assert [(r["first"], r["last"]) for r in led.ranges(settled_only=True)] == [
        (1024, 1024),
        (1029, 1029),
    ]
    assert led.summary()["unknown"] == 4


def test_translated_when_the_agent_saw_another_source_port() -> None:
    led = sent(Ledger([5000], range(1024, 1030)))
    for s in range(1024, 1030):
        port = s if s < 1027 else 30000 + s  # NAT rewrites the upper half
        led.note_receipt(5000, s, 1, "198.19.113.9", port)
    led.finish(complete=True)
    r1, r2 = led.ranges()
    assert (r1["first"], r1["last"], r1["translated"]) == (1024, 1026, False)
    assert (r2["first"], r2["last"], r2["translated"]) == (1027, 1029, True)
    assert r2["observed"] == {
        "addresses": ["198.19.113.9"],
        "first_port": 31027,
        "last_port": 31029,
    }


def test_translated_sticks_once_seen() -> None:
    led = sent(Ledger([5000], [1024]))
    led.note_receipt(5000, 1024, 1, "a", 1024)
    led.note_receipt(5000, 1024, 2, "a", 40000)
    (r,) = led.ranges()
    assert r["translated"] is True
    assert r["received"] == 2
    assert led.first_attempt_histogram() == {1: 1}


def test_observed_addresses_are_collected() -> None:
    led = sent(Ledger([5000], [1024, 1025]))
    led.note_receipt(5000, 1024, 1, "198.18.2.2", 1024)
    led.note_receipt(5000, 1025, 1, "198.18.9.9", 1025)
    (r,) = led.ranges()
    assert r["observed"]["addresses"] == ["198.18.2.2", "198.18.9.9"]
    assert led.observed_addresses() == ["198.18.2.2", "198.18.9.9"]


def test_repeat_receipt_is_not_new_but_counted() -> None:
    led = sent(Ledger([5000], [1024]))
    assert led.note_receipt(5000, 1024, 2, "a", 1024)
    assert not led.note_receipt(5000, 1024, 1, "a", 1024)
    assert led.open == 1
    assert led.received_total == 2
    assert led.first_attempt_histogram() == {1: 1}  # the earliest attempt that got through


def test_unplanned_receipts_are_ignored() -> None:
    led = Ledger([5000], [1024, 1026])
    assert not led.note_receipt(5001, 1024, 1, "a", 1024)  # unplanned destination
    assert not led.note_receipt(5000, 1025, 1, "a", 1025)  # unplanned source
    assert not led.note_receipt(5000, 70000, 1, "a", 1)  # nonsense
    assert not led.note_icmp(5000, 1025, PROHIBITED)
    assert led.unplanned_receipts == 3
    assert led.received_total == 0
    assert led.open == 0
    led.finish(complete=True)
    assert led.summary() == {"cells": 2, **dict.fromkeys(VERDICTS, 0), "blocked": 2}
    assert expand(led.ranges()) == [(5000, 1024), (5000, 1026)]


def test_first_attempt_histogram() -> None:
    led = sent(Ledger([5000, 5001], range(1024, 1034)))
    for i, s in enumerate(range(1024, 1034)):
        led.note_receipt(5000, s, 1 + i % 3, "a", s)
    led.note_receipt(5001, 1024, 4, "a", 1024)
    assert led.first_attempt_histogram() == {1: 4, 2: 3, 3: 3, 4: 1}


def test_batched_sends_count_repeats_and_saturate() -> None:
    led = Ledger([5000], [1024, 1025])
    led.note_sent_many(5000, [1024, 1025, 1024])
    assert (led.attempts(5000, 1024), led.attempts(5000, 1025)) == (2, 1)
    assert led.sent_total == 3
    led.note_sent_many(5000, [1025] * 70000)
    assert led.attempts(5000, 1025) == 0xFFFF  # the counter saturates, the total does not
    assert led.sent_total == 70003


def test_attempts_counts_sends() -> None:
    led = Ledger([5000], [1024])
    for _ in range(3):
        led.note_sent(5000, 1024)
    assert led.attempts(5000, 1024) == 3
    assert led.sent_total == 3


# --- the property: random plans, random evidence ------------------------------------


@dataclass
class Model:
    """What each cell should end as, computed the obvious way."""

    sent: dict[tuple[int, int], int] = field(default_factory=dict)
    received: dict[tuple[int, int], int] = field(default_factory=dict)
    first_receipt: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)
    translated: set[tuple[int, int]] = field(default_factory=set)
    first_attempt: dict[tuple[int, int], int] = field(default_factory=dict)
    settled_by: dict[tuple[int, int], tuple[str, Any]] = field(default_factory=dict)


dst_sets = st.lists(st.integers(5000, 5003), min_size=1, max_size=3, unique=True).map(sorted)
src_sets = st.lists(st.integers(1024, 1040), min_size=1, max_size=14, unique=True).map(sorted)
icmps = st.sampled_from([PROHIBITED, UNREACHABLE, IcmpInfo(3, 10, "198.18.2.1")])


@settings(max_examples=150, deadline=None)
@given(st.data(), dst_sets, src_sets, st.sampled_from([True, False, None]), st.booleans())
def test_ranges_property(
    data: st.DataObject, dsts: list[int], srcs: list[int], complete: bool | None, batched: bool
) -> None:
    """Random evidence, fed one event at a time or (``batched``) through the batch calls."""
    led = Ledger(dsts, srcs)
    model = Model()
    pending_receipts: list[tuple[int, int, int, int, int]] = []
    addr_list = ["198.18.2.2", "198.19.113.9"]
    fresh_expected: list[int] = []

    def flush_receipts() -> None:
        if pending_receipts:
            assert led.note_receipts(pending_receipts, addr_list, 2) == fresh_expected
            pending_receipts.clear()
            fresh_expected.clear()

    any_dst = st.sampled_from([*dsts, 4999])
    any_src = st.sampled_from([*srcs, 1041])
    events = data.draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("sent"), st.sampled_from(dsts), st.sampled_from(srcs)),
                st.tuples(
                    st.just("receipt"),
                    any_dst,
                    any_src,
                    st.integers(1, 5),
                    st.sampled_from(["198.18.2.2", "198.19.113.9"]),
                    st.booleans(),
                ),
                st.tuples(st.just("icmp"), any_dst, any_src, icmps),
                st.tuples(
                    st.just("untested"),
                    st.sampled_from(srcs),
                    st.sampled_from(["in use", "permission denied"]),
                    st.none() | st.lists(st.sampled_from(dsts), min_size=1, unique=True),
                ),
            ),
            max_size=60,
        )
    )
    pending_sent: dict[int, list[int]] = {}  # batched: sends per port, repeats and all

    def flush_sent() -> None:
        for d, ss in pending_sent.items():
            led.note_sent_many(d, ss)
        pending_sent.clear()

    for ev in events:
        kind = ev[0]
        if kind != "receipt":
            flush_receipts()
        if kind != "sent":
            flush_sent()
        if kind == "sent":
            _, d, s = ev
            if batched:
                pending_sent.setdefault(d, []).append(s)
            else:
                led.note_sent(d, s)
            model.sent[(d, s)] = model.sent.get((d, s), 0) + 1
        elif kind == "receipt":
            _, d, s, attempt, addr, nat = ev
            port = s + 20000 if nat else s
            c = (d, s)
            # Only what was sent is credited, at most once per datagram.
            credited = (
                d in dsts
                and s in srcs
                and attempt <= model.sent.get(c, 0)
                and model.received.get(c, 0) < model.sent.get(c, 0)
            )
            if batched:
                pending_receipts.append((addr_list.index(addr), d, s, attempt, port))
                if credited and c not in model.first_receipt and attempt == 2:
                    fresh_expected.append(s)
            else:
                led.note_receipt(d, s, attempt, addr, port)
            if credited:
                model.received[c] = model.received.get(c, 0) + 1
                model.first_receipt.setdefault(c, (addr, port))
                model.first_attempt[c] = min(attempt, model.first_attempt.get(c, attempt))
                if nat:
                    model.translated.add(c)
        elif kind == "icmp":
            _, d, s, info = ev
            led.note_icmp(d, s, info)
            if d in dsts and s in srcs:
                model.settled_by.setdefault((d, s), ("rejected", info))
        else:
            _, s, reason, only = ev
            led.note_untested(s, reason, only)
            for d in dsts if only is None else only:
                model.settled_by.setdefault((d, s), ("untested", reason))
    flush_receipts()
    flush_sent()
    # The address table holds exactly the addresses that credited a cell, in that order.
    assert led.observed_addresses() == list(
        dict.fromkeys(a for a, _ in model.first_receipt.values())
    )
    hist: dict[int, int] = {}
    for a in model.first_attempt.values():
        hist[a] = hist.get(a, 0) + 1
    assert led.first_attempt_histogram() == hist
    unsettled = [
        (d, s)
        for d in dsts
        for s in srcs
        if (d, s) not in model.first_receipt and (d, s) not in model.settled_by
    ]
    assert led.unresolved() == unsettled
    for d in dsts:  # the engine's view: sends per cell, pending or not
        v = led.view(d)
        for s in srcs:
            assert int(v.sent[s]) == min(model.sent.get((d, s), 0), 0xFFFF)
            assert (v.state[s] == 0) == ((d, s) in unsettled)
    # A snapshot (the coordinator's checkpoint) reads back as the same ledger.
    again = Ledger.from_snapshot(led.snapshot(), srcs)
    assert again.ranges(settled_only=True) == led.ranges(settled_only=True)
    assert again.ranges() == led.ranges()
    assert again.summary() == led.summary()
    assert again.first_attempt_histogram() == led.first_attempt_histogram()
    assert (again.open, again.settled, again.sent_total) == (led.open, led.settled, led.sent_total)
    settled_cells = expand(led.ranges(settled_only=True))
    assert settled_cells == [(d, s) for d in dsts for s in srcs if (d, s) not in unsettled]
    if complete is not None:
        led.finish(complete=complete)

    def expected(c: tuple[int, int]) -> tuple[str, bool, Any, Any]:
        if c in model.first_receipt:
            return ("open", c in model.translated, None, None)
        if c in model.settled_by:
            verdict, detail = model.settled_by[c]
            if verdict == "rejected":
                return ("rejected", False, detail.as_json(), None)
            return ("untested", False, None, detail)
        return ("blocked" if complete else "unknown", False, None, None)

    ranges = led.ranges()
    planned = [(d, s) for d in dsts for s in srcs]
    # sorted, and every planned cell exactly once
    assert [(r["dst_port"], r["first"]) for r in ranges] == sorted(
        (r["dst_port"], r["first"]) for r in ranges
    )
    assert expand(ranges) == planned
    for r in ranges:
        cells = [(r["dst_port"], s) for s in range(r["first"], r["last"] + 1)]
        for c in cells:  # every cell of the range has the range's verdict and details
            assert (r["verdict"], r["translated"], r.get("icmp"), r.get("reason")) == expected(c)
        assert r["sent"] == sum(model.sent.get(c, 0) for c in cells)
        assert r["received"] == sum(model.received.get(c, 0) for c in cells)
        firsts = [model.first_receipt[c] for c in cells if c in model.first_receipt]
        if firsts:
            assert r["observed"] == {
                "addresses": sorted({a for a, _ in firsts}),
                "first_port": min(p for _, p in firsts),
                "last_port": max(p for _, p in firsts),
            }
        else:
            assert "observed" not in r
    # maximal: touching neighbours of one destination port differ in something shown
    for a, b in itertools.pairwise(ranges):
        if a["dst_port"] == b["dst_port"] and a["last"] + 1 == b["first"]:
            key_a = (a["verdict"], a["translated"], a.get("icmp"), a.get("reason"))
            key_b = (b["verdict"], b["translated"], b.get("icmp"), b.get("reason"))
            assert key_a != key_b
    assert sum(r["sent"] for r in ranges) == led.sent_total
    assert sum(r["received"] for r in ranges) == led.received_total
    # summary agrees with the ranges
    counts = dict.fromkeys(VERDICTS, 0)
    for r in ranges:
        counts[r["verdict"]] += r["last"] - r["first"] + 1
    assert led.summary() == {"cells": len(planned), **counts}
    assert led.open == counts["open"]
    if complete is not None:
        assert led.unresolved() == []
        assert led.settled == led.cells
    else:
        assert led.settled == len(planned) - len(led.unresolved())


# --- the batch path against the record-by-record loop it replaced -----------------------


def _credit_one_by_one(
    led: Ledger, records: list[tuple[int, int, int, int, int]], addrs: list[str], interest: int
) -> list[int]:
    """The coordinator's receipt loop before it became array operations, kept as the
    reference (the ledger's own arrays, touched one record at a time)."""
    cols = led._cols
    idx = [-1] * (len(addrs) + 1)
    names = [*addrs, "?"]
    fresh: list[int] = []
    for ai, dst, src, attempt, port in records:
        col = cols.get(dst)
        if col is None or not led._planned_src[src] or attempt == 0:
            led.unplanned_receipts += 1
            continue
        base = led._base.get(dst)
        if attempt <= col.sent[src] and base is not None and attempt <= base[src]:
            led.stale_receipts += 1  # an earlier epoch's attempt
            continue
        if attempt > col.sent[src] or col.received[src] >= col.sent[src]:
            led.refused_receipts += 1  # never sent, or more receipts than datagrams
            continue
        led.received_total += 1
        col.received[src] = min(col.received[src] + 1, 0xFFFF)
        if port != src:
            col.xlat[src] = 1
        f = col.first[src]
        if f == 0:
            col.first[src] = attempt
            k = min(ai, len(addrs))
            if idx[k] < 0:
                idx[k] = led._addr_idx(names[k])
            col.obs_addr[src] = idx[k]
            col.obs_port[src] = port
            if attempt == interest:
                fresh.append(src)
        elif attempt < f:
            col.first[src] = attempt
        if col.state[src] != 1:  # not yet open
            led.settled += col.state[src] == 0
            col.state[src] = 1
            led.open += 1
    return fresh


def _everything(led: Ledger) -> tuple[Any, ...]:
    arrays = {
        d: tuple(bytes(getattr(led._cols[d], name)) for name in ("state", "first", "xlat"))
        + tuple(
            getattr(led._cols[d], name).tobytes()
            for name in ("sent", "received", "icmp", "obs_addr", "obs_port")
        )
        for d in led.dst_ports
    }
    counters = (
        led.open,
        led.settled,
        led.received_total,
        led.unplanned_receipts,
        led.refused_receipts,
        led.stale_receipts,
    )
    return arrays, led.observed_addresses(), counters


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(
                st.integers(0, 3),  # address index: 3 is past the two-address list
                st.sampled_from([5000] * 6 + [5001, 5002]),  # mostly one column; 5002 unplanned
                st.sampled_from([0, 1, 2, 1024, 1030, 65535]),  # 1030 is not planned
                st.integers(0, 6),  # attempt 0 is never sent; 4-5: a repeat's
                st.sampled_from([0, 1, 2, 1024, 40000, 65535]),
            ),
            max_size=30,
        ),
        min_size=1,
        max_size=4,
    ),
    st.integers(1, 3),
    st.integers(0, 4),
)
def test_batch_credit_equals_record_by_record(
    batches: list[list[tuple[int, int, int, int, int]]], interest: int, epoch_at: int
) -> None:
    """Batches over two columns (and an unplanned one) credit as the records one by one,
    including in a repeat of the sweep (``new_epoch`` before batch ``epoch_at``: attempts
    of the first epoch are stale there, and the repeat sends every cell twice more)."""
    planned = [0, 1, 2, 1024, 65535]
    fast, slow = sent(Ledger([5000, 5001], planned), 3), sent(Ledger([5000, 5001], planned), 3)
    fast.note_icmp(5000, 2, PROHIBITED)  # a settled cell that a receipt then opens
    slow.note_icmp(5000, 2, PROHIBITED)
    fast._cols[5001].received[1] = slow._cols[5001].received[1] = 0xFFFE  # near saturation
    fast._cols[5001].sent[1] = slow._cols[5001].sent[1] = 0xFFFF
    addrs = ["198.18.2.2", "198.19.0.9"]
    for i, records in enumerate(batches):
        if i and i == epoch_at:
            fast, slow = sent(fast.new_epoch(), 2), sent(slow.new_epoch(), 2)
        packed = b"".join(RECEIPT.pack(*r) for r in records)
        got = fast.note_receipts_packed(packed, addrs, interest).tolist()
        assert got == _credit_one_by_one(slow, records, addrs, interest)
        assert _everything(fast) == _everything(slow)


def test_a_batch_says_which_credited_records_were_for_the_latest_attempt() -> None:
    """The engine's delay measure reads ``last_latest``: a record credited for an earlier
    attempt than the cell's last send, a refused one (an attempt never sent) and an
    unplanned one are not "latest"; the batch's own order is kept."""
    led = Ledger([5000, 5001], [1024, 1025, 1026])
    for s in (1024, 1025, 1026):
        led.note_sent(5000, s)
    led.note_sent(5000, 1025)  # 1025 was sent twice: attempt 1 is not its latest
    led.note_sent(5001, 1024)
    records = [
        (5000, 1024, 1),  # latest
        (5000, 1025, 1),  # credited, an earlier attempt
        (5000, 1026, 3),  # refused: attempt 3 never sent
        (4999, 1024, 1),  # unplanned
        (5001, 1024, 1),  # latest, in another column
        (5000, 1025, 2),  # latest
    ]
    wire = b"".join(RECEIPT.pack(0, d, s, a, s) for d, s, a in records)
    led.note_receipts_packed(wire, ["198.18.2.2"])
    assert led.last_accepted is not None
    assert led.last_latest is not None
    assert led.last_accepted.tolist() == [True, True, False, False, True, True]
    assert led.last_latest.tolist() == [True, False, False, False, True, True]
