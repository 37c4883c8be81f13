"""Run documents for the report tests, made the way the coordinator makes them: a real
``Ledger`` and ``build_document``, plus the contract's 1.1 keys set by hand where the
engine does not produce them yet (``inferred``, ``icmp_limited``, ``icmp.verified``,
``warnings``, ``path_mtu``, an unknown loss estimate).

* ``interrupted_sweep``: a full sweep (1024-65535 to two ports) cancelled half-way: about
  half of the cells sent, most of those open, everything else unknown. In random order,
  as the probe sends, that is tens of thousands of one-port ranges.
* ``sampled_run``: ``random:500`` to two ports through a policy that blocks 40000-49999.
* ``everything``: a small document with every verdict and every detail a report can show,
  including hostile strings from the far side and an IPv6 path with long commands.
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Callable
from typing import Any

from udpreach.core.document import build_document
from udpreach.core.ledger import IcmpInfo, Ledger
from udpreach.core.portspec import format_ports
from udpreach.core.recommend import recommend


def _cached(make: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Build each sample once (a ledger of 64,512 cells a port takes a while); hand out
    copies, so a test may change its own."""
    built = functools.cache(make)

    @functools.wraps(make)
    def fresh(*args: Any, **kw: Any) -> dict[str, Any]:
        return copy.deepcopy(built(*args, **kw))

    return fresh


AGENT = "198.18.1.2"
PROBE = "198.18.2.2"
ROUTER = "198.18.2.1"


def _agent(addr: str = AGENT, ports: tuple[int, ...] = (5000, 5001), name: str = "pc-17"):
    return {"name": name, "registered": addr, "observed": addr, "ports": list(ports)}


def _receive(led: Ledger, dst: int, srcs: list[int], addr: str = AGENT, shift: int = 0) -> None:
    """The agent saw one datagram (the first attempt) of each of these cells."""
    unsent = [s for s in srcs if led.attempts(dst, s) == 0]
    led.note_sent_many(dst, unsent)  # only what was sent can be credited
    led.note_receipts([(0, dst, s, 1, s + shift) for s in srcs], [addr], 1)


def _plan(src: str, dst: tuple[int, ...]) -> dict[str, Any]:
    return {
        "src_ports": src,
        "dst_ports": list(dst),
        "copies": 3,
        "rate": 100000,
        "size": 16,
        "copies_mode": "fixed",
    }


def _loss(estimate: float | None = 0.002, *, blocked: bool = True) -> dict[str, Any]:
    return {
        "estimate": estimate,
        "upper": None if estimate is None else 0.004,
        "attempts": 3,
        "false_blocked_bound": None if estimate is None else 0.00012,
        "confidence_target": 0.01,
        "confidence_reached": estimate is not None or not blocked,
        "rate_found": 100000,
        "rate_backoffs": 0,
    }


INTERRUPTED_LOSS = {"upper": 0.00036, "false_blocked_bound": 1.0, "confidence_reached": False}


@_cached
def interrupted_sweep(seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    src = range(1024, 65536)
    led = Ledger([5000, 5001], src)
    for d in (5000, 5001):
        sent = [s for s in src if rng.random() < 0.5]
        led.note_sent_many(d, sent)
        _receive(led, d, [s for s in sent if rng.random() < 0.8])
    led.finish(complete=False)
    return build_document(
        run_id="20251126T050000-c0ffee",
        complete=False,
        agent=_agent(),
        probe={"address": PROBE, "target": AGENT, "send_mode": "bind"},
        plan=_plan("1024-65535", (5000, 5001)),
        ledger=led,
        extra={
            "started": 1_764_133_200.0,
            "duration": 12.5,
            # As the engine writes it for a cancelled run (the trial's Ctrl-C'd sweep): no
            # bound computed (1.0, "any blocked cell may be open"), the target not reached.
            "loss": _loss(0.0, blocked=False) | INTERRUPTED_LOSS,
            "warnings": ["the run was cancelled by its requester"],
        },
    )


@_cached
def sampled_run(seed: int = 2) -> dict[str, Any]:
    rng = random.Random(seed)
    src = sorted(rng.sample(range(1024, 65536), 500))
    led = Ledger([5000, 5001], src)
    for d in (5000, 5001):
        for s in src:
            for _ in range(3 if 40000 <= s <= 49999 else 1):
                led.note_sent(d, s)
            if not 40000 <= s <= 49999:
                led.note_receipt(d, s, 1, AGENT, s)
    led.finish(complete=True)
    return build_document(
        run_id="20251126T060000-5a5a5a",
        complete=True,
        agent=_agent(),
        probe={"address": PROBE, "target": AGENT, "send_mode": "raw"},
        plan=_plan(format_ports(src), (5000, 5001)),
        ledger=led,
        extra={"started": 1_764_136_800.0, "duration": 3.2, "loss": _loss(), "warnings": []},
    )


@_cached
def interrupted_sample(seed: int = 3) -> dict[str, Any]:
    """The trial's other Ctrl-C: ``random:500`` to two ports through a policy that rejects
    40000-49999, cancelled with about half of the samples settled (in random order, as
    the probe sends): scattered rejected samples, the rest unknown."""
    rng = random.Random(seed)
    src = sorted(rng.sample(range(1024, 65536), 500))
    led = Ledger([5000, 5001], src)
    for d in (5000, 5001):
        settled = [s for s in src if rng.random() < 0.5]
        led.note_sent_many(d, settled)
        for s in settled:
            if 40000 <= s <= 49999:
                led.note_icmp(d, s, IcmpInfo(3, 13, ROUTER))
        _receive(led, d, [s for s in settled if not 40000 <= s <= 49999])
    led.finish(complete=False)
    return build_document(
        run_id="20251126T053000-5a5a00",
        complete=False,
        agent=_agent(),
        probe={"address": PROBE, "target": AGENT, "send_mode": "raw"},
        plan=_plan(format_ports(src), (5000, 5001)),
        ledger=led,
        extra={
            "started": 1_764_135_000.0,
            "duration": 2.5,
            "loss": _loss(0.0) | INTERRUPTED_LOSS,
            "warnings": ["the run was cancelled by its requester"],
        },
    )


V6_AGENT = "2001:db8:ffff:ffff:ffff:ffff:ffff:1002"
V6_PROBE = "2001:db8:ffff:ffff:ffff:ffff:ffff:2002"
V6_ROUTER = "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe"
HOSTILE = '<script>alert("x")</script> [bold red]not markup[/] & "quotes"'


@_cached
def everything(
    *, v6: bool = False, loss_estimate: float | None = 0.002, complete: bool = True
) -> dict[str, Any]:
    """Every verdict and detail: blocked (with inferred and icmp_limited cells) in
    scattered ranges that make a multi-rule iptables recommendation, rejected (verified and
    not), untested, NAT; warnings and names that carry markup. With ``complete=False`` the
    agent was lost before 64000-65535 to 5002 settled: those cells are unknown, the run is
    incomplete, and (as for every incomplete run) nothing is recommended."""
    agent, probe, router = (V6_AGENT, V6_PROBE, V6_ROUTER) if v6 else (AGENT, PROBE, ROUTER)
    dst = (5000, 5001, 5002)
    led = Ledger(dst, range(1024, 65536))
    for d in dst:
        led.note_sent_many(d, range(1024, 65536))
    blocked_spans = [(2000 + 40 * k, 2009 + 40 * k) for k in range(12)]  # iptables: 2 rules
    blocked_spans.append((40000, 49999))
    closed = {s for a, b in blocked_spans for s in range(a, b + 1)}
    for s in range(60000, 60100):
        led.note_icmp(5001, s, IcmpInfo(3 if not v6 else 1, 13 if not v6 else 1, router))
    for s in range(60100, 60200):
        led.note_icmp(5001, s, IcmpInfo(3 if not v6 else 1, 3 if not v6 else 4, agent))
    led.note_untested(5353, HOSTILE, [5002])
    _receive(led, 5000, [s for s in range(1024, 65536) if s not in closed], agent)
    nat = range(20000, 21000)
    _receive(led, 5001, [s for s in range(1024, 60000) if s not in nat], agent)
    _receive(led, 5001, list(nat), agent, shift=10000)
    _receive(led, 5001, list(range(60200, 65536)), agent)
    # 5002 from 64000 on: never settled (unknown) in the incomplete run.
    last = 65536 if complete else 64000
    _receive(led, 5002, [s for s in range(1024, last) if s != 5353], agent)
    led.finish(complete=True)
    doc = build_document(
        run_id="20251126T070000-e7e7e7",
        complete=complete,
        agent=_agent(agent, dst, name=HOSTILE),
        probe={"address": probe, "target": agent, "send_mode": "raw"},
        plan=_plan("1024-65535", dst),
        ledger=led,
        extra={
            "started": 1_764_140_400.0,
            "duration": 21.0,
            "loss": _loss(loss_estimate),
            "warnings": [
                f"ICMP errors from {router} were rate-limited (about 1 every 1.0 s)",
                HOSTILE,
            ],
            "path_mtu": {"mtu": 1280, "from": router},
        },
    )
    if not complete:
        # The agent was lost before 64000-65535 to 5002 was settled: unknown, not blocked.
        (lost,) = [r for r in doc["ranges"] if r["dst_port"] == 5002 and r["first"] == 64000]
        lost["verdict"] = "unknown"
        doc["summary"]["blocked"] -= 1536
        doc["summary"]["unknown"] += 1536
        doc["loss"] |= INTERRUPTED_LOSS
        doc["recommendations"] = recommend(doc)
    # The engine of issue 14 will set these; until it does, as the contract describes them.
    for r in doc["ranges"]:
        if r["verdict"] == "blocked" and r["first"] == 40000:
            r["inferred"] = 120
            r["icmp_limited"] = 9000
        if r["verdict"] == "rejected":
            r["icmp"]["verified"] = r["first"] == 60000
            r["inferred"] = 40 if r["first"] == 60000 else 0
    return doc


def verdict_spans(doc: dict[str, Any]) -> list[str]:
    """Every range of a document as its report shows it: ``first-last`` or one port."""
    return [
        str(r["first"]) if r["first"] == r["last"] else f"{r['first']}-{r['last']}"
        for r in doc["ranges"]
    ]


@_cached
def one_of_each(**extra: Any) -> dict[str, Any]:
    """One destination port with a wide span of every verdict (each fills whole columns of
    the matrix at any width), in the order open, blocked, rejected, untested, unknown."""
    led = Ledger([5000], range(1024, 65536))
    led.note_sent_many(5000, range(1024, 43000))
    _receive(led, 5000, list(range(1024, 15000)))
    for s in range(29000, 43000):
        led.note_icmp(5000, s, IcmpInfo(3, 13, ROUTER))
    for s in range(43000, 53000):
        led.note_untested(s, "address in use")
    led.finish(complete=False)  # what is still pending: the blocked and the unknown cells
    doc = build_document(
        run_id="20251126T080000-0e0e0e",
        complete=False,
        agent=_agent(ports=(5000,)),
        probe={"address": PROBE, "target": AGENT, "send_mode": "bind"},
        plan=_plan("1024-65535", (5000,)),
        ledger=led,
        extra={"started": 1_764_144_000.0, "duration": 9.0, "loss": _loss(), **extra},
    )
    # finish(complete=False) made both pending spans unknown: the first one was blocked.
    for r in doc["ranges"]:
        if r["first"] == 15000:
            r["verdict"] = "blocked"
    doc["summary"]["blocked"] = 14000
    doc["summary"]["unknown"] -= 14000
    doc["recommendations"] = recommend(doc)
    return doc
