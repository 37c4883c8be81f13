"""What a silent cell means when ICMP errors are rate-limited.

Theory of operation. Every router limits the ICMP errors it sends: Linux answers one
destination (our probe's address) about once a second after a burst of six, Cisco once per
500 ms. In a full sweep into a ``reject`` rule almost every datagram therefore meets an empty
bucket and comes back silent: silence there is not a drop. What the run does know:

* a cell with a verified ICMP error of its own is rejected (observed);
* a cell probed while the sender *could* answer, and still silent, is dropped.

"Could answer" is tested without guessing the sender's bucket: a *test burst* sends the
silent cells to test back to back, then one *control* per ICMP sender (a cell that sender
rejected before). Only rejected datagrams spend tokens, and tokens only come back with time,
so if any datagram later in the burst drew an error from a sender, that sender had a token
for every earlier datagram of the burst: each earlier cell that stayed silent would have
been answered had that sender rejected it. A cell is confirmed dropped when that holds for
every sender, twice, in two bursts (a datagram lost before the router must not pass for a
drop); where the path loses datagrams more often, until the loss where the test goes leaves
a chance under 1e-4 that a reject's tests were all lost (about ten bursts at 30% loss). A
burst costs one token per rejected datagram in it, so it holds every cell expected to be
dropped and only as many expected rejects as the sender has had time to refill.

The cells are not tested one by one. A *dark run* is a maximal run of planned source ports
of one destination port between open (or untested) cells. Its cells carry labels: R (an
error of its own, by ICMP type, code and sender), D (confirmed dropped) or none. A run is
settled when both of its ends are labelled, every eighth of it holds a label, no two
confirmed drops are more than ``MAX_GAP_DROP`` cells apart, and no two neighbouring labels
differ without an unlabelled cell between them being searched: between an R and a D (or two
R of different details) points across the gap are tested, so a boundary costs a few tokens.
Unlabelled cells between two labels of the same kind take that kind, *inferred*, but only in
a run that is settled (nothing left to test: a run the budget ended on is not) and whose
boundaries were all found, and whose samples turn between reject and drop at most
``MAX_TURNS`` times: otherwise reject and drop may alternate finer than the samples (an ECMP
pair out of step, rules by parity or in narrow bands), and nothing in that run is inferred.
A cell silent in one test so far counts as a drop for this. The time spent is capped by the
run's ICMP budget; what the budget cannot settle is ``icmp_limited``: dropped or rejected is
not known. Once every run is settled, what is left of the budget halves the widest gaps
between rejects (``MAX_GAP_REJECT``), so drop bands narrower than an eighth are looked for
too. A band of the other kind narrower than the samples' spacing, alone in a run, can
still pass unseen: the report counts every inferred cell as such.

Silence is in doubt (``limited``) wherever a sender rejected anything: its limit is per
destination (our probe), not per run, so rejects on single ports between open ones (dark
runs of one cell, a few answered by the sweep and the rest silent) are tested too; only a
sender that answered without any cap (hundreds of errors at once) leaves silence alone.

Destination ports of one plan place their eighths' samples at different points (a rule by
source port applies to all of them), and a drop one port's tests confirmed is tested on the
other ports where they hold no label (``hints``): as an expected drop, it costs no token.

The sweep's own errors land only on rejects: wherever its sender had a token, the first
reject cell after it takes the error, so they are never inside a drop band, however slow the
sender (Linux's IPv4 default of one a second after six) or fast (Linux's IPv6 every 100 ms,
Cisco's 500 ms, a host-wide burst of 50). They are not spread samples: an eighth's reject
label counts only if a test placed it there by position (a drop counts wherever it is). A
test costs a token, one a second at Linux's IPv4 default, and every destination port's runs
need their own, so the default budget grows with the destination ports (``udpreach.core.plan``).

A burst waits for as many tokens as it holds expected rejects, plus the controls: near the
end of the budget it shrinks to what still fits, and a burst of expected rejects alone (a
bisection between two kinds of reject) sends no control, so each of its steps costs one
token. A control is any cell its sender rejected that may still be sent. After the controls
go as many expected rejects again: answered, they are free samples, and they show a sender
that refills faster than its estimated period (the only thing that lowers it; a missed
control raises it by half).

This module is pure: it reads the ledger's arrays and returns cells to test and the
conclusions; the engine (``udpreach.core.sweep``) sends, waits and feeds back what came.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from udpreach.core.ledger import (
    ICMP_LIMITED,
    INFERRED,
    OBSERVED,
    PENDING,
    IcmpInfo,
    Ledger,
    Verdict,
)

U, D = 0, 1  # label kinds: unlabelled, confirmed dropped; R labels are 2 + the ICMP index
_OPEN, _BLOCKED, _REJECTED, _UNTESTED = 1, 2, 3, 4  # ledger state codes
CONFIRMATIONS = 2  # silent tests a cell must pass to be a confirmed drop (a clean path)
MAX_CONFIRMATIONS = 12  # on a lossy path (the engine's ``_confirmations_needed``)
# A settled run holds a label in each of this many equal parts: spread samples, so that
# reject and drop mixed through a run (an ECMP pair out of step, rules by parity or in
# narrow bands) show both kinds; 9 samples of a half-and-half mix are all of one kind 1 time
# in 256.
SEGMENTS = 8
# Between two confirmed drops, unlabelled cells take their kind only across a gap no wider
# than this: testing expected drops costs no token (hundreds go in one burst, before one
# control), so drop stretches are sampled this densely, and a reject band that wide cannot
# hide in one. Expected rejects cost a token (one a second) each: their gaps stay wider.
MAX_GAP_DROP = 128
# Between two rejects of one kind, after the run is settled and while the budget lasts,
# the widest gaps are halved until none is wider than this: the sweep's own errors can only
# ever land on rejects, so a drop band between them is found only by tests placed by
# position. Each point costs a token (one a second at Linux's IPv4 default): a budget too
# short for all of them still ends with the widest gaps halved first.
MAX_GAP_REJECT = 256
# A run whose samples turn between reject and drop more often than this is mixed: nothing in
# it is inferred (a reject beside a drop, or a drop between two rejects, turns twice).
MAX_TURNS = 2
SEARCH_POINTS = 16  # points tested across a reject/drop boundary in one burst
MAX_BURST_CELLS = 256  # silent cells per test burst: the burst lasts a few ms at most
DEFAULT_PERIOD = 1.0  # Linux's default: one error per second per destination
# No error at all: a sender's bucket may have been empty all along (an earlier run, or the
# probe host's other traffic, spent it), and a run shorter than its refill sees nothing of a
# reject. Silence is trusted only where cells were sent again this long after the run's
# first datagram (Linux's IPv4 period, the slowest realpaths names, and a margin); other
# dark runs get one look first (``Sweep._look``).
LOOK_AFTER = 1.25
MIN_PERIOD, MAX_PERIOD = 0.01, 8.0
# Seconds of an error's way back not taken off its arrival (``SenderBucket.lag``): a margin
# for a datagram that reaches the sender later than the quickest one did.
LAG_MARGIN = 0.02
DEFAULT_BURST = 6  # Linux's XRLIM_BURST_FACTOR
BURST_WINDOW = 0.25  # seconds after a sender's first error that still count as its burst
AT_ONCE = 0.02  # errors this close together came from tokens the bucket already held


@dataclass
class SenderBucket:
    """What the run knows of one ICMP sender's rate limit."""

    address: str
    period: float = DEFAULT_PERIOD  # seconds per token, as estimated
    last_error: float = -1e9  # when its last error arrived
    errors: int = 0
    times: list[float] = field(default_factory=list)
    control: tuple[int, int] | None = None  # (dst, src) of a cell it rejected (verified)
    # How long before its errors arrive it spent their tokens, at least: the quickest round
    # trip of its errors, less the datagrams' slowest way there (their measured delay) and
    # ``LAG_MARGIN``. Its refill runs from then, so errors that come back slowly (a router's
    # slow path, a long way back) do not stretch every test by their delay.
    lag: float = 0.0

    def note(self, now: float) -> None:
        self.errors += 1
        self.last_error = now
        if len(self.times) < 4096:
            self.times.append(now)

    def measured_period(self) -> float | None:
        """The sustained period from arrival times, once it was capped (the first burst's
        gaps, at least Linux's six errors however spread, and any gap of a burst, are left
        out); None until there are a few gaps to go by. (A first burst sent slowly, as the
        pilot does on a busy host, came back over 0.3 s: its gaps, taken for the period, had
        the tests wait a sixth of Linux's second and miss their controls.)"""
        times = self.times[max(self.first_burst(), DEFAULT_BURST) - 1 :]
        gaps = [b - a for a, b in pairwise(times) if b - a > 0.02]
        if len(gaps) < 3:
            return None
        gaps.sort()
        return min(MAX_PERIOD, max(MIN_PERIOD, gaps[len(gaps) // 2]))

    def limiter(self) -> tuple[int, float] | None:
        """(burst, period) of the token bucket that explains the errors' arrival times, for
        the report; None until at least two errors came after the first burst.

        The bucket starts full, so the first errors come back to back: their count (within
        ``BURST_WINDOW`` of the first) is the burst ``B``. Then any interval holding ``B + k``
        errors refilled at least ``k`` tokens, so the period is at most its span over ``k``;
        the tightest interval gives the estimate. It is the largest period the arrivals
        allow: right when the run asked for more errors than the sender gave (the tests
        do), long when it did not. The engine schedules by ``period`` (adapted burst by
        burst, and guarded by control cells), not by this."""
        t = np.asarray(self.times, dtype=np.float64)
        n = len(t)
        first = self.first_burst()
        if n - first < 2:
            return None

        def period(burst: int) -> float:
            best = math.inf
            for k in range(1, n - burst + 1):
                w = burst + k - 1  # errors i .. i + w: burst + k of them
                best = min(best, float((t[w:] - t[: n - w]).min()) / k)
            return best

        def clamp(p: float) -> float:  # errors booked at one instant make a span of 0
            return min(MAX_PERIOD, max(MIN_PERIOD, p))

        # A fast sender refills within the window too: take that share out of the burst.
        p = clamp(period(first))
        burst = max(1, min(first, round(first - (t[first - 1] - t[0]) / p)))
        # A bucket that was not full at the start (a run right after another) shows its
        # burst later, when a test burst after a long wait is answered all at once.
        at_once = int((np.searchsorted(t, t + AT_ONCE, side="right") - np.arange(n)).max())
        burst = max(burst, at_once)
        if n - burst < 2:
            return None
        if burst != first:
            p = clamp(period(burst))
        return burst, p

    def first_burst(self) -> int:
        """How many of its errors came within ``BURST_WINDOW`` of its first."""
        t = self.times
        return int(np.searchsorted(np.asarray(t), t[0] + BURST_WINDOW, side="right")) if t else 0

    def uncapped(self) -> bool:
        """Whether it answered like a router without an ICMP limit: more errors at once than
        any limit lets through (four times a host-wide burst of 50)."""
        return self.first_burst() > 4 * 50

    def spent_at(self) -> float:
        """When it spent the token of its last error, at the latest: its arrival less the
        least its way back took."""
        return self.last_error - self.lag

    def ready_at(self, tokens: int) -> float:
        """When it will have refilled ``tokens`` tokens since it last answered."""
        return self.spent_at() + self.period * max(1, tokens)


@dataclass(frozen=True)
class Run:
    """One dark run: planned source ports ``srcs`` (ascending) of destination ``dst`` and
    their labels (U, D, or 2 + ICMP index)."""

    dst: int
    srcs: np.ndarray
    labels: np.ndarray
    # Cells silent once in a test where the sender could answer: a drop not yet confirmed
    # (None: none). Not a label, but evidence enough that the run is not all reject.
    tentative: np.ndarray | None = None
    # Cells a test burst placed, chosen by position (None: none). The sweep's own errors
    # land only on rejects: a drop band between them is never sampled by them.
    tested: np.ndarray | None = None
    # Where in each eighth its sample goes (0.5: the middle). Destination ports of one plan
    # sample at different points: a rule by source port applies to all of them, so together
    # they sample the source ports more densely (a band between one port's samples is
    # under another's).
    phase: float = 0.5

    @property
    def unlabelled(self) -> int:
        return int(np.count_nonzero(self.labels == U))


@dataclass(frozen=True)
class Need:
    """A cell to test: (dst, src), its kind (see ``needs``), and the size of its run."""

    dst: int
    src: int
    kind: str  # cheap | costly | search | refine (see ``refinements``: costly too)
    weight: int
    group: tuple[int, int] | None = None  # a search's boundary (its points go together)

    @property
    def costly(self) -> bool:
        return self.kind in ("costly", "refine")


def dark_runs(
    ledger: Ledger,
    confirms: dict[int, np.ndarray],
    tested: dict[int, np.ndarray] | None = None,
    confirmations: np.ndarray | int = CONFIRMATIONS,
) -> Iterator[Run]:
    """Every dark run of the ledger, with its labels (see the module docstring); a cell is
    a confirmed drop after ``confirmations`` silent tests (one count for every cell, or an
    array by source port)."""
    planned = np.flatnonzero(ledger.planned_mask())
    for j, d in enumerate(ledger.dst_ports):
        v = ledger.view(d)
        state = v.state[planned]
        dark = (state == PENDING) | (state == _REJECTED)
        if not dark.any():
            continue
        labels = np.zeros(len(planned), dtype=np.int64)
        rejected = state == _REJECTED
        labels[rejected] = 2 + v.icmp[planned][rejected].astype(np.int64)
        conf = confirms.get(d)
        once: np.ndarray | None = None
        if conf is not None:
            need = (
                confirmations[planned] if isinstance(confirmations, np.ndarray) else confirmations
            )
            dropped = (state == PENDING) & (conf[planned] >= need)
            labels[dropped] = D
            once = (state == PENDING) & (conf[planned] > 0) & ~dropped
        by_test = None
        if tested is not None:
            placed = tested.get(d)
            by_test = placed[planned] if placed is not None else np.zeros(len(planned), bool)
        phase = (j + 0.5) / len(ledger.dst_ports)
        edges = np.diff(np.r_[0, dark.astype(np.int8), 0])
        for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
            yield Run(
                d,
                planned[a:b],
                labels[a:b],
                None if once is None else once[a:b],
                None if by_test is None else by_test[a:b],
                phase,
            )


def _nearest_u(labels: np.ndarray, lo: int, hi: int, at: int) -> int | None:
    """The unlabelled position in [lo, hi) nearest to ``at``."""
    idx = np.flatnonzero(labels[lo:hi] == U)
    if not len(idx):
        return None
    return lo + int(idx[np.argmin(np.abs(idx + lo - at))])


def needs(run: Run) -> list[tuple[int, str, int]]:
    """Positions in the run to test next, in sending order, each with its kind: ``cheap``
    (a drop is expected: it spends no token), ``costly`` (a reject is expected: one token),
    or ``search`` (points across a boundary between a reject and a drop, from the drop's
    side towards the reject's: the first reject among them spends the one token, and every
    point before it is thereby a confirmed drop, so one token narrows the boundary
    ``SEARCH_POINTS + 1``-fold instead of the halving of a binary search)."""
    labels = run.labels
    n = len(labels)
    if n == 1:  # (rules on single ports make tens of thousands of these)
        return [(0, "cheap", -1)] if labels[0] == U else []
    if not (labels == U).any():
        return []
    out: dict[int, tuple[str, int]] = {}
    order: list[int] = []
    labelled = np.flatnonzero(labels != U)
    boundary = -1  # which boundary a "search" point belongs to

    def expect_at(pos: int) -> str:
        if not len(labelled):
            return "cheap"
        near = labelled[np.argmin(np.abs(labelled - pos))]
        return "costly" if labels[near] >= 2 else "cheap"

    def add(pos: int, kind: str) -> None:
        if pos not in out:
            order.append(pos)
        out[pos] = (kind, boundary if kind == "search" else -1)

    for pos in (0, n - 1):  # both ends
        if labels[pos] == U:
            add(pos, expect_at(pos))
    # Every eighth holds a label: a drop, or a reject a test placed (the sweep's own errors
    # are never inside a drop band: see the module's text).
    sampled = labels != U
    placed = run.tested
    if placed is not None:
        sampled = (labels == D) | ((labels != U) & placed)
    for k in range(min(SEGMENTS, n)):
        lo, hi = k * n // SEGMENTS, (k + 1) * n // SEGMENTS
        if hi > lo and not sampled[lo:hi].any():
            mid = _nearest_u(labels, lo, hi, lo + int((hi - lo) * run.phase))
            if mid is not None and mid not in out:
                add(mid, expect_at(mid))
    for a, b in pairwise(labelled.tolist()):  # drop gaps too wide to infer across
        if labels[a] != D or labels[b] != D or b - a - 1 <= MAX_GAP_DROP:
            continue
        for at in range(a + MAX_GAP_DROP, b, MAX_GAP_DROP):  # cheap: all in one burst
            near = _nearest_u(labels, a + 1, b, at)
            if near is not None and near not in out:
                add(near, "cheap")
    for a, b in pairwise(labelled.tolist()):  # boundaries
        if labels[a] == labels[b] or b - a <= 1:
            continue
        gap = np.flatnonzero(labels[a + 1 : b] == U) + a + 1
        if labels[a] >= 2 and labels[b] >= 2:  # two kinds of reject: both sides cost
            mid = _nearest_u(labels, a + 1, b, (a + b) // 2)
            if mid is not None:
                add(mid, "costly")
            continue
        spread = np.linspace(0, len(gap) - 1, min(SEARCH_POINTS, len(gap)))
        picks = gap[np.unique(spread.round().astype(int))]
        if labels[a] >= 2:  # the reject on the left: from the drop's side, right to left
            picks = picks[::-1]
        boundary += 1
        for pos in picks.tolist():
            add(pos, "search")
    return [(pos, *out[pos]) for pos in order]


def mixed(labels: np.ndarray) -> bool:
    """Whether the run's labels turn between reject and drop more than ``MAX_TURNS`` times:
    reject and drop then alternate through it (an ECMP pair out of step, rules by parity or
    in narrow bands), and the cells between any two samples may be of either kind."""
    kinds = labels[labels != U] >= 2
    return int(np.count_nonzero(kinds[1:] != kinds[:-1])) > MAX_TURNS


def resolved(labels: np.ndarray) -> bool:
    """Whether every boundary between labels of different kinds was found: no unlabelled
    cell lies between two neighbouring labels that differ. Where one is left, the run's
    make-up is not known (reject and drop may alternate finer than the samples, as behind
    an ECMP pair out of step), so none of its cells is inferred."""
    labelled = np.flatnonzero(labels != U)
    if len(labelled) < 2:
        return True  # nothing to search between; ``needs`` still asks for both ends
    kinds = labels[labelled]
    differ = kinds[1:] != kinds[:-1]
    return not bool((differ & (np.diff(labelled) > 1)).any())


def refinements(run: Run) -> list[tuple[int, int]]:
    """Midpoints of the gaps wider than ``MAX_GAP_REJECT`` between two rejects of one kind,
    each with its gap's width. Not needed for a run to be settled (``needs``): tested while
    the budget lasts, widest first, they find drop bands narrower than an eighth."""
    labels = run.labels
    if len(labels) < 3:  # no gap between two labels
        return []
    labelled = np.flatnonzero(labels != U)
    out: list[tuple[int, int]] = []
    for a, b in pairwise(labelled.tolist()):
        if labels[a] < 2 or labels[a] != labels[b] or b - a - 1 <= MAX_GAP_REJECT:
            continue
        mid = _nearest_u(labels, a + 1, b, (a + b) // 2)
        if mid is not None:
            out.append((mid, b - a - 1))
    return out


def hints(runs: Sequence[Run]) -> list[tuple[Run, int]]:
    """Cells to test because another destination port's run has confirmed drops there: a
    rule by source port applies to every destination port, so a drop band one port's
    samples found may sit unseen between another's. One per (run, stretch of drops) with
    no label of that run inside, at its middle; tested as an expected drop (no token, or
    one if that port rejects there, after which the stretch holds a label)."""
    # Per destination port, its stretches of drops in ascending order: (first src, last
    # src, the order they were found in). One port's stretches never overlap.
    stretches: dict[int, list[tuple[int, int, int]]] = {}
    found = 0
    for run in runs:
        if len(run.labels) == 1:  # (rules on single ports make tens of thousands of these)
            if run.labels[0] == D:
                s = int(run.srcs[0])
                stretches.setdefault(run.dst, []).append((s, s, found))
                found += 1
            continue
        labelled = np.flatnonzero(run.labels != U)
        is_d = run.labels[labelled] == D
        if not is_d.any():
            continue
        # maximal groups of drops with no other label between them
        edges = np.diff(np.r_[0, is_d.astype(np.int8), 0])
        for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
            first, last = run.srcs[labelled[a]], run.srcs[labelled[b - 1]]
            stretches.setdefault(run.dst, []).append((int(first), int(last), found))
            found += 1
    if not stretches:
        return []
    table: dict[int, tuple[list[int], list[int], list[int]]] = {}
    for dst, found_here in stretches.items():
        found_here.sort()
        table[dst] = (
            [f for f, _, _ in found_here],
            [la for _, la, _ in found_here],
            [i for _, _, i in found_here],
        )
    out: list[tuple[Run, int]] = []
    for run in runs:
        if len(run.labels) == 1 and run.labels[0] != U:
            continue  # any stretch that meets it holds its one cell, which has a label
        lo_src, hi_src = int(run.srcs[0]), int(run.srcs[-1])
        # The other ports' stretches that meet [lo_src, hi_src], in the order found.
        near: list[tuple[int, int, int]] = []
        for dst, (firsts, lasts, order) in table.items():
            if dst == run.dst:
                continue
            i0 = bisect_left(lasts, lo_src)
            i1 = bisect_right(firsts, hi_src)
            near.extend((order[i], firsts[i], lasts[i]) for i in range(i0, i1))
        if not near:
            continue
        near.sort()
        for _, first, last in near:
            lo = int(np.searchsorted(run.srcs, first))
            hi = int(np.searchsorted(run.srcs, last, side="right"))
            if hi > lo and not (run.labels[lo:hi] != U).any():
                pos = _nearest_u(run.labels, lo, hi, (lo + hi) // 2)
                if pos is not None:
                    out.append((run, pos))
    return out


def all_needs(runs: Iterable[Run]) -> list[Need]:
    """The needs of every run, bigger runs first (each run's own order kept), then the
    ``hints`` of other destination ports' drops; only when no run needs anything, the
    refinements of every run, widest gap first (a boundary search goes burst by burst, and
    refinements would make each burst wait for more tokens)."""
    found: list[Need] = []
    finer: list[tuple[int, Need]] = []
    ordered = sorted(runs, key=lambda r: -len(r.srcs))
    for i, run in enumerate(ordered):
        for pos, kind, group in needs(run):
            key = (i, group) if group >= 0 else None
            found.append(Need(run.dst, int(run.srcs[pos]), kind, len(run.srcs), key))
        for pos, gap in refinements(run):
            finer.append((gap, Need(run.dst, int(run.srcs[pos]), "refine", len(run.srcs))))
    for run, pos in hints(ordered):
        found.append(Need(run.dst, int(run.srcs[pos]), "cheap", len(run.srcs)))
    if found:
        return found
    finer.sort(key=lambda t: -t[0])
    return [n for _, n in finer]


def limited(runs: Sequence[Run], *, across: bool = True) -> bool:
    """Whether silence is in doubt: some dark run holds both a verified reject and
    unlabelled cells, or (``across``) some run holds a reject and another unlabelled cells.
    A router limits its errors per destination (our probe), not per run: rejects on single
    ports (every other port, say) make dark runs of one cell each, a few answered and the
    rest silent, and the silent ones are as likely rejected. ``across`` is off only when
    every sender answered without a cap (``SenderBucket.uncapped``)."""
    if across:
        return any((r.labels >= 2).any() for r in runs) and any((r.labels == U).any() for r in runs)
    return any((r.labels >= 2).any() and (r.labels == U).any() for r in runs)


@dataclass
class Conclusion:
    """What ``conclude`` settled."""

    inferred_rejected: int = 0
    inferred_blocked: int = 0
    dropped: int = 0  # confirmed by tests of their own
    icmp_limited: int = 0


def conclude(ledger: Ledger, runs: Sequence[Run]) -> Conclusion:
    """Settle what the labels allow and mark the rest (see the module docstring).

    Confirmed drops are blocked (observed); in a settled run (nothing left to test, every
    boundary found), unlabelled cells between two labels of the same kind take that kind
    (inferred); other unlabelled cells without ICMP evidence of their own are
    ``icmp_limited``.
    """
    out = Conclusion()
    for run in runs:
        labels = run.labels
        srcs = run.srcs
        dropped = srcs[labels == D]
        if len(dropped):
            out.dropped += ledger.settle(run.dst, dropped, Verdict.BLOCKED, OBSERVED)
        covered = np.zeros(len(labels), dtype=bool)
        # Inferred only where the run's boundaries were all found, and between drops only
        # across gaps as narrow as they are sampled (MAX_GAP_DROP). A cell silent in one test
        # so far (the budget ended before its second) counts as a drop here: no reject is
        # inferred across it, though it is not settled itself.
        seen = labels
        if run.tentative is not None and run.tentative.any():
            seen = labels.copy()
            seen[(labels == U) & run.tentative] = D
        labelled = np.flatnonzero(seen != U)
        # ... and only in a run sampled as the module's text says (nothing left to test):
        # a run the budget ended on has gaps a band of the other kind may hide in.
        inferable = resolved(seen) and not mixed(seen) and not needs(run)
        for a, b in pairwise(labelled.tolist() if inferable else []):
            if b - a <= 1 or seen[a] != seen[b] or labels[a] == U or labels[b] == U:
                continue  # different kinds, or a tentative end: nothing to infer from
            if seen[a] == D and b - a - 1 > MAX_GAP_DROP:
                continue
            gap = srcs[a + 1 : b][labels[a + 1 : b] == U]
            covered[a + 1 : b] = True
            if seen[a] == D:
                out.inferred_blocked += ledger.settle(run.dst, gap, Verdict.BLOCKED, INFERRED)
            else:
                info = ledger.icmp_info(int(seen[a]) - 2)
                if info is not None:
                    out.inferred_rejected += ledger.settle(
                        run.dst, gap, Verdict.REJECTED, INFERRED, info
                    )
        rest = srcs[(labels == U) & ~covered]
        if len(rest):
            v = ledger.view(run.dst)
            rest = rest[(v.state[rest] == PENDING) & (v.icmp[rest] == 0)]
            ledger.mark(run.dst, rest, ICMP_LIMITED)
            out.icmp_limited += len(rest)
    return out


def verified_senders(
    ledger: Ledger, usable: Callable[[int, int], bool] | None = None
) -> dict[str, tuple[int, int]]:
    """Each sender of a verified ICMP error, with one cell it rejected (a control), the
    first for which ``usable`` holds, if given."""
    found: dict[str, tuple[int, int]] = {}
    planned = ledger.planned_mask()
    for d in ledger.dst_ports:
        v = ledger.view(d)
        rejected = np.flatnonzero((v.state == _REJECTED) & planned)
        if not len(rejected):
            continue
        idx = v.icmp[rejected]
        for i in np.unique(idx).tolist():
            info = ledger.icmp_info(int(i))
            if info is None or not info.verified or info.sender in found:
                continue
            for s in rejected[idx == i].tolist():
                if usable is None or usable(d, s):
                    found[info.sender] = (d, s)
                    break
    return found


def describe(info: IcmpInfo) -> str:
    return f"type {info.type} code {info.code} from {info.sender}"
