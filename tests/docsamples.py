"""Run documents (schema udpreach/run-v1) for tests of the pieces that consume them.

``build_doc`` paints verdict spans onto a plan (everything else open) and produces the
document exactly as the coordinator would: maximal ranges sorted by (dst_port, first), a
summary, counters consistent with the verdicts. The named samples describe one firewall
change: BASELINE before it, AFTER once 45000-49999 was opened to 5000 and a reject rule for
5001 grew by a hundred ports.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from hypothesis import strategies as st

from udpreach.core.expect import merge_ranges, summarize
from udpreach.core.portspec import parse_ports, ranges_of

ICMP_ADMIN = {"type": 3, "code": 13, "from": "198.18.2.1"}
ICMP_PORT = {"type": 3, "code": 3, "from": "198.18.1.2"}

Span = dict[str, Any]


def _counters(verdict: str, n: int, copies: int) -> tuple[int, int]:
    if verdict == "open":
        return n, n
    if verdict == "blocked":
        return copies * n, 0
    if verdict in ("rejected", "unknown"):
        return n, 0
    return 0, 0


def build_doc(
    run_id: str = "r-0001",
    *,
    agent: str = "pc-17",
    agent_addr: str = "198.18.1.2",
    probe_addr: str = "198.18.2.2",
    src: str = "1024-65535",
    dst: tuple[int, ...] = (5000,),
    spans: list[Span] | tuple[Span, ...] = (),
    copies: int = 3,
    started: float = 1_764_115_200.0,
    complete: bool | None = None,
) -> dict[str, Any]:
    """A run document: every planned cell open except the painted ``spans``.

    A span is ``{"dst", "first", "last", "verdict"}`` plus optional ``translated``,
    ``icmp`` (rejected) and ``reason`` (untested); it only affects planned cells.
    """
    src_iv = ranges_of(parse_ports(src))
    pieces: list[dict[str, Any]] = []
    for d in dst:
        cur = [(a, b, ("open", False, None, None)) for a, b in src_iv]
        for sp in spans:
            if sp["dst"] != d:
                continue
            attrs = (
                sp["verdict"],
                bool(sp.get("translated", False)),
                copy.deepcopy(sp.get("icmp")) if sp["verdict"] == "rejected" else None,
                sp.get("reason", "address in use") if sp["verdict"] == "untested" else None,
            )
            nxt: list[tuple[int, int, tuple[Any, ...]]] = []
            for x, y, at in cur:
                if y < sp["first"] or x > sp["last"]:
                    nxt.append((x, y, at))
                    continue
                if x < sp["first"]:
                    nxt.append((x, sp["first"] - 1, at))
                if y > sp["last"]:
                    nxt.append((sp["last"] + 1, y, at))
                nxt.append((max(x, sp["first"]), min(y, sp["last"]), attrs))
            cur = sorted(nxt, key=lambda t: t[0])
        for a, b, (verdict, translated, icmp, reason) in cur:
            sent, received = _counters(verdict, b - a + 1, copies)
            r: dict[str, Any] = {
                "dst_port": d,
                "first": a,
                "last": b,
                "verdict": verdict,
                "translated": translated,
                "sent": sent,
                "received": received,
            }
            if icmp is not None:
                r["icmp"] = icmp
            if reason is not None:
                r["reason"] = reason
            pieces.append(r)
    ranges = merge_ranges(pieces)
    summary = summarize(ranges)
    # A sample the tests trust must itself keep the contract: every planned cell exactly
    # once, sorted by (dst_port, first), maximal.
    planned = len(parse_ports(src)) * len(dst)
    assert sum(r["last"] - r["first"] + 1 for r in ranges) == planned == summary["cells"]
    keys = [(r["dst_port"], r["first"]) for r in ranges]
    assert keys == sorted(keys)
    for a, b in itertools.pairwise(ranges):
        same_run = a["dst_port"] == b["dst_port"] and a["last"] + 1 == b["first"]
        assert not (
            same_run
            and (a["verdict"], a["translated"], a.get("icmp"), a.get("reason"))
            == (b["verdict"], b["translated"], b.get("icmp"), b.get("reason"))
        )
    return {
        "schema": "udpreach/run-v1",
        "run_id": run_id,
        "complete": summary["unknown"] == 0 if complete is None else complete,
        "agent": {
            "name": agent,
            "registered": agent_addr,
            "observed": agent_addr,
            "ports": list(dst),
        },
        "probe": {"address": probe_addr},
        "plan": {
            "src_ports": src,
            "dst_ports": list(dst),
            "copies": copies,
            "rate": 100000,
            "size": 16,
        },
        "summary": summary,
        "ranges": ranges,
        "started": started,
        "finished": started + 42.5,
        "duration": 42.5,
    }


def baseline() -> dict[str, Any]:
    """Before the change: 5000 blocks 40000-49999; 5001 rejects 60000-60099, NATs 2000-2999
    and could not test 5353."""
    return build_doc(
        "20251126T010000-a1b2c3",
        dst=(5000, 5001),
        spans=[
            {"dst": 5000, "first": 40000, "last": 49999, "verdict": "blocked"},
            {"dst": 5001, "first": 2000, "last": 2999, "verdict": "open", "translated": True},
            {"dst": 5001, "first": 5353, "last": 5353, "verdict": "untested"},
            {
                "dst": 5001,
                "first": 60000,
                "last": 60099,
                "verdict": "rejected",
                "icmp": ICMP_ADMIN,
            },
        ],
    )


def after_change() -> dict[str, Any]:
    """After the change: 45000-49999 opened on 5000; the reject on 5001 grew to 60199."""
    return build_doc(
        "20251126T020000-d4e5f6",
        dst=(5000, 5001),
        started=1_764_118_800.0,
        spans=[
            {"dst": 5000, "first": 40000, "last": 44999, "verdict": "blocked"},
            {"dst": 5001, "first": 2000, "last": 2999, "verdict": "open", "translated": True},
            {"dst": 5001, "first": 5353, "last": 5353, "verdict": "untested"},
            {
                "dst": 5001,
                "first": 60000,
                "last": 60199,
                "verdict": "rejected",
                "icmp": ICMP_ADMIN,
            },
        ],
    )


def incomplete() -> dict[str, Any]:
    """The agent was lost half-way through 5001."""
    return build_doc(
        "20251126T030000-778899",
        dst=(5000, 5001),
        started=1_764_122_400.0,
        spans=[
            {"dst": 5000, "first": 40000, "last": 49999, "verdict": "blocked"},
            {"dst": 5001, "first": 30000, "last": 65535, "verdict": "unknown"},
        ],
    )


def ipv6() -> dict[str, Any]:
    """An IPv6 path that blocks two source-port ranges to 5000."""
    return build_doc(
        "20251126T040000-v6v6v6",
        agent="pc-v6",
        agent_addr="2001:2:0:91::2",
        probe_addr="2001:2:0:92::2",
        dst=(5000, 6000),
        started=1_764_126_000.0,
        spans=[
            {"dst": 5000, "first": 1024, "last": 2047, "verdict": "blocked"},
            {"dst": 5000, "first": 40000, "last": 49999, "verdict": "blocked"},
        ],
    )


BASELINE_EXPECT = """\
# the policy we mean to have
[[expect]]
agent = "pc-17"
dst_ports = "5000,5001"
src_ports = "1024-65535"
verdict = "open"

[[expect]]
dst_ports = "5000"
src_ports = "40000-49999"
verdict = "blocked"
"""


@st.composite
def docs(draw: st.DrawFn) -> dict[str, Any]:
    """Random small run documents: a few destination ports, a gappy source-port plan, and
    spans of every verdict (with translation and differing ICMP details)."""
    lo = draw(st.integers(1024, 1100))
    width = draw(st.integers(1, 120))
    ports = sorted(draw(st.sets(st.integers(lo, lo + width), min_size=1, max_size=width + 1)))
    src = ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges_of(ports))
    dst = tuple(sorted(draw(st.sets(st.integers(5000, 5005), min_size=1, max_size=3))))
    spans = []
    for _ in range(draw(st.integers(0, 12))):
        first = draw(st.integers(lo, lo + width))
        verdict = draw(st.sampled_from(("open", "blocked", "rejected", "untested", "unknown")))
        span: Span = {
            "dst": draw(st.sampled_from(dst)),
            "first": first,
            "last": draw(st.integers(first, lo + width)),
            "verdict": verdict,
            "translated": verdict == "open" and draw(st.booleans()),
        }
        if verdict == "rejected":
            span["icmp"] = draw(st.sampled_from((ICMP_ADMIN, ICMP_PORT)))
        if verdict == "untested":
            span["reason"] = draw(st.sampled_from(("address in use", "permission denied")))
        spans.append(span)
    return build_doc("r-hyp", src=src, dst=dst, spans=spans)


def cell_verdicts(doc: dict[str, Any]) -> dict[tuple[int, int], str]:
    """The verdict of every cell, one by one (the slow, obviously right reference)."""
    out = {}
    for r in doc["ranges"]:
        for s in range(r["first"], r["last"] + 1):
            out[(r["dst_port"], s)] = r["verdict"]
    return out
