"""The run engine over a simulated path: every behaviour of real paths, in milliseconds.

Each test runs the real ``Sweep`` against the real agent core through ``simpath`` (a fake
clock, the numbers of ``realpaths.md``) and compares every (dst, src) verdict with the
path's truth. Times are of the fake clock; the physical minimum of a policed sweep is
cells / rate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
from simpath import AGENT, PROBE, ROUTER, Path, Rule, SimRun, mismatches, truth, verdicts

from udpreach.core import schema, silence
from udpreach.core.recommend import recommend
from udpreach.core.sweep import (
    TRANSITIONS,
    Finished,
    Phase,
    Send,
    Stage,
    Sweep,
    SweepSettings,
    Wait,
)
from udpreach.render import facts

FULL = range(1024, 65536)
DEMO = [Rule("drop", (40000, 49999)), Rule("reject", (30000, 30999))]


def run(path: Path, **kw: object) -> tuple[SimRun, dict]:
    sim = SimRun(path, **kw)  # type: ignore[arg-type]
    return sim, sim.run()


def right(sim: SimRun, doc: dict, path: Path, at: float = 0.0) -> None:
    srcs = sorted(set(sim.plan.src_ports))
    bad = mismatches(doc, truth(path, sim.plan.dst_ports, srcs, at))
    assert bad == [], f"{len(bad)} wrong, e.g. {bad[:5]}"


# -- the phase table ------------------------------------------------------------------------


def test_the_phase_table_drives_the_run() -> None:
    sim = SimRun(Path(), src_ports="1024-1100")
    sweep = sim.sweep
    assert sweep.phase is Phase.SENDING
    with pytest.raises(RuntimeError, match="illegal run transition"):
        sweep._move("finish")  # sending -> complete is not in the table
    assert (Phase.SETTLING, "finish") in TRANSITIONS
    doc = sim.run()
    assert sweep.phase is Phase.COMPLETE
    assert doc["complete"] is True
    assert isinstance(sweep.next_action(sim.now), Finished)


EVENTS = ["send", "drain", "finish", "abort", "settle", "bogus"]
PATHS = {
    Phase.PLANNED: [],
    Phase.SENDING: ["send"],
    Phase.SETTLING: ["send", "drain"],
    Phase.COMPLETE: ["send", "drain", "finish"],
    Phase.INCOMPLETE: ["abort"],
}


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("event", EVENTS)
def test_every_move_outside_the_table_raises_and_changes_nothing(phase: Phase, event: str) -> None:
    sweep = SimRun(Path(), src_ports="1024-1100").sweep
    sweep.phase = Phase.PLANNED
    for step in PATHS[phase]:
        sweep._move(step)
    assert sweep.phase is phase
    if (phase, event) in TRANSITIONS:
        sweep._move(event)
        assert sweep.phase is TRANSITIONS[(phase, event)]
        return
    with pytest.raises(RuntimeError, match=event):
        sweep._move(event)
    assert sweep.phase is phase


def test_actions_say_what_to_send_and_when() -> None:
    sim = SimRun(Path(), src_ports="1024-1100", rate=1000)
    act = sim.sweep.next_action(0.0)
    assert isinstance(act, Send)
    (dst, attempt, srcs), *_ = act.groups
    assert dst == 5000
    assert attempt == 1
    assert len(srcs) >= 1
    sim.sweep.on_sent(act, None, 0.0)
    nxt = sim.sweep.next_action(0.0)
    assert isinstance(nxt, Wait)
    assert nxt.until > 0.0


# -- kind paths and plain firewalls ----------------------------------------------------------


def test_clean_path_everything_open_in_one_round() -> None:
    _sim, doc = run(Path())
    assert doc["summary"]["open"] == 64512
    assert doc["probe_stats"]["rounds"] == 1
    assert doc["probe_stats"]["sent"] <= 64512 + 128  # the end's recheck: a sample again
    assert doc["loss"]["confidence_reached"] is True
    assert doc["warnings"] == []


def test_a_run_held_below_its_rate_by_the_probes_ceiling_says_so() -> None:
    """--size 8000 ran at 1,562/s under the probe's byte ceiling (12.5 MB/s) while the
    report said only "rate <= 100,000/s": the document keeps the ceiling it was held to,
    and the plan line names it. A ceiling above the plan's rate is not mentioned."""
    sim = SimRun(Path(), src_ports="1024-5119", rate=100_000)
    sim.sweep.rate_cap = 2_000.0
    doc = sim.run()
    assert doc["summary"]["open"] == 4096
    assert doc["loss"]["rate_ceiling"] == 2000
    assert doc["duration"] >= 4096 / 2000
    assert "rate <= 100,000/s (the probe's rate ceiling held it to 2,000/s)" in facts.plan_text(doc)
    sim = SimRun(Path(), src_ports="1024-5119", rate=100_000)
    sim.sweep.rate_cap = 500_000.0
    doc = sim.run()
    assert "rate_ceiling" not in doc["loss"]
    assert "ceiling" not in facts.plan_text(doc)


def test_a_ceiling_that_held_only_a_moment_is_not_named() -> None:
    """The probe's ceiling is shared by the runs at a time: a run that overlapped another
    for its first batches was held to half its rate only then. It went at its own rate, and
    the report must not blame the ceiling (it kept the lowest share ever seen)."""
    sim = SimRun(Path(), src_ports="1024-65535", rate=100_000)
    sim.sweep.rate_cap = 50_000.0

    def overlap_ends(sweep: Sweep) -> bool:
        if sweep.ledger.sent_total > 2_000:
            sweep.rate_cap = 100_000.0  # the other run ended
        return False

    doc = sim.run(stop=overlap_ends)
    assert doc["summary"]["open"] == 64512
    assert "rate_ceiling" not in doc["loss"]
    assert "ceiling" not in facts.plan_text(doc)


class _Every(Rule):
    """A rule on the source ports of its range that ``pick`` chooses (by parity, or by a
    hash like an ECMP pair's member choice)."""

    def __init__(self, action: str, srcs: tuple[int, int], pick: Callable[[int], bool]) -> None:
        super().__init__(action, srcs)
        self.pick = pick

    def matches(self, dst: int, src: int) -> bool:
        return super().matches(dst, src) and self.pick(src)


# An ECMP pair out of step: the member a flow hashes to rejects or drops.
_ECMP = [
    _Every("reject", (30000, 31999), lambda x: (x * 2654435761) >> 16 & 1 == 0),
    _Every("drop", (30000, 31999), lambda x: (x * 2654435761) >> 16 & 1 == 1),
]


def _strictly_right(sim: SimRun, doc: dict, path: Path) -> None:
    """Every cell right, a blocked range's rejects no more than its icmp_limited count (the
    cells the run says it could not tell apart), and every planned cell in one range."""
    want = truth(path, sim.plan.dst_ports, sorted(set(sim.plan.src_ports)))
    assert len(verdicts(doc)) == len(want)
    bad = mismatches(doc, want)
    assert bad == [], f"{len(bad)} cells wrong, e.g. {bad[:5]}"


@pytest.mark.parametrize(
    "rules",
    [
        # 40000-40511 in eight 64-port bands: reject, drop, reject, ...
        [Rule("reject" if k % 2 == 0 else "drop", (40000 + 64 * k, 40063 + 64 * k))
         for k in range(8)],
        # even ports rejected, odd ones dropped
        [_Every("reject", (30000, 30999), lambda x: x % 2 == 0),
         _Every("drop", (30000, 30999), lambda x: x % 2 == 1)],
        _ECMP,
    ],
    ids=["64-port-bands", "parity", "ecmp-hash"],
)  # fmt: skip
def test_reject_and_drop_mixed_finer_than_the_samples_are_never_guessed(
    rules: list[Rule],
) -> None:
    """An adversarial review's policies: reject and drop alternating inside one silent
    stretch. Unlabelled cells between two samples of one kind took that kind, so dropped
    bands were reported rejected (inferred) and rejects inferred as drops, and two runs
    disagreed. Now a gap is inferred only when it is narrow and the stretch's boundaries
    were all found; what the budget cannot tell apart is icmp_limited, never a guess."""
    path = Path(rules=rules)
    sim, doc = run(path)
    _strictly_right(sim, doc, path)
    again_sim, again = run(Path(rules=rules, seed=2))
    _strictly_right(again_sim, again, path)
    # A budget that ends before the runs are sampled (4 s: no test burst at all; 8 s: some
    # drops silent once, not twice): the lab's first try inferred rejects across them.
    for budget in (4.0, 8.0):
        short_sim, short = run(
            path, dst_ports=(5000, 5001), settings=SweepSettings(icmp_budget=budget)
        )
        _strictly_right(short_sim, short, path)


_RDR = [
    Rule("reject", (30000, 34999)),
    Rule("drop", (35000, 35999)),
    Rule("reject", (36000, 40999)),
]


@pytest.mark.parametrize(
    ("rules", "limits"),
    [
        (_RDR, {"icmp_rate": 2}),  # Cisco's default: one error every 500 ms
        (_RDR, {"icmp_rate": 10}),  # Linux's IPv6 default: one every 100 ms
        (_ECMP, {"icmp_burst": 50}),  # a burst as big as Linux's host-wide one
        ([Rule("reject" if k % 2 == 0 else "drop", (40000 + 200 * k, 40199 + 200 * k))
          for k in range(10)], {"icmp_burst": 50}),
        # Linux's IPv4 default; the drop band is under an eighth of the silent stretch
        ([Rule("reject", (30000, 39999)), Rule("drop", (35630, 36829))], {}),
    ],
    ids=["rdr-2/s", "rdr-10/s", "ecmp-burst-50", "200-port-bands-burst-50", "drop-in-reject"],
)  # fmt: skip
def test_a_sender_that_answers_fast_does_not_hide_drop_bands(
    rules: list[Rule], limits: dict[str, int]
) -> None:
    """The sweep's own ICMP errors land only on rejects: with a sender that answers often
    they filled every eighth of a silent stretch, no test looked for drops there, and the
    drop bands between them came out rejected (inferred): 800-1,200 wrong cells in each of
    these. The eighths are now sampled by tests placed by position, and wide gaps between
    rejects are halved while the budget lasts."""
    path = Path(rules=rules, **limits)  # type: ignore[arg-type]
    sim, doc = run(path, src_ports="20000-45000")
    _strictly_right(sim, doc, path)


@pytest.mark.parametrize(
    "drop",
    [(35630, 36829), (35000, 35599)],
    ids=["between-two-eighths-middles", "inside-one-eighth"],
)
def test_a_drop_band_one_port_finds_is_looked_for_on_the_others(drop: tuple[int, int]) -> None:
    """A drop band inside a 10,000-port reject range, two destination ports, Linux's IPv4
    limit. The first band sits between the middles of two eighths, where every port's
    samples went: the lab reported all of it rejected (inferred) on both ports, run after
    run. Ports now sample at different points of their eighths, and a drop one port's
    tests confirm is tested on the others (free if it is a drop there too)."""
    path = Path(rules=[Rule("reject", (30000, 39999)), Rule("drop", drop)])
    sim, doc = run(path, dst_ports=(5000, 5001))
    _strictly_right(sim, doc, path)


@pytest.mark.parametrize("ports", [3, 4])
def test_the_sweeps_own_errors_never_stand_for_spread_samples(ports: int) -> None:
    """The sweep's own errors land just past a drop band, never in it, even from Linux's
    one-a-second IPv4 limit. They counted as an eighth's sample at that limit, and with
    three or four destination ports (a longer sweep, so more of its errors) they filled the
    eighths where the ports' own samples would have fallen in the band: 3,600 and 2,400
    dropped cells came out rejected (inferred). A reject now counts for an eighth only where
    a test placed it, and the default budget grows with the destination ports to pay for
    the tests (``default_icmp_budget``)."""
    path = Path(rules=[Rule("reject", (30000, 39999)), Rule("drop", (35630, 36829))])
    sim, doc = run(path, dst_ports=tuple(range(5000, 5000 + ports)))
    _strictly_right(sim, doc, path)
    assert sim.sweep.icmp_budget == 20.0 + 10.0 * (ports - 1)


@pytest.mark.parametrize("icmp_delay", [0.5, 1.0])
def test_errors_that_come_back_late_never_make_a_drop_band_a_reject(icmp_delay: float) -> None:
    """A drop band inside a reject range, the router's errors 0.5 or 1 s slower than the
    datagrams. The test bursts were judged by the UDP delay alone, before their answers came
    back: all 1,200 dropped cells came out rejected (inferred), with no icmp_limited cell and
    no warning. A burst now waits by its errors' own delay."""
    rules = [Rule("reject", (30000, 39999)), Rule("drop", (35630, 36829))]
    path = Path(rules=rules, icmp_delay=icmp_delay)
    # A budget this layout settles in (the default ends it icmp_limited, delay or not).
    sim, doc = run(path, src_ports="20000-45000", settings=SweepSettings(icmp_budget=90))
    _strictly_right(sim, doc, path)
    assert not any(r.get("icmp_limited") for r in doc["ranges"]), doc["ranges"]


def test_a_silent_expected_reject_before_an_answered_one_is_a_drop() -> None:
    """A burst of expected rejects alone has no control; a refinement point inside a drop
    band, silent while a later cell of the burst was answered, is the same evidence as a
    control's answer. The review found it thrown away, and the band inferred rejected (a
    slow sweep: its own errors fill the eighths, so the band is only found by refining)."""
    path = Path(rules=[Rule("reject", (30000, 39999)), Rule("drop", (35100, 35299))])
    sim, doc = run(path, src_ports="30000-39999", rate=500)
    _strictly_right(sim, doc, path)


def test_a_port_never_tested_still_needs_samples_a_test_placed() -> None:
    """A fast sender's burst (1,650 errors at once) labelled both ends of the run: no test
    had been placed on the port yet, and it escaped the rule that an eighth's reject counts
    only where a test placed it (0 test bursts, 200 drops inferred rejected)."""
    rules = [Rule("reject", (30000, 31999)), Rule("drop", (31050, 31249))]
    path = Path(rules=rules, icmp_rate=10, icmp_burst=1650)
    sim, doc = run(path, src_ports="30000-31999")
    _strictly_right(sim, doc, path)


@pytest.mark.parametrize("seed", [1, 5])
def test_loss_before_the_firewall_never_confirms_a_reject_as_a_drop(seed: int) -> None:
    """30% loss on the way to a reject rule (the lab's ``numgen random mod 10 < 3 drop``
    before the reject): a test datagram lost before the firewall is as silent as a drop,
    and two silent tests confirmed one. Over the simulated path 1,335-2,666 rejected cells
    came out blocked, and in the lab single cells at a run's ends. The confirmations a drop
    needs now follow the loss where the test goes (a chance under 1e-4 that a reject's tests
    were all lost; a dark block takes its measured neighbours' loss)."""
    path = Path(
        rules=[Rule("reject", (30000, 39999))],
        loss=[((30000, 44999), 0.3)],
        loss_first=True,
        seed=seed,
    )
    sim, doc = run(path, src_ports="25000-45000", dst_ports=(5000, 5001))
    _strictly_right(sim, doc, path)
    confirmations = sim.sweep._confirmations  # per source port: where the loss is
    assert confirmations[35000] >= 8  # the dark run, beside the lossy band
    assert confirmations[26000] <= 3  # the clean part (the plan's loss, from its clean blocks)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_loss_exactly_in_front_of_a_reject_never_confirms_a_drop(seed: int) -> None:
    """The same with the loss confined to the reject's own ports (the lab's `udp sport
    30000-31999 numgen random mod 100 < 30 drop` before the reject, an adversarial
    review's): the band delivers nothing and its neighbours are clean, so no delivery
    shows its loss, and two silent tests confirmed 1-383 rejected cells dropped (diff of
    two runs exit 1). Its tests do: a reject that answers a test after staying silent in
    an earlier one, or a known reject silent while its sender had a token, was lost."""
    path = Path(
        rules=[Rule("reject", (30000, 31999)), Rule("reject", (40000, 40999))],
        loss=[((30000, 31999), 0.3)],
        loss_first=True,
        seed=seed,
    )
    sim, doc = run(path, src_ports="20000-45000")
    _strictly_right(sim, doc, path)
    assert sim.sweep._reject_silent.sum() > 0
    assert sim.sweep._confirmations[31000] >= 6
    assert sim.sweep._confirmations[22000] <= 3  # far from it: the clean plan's


def test_a_bursts_controls_wait_out_the_spread_of_its_senders_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A router that rejects some ports at once and others behind a slow queue (the review's
    lab: rules after a 300 ms delay line), one address for both: a control sent just after
    the cells reaches it first and takes the token a slow cell needed, whose silence then
    passed for a drop (2,000 rejected cells blocked in one of two real runs). Its errors'
    times show the spread (fast ones and slow ones): a burst then sends its controls that
    much after its cells."""
    sends: list[tuple[float, int, float]] = []  # (now, part, pause)
    real = Sweep._send_burst

    def watch(self: Sweep, now: float) -> Send:
        burst = self._burst
        assert burst is not None
        sends.append((now, self._qpos, burst.pause))
        return real(self, now)

    monkeypatch.setattr(Sweep, "_send_burst", watch)
    path = Path(
        rules=[
            Rule("reject", (20000, 21999)),
            Rule("drop", (30000, 30999)),
            Rule("reject", (40000, 41999), icmp=(3, 3), delay=0.3),
        ],
        udp_delay=0.3,
    )
    sim, doc = run(path)
    _strictly_right(sim, doc, path)
    lo, hi = sim.sweep._error_rtt[ROUTER]
    assert hi - lo >= 0.25
    split = [(t, p) for t, part, p in sends if part == 0 and p > 0]
    assert split, sends
    for t, pause in split:  # the second part went out no sooner than the pause
        assert any(t2 >= t + pause - 1e-9 for t2, part, _ in sends if part == 1)


def test_tests_lost_in_front_of_a_reject_are_not_taken_for_a_slow_refill() -> None:
    """IPv6's limit (one error every 100 ms) behind the same lossy band, with a drop band
    beside it (the review's p18). A missed control raised the sender's period by half each
    time; 30% loss missed them often, the period went to over a second and the run spent its
    whole budget (20 s) and left 2,940 cells icmp_limited. Where tests of rejects are
    known to be lost, only two missed controls in a row raise it."""
    path = Path(
        rules=[Rule("reject", (30000, 31999)), Rule("drop", (32000, 32999))],
        loss=[((30000, 31999), 0.3)],
        loss_first=True,
        icmp_rate=10.0,
        seed=2,
    )
    sim, doc = run(path)
    _strictly_right(sim, doc, path)
    assert sum(r.get("icmp_limited", 0) for r in doc["ranges"]) == 0
    assert sim.now < 12.0  # 14.9 s before
    assert all(b.period < 1.0 for b in sim.sweep.senders.values())


@pytest.mark.parametrize(
    "rules",
    [
        [_Every("reject", (20000, 29999), lambda x: x % 2 == 1)],
        [Rule("reject", (p, p)) for p in range(30000, 50000, 500)],
    ],
    ids=["every-other-port", "40-single-ports"],
)
def test_rejects_on_single_ports_are_never_called_blocked(rules: list[Rule]) -> None:
    """Rejects on single ports between open ones make dark runs of one cell each: the
    sweep's errors answered a few and the rest came back silent. Silence was counted in
    doubt only in a run holding a reject and a silent cell, never across runs, so 4,994 of
    the every-other-port rejects were reported plainly blocked. A router limits errors per
    destination, not per run: now they are tested, and what the budget cannot settle is
    icmp_limited."""
    path = Path(rules=rules)
    sim, doc = run(path)
    _strictly_right(sim, doc, path)


def test_drops_on_single_ports_of_two_destination_ports_beside_a_reject_range() -> None:
    """Every other source port dropped on two destination ports, a reject range elsewhere:
    tens of thousands of one-cell dark runs, each a stretch of drops once tested. Choosing
    each burst compared every run with every other port's stretch (``silence.hints``): the
    full range's run took 330 s of CPU for 32 s of its own time (a real probe's event loop
    stopped for seconds at every burst), 7.5 s now. Here a band of it, for the verdicts;
    ``test_hints_are_those_of_every_run_against_every_other_ports_stretch`` checks that the
    search finds what the comparison did."""
    rules = [_Every("drop", (40000, 45999), lambda x: x % 2 == 0), Rule("reject", (30000, 30999))]
    path = Path(rules=rules)
    sim, doc = run(path, dst_ports=(5000, 5001))
    _strictly_right(sim, doc, path)


def _hints_by_definition(runs: list[silence.Run]) -> list[tuple[silence.Run, int]]:
    """``silence.hints`` as first written: every run against every other port's stretch."""
    stretches = []
    for r in runs:
        labelled = np.flatnonzero(r.labels != silence.U)
        is_d = r.labels[labelled] == silence.D
        if not is_d.any():
            continue
        edges = np.diff(np.r_[0, is_d.astype(np.int8), 0])
        for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
            stretches.append((r.dst, int(r.srcs[labelled[a]]), int(r.srcs[labelled[b - 1]])))
    out = []
    for r in runs:
        for dst, first, last in stretches:
            if dst == r.dst:
                continue
            lo = int(np.searchsorted(r.srcs, first))
            hi = int(np.searchsorted(r.srcs, last, side="right"))
            if hi > lo and not (r.labels[lo:hi] != silence.U).any():
                idx = np.flatnonzero(r.labels[lo:hi] == silence.U)
                pos = lo + int(idx[np.argmin(np.abs(idx + lo - (lo + hi) // 2))])
                out.append((r, pos))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_hints_are_those_of_every_run_against_every_other_ports_stretch(seed: int) -> None:
    """The hints found by search are the definition's, in its order, for random dark runs
    (one cell to hundreds, unlabelled, dropped or rejected cells) on one to three ports."""
    rng = np.random.default_rng(seed)
    runs = []
    for dst in range(5000, 5000 + int(rng.integers(1, 4))):
        at = 1024
        for _ in range(int(rng.integers(1, 30))):
            at += int(rng.integers(1, 400))
            n = int(rng.choice([1, 1, 2, 3, int(rng.integers(4, 300))]))
            labels = rng.choice([silence.U, silence.D, 2], size=n, p=[0.6, 0.3, 0.1])
            runs.append(silence.Run(dst, np.arange(at, at + n), labels.astype(np.int64)))
            at += n
    order = sorted(runs, key=lambda r: -len(r.srcs))
    got = [(id(r), pos) for r, pos in silence.hints(order)]
    assert got == [(id(r), pos) for r, pos in _hints_by_definition(order)]
    for r in runs:
        if len(r.srcs) == 1:  # the one-cell shortcut: an unlabelled cell is an expected drop
            assert silence.needs(r) == ([(0, "cheap", -1)] if r.labels[0] == silence.U else [])
            assert silence.refinements(r) == []


@pytest.mark.parametrize("icmp_delay", [0.0, 0.05, 0.2, 0.5, 0.9])
def test_two_kinds_of_reject_side_by_side_are_split_within_the_budget(icmp_delay: float) -> None:
    """Two reject rules with different ICMP codes, at Linux's default limit: the boundary is
    bisected one token at a time, and a burst of expected rejects alone spends no token on
    a control. The errors may come back later than the datagrams cross (a router's slow
    path, a long way back): a test burst waits for them by their own delay, or answered
    controls pass for missed ones and the budget goes on waits (at 50 ms, 1,984 of the 2,000
    cells were left icmp_limited); and the router's refill runs from when it spent a token,
    not from when its error arrived (at 0.5-1 s, each token cost that much more: 1,978-1,984
    cells icmp_limited). (Up to 0.9 s: a burst waits for its errors at most --max-delay.)"""
    rules = [
        Rule("reject", (30000, 30999), icmp=(3, 13)),
        Rule("reject", (31000, 31999), icmp=(3, 3)),
    ]
    path = Path(rules=rules, icmp_delay=icmp_delay)
    sim, doc = run(path, src_ports="20000-45000")
    right(sim, doc, path)
    assert not any(r.get("icmp_limited") for r in doc["ranges"]), doc["ranges"]
    rejected = {
        (r["first"], r["last"], r["icmp"]["code"])
        for r in doc["ranges"]
        if r["verdict"] == "rejected"
    }
    assert rejected == {(30000, 30999, 13), (31000, 31999, 3)}


def test_drop_and_reject_with_unlimited_icmp_need_no_tests() -> None:
    """A kinder world, set up on purpose: a router that answers every datagram."""
    path = Path(rules=DEMO, icmp_unlimited=True)
    sim, doc = run(path)
    right(sim, doc, path)
    assert doc["probe_stats"]["icmp_tests"] == 0
    assert all("inferred" not in r for r in doc["ranges"])


def test_a_stage_whose_every_cell_is_credited_does_not_wait_out_its_settle() -> None:
    """Nothing is in flight once every cell a stage sent was credited: the run ends a
    receipt batch after its last datagram, not a settle wait (delay x 1.25 + 20 ms) later.
    A stage with a dark cell still waits the whole settle for a late datagram."""
    sim, doc = run(Path())
    assert doc["summary"]["open"] == 64512
    sweep = sim.sweep
    assert sim.now - sweep._last_send < 0.5 * sweep.settle_wait()

    dark = Path(rules=[Rule("drop", (40000, 40000))], icmp_rate=1e6, icmp_burst=1e6)
    sim, doc = run(dark, src_ports="39000-40999")
    right(sim, doc, dark)
    assert sim.now - sim.sweep._last_send >= sim.sweep.settle_wait()


def test_two_destination_ports_with_different_policies() -> None:
    path = Path(
        rules=[Rule("drop", (2000, 2999), dsts=(5000,)), Rule("reject", (2500, 2599), dsts=(5001,))]
    )
    sim, doc = run(path, src_ports="1024-4095", dst_ports=(5000, 5001))
    right(sim, doc, path)


# -- rejects under rate-limited ICMP (Linux: 1/s, burst 6) -----------------------------------


def test_reject_range_under_the_kernels_icmp_limit_is_rejected_with_inferred_cells() -> None:
    path = Path(rules=DEMO)
    sim, doc = run(path)
    right(sim, doc, path)
    rejected = [r for r in doc["ranges"] if r["verdict"] == "rejected"]
    assert [(r["first"], r["last"]) for r in rejected] == [(30000, 30999)]
    assert rejected[0]["icmp"] == {"type": 3, "code": 13, "from": ROUTER, "verified": True}
    assert 0 < rejected[0]["inferred"] < 1000  # samples of its own, the rest inferred
    assert doc["probe_stats"]["icmp_tests"] >= 1
    assert any("rate-limited" in w for w in doc["warnings"])
    assert sim.now < 30  # tens of seconds, not nmap's hours


SMALL_PLAN = "19900-20299,29900-30099,50000-50099"  # 700 source ports across three rules
THREE = [
    Rule("reject", (20000, 29999)),
    Rule("drop", (30000, 30999)),
    Rule("reject", (50000, 50999), icmp=(3, 3)),
]


@pytest.mark.parametrize(
    ("dsts", "icmp_delay"), [((5000,), 0.0), ((5000, 5001), 0.0), ((5000,), 0.9)]
)
def test_a_short_run_after_another_still_finds_the_rejects(
    dsts: tuple[int, ...], icmp_delay: float
) -> None:
    """A run shorter than the router's refill, started when its bucket was empty (the run
    before spent it, or this host's other traffic did), saw no error at all and reported
    every reject a confirmed drop, with no warning (the real lab: 1,000 of 1,000 cells, in
    0.2 s). The dark runs now get one look after a refill before silence is trusted, and
    its errors get the floor a datagram gets (--max-delay, 1 s) to come back."""
    path = Path(rules=THREE, icmp_drained=True, icmp_delay=icmp_delay)
    sim, doc = run(path, src_ports=SMALL_PLAN, dst_ports=dsts)
    right(sim, doc, path)
    rejected = {r["icmp"]["code"] for r in doc["ranges"] if r["verdict"] == "rejected"}
    assert rejected == {13, 3}, doc["ranges"]
    assert doc["probe_stats"]["icmp_errors"] > 0


@pytest.mark.parametrize(
    "kw",
    [{"copies": 2}, {"settings": SweepSettings(max_datagrams=1400)}],
    ids=["copies-spent", "datagram-cap"],
)
def test_where_the_look_cannot_go_the_silence_is_not_taken_for_drops(kw: dict) -> None:
    """--copies spent by the rounds, or the run's cap reached: no look, and the silence
    was called confirmed drops all the same (500 of 500 rejects wrong)."""
    path = Path(rules=THREE, icmp_drained=True)
    sim, doc = run(path, src_ports=SMALL_PLAN, **kw)
    right(sim, doc, path)
    assert sum(r.get("icmp_limited", 0) for r in doc["ranges"]) >= 500
    assert any("could not be sent again after a router's refill" in w for w in doc["warnings"])


def test_tests_that_end_for_want_of_a_control_do_not_blame_the_budget() -> None:
    """With --copies 3 the look found the router, but every cell it had rejected had used
    its copies: the tests ended at once, and the warning said "within the 20s ICMP budget"
    after 2.3 s."""
    path = Path(rules=THREE, icmp_drained=True)
    sim, doc = run(path, src_ports=SMALL_PLAN, copies=3)
    right(sim, doc, path)
    (said,) = [w for w in doc["warnings"] if "icmp_limited" in w]
    assert "ICMP budget" not in said, said
    assert "as --copies left no cell a sender rejected to test them by" in said, said


def test_a_drop_only_path_costs_one_look() -> None:
    """No sender anywhere: the look finds nothing, the drops stand, and it costs the
    refill's wait and the errors' (about 2.3 s), not the ICMP budget."""
    path = Path(rules=[Rule("drop", (30000, 30999))], icmp_drained=True)
    sim, doc = run(path, src_ports=SMALL_PLAN)
    right(sim, doc, path)
    assert doc["summary"]["blocked"] == 100  # 30000-30099
    assert doc["probe_stats"]["icmp_tests"] == 1
    assert not any(r.get("icmp_limited") for r in doc["ranges"])
    assert sim.now < 3.0  # the refill, then --max-delay for errors to come back


def test_a_sweep_longer_than_a_refill_needs_no_look() -> None:
    path = Path(rules=DEMO[:1])  # a drop band; nothing rejects
    sim, doc = run(path, src_ports="1024-65535", rate=20_000)  # 3 s of sending
    right(sim, doc, path)
    assert doc["probe_stats"]["icmp_tests"] == 0


def test_progress_says_how_long_the_icmp_tests_may_take() -> None:
    """The cell count stands still while silent cells are tested (up to the budget): the
    progress line sat there for 18 s with nothing to say how long yet."""
    sim = SimRun(Path(rules=DEMO))
    seen: list[dict] = []
    sim.run(stop=lambda sweep: bool(seen.append(sweep.progress(sim.now))))
    left = [p["icmp_left"] for p in seen if p["stage"] == "icmp"]
    budget = sim.sweep.icmp_budget
    assert left, "no progress while testing"
    assert left[0] == math.ceil(budget)
    assert min(left) >= 0
    assert left == sorted(left, reverse=True)  # counts down
    assert all("icmp_left" not in p for p in seen if p["stage"] != "icmp")


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(1.0, 6.0), (2.0, 1.0), (10.0, 6.0)],
    ids=["linux-1s-burst-6", "cisco-500ms", "10-per-s-burst-6"],
)
def test_the_report_names_the_icmp_senders_limit_it_measured(rate: float, burst: float) -> None:
    """The rate limit in the warning and the document is measured from the errors' arrival
    times (the engine's own schedule of test bursts must not show through)."""
    path = Path(rules=DEMO, icmp_rate=rate, icmp_burst=burst)
    for seed in (1, 2, 3):
        sim, doc = run(path, seed=seed)
        right(sim, doc, path)
        got = doc["icmp_senders"][ROUTER]
        assert got["period"] == pytest.approx(1 / rate, rel=0.1), got
        assert abs(got["burst"] - burst) <= 1, got
        said = [w for w in doc["warnings"] if "rate-limited" in w]
        assert f"{ROUTER} about 1 per {got['period']:.2g}s after a burst of {got['burst']}" in (
            said[0] if said else ""
        ), said


def test_two_runs_of_an_unchanged_policy_agree() -> None:
    path = Path(rules=DEMO)
    docs = [SimRun(path, seed=seed).run() for seed in (1, 2)]
    assert verdicts(docs[0]) == verdicts(docs[1])


def test_a_reject_next_to_a_drop_is_split_at_the_right_port() -> None:
    path = Path(rules=[Rule("reject", (30000, 30999)), Rule("drop", (31000, 31999))])
    sim, doc = run(path)
    right(sim, doc, path)


def test_a_reject_island_in_a_drop_range_is_found_or_said_to_be_unknown() -> None:
    path = Path(rules=[Rule("drop", (40000, 49999)), Rule("reject", (45000, 45099))])
    sim, doc = run(path)
    right(sim, doc, path)  # icmp_limited cells count as right only where truth is dark


def test_icmp_budget_zero_reports_icmp_limited_never_a_plain_blocked() -> None:
    path = Path(rules=DEMO)
    sim, doc = run(path, settings=SweepSettings(icmp_budget=0))
    right(sim, doc, path)
    limited = sum(r.get("icmp_limited", 0) for r in doc["ranges"])
    assert limited > 900  # the reject range's silent cells: not known to be drops
    assert doc["probe_stats"]["icmp_tests"] == 0
    assert any("icmp_limited" in w for w in doc["warnings"])


def test_forged_header_only_errors_never_settle_a_cell_alone() -> None:
    """An off-path forger (no secret) can only quote headers: such errors are weak
    evidence, retried past, and never make a lossy open cell rejected."""
    path = Path(rules=[Rule("drop", (40000, 40999))], loss=[((20000, 20999), 0.3)], forged_icmp=0.2)
    _sim, doc = run(path, src_ports="1024-65535")
    got = verdicts(doc)
    assert all(got[(5000, s)] == "open" for s in range(20000, 21000))
    weak = [r for r in doc["ranges"] if r["verdict"] == "rejected"]
    assert all(r["icmp"]["verified"] is False for r in weak)
    assert doc["probe_stats"]["icmp_unverified"] > 0


def test_a_quote_with_a_wrong_mac_is_forged_and_ignored() -> None:
    from udpreach.core.sweep import IcmpReport

    sim = SimRun(Path(), src_ports="1024-1100")
    sweep = sim.sweep
    act = sweep.next_action(0.0)
    assert isinstance(act, Send)
    sweep.on_sent(act, None, 0.0)
    dst, attempt, srcs = act.groups[0]
    genuine = sim.codec.encode(dst, int(srcs[0]), attempt)
    forged = genuine[:8] + bytes(8)
    sweep.on_icmp([IcmpReport(dst, int(srcs[0]), 3, 13, ROUTER, quote=forged)], 0.001)
    assert sweep.facts.icmp_forged == 1
    assert sweep.ledger.verdict(dst, int(srcs[0])) == "unknown"  # still pending
    sweep.on_icmp([IcmpReport(dst, int(srcs[0]), 3, 13, ROUTER, quote=genuine)], 0.002)
    assert sweep.ledger.verdict(dst, int(srcs[0])) == "rejected"


# -- loss where it is -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        Path(loss=[((20000, 29999), 0.5)], rules=[Rule("drop", (40000, 49999))]),
        Path(ecmp_loss=(4, 0.5)),
        Path(loss=[((1024, 65535), 0.2)]),
    ],
    ids=["one-band-50%", "one-ecmp-member-50%", "uniform-20%"],
)
def test_loss_is_not_a_block(path: Path) -> None:
    sim, doc = run(path)
    right(sim, doc, path)
    assert doc["loss"]["confidence_reached"] is True
    assert doc["loss"]["false_blocked_bound"] <= 0.01
    # Where the loss is: a band that loses is named (its edges, give or take the first
    # cells that happened to get through); loss spread over the plan, evenly or by a hash
    # of the flow (an ECMP member), has no place.
    where = doc["loss"].get("where")
    if path.loss and path.loss[0][0] == (20000, 29999):
        ((d, first, last),) = [(r["dst_port"], r["first"], r["last"]) for r in where]
        assert d == 5000
        assert 20000 <= first <= 20010
        assert 29990 <= last <= 29999
        assert where[0]["estimate"] == pytest.approx(0.5, abs=0.05)
        assert doc["loss"]["elsewhere"] < 0.01
        assert ", not spread: " in facts.confidence(doc).loss_text
        assert "% in 5000: 200" in facts.confidence(doc).loss_text
    else:
        assert where is None
        assert "not spread" not in facts.confidence(doc).loss_text


def test_no_delivery_at_all_means_loss_unknown_not_zero() -> None:
    _sim, doc = run(Path(rules=[Rule("drop", (0, 65535))]), src_ports="1024-2047")
    assert doc["summary"]["blocked"] == 1024
    assert doc["loss"]["estimate"] is None
    assert doc["loss"]["false_blocked_bound"] is None
    assert doc["loss"]["confidence_reached"] is False
    # A pipeline that reads only the warnings hears it too.
    assert [w for w in doc["warnings"] if w.startswith("confidence target not reached")] == [
        "confidence target not reached: nothing got through, so the loss on the path is "
        "unknown and a 'blocked' cell may yet be open"
    ]


def test_retries_stop_at_the_copies_ceiling_and_say_the_target_was_missed() -> None:
    path = Path(loss=[((1024, 65535), 0.8)])
    _sim, doc = run(path, src_ports="1024-3071", copies=3)
    assert doc["loss"]["attempts"] <= 3
    assert doc["probe_stats"]["sent"] <= 3 * 2048
    assert doc["loss"]["confidence_reached"] is False
    said = [w for w in doc["warnings"] if w.startswith("confidence target not reached")]
    assert len(said) == 1
    assert f"up to {doc['loss']['false_blocked_bound']:.2g} (target 0.01)" in said[0]


# -- late datagrams ---------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.1, 1.0])
def test_udp_delay_is_measured_from_receipts(delay: float) -> None:
    """UDP delayed (the control channel not): the rounds wait for what is in flight."""
    path = Path(udp_delay=delay, rules=[Rule("drop", (40000, 49999))])
    sim, doc = run(path, src_ports="random:500")
    right(sim, doc, path)
    assert doc["probe_stats"]["udp_delay"] >= delay
    assert doc["loss"]["estimate"] == 0.0


def test_delay_beyond_max_delay_with_no_evidence_yet_can_be_raised() -> None:
    path = Path(udp_delay=2.5)
    sim, doc = run(path, src_ports="random:200", settings=SweepSettings(max_delay=3.0))
    right(sim, doc, path)


# -- path MTU ---------------------------------------------------------------------------------


def test_fragmentation_needed_is_a_path_mtu_finding_not_a_reject() -> None:
    path = Path(mtu=1280)
    _sim, doc = run(path, size=1472, src_ports="1024-3023")
    assert doc["summary"]["open"] == 2000
    assert doc["path_mtu"] == {"mtu": 1280, "from": ROUTER, "size": 1472}
    assert any("path MTU" in w for w in doc["warnings"])


def test_a_firewall_that_drops_fragments_gives_blocked_with_the_mtu_warning() -> None:
    path = Path(mtu=1280, drop_fragments=True)
    _sim, doc = run(path, size=1472, src_ports="1024-3023")
    assert doc["summary"]["blocked"] == 2000
    assert doc["path_mtu"]["mtu"] == 1280


# -- paths that change or fill up ---------------------------------------------------------------


def test_a_policy_change_mid_run_is_said_and_the_latest_evidence_wins() -> None:
    path = Path(later=(0.4, [Rule("drop", (40000, 49999))]))
    sim, doc = run(path)
    right(sim, doc, path, at=1e9)
    assert doc["probe_stats"]["epochs"] == 2
    assert any("path changed during the run" in w for w in doc["warnings"])
    assert len(doc["ranges"]) == 3
    # A range counts the datagrams its verdict rests on, the repeat's: the blocked one got
    # some through in the first sweep, yet says none arrived (the contract's blocked).
    (blocked,) = [r for r in doc["ranges"] if r["verdict"] == "blocked"]
    assert blocked["received"] == 0
    assert 0 < blocked["sent"] < doc["probe_stats"]["sent"]
    opened = [r for r in doc["ranges"] if r["verdict"] == "open"]
    assert all(0 < r["received"] <= r["sent"] for r in opened)
    # The warning names every cell the repeat closed, not only the recheck's samples.
    (closed,) = [w for w in doc["warnings"] if "were dark in the repeat" in w]
    assert re.search(r"between 4\d{4} and 4\d{4}", closed), closed


def test_a_limit_per_flow_is_named_with_the_whole_band_it_closed() -> None:
    """A per-flow meter (nft `meter flows { udp sport limit rate over 1/minute burst 1
    packets } drop`, an adversarial review's): each source port's first datagram passes,
    later ones not. The recheck finds open cells dark, and the repeat finds the band dark:
    the latest evidence wins, as for a changed policy; the warning named 8-10 sampled ports
    of 10,000, and now says the whole band and that a per-flow limit looks the same."""
    passed: set[tuple[int, int]] = set()

    class _FirstOnly(Rule):  # and a plain drop band, so that the sweep leaves dark cells
        def matches(self, dst: int, src: int) -> bool:
            if 35000 <= src <= 35999:
                return True
            if not 20000 <= src <= 29999:
                return False
            if (dst, src) in passed:
                return True
            passed.add((dst, src))
            return False

    rule = _FirstOnly("drop", (20000, 35999))
    path = Path(rules=[rule])
    # Decided per datagram (the path's tables would ask each port once, ahead).
    path.rule_at = lambda now, dst, src: rule if rule.matches(dst, src) else None  # type: ignore[method-assign]
    sim = SimRun(path, src_ports="10000-39999")
    doc = sim.run()
    assert doc["probe_stats"]["epochs"] == 2
    (closed,) = [w for w in doc["warnings"] if "were dark in the repeat" in w]
    assert closed.startswith("10,000 cells the first sweep found open"), closed
    assert "source ports 20000-29999" in closed
    assert "limit per flow" in closed


@pytest.mark.parametrize("at", [0.3, 0.4, 0.5])
def test_a_reject_range_that_appears_mid_run_is_never_called_dropped(at: float) -> None:
    # The recheck that finds the change draws the router's burst of errors; the repeated
    # sweep must not meet the reject range with the bucket still empty and call it silent.
    new = [Rule("drop", (20000, 24999)), Rule("reject", (30000, 30999))]
    path = Path(later=(at, new))
    sim, doc = run(path)
    assert doc["probe_stats"]["epochs"] == 2
    bad = mismatches(doc, truth(path, sim.plan.dst_ports, sorted(set(sim.plan.src_ports)), 1e9))
    assert bad == [], f"{len(bad)} wrong, e.g. {bad[:5]}"


def test_a_reject_that_became_a_drop_early_in_the_run_is_said() -> None:
    """The review's q07: the policy swapped a reject band to a drop after 5,000 datagrams.
    The router's first six errors came before the swap, the recheck found nothing changed
    (no cell was open), and the report showed six rejected ports amid an icmp_limited band
    with no word of a change. It answered nothing in any later test burst, each holding a
    cell it had rejected before, sent when it had refilled: it stopped rejecting them."""
    new = [Rule("drop", (30000, 39999))]
    path = Path(rules=[Rule("reject", (30000, 39999))], later=(0.05, new))
    _sim, doc = run(path)
    (said,) = [w for w in doc["warnings"] if "answered nothing in the last" in w]
    assert said.startswith(f"{ROUTER} answered nothing in the last")
    assert "the path changed during the run" in said


def test_a_session_limit_is_reported_by_time_not_as_a_blocked_range() -> None:
    sim, doc = run(Path(session_limit=2000))
    assert doc["complete"] is False
    assert doc["summary"]["blocked"] == 0
    assert doc["summary"]["open"] == 2000
    (said,) = [w for w in doc["warnings"] if "stopped by time" in w]
    assert "2,000 flows" in said
    # The evidence: a while later, flows that had got through still do, and no new one.
    assert "of the flows that had got through still did, and no new one" in said
    assert sim.now < 5


@pytest.mark.parametrize(
    ("outages", "dsts"),
    [([(0.25, 0.40)], [5000]), ([(0.25, 0.40)], [5000, 5001, 5002]), ([(0.3, 2.3)], [5000])],
    ids=["150ms", "150ms-3-ports", "2s"],
)
def test_an_outage_during_the_sweep_is_waited_out_not_taken_for_a_limit(
    outages: list[tuple[float, float]], dsts: list[int]
) -> None:
    """Everything lost for a moment in round 1 (a link down, a firewall reload): four dark
    windows in a row read as a session limit, and the run ended with 49,260 of 64,512 cells
    unknown. Delivery is looked at again a while later; it is back, so the sweep goes on,
    every verdict is the policy's, and a warning says what happened."""
    path = Path(outages=outages, rules=[Rule("drop", (45000, 45999))])
    sim, doc = run(path, dst_ports=dsts)
    assert doc["complete"] is True
    right(sim, doc, path)
    (said,) = [w for w in doc["warnings"] if "came back" in w]
    assert said.startswith("delivery stopped by time during the sweep and came back (once, ")
    assert not [w for w in doc["warnings"] if "unknown" in w or "session" in w]
    assert sim.now < outages[0][1] + 5


@pytest.mark.parametrize("seed", [1, 5])
def test_an_outage_look_sends_its_new_and_open_cells_interleaved(seed: int) -> None:
    """A look sends its cells in its shuffled order. Sent by attempt, all its new cells went
    before its open ones, and an outage that ended between the two (these seeds: 0.05-0.5 s)
    let only the open ones through: read as a filled session table, the run ended with
    62,871 cells unknown."""
    path = Path(outages=[(0.05, 0.5)], rules=[Rule("drop", (45000, 45999))], seed=seed)
    sim = SimRun(path, seed=seed)
    sweep = sim.sweep
    looks: list[tuple[list[int], list[int]]] = []  # (the look's order, the order sent)
    real = sweep._send_batch

    def spy(now: float) -> object:
        if sweep.stage is not Stage.OUTAGE:
            return real(now)
        start = sweep._qpos
        action = real(now)
        queued = sweep._queue[start : sweep._qpos].tolist()
        sent = [s for _, _, srcs in action.groups for s in srcs.tolist()]  # type: ignore[attr-defined]
        looks.append((queued, sent))
        return action

    sweep._send_batch = spy  # type: ignore[method-assign]
    doc = sim.run()
    assert looks
    assert all(sent == queued for queued, sent in looks)
    assert doc["complete"] is True
    right(sim, doc, path)


def test_delivery_that_never_comes_back_ends_the_run_in_bounded_time() -> None:
    """A policy that drops everything from 0.3 s on: no established flow passes either, so
    it is not called a limit; the looks give up after 7.75 s and the rest is unknown."""
    sim, doc = run(Path(later=(0.3, [Rule("drop", (0, 65535))])))
    assert doc["complete"] is False
    assert doc["summary"]["blocked"] == 0
    (said,) = [w for w in doc["warnings"] if w.startswith("delivery stopped by time")]
    assert "did not come back in 5 looks over 7.75 s" in said
    assert sim.now < 15


@pytest.mark.parametrize("pool", [10, 100, 300])
def test_a_nat_pool_that_fills_on_one_band_is_a_limit_by_time_with_no_rule(pool: int) -> None:
    """A NAT pool of ``pool`` flows on one band of 1,000 source ports: its first flows get
    through, every later one is dropped. The verdicts are what crossed; the report says
    where delivery stopped by time and after how many flows, not "single ports", and the
    recommendation gives no rule for those cells (a rule would not open them)."""
    band = (40000, 40999)
    path = Path(session_limit=pool, session_band=band, rules=[Rule("drop", (50000, 50999))])
    sim, doc = run(path)
    crossed = set(sim.crossed())
    got = verdicts(doc)
    assert {c for c, v in got.items() if v == "open"} == crossed
    assert {c for c, v in got.items() if v == "blocked"} == {
        (5000, s) for s in range(40000, 51000) if (5000, s) not in crossed
    }
    (said,) = [w for w in doc["warnings"] if w.startswith(schema.FILLED_WARNING)]
    m = re.search(r"in 5000: (\d+)-(\d+): the ([\d,]+) flows sent there first", said)
    assert m, said
    first, last, flows = int(m.group(1)), int(m.group(2)), int(m.group(3).replace(",", ""))
    assert band[0] <= first <= band[0] + 10, said
    assert band[1] - 10 <= last <= band[1], said
    assert flows == len([s for _, s in crossed if first <= s <= last]), said
    assert not [w for w in doc["warnings"] if "single ports" in w]
    advice = recommend(doc)
    (rule,) = advice["rules"]
    assert rule["src_ports"] == "50000-50999"  # the drop band's rule, none for the pool's
    assert rule["cells"] == 1000
    assert any("where delivery stopped by time" in n for n in advice["notes"])


@pytest.mark.parametrize(
    "path",
    [
        Path(rules=DEMO),
        Path(loss=[((20000, 29999), 0.5)], rules=[Rule("drop", (40000, 49999))]),
        Path(loss=[((1024, 65535), 0.8)]),
        Path(band_police=((20000, 29999), 1000, 5)),
        Path(later=(0.3, [Rule("drop", (40000, 49999))])),
    ],
    ids=["port-rules", "loss-on-a-band", "loss-80%", "policer-on-a-band", "policy-change"],
)
def test_port_rules_loss_and_policers_are_never_a_limit_by_time(path: Path) -> None:
    """What the sending order has nothing to do with is never said as a limit by time (a
    policy that changed is said as that, and the repeat's verdicts stand)."""
    _sim, doc = run(path)
    assert not [w for w in doc["warnings"] if w.startswith(schema.FILLED_WARNING)]


# -- as fast as the path allows -------------------------------------------------------------------


@pytest.mark.parametrize("rate", [5000, 50000])
def test_a_policer_on_the_whole_path_is_found_and_followed(rate: int) -> None:
    path = Path(police=(rate, 5))
    sim, doc = run(path)
    right(sim, doc, path)
    clean = SimRun(Path()).run()
    fixed = clean["finished"]
    assert sim.now <= 1.5 * 64512 / rate + fixed
    assert doc["loss"]["limiter_rate"] == pytest.approx(rate, rel=0.25)


def test_a_policer_on_one_band_slows_only_the_retries() -> None:
    path = Path(band_police=((20000, 29999), 1000, 5))
    sim, doc = run(path)
    right(sim, doc, path)
    assert sim.now < 20  # about 10,000 band cells at 1,000/s


@pytest.mark.parametrize("ports", [2, 3])
def test_a_policer_on_one_band_never_blackens_one_destination_port(ports: int) -> None:
    """A 500/s policer (burst 5) on a source band, several destination ports sent back to
    back: the first port's datagram of each source port took the token and the others were
    dropped, every time, so their blocks held nothing and were taken for dark bands: 4,800
    (two ports) and 1,491 (three) open cells blocked, confidence not reached (the lab's
    adversarial q3 found 81-239). A block dark on one port whose source ports lose datagrams
    on another is retried as lossy."""
    path = Path(band_police=((25000, 34999), 500, 5))
    sim, doc = run(path, src_ports="15000-40000", dst_ports=tuple(range(5000, 5000 + ports)))
    right(sim, doc, path)
    assert doc["loss"]["confidence_reached"]


def test_a_slow_policer_on_one_band_is_followed_by_the_retries() -> None:
    """A 300/s policer on 5,000 source ports of a full sweep, a reject range elsewhere: each
    retry round at full speed lasted 40 ms and credited about 16 cells, too few to judge a
    round by, so the retries never slowed; after 46 rounds 4,172 open cells were reported
    blocked (confidence not reached). Small rounds now add up, and the retries come down to
    the rate the band passes."""
    path = Path(
        rules=[Rule("reject", (50000, 54999)), Rule("drop", (52000, 52499))],
        band_police=((10000, 14999), 300, 5),
    )
    sim, doc = run(path)
    right(sim, doc, path)
    assert doc["loss"]["confidence_reached"]
    assert sim.now < 60  # 5,000 band cells at 300/s: 17 s at least


def test_a_band_going_dark_is_not_a_reason_to_slow_down() -> None:
    path = Path(later=(0.3, [Rule("drop", (40000, 49999))]))
    sim = SimRun(path)
    sim.run()
    assert sim.sweep.pacer.limit_found is None


# -- the agent and the requester -------------------------------------------------------------------


def test_a_lost_agent_leaves_unknown_not_blocked() -> None:
    _sim, doc = run(Path(agent_lost_at=0.3))
    assert doc["complete"] is False
    assert doc["summary"]["blocked"] == 0
    assert doc["summary"]["unknown"] > 0
    assert doc["summary"]["open"] > 0


def test_an_agent_that_reports_what_was_never_sent_is_refused_and_flagged() -> None:
    _sim, doc = run(Path(), agent="liar", src_ports="1024-9999")
    assert doc["complete"] is False
    assert doc["probe_stats"]["refused_receipts"] > 0
    assert any("never sent" in w for w in doc["warnings"])


def test_cancel_ends_the_run_incomplete() -> None:
    sim = SimRun(Path())
    sweep = sim.sweep
    act = sweep.next_action(0.0)
    assert isinstance(act, Send)
    sweep.on_sent(act, None, 0.0)
    sweep.cancel(0.01)
    assert isinstance(sweep.next_action(0.01), Finished)
    assert sweep.phase is Phase.INCOMPLETE
    assert "cancelled" in sweep.facts.warnings[-1]


def test_an_agent_that_stops_answering_flushes_ends_the_run() -> None:
    sim = SimRun(Path(), src_ports="1024-1100")
    sweep = sim.sweep
    now = 0.0
    while True:
        act = sweep.next_action(now)
        if isinstance(act, Send):
            sweep.on_sent(act, None, now)
        elif isinstance(act, Wait):
            now = act.until
        elif isinstance(act, Finished):
            break
        assert now < 60
    assert sweep.phase is Phase.INCOMPLETE
    assert any("did not answer" in w for w in sweep.facts.warnings)


# -- ceilings ----------------------------------------------------------------------------------


def test_max_datagrams_stops_before_a_round_that_would_pass_it() -> None:
    path = Path(rules=[Rule("drop", (2000, 2999))])
    _sim, doc = run(path, src_ports="1024-3071", settings=SweepSettings(max_datagrams=2500))
    assert doc["probe_stats"]["sent"] <= 2500
    assert any("2500 datagrams" in w for w in doc["warnings"])
    assert doc["loss"]["confidence_reached"] is False


def test_a_byte_cap_counts_headers_and_payload() -> None:
    path = Path(rules=[Rule("drop", (2000, 2999))])
    cap = 2048 * (1000 + 28) + 100
    _sim, doc = run(path, src_ports="1024-3071", size=1000, settings=SweepSettings(max_bytes=cap))
    assert doc["probe_stats"]["bytes"] <= cap
    assert any("bytes" in w for w in doc["warnings"])


def test_a_byte_rate_ceiling_paces_big_datagrams() -> None:
    sim = SimRun(
        Path(), src_ports="1024-2047", size=9000, settings=SweepSettings(byte_rate=10_000_000)
    )
    assert sim.sweep.pacer.ceiling == pytest.approx(10_000_000 / 9028)
    sim.run()
    assert sim.now >= 1024 * 9028 / 10_000_000 * 0.9


def test_the_document_names_the_agent_target() -> None:
    _sim, doc = run(Path(), src_ports="1024-1100")
    assert doc["probe"]["target"] == AGENT


def test_delivery_that_stops_after_the_sweep_is_said_not_taken_for_a_new_policy() -> None:
    """Nothing gets through the recheck at all (the path went down, or the agent's host ran
    out of fragment reassembly memory): not a changed policy to sweep again, a run that is
    not complete, with the sweep's own verdicts."""
    # The sweep is over in 0.09 s of fake time; the path goes down just before the recheck.
    path = Path(rules=[Rule("drop", (2000, 2099))], later=(0.085, [Rule("drop", (0, 65535))]))
    _sim, doc = run(path, src_ports="1024-3023")
    assert doc["complete"] is False
    assert doc["probe_stats"]["epochs"] == 1
    assert doc["summary"]["open"] == 1900
    assert any("nothing got through any more" in w for w in doc["warnings"])


def _with_agent_stats(sim: SimRun, stats: dict[str, object]) -> None:
    """The agent's stats at every flush are ``stats`` (the simulated agent keeps none)."""
    original = sim.sweep.on_flushed

    def with_stats(seq: int, now: float, _stats: object = None) -> None:
        original(seq, now, dict(stats))

    sim.sweep.on_flushed = with_stats  # type: ignore[method-assign]


def _fragmented_run(failures: int, timeouts: int) -> dict:
    """A drop band of 100 ports, 3,000-byte datagrams over a 1,500 MTU, and an agent whose
    host reports ``failures`` lost and ``timeouts`` timed-out fragmented datagrams."""
    sim = SimRun(Path(rules=[Rule("drop", (2000, 2099))]), src_ports="1024-3023", size=3000)
    sim.sweep.route_mtu = 1500
    stats = {
        "accepted": 0,
        "rejected": {},
        "reassembly_failures": failures,
        "reassembly_timeouts": timeouts,
    }
    _with_agent_stats(sim, stats)
    return sim.run()


def test_reassembly_failures_on_the_agents_host_make_dark_cells_unknown() -> None:
    """Fragments a port firewall let through fill the agent host's reassembly memory:
    every fragmented datagram is then lost, open or not. The agent says so, and dark cells
    are unknown, not blocked."""
    sim = SimRun(Path(rules=[Rule("drop", (2000, 2099))]), src_ports="1024-3023", size=3000)
    sim.sweep.route_mtu = 1500  # 3000 bytes go out in fragments
    _with_agent_stats(sim, {"accepted": 0, "rejected": {}, "reassembly_failures": 612})
    doc = sim.run()
    assert doc["complete"] is False
    assert doc["summary"]["blocked"] == 0
    assert doc["summary"]["unknown"] == 100
    assert any("failed to reassemble 612" in w for w in doc["warnings"])


def test_fragments_lost_at_the_agents_host_beyond_timeouts_make_dark_cells_unknown() -> None:
    """With the timeouts counted apart, the host's other losses (a full memory, overlapping
    fragments) still leave dark cells unknown."""
    doc = _fragmented_run(failures=3, timeouts=40)
    assert doc["complete"] is False
    assert doc["summary"]["unknown"] == 100
    assert any("host lost 3 fragmented datagrams" in w for w in doc["warnings"])


def test_fragments_that_only_timed_out_at_the_agents_host_leave_the_verdicts() -> None:
    """A port firewall drops a datagram's first fragment and passes the rest, which time out
    at the agent's host (30 s): each timeout is a datagram dropped on the way, and harms no
    other. Nothing else lost: dark cells are blocked as usual, and the report says why
    fragments timed out."""
    doc = _fragmented_run(failures=0, timeouts=100)
    assert doc["complete"] is True
    assert doc["summary"]["blocked"] == 100
    assert doc["summary"]["unknown"] == 0
    assert any("100 fragmented datagrams timed out" in w for w in doc["warnings"])
    assert any("reject may not answer a fragment" in w for w in doc["warnings"])


def test_a_band_the_tests_find_open_after_the_sweep_says_the_path_changed() -> None:
    """A drop band lifted after the sweep, while the ICMP tests of a reject band go on (a
    review's rule flapping every 2 s came out as a mixture and no word of a change): the
    tests deliver cells that were dark through every round. They count as open, the latest
    evidence, and the report says the path changed, with where."""
    rules = [Rule("drop", (30000, 39999)), Rule("reject", (50000, 50999))]
    path = Path(rules=rules, later=(1.5, rules[1:]))
    _, doc = run(path)
    opened = sum(  # the band's open cells
        max(0, min(r["last"], 39999) - max(r["first"], 30000) + 1)
        for r in doc["ranges"]
        if r["verdict"] == "open"
    )
    assert opened >= 10
    changed = [w for w in doc["warnings"] if w.startswith("the path changed during the run")]
    assert len(changed) == 1
    assert f"{opened:,} cells dark through the sweep" in changed[0]
    assert "dst 5000 source ports 3" in changed[0]
    steady = SimRun(Path(rules=rules)).run()  # the same policy throughout: no such word
    assert not any("dark through the sweep" in w for w in steady["warnings"])


def test_open_cells_scattered_in_a_blocked_band_are_flagged() -> None:
    """Single open ports inside a dropped band (here accept rules; a NAT pool that filled,
    a session table or a changing policy look the same): each blocked cell is a fact, but
    the pattern is said (a review's full NAT pool in one band was only called "blocked
    cells scattered among open ones" at its edge)."""
    rules = [Rule("drop", (30000, 39999))]
    rules += [Rule("accept", (p, p)) for p in range(30000, 40000, 50)]
    path = Path(rules=rules)
    sim, doc = run(path, src_ports="25000-44999")
    right(sim, doc, path)
    lit = [w for w in doc["warnings"] if w.startswith("open cells lie scattered")]
    assert len(lit) == 1
    assert "5000: 30" in lit[0]
    plain = SimRun(Path(rules=rules[:1]), src_ports="25000-44999").run()
    assert not any(w.startswith("open cells lie scattered") for w in plain["warnings"])


def test_datagrams_changed_or_duplicated_on_the_way_are_said_in_the_report() -> None:
    """Corruption, truncation and duplication leave the verdicts right (a changed datagram
    fails its check and counts as lost; a copy counts once), and the report says how many
    the agent threw away and why, not only the document's ``agent_stats``."""
    path = Path(rules=[Rule("drop", (2000, 2099))], corrupt=0.03, truncate=0.02, duplicate=0.2)
    sim, doc = run(path, src_ports="1024-5023")
    right(sim, doc, path)
    rejected = doc["agent_stats"]["rejected"]
    assert rejected.get("bad_mac", 0) + rejected.get("malformed", 0) > 0
    assert rejected.get("duplicate", 0) > 0
    refused = [w for w in doc["warnings"] if w.startswith("the agent refused")]
    assert len(refused) == 1
    mac, size = rejected.get("bad_mac", 0), rejected.get("malformed", 0)
    assert (
        f"{mac:,} with a MAC that does not verify" in refused[0]
        if size
        else (f"refused {mac:,} datagrams whose MAC does not verify" in refused[0])
    )
    assert any("more copies of datagrams it had already counted" in w for w in doc["warnings"])
    clean = SimRun(Path(rules=[Rule("drop", (2000, 2099))]), src_ports="1024-5023").run()
    assert not any("the agent re" in w for w in clean["warnings"])


def test_reassembly_failures_do_not_matter_when_nothing_was_fragmented() -> None:
    """The host's counter moves for any traffic it receives; unfragmented probe datagrams
    cannot be among the failures, so the verdicts stand."""
    sim = SimRun(Path(rules=[Rule("drop", (2000, 2099))]), src_ports="1024-3023", size=200)
    sim.sweep.route_mtu = 1500
    _with_agent_stats(sim, {"accepted": 0, "rejected": {}, "reassembly_failures": 612})
    doc = sim.run()
    assert doc["complete"] is True
    assert doc["summary"]["blocked"] == 100
    assert not any("reassemble" in w for w in doc["warnings"])


def test_a_datagram_over_the_probes_route_mtu_is_a_path_mtu_finding() -> None:
    sim = SimRun(Path(), src_ports="1024-1123", size=3000)
    sim.sweep.route_mtu = 1500
    doc = sim.run()
    assert doc["path_mtu"] == {"mtu": 1500, "from": "route", "size": 3000}
    assert any("route has an MTU of 1500" in w for w in doc["warnings"])


def test_a_limit_is_only_named_once_errors_came_after_the_burst() -> None:
    from udpreach.core.silence import SenderBucket

    b = SenderBucket(ROUTER)
    assert b.limiter() is None
    for t in (5.0, 5.001, 5.002, 5.003, 5.004, 5.005):  # Linux's burst of six
        b.note(t)
    assert b.limiter() is None  # a burst says nothing of the refill yet
    b.note(6.0)
    assert b.limiter() is None
    for t in (8.0, 8.001, 9.0):  # two tokens waited for, then one
        b.note(t)
    assert b.limiter() == (6, pytest.approx(1.0, rel=0.01))


def test_only_errors_beyond_what_was_asked_lower_the_period() -> None:
    """An answered burst says only that the wait was long enough: lowering the period on
    that alone made a one-a-second sender's next burst miss its control, again and again.
    Errors beyond the tokens waited for (the expected rejects sent after the controls) show
    it refills faster; a missed control doubles it."""
    fast = Path(rules=DEMO, icmp_rate=4.0, icmp_burst=20.0)
    sim, doc = run(fast)
    right(sim, doc, fast)
    assert sim.sweep.senders[ROUTER].period < 0.5
    linux = Path(rules=DEMO)
    sim, doc = run(linux)
    right(sim, doc, linux)
    assert sim.sweep.senders[ROUTER].period == pytest.approx(1.0, rel=0.05)


def test_a_first_burst_spread_by_slow_sending_is_not_taken_for_the_period() -> None:
    """The lab under CI's load: the pilot sent slowly, so Linux's burst of six came back
    over 0.26 s, and the gaps between them were taken for the period (0.18-0.82 s for
    1 s): the tests' controls were missed four times over and 1,976 rejects were left
    icmp_limited. A sustained period shows only after the first burst."""
    from udpreach.core.silence import SenderBucket

    lab = SenderBucket(ROUTER)
    for t in (0.084, 0.108, 0.250, 0.251, 0.251, 0.259, 1.083, 2.123):
        lab.note(t)
    assert lab.measured_period() is None  # two refills: too few to go by
    lab.note(3.12)
    lab.note(4.13)
    assert lab.measured_period() == pytest.approx(1.0, rel=0.05)
    slower = SenderBucket(ROUTER)  # spread over 0.29 s: longer than BURST_WINDOW
    for t in (0.0, 0.093, 0.103, 0.160, 0.290, 0.290, 1.0, 2.117, 3.11):
        slower.note(t)
    assert slower.measured_period() == pytest.approx(1.0, rel=0.15)
    fast = SenderBucket(ROUTER)  # Linux's IPv6 limit: 100 ms after a burst of six
    for t in [0.0, 0.001, 0.002, 0.003, 0.004, 0.005] + [0.1 * k for k in range(1, 10)]:
        fast.note(t)
    assert fast.measured_period() == pytest.approx(0.1, rel=0.05)


def test_errors_booked_at_one_instant_still_give_a_finite_limit() -> None:
    """Errors read in one batch share a timestamp: spans of 0 must not divide by zero."""
    from udpreach.core.silence import MIN_PERIOD, SenderBucket

    b = SenderBucket(ROUTER)
    for t in [1.0] * 6 + [2.0] * 9:
        b.note(t)
    burst, period = b.limiter() or (0, 0.0)
    assert burst >= 1
    assert MIN_PERIOD <= period < 1.0


def test_a_bucket_that_started_half_empty_still_shows_its_burst() -> None:
    """A run right after another finds the sender's bucket partly drained: its first
    errors are fewer than the burst, which shows later, after a long wait, all at once."""
    from udpreach.core.silence import SenderBucket

    b = SenderBucket(ROUTER)
    for t in [0.0, 0.001, 1.0, 2.0] + [8.0] * 6 + [9.0, 10.0]:
        b.note(t)
    assert b.limiter() == (6, pytest.approx(1.0, rel=0.01))


def test_scattered_blocked_cells_without_loss_are_called_a_rule() -> None:
    """Every eighth port dropped, nothing lost: the warning said "loss, not a rule?" with
    the run's loss at 0. And the interleaved reject/drop edge of a dark stretch (blocked
    and rejected cells, no open ones between them) is not "scattered"."""
    path = Path(rules=[_Every("drop", (40000, 49999), lambda x: x % 8 == 0)])
    sim, doc = run(path, src_ports="38000-51999")
    right(sim, doc, path)
    (warning,) = [w for w in doc["warnings"] if "scattered" in w]
    assert "(no loss was seen: a rule on single ports?)" in warning
    bands = [
        Rule("reject" if k % 2 == 0 else "drop", (40000 + 64 * k, 40063 + 64 * k)) for k in range(8)
    ]
    _, doc = run(Path(rules=bands), src_ports="38000-42999")
    assert not [w for w in doc["warnings"] if "scattered" in w], doc["warnings"]


def test_a_run_whose_samples_turn_between_reject_and_drop_often_is_mixed() -> None:
    """Reject next to drop (one turn) or a drop between two rejects (two) can be searched
    and inferred; a third turn means they alternate, and nothing in the run is inferred
    (an ECMP pair out of step in the lab passed the other rules by chance)."""
    import numpy as np

    from udpreach.core import silence

    u, d, r, r2 = silence.U, silence.D, 2, 3  # unlabelled, dropped, two kinds of reject
    assert not silence.mixed(np.array([r, u, r, u, d, u, d]))
    assert not silence.mixed(np.array([r, u, d, d, u, r]))
    assert not silence.mixed(np.array([r, r2, u, d, r]))  # two rejects of other kinds: 2
    assert silence.mixed(np.array([r, u, d, u, r, u, d]))
    assert silence.resolved(np.array([r, r, d, d, u, d]))
    assert not silence.resolved(np.array([r, u, d]))


def test_errors_from_this_hosts_own_firewall_are_not_a_sender_on_the_path() -> None:
    """The probe host's own egress reject answers from the probe's address. The report
    named that address as rate-limiting ICMP "on the path". Its limiter is tested like any
    (the verdicts stay right); the warning says whose it is."""
    path = Path(rules=[Rule("reject", (20000, 20299), sender=PROBE), Rule("drop", (30000, 30099))])
    sim, doc = run(path, src_ports=SMALL_PLAN)
    right(sim, doc, path)
    (said,) = [w for w in doc["warnings"] if "ICMP" in w or "firewall" in w]
    assert f"on the path ({PROBE}" not in said, said
    assert said.startswith(f"ICMP errors from this host's own firewall were rate-limited ({PROBE}")
