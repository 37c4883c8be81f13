"""The run engine: one sweep as a synchronous state machine (no trio, no sockets, no clock).

Theory of operation. ``Sweep`` owns everything that decides a run: the plan, the ledger, the
pacing, the loss model, when a round is settled, what to send next and when to stop. The
shell (``probe.runner``) only moves bytes: it asks ``next_action(now)`` and performs what it
gets, and feeds back what happened (``on_sent``, ``on_receipts``, ``on_icmp``, ``on_flushed``,
``on_agent_lost``, ``cancel``), always with the time as an argument (as aioquic's connection
takes ``now``). So every decision is testable in milliseconds against a simulated path with
a fake clock (``tests/simpath.py``).

A run goes through *stages*, each sending something and then settling it:

1. **pilot** (big plans): 128 random cells at a gentle rate, one datagram at a time: the
   reference delivery ratio for the pacer, and the first measurement of the UDP delay. It
   ends early, and round 1 takes its unsent cells, once its first ``EARLY_PILOT`` (44)
   ports were all credited (``pacing.EARLY_PILOT``: a clean path needs no more).
2. **sweep rounds**: round 1 sends every cell once in a random order; later rounds retry the
   cells still unseen in the blocks of source ports whose loss says they need it
   (``udpreach.core.loss``), at a rate the path accepts (``udpreach.core.pacing``). When
   delivery stops by time in round 1, an **outage** look sends a few undelivered and a few
   open cells a while later: back (an outage), round 1 goes on; open flows only (a limit),
   or nothing after the last look, the run ends.
3. **recheck**: a sample of settled cells is sent again; a verdict that changed means the
   path changed during the run: the sweep is run once more and the latest evidence wins.
4. **ICMP tests** (``udpreach.core.silence``): when a sender's ICMP errors were rate-limited,
   silent cells are tested in paced bursts, within the run's ICMP budget.

A stage is *settled* once its last datagram has had time to arrive, by the UDP delay measured
from the receipts themselves (credit time minus send time, both on the probe's clock; with
no evidence yet, ``max_delay`` plus a margin), and the agent has then answered a flush: a
round trip on the ordered control channel, so every receipt the agent held is in the ledger.
The phase table below drives the run; any other move is a bug and raises.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np

from udpreach.core import schema, silence
from udpreach.core.datagram import CHUNK_SHIFT, MIN_SIZE, TokenCodec
from udpreach.core.document import build_document
from udpreach.core.errors import ProtocolError
from udpreach.core.framing import decode_receipts
from udpreach.core.ledger import OPEN, PENDING, IcmpInfo, Ledger
from udpreach.core.loss import (
    BlockEvidence,
    LossEstimate,
    Pool,
    block_bound,
    estimate_loss,
    false_blocked_bound,
    loss_upper,
    lossier,
    sibling_bounds,
    wilson_upper,
)
from udpreach.core.pacing import EARLY_PILOT, PACED_SECONDS, PILOT_CELLS, Pacer, Window
from udpreach.core.plan import Plan, default_icmp_budget
from udpreach.core.portspec import format_ports, ranges_of

log = logging.getLogger("udpreach.sweep")

BLOCK = 256  # planned source ports per loss block
BATCH_BYTES = 4 * 1024 * 1024  # the most a batch of datagrams may hold
FLUSH_EVERY = 0.02  # seconds between flushes while sending (the pacer's window judgements)
REPLY_TIMEOUT = 10.0  # the agent answers a flush within this, or is lost
CHECKPOINT_EVERY = 2.0
FIRST_CHECKPOINT = 1.0
MAX_REQUEUES = 8  # per source port and stage; then the rest is untested
SETTLE_MARGIN = 0.02  # seconds added to the measured delay before a round is judged
RECENT_RTTS = 8  # a test burst waits by the slowest of its senders' last this many errors
DELAY_FACTOR = 1.25
OPENED_IN_TESTS = 10  # dark cells the ICMP tests delivered, at least, to say the path changed
STRETCHED = 0.1  # a test burst sent over this share of its sender's refill period or more
RECHECK_SAMPLE = 128  # settled cells of each kind sent again at the end
RECHECK_TRIES = 3  # attempts an open cell gets in the recheck before it counts as changed
MAX_RECHECK_TRIES = 12  # on a lossy path
MAX_EPOCHS = 2  # sweeps of one run: the first, and one more if the path changed
QUIET_CELLS = 2048  # a plan this small is swept without backlog at the agent
PREPARE_CHUNKS = 8  # MAC chunks made per ``prepare`` call: about 16 us
STOPPED_ANSWERING = 5  # bursts in a row a sender answered nothing of: it stopped rejecting
MIN_PAUSE = 0.005  # a spread of the errors' times under this is jitter: one send a burst
MAX_PAUSE = 2.0  # the longest a burst's controls wait after its cells
COLLAPSE_WINDOWS = 4  # windows in a row that delivered nothing: delivery stopped by time
# When it stops, a look (a few cells not yet delivered and a few open ones) after each of
# these waits, until delivery is back: an outage (a link, a reload) lasts a moment, a full
# session table or NAT pool does not, and lets its established flows through meanwhile.
OUTAGE_WAITS = (0.25, 0.5, 1.0, 2.0, 4.0)
OUTAGE_CELLS = 32  # of each kind per look
MAX_OUTAGE_LOOKS = 16  # in a run, over every time delivery stopped
# A block of source ports where delivery stopped by time (``_filled``): its first cells sent
# all came through, then none; so many open ones first would have this chance at most were
# the verdicts unrelated to the sending order (a port rule, loss).
FILL_CHANCE = 1e-6
LOSSIEST = 8  # ranges the document names where the loss is (``_lossiest``), at most
FILL_MIN_LEAD = 3  # open cells sent before the first dark one, at least
FILL_MIN_DARK = 8  # dark cells in the block, at least
PORT_UNREACHABLE = ((3, 3), (1, 4))  # ICMP, ICMPv6
PMTU_ERRORS = ((3, 4, False), (2, 0, True))  # (type, code, ipv6): fragmentation needed


class Phase(Enum):
    PLANNED = "planned"
    SENDING = "sending"
    SETTLING = "settling"
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"


class Stage(Enum):
    PILOT = "pilot"
    SWEEP = "sweep"
    RECHECK = "recheck"
    PROBE = "icmp"
    OUTAGE = "outage"  # delivery stopped in round 1: a few cells a while later: is it back?
    DRAIN = "drain"  # no sending: the last wait, by the slowest delivery seen, before the end


_P = Phase
#: (phase, event) -> the next phase. What the engine does in a phase is decided by it.
TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (_P.PLANNED, "send"): _P.SENDING,
    (_P.SENDING, "drain"): _P.SETTLING,
    (_P.SETTLING, "send"): _P.SENDING,
    (_P.SETTLING, "finish"): _P.COMPLETE,
    (_P.PLANNED, "finish"): _P.COMPLETE,  # nothing could be sent at all (a ceiling)
    (_P.PLANNED, "abort"): _P.INCOMPLETE,
    (_P.SENDING, "abort"): _P.INCOMPLETE,
    (_P.SETTLING, "abort"): _P.INCOMPLETE,
}


# -- actions: what the shell is asked to do -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send these datagrams now, in this order: ``(dst port, attempt, source ports)``."""

    groups: tuple[tuple[int, int, np.ndarray], ...]
    count: int
    burst: int = 0  # send in bursts of this many datagrams (0: all back to back) ...
    spacing: float = 0.0  # ... this many seconds apart, start to start


@dataclass(frozen=True, slots=True)
class Flush:
    """Ask the agent to flush its receipts (``seq``); ``final``: first collect every ICMP
    error the sender holds (the stage is over: nothing more is in flight)."""

    seq: int
    final: bool


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do before ``until`` unless an event comes."""

    until: float


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Store the ledger as it is (a crash keeps what was settled)."""


@dataclass(frozen=True, slots=True)
class Finished:
    complete: bool


Action = Send | Flush | Wait | Checkpoint | Finished


# -- events: what the shell reports ---------------------------------------------------------


class SendResult(Protocol):
    """What happened to one source port's datagrams of a ``Send`` (``probe.sender``)."""

    sent: list[int]
    untested: str | None
    backpressure: bool


@dataclass(frozen=True, slots=True)
class IcmpReport:
    """An ICMP error that named one of our cells (the shell matched its ports)."""

    dst_port: int
    src_port: int
    type: int
    code: int
    sender: str
    quote: bytes = b""  # the quoted UDP payload, as much as the error carried
    mtu: int = 0  # the next-hop MTU of a "fragmentation needed" / "packet too big"
    ipv6: bool = False
    at: float | None = None  # when it arrived (the kernel's stamp), if earlier than read


@dataclass(frozen=True)
class SweepSettings:
    """A run's limits and knobs beyond the plan."""

    max_datagrams: int | None = None
    max_bytes: int | None = None  # a byte cap per run (payload plus IP/UDP headers)
    byte_rate: float | None = None  # bytes per second ceiling
    max_delay: float = 1.0  # UDP one-way delay verdicts stay right up to, before evidence
    # seconds for tests of silent cells under limited ICMP (None: the plan's default for its
    # destination ports, ``udpreach.core.plan.default_icmp_budget``)
    icmp_budget: float | None = None
    recheck: bool = True
    header_bytes: int = 28  # IPv4 + UDP (48 for IPv6)
    control_rtt: float = 0.005  # the control channel's round trip, measured at the start


@dataclass
class _Burst:
    """One ICMP test burst: the cells in sending order, and what answered."""

    order: list[tuple[int, int, int]]  # (dst, src, attempt)
    candidates: set[tuple[int, int]]
    answers: dict[str, int] = field(default_factory=dict)  # sender -> last index answered
    answered_at: set[int] = field(default_factory=set)  # the indices that drew their error
    sent_at: float = 0.0
    controls: dict[str, int] = field(default_factory=dict)  # sender -> its control's index
    asked: dict[str, int] = field(default_factory=dict)  # sender -> tokens waited for
    counts: dict[str, int] = field(default_factory=dict)  # sender -> errors it sent back
    since: float = 0.0  # the main sender's last error before the burst
    main: str = ""  # the main sender (the one whose tokens the burst waited for)
    look: bool = False  # no sender known yet: spread samples of the dark runs (``_look``)
    # Where the controls begin, when they go in a second send ``pause`` seconds after the
    # cells they judge (0: one send); and when that second send is due.
    split: int = 0
    pause: float = 0.0
    resume_at: float = 0.0
    # Seconds its sends took (a paced one, or one a busy host stretched): a sender whose
    # bucket refilled inside them may answer a late cell after an early one met it empty.
    send_began: float = 0.0
    send_time: float = 0.0


@dataclass
class Facts:
    """What the run learnt, beyond the ledger."""

    rounds: int = 0
    max_attempt: int = 0
    stale_receipts: int = 0
    malformed_batches: int = 0
    icmp_errors: int = 0
    icmp_forged: int = 0
    icmp_unverified: int = 0
    agent_stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    path_mtu: dict[str, Any] | None = None
    icmp_tests: int = 0
    epochs: int = 1
    bound: float | None = None
    collapse: int | None = None  # flows after which delivery stopped


class Sweep:
    """One run of a plan: the engine (see the module docstring)."""

    def __init__(
        self,
        plan: Plan,
        codec: TokenCodec,
        *,
        now: float,
        seed: int,
        settings: SweepSettings | None = None,
        run_id: str = "",
        source: str = "",
        target: str = "",
        warnings: Sequence[str] = (),
    ) -> None:
        self.plan = plan
        self.run_id = run_id
        self.target = target
        self.codec = codec
        self.settings = settings or SweepSettings()
        budget = self.settings.icmp_budget
        self.icmp_budget = default_icmp_budget(len(plan.dst_ports)) if budget is None else budget
        self.source = source
        self.ledger = Ledger(plan.dst_ports, plan.src_ports)
        self.ledger.expected_source = source
        self.facts = Facts(warnings=list(warnings))
        self.rng = random.Random(seed)
        ceiling = float(plan.rate)
        s = self.settings
        self.datagram_bytes = plan.size + s.header_bytes
        if s.byte_rate is not None:
            ceiling = min(ceiling, max(1.0, s.byte_rate / self.datagram_bytes))
        self.pacer = Pacer(ceiling=ceiling)
        self.rate_cap: float | None = None  # the shell's share of the probe's global ceiling
        # Datagrams sent while that share, and not the plan or the pacer, set the rate: by
        # the share (rounded), so that the report names the one most of them went out under.
        self._held_to: dict[int, int] = {}
        self.route_mtu: int | None = None  # the probe's route MTU towards the agent, if known
        self.phase = Phase.PLANNED
        self.stage = Stage.SWEEP
        self.started = now
        self._per_src = len(plan.dst_ports)
        self._planned = np.asarray(plan.src_ports, dtype=np.intp)
        self._block_of = np.full(65536, -1, dtype=np.int64)
        self._planned_sorted = np.sort(self._planned)  # (plans may list ports in any order)
        self._planned_sorted.setflags(write=False)
        self._block_of[self._planned_sorted] = np.arange(len(self._planned)) // BLOCK
        # Each source port's place in the order the pilot and round 1 of the latest epoch
        # sent them (-1: not sent there): how a limit that filled by time shows (``_filled``).
        self._rank = np.full(65536, -1, dtype=np.int64)
        self._ranked = 0
        # Sending: the stage's source ports in order, and the destinations of those that do
        # not go to every planned destination port.
        self._queue: np.ndarray = np.zeros(0, dtype=np.intp)
        # MAC chunks to make ahead for the first round (``prepare``): (dst port, chunks).
        self._ahead: list[tuple[int, list[int]]] = []
        self._pilot_sample: np.ndarray | None = None  # the pilot ended early: on these
        self._only: dict[int, list[int]] = {}
        self._open_at: float | None = None  # when every cell of the stage was credited
        self._qpos = 0
        self._requeues: dict[int, int] = {}
        self._next_send = now
        self._last_send = now
        self._last_send_call = now
        self._burst: _Burst | None = None
        # Windows (pacing and delay): per source port, the window it was last sent in.
        self._windows: list[Window] = []
        self._win_of = np.full(65536, -1, dtype=np.int64)
        self._sent_at = np.full(65536, np.nan)  # per source port, when it was last sent
        self._judged = 0
        self._judging = False
        self._stage_window = 0
        # Flushes.
        self._flush_seq = 0
        self._flush_out: tuple[int, float, bool] | None = None  # seq, sent at, final
        self._last_flush = now
        self._settle_at = now
        self._next_checkpoint = now + FIRST_CHECKPOINT
        self._checkpoint_due = False
        # Delay evidence (seconds from send to credit, on the probe's clock).
        self.delay_samples = 0
        self.delay_high = 0.0  # the slowest send-to-credit time seen
        self.delay_quiet = 0.0  # ... in stages that sent little (no backlog at the agent)
        self._quiet_samples = 0
        self._drained = False
        self._looked = False  # the dark runs had their look (``_look``)
        self._no_control = False  # the tests stopped: no sender's reject could be sent again
        # Per destination port, samples of the dark runs the look could not be sent to.
        self._unlooked: dict[int, np.ndarray] = {}
        self._first_send: float | None = None
        self._conclude_tested = False
        # Rounds.
        self.round = 0
        self._opened_rounds: list[int] = []  # cells first credited in each round
        # Looks since delivery stopped (``OUTAGE_WAITS``), in all, and what the current one
        # sent: source ports not yet delivered, and open ones with their receipts before.
        self._outage_looks = 0
        self._outage_looks_total = 0
        self._outage_new: list[int] = []
        self._outage_old: dict[int, int] = {}
        self._dark_since: float | None = None  # when the windows went dark
        self._outages: list[float] = []  # how long delivery stopped, each time it came back
        self._round_rate = 0.0
        self._round_started = now
        # ICMP.
        self.senders: dict[str, silence.SenderBucket] = {}
        self._confirms: dict[int, np.ndarray] = {}
        # Silent tests that confirm a drop, per source port (see _confirmations_needed).
        self._confirmations = np.full(65536, silence.CONFIRMATIONS, dtype=np.uint8)
        self._tested: dict[int, np.ndarray] = {}  # cells a test burst placed (by position)
        # Tests of cells that are rejects, by block of source ports, where the sender is
        # known to have had a token (it answered a later datagram of the burst): how many,
        # and how many of them stayed silent (lost on the way, or their error on the way
        # back). The loss where a drop's tests go, even where nothing is ever delivered (a
        # lossy band exactly in front of a reject: see _confirmations_needed).
        self._reject_tests = np.zeros(0, dtype=np.int64)
        self._reject_silent = np.zeros(0, dtype=np.int64)
        self._missed_controls: dict[str, int] = {}  # per sender, controls missed in a row
        self._unanswered: dict[str, int] = {}  # per sender, bursts it answered nothing of
        # Per sender, the shortest and longest time from a datagram (its latest attempt) to
        # its verified error: a spread says its rejects sit at different depths of the path
        # (some behind a slow queue), so a burst's order at that sender may not be its order
        # at ours, and its controls wait out the spread (``_burst_pause``).
        self._error_rtt: dict[str, tuple[float, float]] = {}
        self._recent_rtt: dict[str, deque[float]] = {}  # each sender's last round trips
        self._probe_started: float | None = None
        # Per destination port, the open cells when the ICMP tests began, and the ledger and
        # the count of dark cells then (``_opened_by_tests``).
        self._open_before_tests: tuple[Ledger, dict[int, np.ndarray], int] | None = None
        self.conclusion: silence.Conclusion | None = None
        # Recheck.
        self._recheck: dict[tuple[int, int], str] = {}  # cell -> verdict before
        self._recheck_seen: set[tuple[int, int]] = set()
        self._first_open: dict[int, np.ndarray] = {}  # per dst, by planned port (a repeat)
        self._recheck_tries = 0
        self._recheck_att: dict[tuple[int, int], int] = {}
        self._recheck_sent: dict[tuple[int, int], int] = {}  # tries each cell got
        self._changed: list[tuple[int, int, str, str]] = []
        self._bytes_capped = False
        self._delivery_stopped = False
        self._reassembly_lost = False
        self._finished: bool | None = None
        self.loss: LossEstimate | None = None
        self._start_first_stage(now)

    # -- the phase table --------------------------------------------------------------------

    def _move(self, event: str) -> None:
        nxt = TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise RuntimeError(f"illegal run transition {self.phase.value} --{event}-->")
        self.phase = nxt

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.COMPLETE, Phase.INCOMPLETE)

    # -- what next ----------------------------------------------------------------------------

    def next_action(self, now: float) -> Action:
        """What the shell should do now (see the actions above)."""
        if self.finished:
            return Finished(self.phase is Phase.COMPLETE)
        out = self._flush_out
        if out is not None and now - out[1] >= REPLY_TIMEOUT:
            self.abort(f"agent did not answer within {REPLY_TIMEOUT:g}s", now)
            return Finished(False)
        if self._checkpoint_due or now >= self._next_checkpoint:
            self._checkpoint_due = False
            self._next_checkpoint = now + CHECKPOINT_EVERY
            return Checkpoint()
        if self.phase is Phase.SENDING:
            if self._judging and out is None and now - self._last_flush >= FLUSH_EVERY:
                return self._flush(now, final=False)
            if self._qpos < len(self._queue):
                if now < self._next_send:
                    return Wait(self._next_send)
                if self.stage is Stage.PILOT and self._end_pilot_early(now):
                    return self.next_action(now)
                return self._send_batch(now)
            self._move("drain")
        # Settling: wait for the last datagrams to arrive (by the delay measured so far),
        # then a flush barrier. A stage whose every cell was credited has nothing left in
        # flight to wait for.
        settle_at = self._last_send + self._settle_for()
        if now < settle_at:
            if self._open_at is None and self._stage_all_open():
                self._open_at = now
            if self._open_at is not None:
                settle_at = self._open_at
        self._settle_at = settle_at
        if now < self._settle_at:
            if self._judging and out is None and now - self._last_flush >= FLUSH_EVERY:
                return self._flush(now, final=False)
            return Wait(self._settle_at)
        if out is None:
            return self._flush(now, final=True)
        return Wait(out[1] + REPLY_TIMEOUT)

    def _stage_all_open(self) -> bool:
        """Whether every cell the current stage sent is credited (the pilot and sweep rounds,
        whose cells were all unseen when sent; a recheck re-sends cells already open, and
        ICMP tests wait for errors, not credits)."""
        if self.stage not in (Stage.PILOT, Stage.SWEEP) or self._only or not len(self._queue):
            return False
        q = self._queue
        return all(bool((self.ledger.view(d).state[q] == OPEN).all()) for d in self.plan.dst_ports)

    def settle_wait(self) -> float:
        """How long after its last datagram a stage is judged: the measured UDP delay with
        a margin; before any evidence, ``max_delay`` and a margin.

        The flush that ends the wait makes the agent read its socket first, so what waits
        there (an agent behind on a busy host) is covered: only the path's own delay must
        pass. A send-to-credit time measured while little was sent (the pilot, a recheck,
        a test burst) is that delay; one measured in a full-speed round also counts the
        agent's backlog. So the stages wait by the quiet figure when there is one, and the
        run's last wait (``Stage.DRAIN``) by the slowest seen, in case the path itself
        queued under load."""
        rtt = self.settings.control_rtt
        if self.delay_samples == 0:
            return self.settings.max_delay + SETTLE_MARGIN + rtt
        delay = self.delay_high
        if self._quiet_samples and self.stage is not Stage.DRAIN:
            delay = self.delay_quiet
        return max(2 * rtt, DELAY_FACTOR * delay + SETTLE_MARGIN)

    def sources_ahead(self, within: float) -> int:
        """Source ports the next sends will use within ``within`` seconds at the current
        rate: of the rest of this stage's queue, and after the pilot of the whole first
        round (a bind-mode sender opens sockets for them ahead, in time it would otherwise
        wait)."""
        left = len(self._queue) - self._qpos
        if self.stage is Stage.PILOT:
            left += len(self.plan.src_ports)
        return max(0, min(left, int(self._rate() * within / self._per_src) + 1))

    def prepare(self, chunks: int = PREPARE_CHUNKS) -> bool:
        """Work ahead, in time the shell would otherwise spin away (the pilot's spacing):
        make at most ``chunks`` of the MAC chunks the first round encodes with (its
        ``encode_block`` then only gathers; 16 source ports a chunk, about 2 us each).
        Returns whether any is left to make. Nothing is left once the first round ended
        (or the run went on to another stage)."""
        ahead = self._ahead
        if self.round > 1 or self.finished or self.stage not in (Stage.PILOT, Stage.SWEEP):
            ahead.clear()
        while ahead and chunks > 0:
            dst, his = ahead[-1]
            take = his[-chunks:]
            del his[-chunks:]  # from the end: no copy of the rest
            self.codec.prepare(dst, 1, take)
            chunks -= len(take)
            if not his:
                ahead.pop()
        return bool(ahead)

    def linger(self) -> float:
        """How long a bind-mode socket should stay open for an ICMP error to come back."""
        return max(0.05, 4 * self.settings.control_rtt, min(2.0, self._settle_for()))

    def _settle_for(self) -> float:
        """The current stage's wait after its last datagram (``settle_wait``; the look's
        is at least the floor a datagram gets before any evidence: no error has shown yet
        how slow the way back is). A test burst's answers are ICMP errors, which come back
        their own way (a router's slow path, a busy probe host reading them late): it also
        waits by the slowest error its senders have taken (up to ``max_delay``). Judged
        sooner, an answered control passed for a missed one, raised the sender's period and
        spent the budget on waits (an error delay of 50 ms left 1,984 rejects unsettled)."""
        wait = self.settle_wait()
        burst = self._burst
        if burst is not None and burst.look:
            wait = max(wait, self.settings.max_delay + SETTLE_MARGIN)
        elif burst is not None:
            # By the last few round trips (one slow error, or one read late in bind mode,
            # must not slow every later burst); the floor, as for the look, for a sender
            # with none known yet (every error of it came back after its cell was sent again).
            recent = self._recent_rtt
            asked = burst.asked or self.senders
            if all(recent.get(a) for a in asked):
                slowest = max(max(recent[a]) for a in asked)
            else:
                slowest = self.settings.max_delay
            wait = max(wait, min(self.settings.max_delay, DELAY_FACTOR * slowest) + SETTLE_MARGIN)
        return wait

    def _flush(self, now: float, *, final: bool) -> Flush:
        self._flush_seq += 1
        self._flush_out = (self._flush_seq, now, final)
        self._last_flush = now
        return Flush(self._flush_seq, final)

    def _rate(self) -> float:
        rate = self.pacer.rate
        if self.rate_cap is not None:
            rate = min(rate, self.rate_cap)
        return max(1.0, rate)

    def _note_ceiling(self, count: int) -> None:
        """Count a batch against the probe's ceiling when that is what held its rate below
        the plan's (the report says why the run went slower than asked)."""
        cap = self.rate_cap
        if cap is not None and cap < self.plan.rate and cap < self.pacer.rate:
            key = max(1, round(cap))
            self._held_to[key] = self._held_to.get(key, 0) + count

    def _send_batch(self, now: float) -> Action:
        if self._burst is not None and self._qpos < len(self._queue):
            return self._send_burst(now)
        pilot = self.stage is Stage.PILOT
        rate = self.pilot_rate if pilot else self._rate()
        window = self._windows[-1] if self._windows else None
        if window is not None and not window.sent:
            # A window's time runs from its first datagram: what came before (a checkpoint,
            # the stage's start) would lower the delivered rate a limiter is judged by. It
            # goes at the rate and burst of now, which the pacer may have changed since it
            # opened (judged at its old rate, it would pass for current and be misread).
            window.start, window.rate, window.burst = now, rate, self.pacer.burst
        if pilot:  # a few milliseconds of it per batch; the sender spaces the datagrams
            want = max(1, int(rate * PACED_SECONDS) // self._per_src)
        else:
            want = self.pacer.batch_size(rate, self._per_src)
        # Several copies of a batch exist at once (payloads, packets): bounded in bytes.
        want = min(want, max(1, BATCH_BYTES // (self.datagram_bytes * self._per_src)))
        srcs = self._queue[self._qpos : self._qpos + want]
        dsts = self.plan.dst_ports
        groups: list[tuple[int, int, np.ndarray]] = []
        if self._only:
            per: dict[int, list[int]] = {}
            for s in srcs.tolist():
                for d in self._only.get(s, dsts):
                    per.setdefault(d, []).append(s)
            owed = [(d, np.asarray(ss, dtype=np.intp)) for d, ss in per.items()]
        else:
            owed = [(d, srcs) for d in dsts]
        count = 0
        for d, ss in owed:
            attempts = self.ledger.view(d).sent[ss].astype(np.int64) + 1
            lo, hi = int(attempts.min()), int(attempts.max())
            if lo == hi:
                groups.append((d, lo, ss))
            elif self.stage is Stage.OUTAGE:
                # The look's new and open cells go in its shuffled order, interleaved: by
                # attempt, all the new ones would go first, and an outage that ended between
                # the two kinds would let only the open ones through (a "limit", and the run
                # would end).
                cut = np.flatnonzero(np.diff(attempts)) + 1
                for a, part in zip(np.split(attempts, cut), np.split(ss, cut), strict=True):
                    groups.append((d, int(a[0]), part))
            else:
                for a in np.unique(attempts).tolist():
                    groups.append((d, int(a), ss[attempts == a]))
            count += len(ss)
        self._qpos += len(srcs)
        if not pilot:
            self._note_ceiling(count)
        if pilot and count > 1:  # one datagram at a time, at the pilot's gentle rate
            return Send(tuple(groups), count, 1, 1 / rate)
        burst = self.pacer.burst if not pilot else 0
        if burst and count > burst:
            return Send(tuple(groups), count, burst, burst / rate)
        return Send(tuple(groups), count)

    @property
    def pilot_rate(self) -> float:
        return min(self._rate(), self.pacer.pilot_rate)

    def _cap_left(self) -> int | None:
        """Datagrams the run may still send (None: no cap)."""
        s = self.settings
        caps = []
        if s.max_datagrams is not None:
            caps.append(s.max_datagrams - self.ledger.sent_total)
        if s.max_bytes is not None:
            caps.append(
                (s.max_bytes - self.ledger.sent_total * self.datagram_bytes) // self.datagram_bytes
            )
        return max(0, min(caps)) if caps else None

    def _fits(self, datagrams: int) -> bool:
        """Whether a stage of this many datagrams fits the run's caps; if not, say so once
        and send nothing more."""
        cap = self._cap_left()
        if cap is None or datagrams <= cap:
            return True
        if not self._bytes_capped:
            self._stop_for_cap()
        return False

    def _stop_for_cap(self) -> None:
        s = self.settings
        what = []
        if s.max_datagrams is not None:
            what.append(f"{s.max_datagrams} datagrams (--max-datagrams)")
        if s.max_bytes is not None:
            what.append(f"{s.max_bytes} bytes (--max-bytes)")
        self.facts.warnings.append(
            f"stopped sending after {self.ledger.sent_total:,} datagrams: the probe's "
            f"ceiling per run is {' and '.join(what)}"
        )
        self._bytes_capped = True

    # -- events -------------------------------------------------------------------------------

    def on_sent(self, send: Send, results: list[tuple[int, SendResult]] | None, now: float) -> None:
        """``send`` went to the sender at ``now``; ``results`` is None when every datagram
        went out, else one result per source port (what went, and why the rest did not)."""
        led = self.ledger
        window = self._window(now)
        self._last_send_call = now
        if self._first_send is None:
            self._first_send = now
        if results is None:
            for d, _, srcs in send.groups:
                led.note_sent_many(d, srcs)
                self._win_of[srcs] = len(self._windows) - 1
                self._sent_at[srcs] = now
            sent_n = send.count
        else:
            sent_n = self._note_partial(send, results)
            if any(res.backpressure for _, res in results):
                self._next_send += 0.001  # the kernel's buffer was full: ease off
        window.sent += sent_n
        self._last_send = now
        if self._burst is not None and self.stage is Stage.PROBE:
            self._burst.send_time += max(0.0, now - self._burst.send_began)
        rate = self.pilot_rate if self.stage is Stage.PILOT else self._rate()
        # Late (a slow wake-up, a busy machine): catch up by at most 10 ms of sending, and
        # not at all in small bursts, where a catch-up would go out back to back and overrun
        # the burst allowance the bursts are sized for.
        if send.spacing:
            # The sender spaced the bursts itself; the next batch's first burst goes one
            # spacing after this one's last, never sooner.
            self._next_send = max(self._next_send + sent_n / rate, now + send.spacing)
        else:
            slack = 0.0 if self.pacer.burst or self.stage is Stage.PILOT else 0.01
            self._next_send = max(self._next_send, now - slack) + sent_n / rate
        if self._burst is not None and self._qpos < len(self._queue):
            self._next_send = max(self._next_send, self._burst.resume_at)
        if window.sent >= self.pacer.window_size():
            window.end = now
            self._windows.append(Window(rate, now, burst=self.pacer.burst))

    def _window(self, now: float) -> Window:
        if not self._windows:
            rate = self.pilot_rate if self.stage is Stage.PILOT else self._rate()
            self._windows.append(Window(rate, now, burst=self.pacer.burst))
        return self._windows[-1]

    def _note_partial(self, send: Send, results: list[tuple[int, SendResult]]) -> int:
        led = self.ledger
        wanted: dict[int, list[int]] = {}
        for d, _, srcs in send.groups:
            for s in srcs.tolist():
                wanted.setdefault(s, []).append(d)
        sent_n = 0
        window = len(self._windows) - 1
        requeue: list[int] = []
        for src_any, res in results:
            src = int(src_any)  # a sender may hand back numpy integers
            for d in res.sent:
                led.note_sent(d, src)
            if res.sent:
                self._win_of[src] = window
                self._sent_at[src] = self._last_send_call
            sent_n += len(res.sent)
            left = [d for d in wanted.get(src, []) if d not in res.sent]
            if not left:
                continue
            if res.untested:
                led.note_untested(src, res.untested, left)
            elif res.backpressure and self._burst is not None:
                # A test burst is judged by its order: a datagram sent after the others
                # would prove nothing. Not sent, not judged; a later burst tests it again.
                self._burst.candidates.difference_update((d, src) for d in left)
            elif res.backpressure and self._requeues.get(src, 0) < MAX_REQUEUES:
                self._requeues[src] = self._requeues.get(src, 0) + 1
                if len(left) != self._per_src:
                    self._only[src] = left
                requeue.append(src)
            elif res.backpressure:  # never "blocked" for want of sending: say what happened
                led.note_untested(src, "the probe host's send buffer stayed full", left)
        if requeue:
            self._queue = np.concatenate([self._queue, np.asarray(requeue, dtype=np.intp)])
        return sent_n

    def on_receipts(self, payload: bytes, now: float) -> None:
        """A batch of receipts from the agent (``framing.encode_receipts``)."""
        try:
            run_id, addrs, recs = decode_receipts(payload)
        except ProtocolError:
            self.facts.malformed_batches += 1
            return
        if run_id != self.run_id:
            self.facts.stale_receipts += len(recs) // 8
            return
        self.on_records(recs, addrs, now)

    def on_records(self, recs: bytes | memoryview, addrs: Sequence[str], now: float) -> None:
        """Receipt records in their wire form (``framing.RECEIPT``)."""
        led = self.ledger
        if len(recs) and self._recheck:
            self._note_recheck(recs)
        # The delay is read off what the ledger credited (a receipt it refused, or a repeat,
        # says nothing about when a datagram arrived), for the latest attempts only.
        fresh = led.note_receipts_packed(recs, addrs)
        if len(recs) and led.last_latest is not None:
            self._note_delays(recs, led.last_latest, now)
        if len(fresh) and self._windows:
            of = self._win_of[fresh]
            of = of[(of >= 0) & (of < len(self._windows))]
            if len(of):
                counts = np.bincount(of)
                wins = self._windows
                for w in np.flatnonzero(counts).tolist():
                    wins[w].delivered += int(counts[w])

    def _note_delays(self, recs: bytes | memoryview, use: np.ndarray, now: float) -> None:
        rec = np.frombuffer(recs, dtype=_RECORD)
        sent_at = self._sent_at[rec["src"].astype(np.intp)]
        use = use & ~np.isnan(sent_at)
        if not use.any():
            return
        high = min(now - float(sent_at[use].min()), 10 * max(1.0, self.settings.max_delay))
        n = int(np.count_nonzero(use))
        self.delay_samples += n
        self.delay_high = max(self.delay_high, high)
        if self.stage is not Stage.SWEEP or self.plan.cells <= QUIET_CELLS:
            self._quiet_samples += n
            self.delay_quiet = max(self.delay_quiet, high)

    def on_icmp(self, reports: Sequence[IcmpReport], now: float) -> None:
        """ICMP errors the sender matched to our cells (after the end: ignored)."""
        if self.finished:
            return
        for r in reports:
            self._one_icmp(r, now)

    def _one_icmp(self, r: IcmpReport, now: float) -> None:
        self.facts.icmp_errors += 1
        attempt = 0
        verified = False
        if len(r.quote) >= MIN_SIZE:
            cell = self.codec.verify_quote(r.quote)
            if cell is None or (cell.dst_port, cell.src_port) != (r.dst_port, r.src_port):
                self.facts.icmp_forged += 1  # it quotes a payload that is not ours: forged
                return
            attempt, verified = cell.attempt, True
        if (r.type, r.code, r.ipv6) in PMTU_ERRORS:
            self._note_pmtu(r)
            return
        if not verified:
            self.facts.icmp_unverified += 1
        info = IcmpInfo(r.type, r.code, r.sender, verified)
        self.ledger.note_icmp(r.dst_port, r.src_port, info)
        if not verified:
            return
        bucket = self.senders.get(r.sender)
        if bucket is None:
            bucket = self.senders[r.sender] = silence.SenderBucket(r.sender)
        # Its arrival, not when the shell got to it (a busy host reads a burst's errors in
        # bunches): the sender's limit is timed by these. Never later than it was read,
        # never before the sender's previous error or its own datagram left (a stamp mapped
        # through a stale reading of the clock, or a wall clock that stepped).
        at = now if r.at is None else min(now, max(r.at, bucket.last_error))
        sent_at = float(self._sent_at[r.src_port])
        latest = attempt == int(self.ledger.view(r.dst_port).sent[r.src_port])
        if latest and not math.isnan(sent_at):
            at = min(now, max(at, sent_at))
            rtt = at - sent_at
            lo, hi = self._error_rtt.get(r.sender, (rtt, rtt))
            lo, hi = min(lo, rtt), max(hi, rtt)
            self._error_rtt[r.sender] = (lo, hi)
            self._recent_rtt.setdefault(r.sender, deque(maxlen=RECENT_RTTS)).append(rtt)
            # Of the quickest round trip, what the way back took at least: less the way
            # there, which the datagrams' own delay bounds (a queue towards the sender
            # during the sweep, gone by the tests, must not date its refill too early).
            bucket.lag = max(0.0, lo - self.delay_high - silence.LAG_MARGIN)
        bucket.note(at)
        if bucket.control is None:
            bucket.control = (r.dst_port, r.src_port)
        burst = self._burst
        if burst is not None:
            key = (r.dst_port, r.src_port, attempt)
            for i, sent in enumerate(burst.order):
                if sent == key:
                    burst.answers[r.sender] = max(burst.answers.get(r.sender, -1), i)
                    burst.answered_at.add(i)
                    burst.counts[r.sender] = burst.counts.get(r.sender, 0) + 1
                    break

    def _note_pmtu(self, r: IcmpReport) -> None:
        found = self.facts.path_mtu
        if r.mtu and (found is None or r.mtu < found["mtu"]):
            self.facts.path_mtu = {"mtu": r.mtu, "from": r.sender, "size": self.plan.size}

    def on_flushed(self, seq: int, now: float, stats: dict[str, Any] | None = None) -> None:
        """The agent answered flush ``seq``: every receipt it held then is in."""
        out = self._flush_out
        if out is None or out[0] != seq:
            return
        self._flush_out = None
        if isinstance(stats, dict):
            self.facts.agent_stats = stats
        _, sent_at, final = out
        self._judge_windows(sent_at, now)
        if self.finished:
            return
        if final and self.phase is Phase.SETTLING and sent_at >= self._settle_at:
            self._settled(now)

    def on_agent_lost(self, why: str, now: float) -> None:
        """The agent went away: the run ends incomplete."""
        self.abort(why, now)

    def cancel(self, now: float) -> None:
        """The requester asked to stop: the run ends incomplete."""
        self.abort("the run was cancelled by its requester", now)

    def abort(self, why: str, now: float) -> None:
        """End the run incomplete (agent lost, cancelled, no answer): unsettled cells are
        unknown."""
        if self.finished:
            return
        self.facts.warnings.append(why)
        # The agent's host answers "port unreachable" once the agent is dead: in a run that
        # did not finish, that is the agent gone, not the path rejecting.
        n = self.ledger.unsettle_icmp(
            lambda i: (i.type, i.code) in PORT_UNREACHABLE and i.sender == self.target
        )
        if n:
            self.facts.warnings.append(
                f"{n} {'cell' if n == 1 else 'cells'} drew port-unreachable from the agent's "
                "host after the agent went away; "
                f"{'it is' if n == 1 else 'they are'} unknown"
            )
        self._move("abort")
        self._finish(False)

    # -- pacing judgements ----------------------------------------------------------------------

    def _judge_windows(self, flushed_at: float, now: float) -> None:
        """Judge the windows the agent has provably reported on: those that ended at least
        the delay before the flush was asked for."""
        if not self._judging:
            return
        wins = self._windows
        delay = self.settle_wait()
        while self._judged < len(wins) - 1 and wins[self._judged].end + delay <= flushed_at:
            self.pacer.on_window(wins[self._judged], now)
            self._judged += 1
        if self.stage is Stage.SWEEP and self.round == 1 and self._collapsed():
            self._queue = self._queue[: self._qpos]  # delivery stopped: stop sending

    def _collapsed(self) -> bool:
        """Whether delivery stopped by time in round 1: windows that delivered nothing, in
        a row, after windows that delivered (a session or NAT limit, not a port band)."""
        if self.facts.collapse is not None:
            return True
        judged = self._windows[self._stage_window : self._judged]
        if len(judged) < COLLAPSE_WINDOWS + 2:
            return False
        tail = judged[-COLLAPSE_WINDOWS:]
        if any(w.delivered for w in tail):
            return False
        before = judged[:-COLLAPSE_WINDOWS]
        k = len(before)
        while k and before[k - 1].delivered == 0:
            k -= 1
        sent_before = sum(w.sent for w in before[:k])
        delivered_before = sum(w.delivered for w in before[:k])
        if k < 1 or delivered_before < 0.2 * sent_before or sent_before < 200:
            return False
        # The flows (cells) that got through: counting what those windows sent overstated a
        # limit of 5,000 as 6,000 (the last of them sent some that did not).
        self.facts.collapse = max(1, self.ledger.open)
        self._dark_since = before[k].start if k < len(before) else tail[0].start
        return True

    # -- stages -------------------------------------------------------------------------------

    def _start_first_stage(self, now: float) -> None:
        plan = self.plan
        if plan.cells >= 16 * PILOT_CELLS and plan.rate > self.pacer.pilot_rate:
            k = max(1, PILOT_CELLS // self._per_src)
            sample = self.rng.sample(list(plan.src_ports), min(k, len(plan.src_ports)))
            if not self._fits(plan.cells):  # the pilot only if the whole first round fits
                self._finish(True)
                return
            self._begin(Stage.PILOT, np.asarray(sample, dtype=np.intp), {}, now, judging=False)
            his = np.unique(self._planned >> CHUNK_SHIFT).tolist()
            self._ahead = [(d, list(his)) for d in reversed(plan.dst_ports)]
        elif not self._begin_round(now):
            self._finish(True)  # not even one round fits the run's ceilings: all untested

    def _begin(
        self,
        stage: Stage,
        srcs: np.ndarray,
        only: dict[int, list[int]],
        now: float,
        *,
        judging: bool,
        shuffle: bool = True,
    ) -> None:
        self.stage = stage
        if shuffle and len(srcs) > 1:
            order = np.random.default_rng(self.rng.getrandbits(64)).permutation(len(srcs))
            srcs = srcs[order]
        self._queue = srcs
        if stage is Stage.PILOT or (stage is Stage.SWEEP and self.round == 1):
            self._rank[srcs] = np.arange(self._ranked, self._ranked + len(srcs))
            self._ranked += len(srcs)
        self._only = only
        self._open_at = None
        self._qpos = 0
        self._requeues = {}
        # Windows are kept across stages (receipts name them); a new stage opens its own.
        if self._windows and self._windows[-1].sent:
            self._windows[-1].end = now
            self._windows.append(Window(self._rate(), now, burst=self.pacer.burst))
        self._judged = max(self._judged, len(self._windows) - 1)
        self._stage_window = len(self._windows) - 1 if self._windows else 0
        self._judging = judging
        self._next_send = max(self._next_send, now)
        self._move("send")

    def _begin_round(self, now: float) -> bool:
        """Start the next sweep round if any cell needs one; False when none does."""
        srcs, only = self._owed(self.round + 1)
        if not len(srcs):
            return False
        count = len(srcs) * self._per_src - sum(self._per_src - len(d) for d in only.values())
        if not self._fits(count):
            return False
        self.round += 1
        self.facts.rounds = self.round
        self.facts.max_attempt = max(self.facts.max_attempt, self.round)
        self._round_rate = self._rate()
        self._round_started = now
        self._begin(Stage.SWEEP, srcs, only, now, judging=self.round == 1)
        return True

    def _owed(self, rnd: int) -> tuple[np.ndarray, dict[int, list[int]]]:
        """The source ports the next round sends (and, for those that do not go to every
        destination port, the ones they go to)."""
        led = self.ledger
        planned = self._planned
        copies = self.plan.copies
        dsts = self.plan.dst_ports
        if rnd == 1:  # every cell not yet sent in this epoch
            per = {}
            for d in dsts:
                v = led.view(d)
                per[d] = planned[
                    (v.sent[planned] == v.base[planned]) & (v.state[planned] == PENDING)
                ]
        elif not any(bool((led.view(d).state[planned] == PENDING).any()) for d in dsts):
            return np.zeros(0, dtype=np.intp), {}  # every cell settled: no evidence to weigh
        else:
            need = self._blocks_needing()
            islands = {d: set(s for _, s in self._islands_of(d, PENDING)) for d in dsts}
            lossy = self._lossy_blocks()
            per = {}
            for d in dsts:
                v = led.view(d)
                tries = v.sent[planned].astype(np.int64) - v.base[planned]
                pending = planned[(v.state[planned] == PENDING) & (tries < copies)]
                blocks = self._block_of[pending]
                chosen = need[d][blocks] if len(pending) else np.zeros(0, dtype=bool)
                # A dark cell between open ones in a block that loses datagrams is far
                # likelier a lossy open cell than a rule of one port: it is retried while
                # copies last, whatever the block's bound says.
                if islands[d] and len(pending):
                    chosen = chosen | (
                        np.isin(pending, list(islands[d])) & np.isin(blocks, lossy.get(d, []))
                    )
                per[d] = pending[chosen]
        first = per[dsts[0]]
        if all(np.array_equal(per[d], first) for d in dsts[1:]):
            return first, {}
        members: dict[int, list[int]] = {}
        for d in dsts:
            for s in per[d].tolist():
                members.setdefault(s, []).append(d)
        srcs = np.asarray(sorted(members), dtype=np.intp)
        full = len(dsts)
        return srcs, {s: ds for s, ds in members.items() if len(ds) != full}

    def block_evidence(self) -> dict[int, list[BlockEvidence]]:
        """Each destination port's loss evidence per block of source ports."""
        out: dict[int, list[BlockEvidence]] = {}
        planned = self._planned_sorted
        nblocks = int(self._block_of[planned].max()) + 1 if len(planned) else 0
        for d in self.plan.dst_ports:
            v = self.ledger.view(d)
            blk = self._block_of[planned]
            state = v.state[planned]
            base = v.base[planned].astype(np.int64)
            first = v.first[planned].astype(np.int64) - base
            opened = (state == 1) & (first > 0)
            unseen = state == PENDING
            sent = v.sent[planned].astype(np.int64) - base

            def count(
                mask: np.ndarray, weights: np.ndarray | None = None, blk: np.ndarray = blk
            ) -> np.ndarray:
                return np.bincount(blk[mask], weights=weights, minlength=nblocks)

            n_open = count(opened)
            losses = count(opened, (first - 1)[opened].astype(float))
            retried_mask = opened & (first >= 2)
            retried = count(retried_mask)
            retry_losses = count(retried_mask, (first - 2)[retried_mask].astype(float))
            n_unseen = count(unseen)
            fewest = np.full(nblocks, 255, dtype=np.int64)
            if unseen.any():
                np.minimum.at(fewest, blk[unseen], sent[unseen])
            out[d] = [
                BlockEvidence(
                    int(n_open[b]),
                    int(losses[b]),
                    int(retried[b]),
                    int(retry_losses[b]),
                    int(n_unseen[b]),
                    int(fewest[b]) if n_unseen[b] else 0,
                )
                for b in range(nblocks)
            ]
        return out

    def _blocks_needing(self) -> dict[int, np.ndarray]:
        """Per destination port, a boolean per block: does it need another attempt?"""
        evidence = self.block_evidence()
        flat = [b for bs in evidence.values() for b in bs]
        pool = Pool.of(flat)
        siblings = sibling_bounds(evidence)  # dark here, lossy on another destination port
        active = sum(1 for b in flat if b.unseen and b.opened)
        active += sum(1 for bs in siblings.values() for x in bs if x > 0)
        share = self.plan.confidence / max(1, active)
        floor = min(2, self.plan.copies)
        out: dict[int, np.ndarray] = {}
        for d, blocks in evidence.items():
            need = np.zeros(len(blocks) + 1, dtype=bool)
            for i, b in enumerate(blocks):
                if not b.unseen:
                    continue
                bound = max(block_bound(b, pool), siblings[d][i])
                need[i] = b.attempts < floor or bound > share
            out[d] = need
        return out

    def _settled(self, now: float) -> None:
        """The stage's datagrams have all had time to arrive and the agent has flushed."""
        self._checkpoint_due = True
        stage = self.stage
        if stage is Stage.PILOT:
            self._after_pilot(now)
        elif stage is Stage.SWEEP:
            self._after_round(now)
        elif stage is Stage.RECHECK:
            self._after_recheck(now)
        elif stage is Stage.OUTAGE:
            self._after_outage_look(now)
        elif stage is Stage.DRAIN:
            self._drained = True
            self._conclude(now, tested=self._conclude_tested)
        else:
            self._after_burst(now)

    def _end_pilot_early(self, now: float) -> bool:
        """End the pilot now if the first ``EARLY_PILOT`` source ports it sent (leaving out
        refused ones) are credited on every destination port they went to: the reference
        is then 1 (``pacing.EARLY_PILOT`` says how sure), the pilot's unsent cells go in
        round 1 and those still in flight settle with it. Any of them dark or not yet
        credited: the pilot goes on, and ends as always if none of that changes."""
        q = self._queue[: self._qpos]
        if len(q) < EARLY_PILOT:
            return False
        _, at = np.unique(q, return_index=True)
        q = q[np.sort(at)]  # a port sent again (the kernel's buffer was full) counts once
        went = np.zeros(len(q), dtype=bool)
        dark = np.zeros(len(q), dtype=bool)
        settled = np.zeros(len(q), dtype=bool)  # dark for sure already (an ICMP error)
        for d in self.plan.dst_ports:
            v = self.ledger.view(d)
            w = v.sent[q] > v.base[q]
            state = v.state[q]
            went |= w
            dark |= w & (state != OPEN)
            settled |= w & (state != OPEN) & (state != PENDING)
        first = np.flatnonzero(went)[:EARLY_PILOT]
        if len(first) < EARLY_PILOT or dark[first].any() or settled.any():
            return False
        self._pilot_sample = q[first]
        self._move("drain")
        self._settled(now)
        return True

    def _after_pilot(self, now: float) -> None:
        led = self.ledger
        early, self._pilot_sample = self._pilot_sample, None
        srcs = np.unique(self._queue) if early is None else early
        delivered = sent = 0
        for d in self.plan.dst_ports:
            v = led.view(d)
            went = v.sent[srcs] > v.base[srcs]  # refused or never sent: not in the ratio
            sent += int(np.count_nonzero(went))
            delivered += int(np.count_nonzero(went & (v.state[srcs] == 1)))
        self.pacer.set_reference(delivered, sent, self.pilot_rate)
        if not self._begin_round(now):
            self._after_sweep(now)

    def _after_round(self, now: float) -> None:
        led = self.ledger
        opened = 0
        for d in self.plan.dst_ports:
            v = led.view(d)
            first = v.first[self._planned].astype(np.int64) - v.base[self._planned]
            opened += int(np.count_nonzero(first == self.round))
        self._opened_rounds.append(opened)
        if self.round >= 3:
            duration = max(1e-3, self._last_send - self._round_started)
            self.pacer.on_retry_round(self._round_rate, duration, opened, self._opened_rounds[-2])
        self.loss = estimate_loss(led.first_attempt_histogram())
        if self.round == 1 and self._collapsed():
            self._opened_rounds.pop()  # round 1 is not over: it goes on if delivery comes back
            if not self._outage_look(now):
                self._note_collapse()
                self.abort(self.facts.warnings.pop(), now)
            return
        if self._bytes_capped:
            self._after_sweep(now)
            return
        if self._begin_round(now):
            return
        self._after_sweep(now)

    def _outage_look(self, now: float) -> bool:
        """Delivery stopped in round 1: after the next of ``OUTAGE_WAITS``, send a few cells
        not delivered yet and a few open ones (to the first destination port), and judge
        them when they settle (``_after_outage_look``). False when the looks are spent."""
        if self._outage_looks >= len(OUTAGE_WAITS) or self._outage_looks_total >= MAX_OUTAGE_LOOKS:
            return False
        d0 = self.plan.dst_ports[0]
        v = self.ledger.view(d0)
        planned = self._planned
        state = v.state[planned]
        pending = planned[state == PENDING]
        unsent = pending[v.sent[pending] == v.base[pending]]
        fresh = unsent if len(unsent) else pending
        opened = planned[state == OPEN]
        if not len(fresh):
            return False
        new = self.rng.sample(fresh.tolist(), min(OUTAGE_CELLS, len(fresh)))
        old = self.rng.sample(opened.tolist(), min(OUTAGE_CELLS, len(opened)))
        self._outage_new = [int(x) for x in new]
        self._outage_old = {int(x): int(v.received[x]) for x in old}
        srcs = np.asarray(self._outage_new + list(self._outage_old), dtype=np.intp)
        only = {int(x): [d0] for x in srcs} if self._per_src > 1 else {}
        self._begin(Stage.OUTAGE, srcs, only, now, judging=False)
        self._next_send = max(self._next_send, now + OUTAGE_WAITS[self._outage_looks])
        self._outage_looks += 1
        self._outage_looks_total += 1
        return True

    def _after_outage_look(self, now: float) -> None:
        """A look settled: delivery is back (a new cell came through: go on with round 1),
        or established flows pass and new ones do not (a limit that filled: the run ends
        as before), or nothing came through (look again, later; the run ends when the
        looks are spent)."""
        v = self.ledger.view(self.plan.dst_ports[0])
        back = any(v.state[s] == OPEN for s in self._outage_new)
        old_pass = sum(int(v.received[s]) > n for s, n in self._outage_old.items())
        if back:
            since = self._dark_since if self._dark_since is not None else now
            self._outages.append(max(0.0, self._last_send - since))
            self.facts.collapse = None
            self._dark_since = None
            self._outage_looks = 0
            self._resume_round(now)
            return
        if not old_pass and self._outage_look(now):
            return
        self._note_collapse(established=old_pass, looked=self._outage_looks)
        self.abort(self.facts.warnings.pop(), now)

    def _resume_round(self, now: float) -> None:
        """Go on with round 1 after delivery came back: the cells it has not sent yet, then
        the round ends as any does (the cells sent while nothing got through are retried
        in the rounds after it)."""
        srcs, only = self._owed(1)
        if len(srcs) and self._fits(
            len(srcs) * self._per_src - sum(self._per_src - len(d) for d in only.values())
        ):
            self._begin(Stage.SWEEP, srcs, only, now, judging=True)
            return
        self.stage = Stage.SWEEP
        self._after_round(now)

    def _note_collapse(self, *, established: int = 0, looked: int = 0) -> None:
        n = self.facts.collapse or 0
        if established:
            self.facts.warnings.append(
                f"delivery stopped by time, not by port range, after about {n:,} flows: a "
                "session, NAT-pool or connection-tracking limit on the path (sent again a "
                f"while later, {established} of the flows that had got through still did, and "
                "no new one); cells sent after it are unknown"
            )
        elif looked:
            self.facts.warnings.append(
                f"delivery stopped by time, not by port range, after about {n:,} flows and "
                f"did not come back in {looked} looks over {sum(OUTAGE_WAITS[:looked]):g} s: "
                "a session, NAT-pool or connection-tracking limit on the path, the path gone "
                "down, or a policy that now drops everything; cells sent after it are unknown"
            )
        else:
            self.facts.warnings.append(
                f"delivery stopped by time, not by port range, after about {n:,} flows: a "
                "session, NAT-pool or connection-tracking limit on the path (or a policy that "
                "now drops everything); cells sent after it are unknown"
            )

    def _after_sweep(self, now: float) -> None:
        """The rounds are over: recheck, then ICMP tests, then the end."""
        if self.settings.recheck and not self._bytes_capped and self._start_recheck(now):
            return
        self._start_probe(now)

    # -- recheck ------------------------------------------------------------------------------

    def _start_recheck(self, now: float) -> bool:
        if self.plan.cells < 4 * RECHECK_SAMPLE or self._recheck:
            return False
        led = self.ledger
        planned = self._planned
        if not any((led.view(d).state[planned] == PENDING).any() for d in self.plan.dst_ports):
            # Every cell was seen (or rejected): the sweep's random order spreads each range
            # over the whole sweep, so a change during it would have left dark cells, and
            # delivery never stopped. A recheck could only learn about the time after the
            # run; the verdicts are facts of the run.
            return False
        picks: dict[tuple[int, int], str] = {}
        # First the islands: an open cell between dark neighbours, a dark one between open
        # neighbours. A change in the middle of a sweep leaves exactly these (the cells sent
        # before it keep the old verdict amid the new); a path that did not change has
        # almost none, so they cost little and find a change that uniform samples miss.
        for verdict, code in (("open", 1), ("dark", PENDING)):
            islands = self._islands(code)
            if len(islands) > RECHECK_SAMPLE:
                islands = self.rng.sample(islands, RECHECK_SAMPLE)
            cells = self._sample_cells(code)
            if len(cells) > RECHECK_SAMPLE // 2:
                cells = self.rng.sample(cells, RECHECK_SAMPLE // 2)
            for c in cells:
                picks[c] = verdict
            for c in islands:
                picks[c] = verdict if verdict == "open" else "dark island"
        copies_left = [c for c in picks if self._may_send(*c)]
        if not copies_left or not self._fits(RECHECK_TRIES * len(copies_left)):
            return False
        self._recheck = {c: picks[c] for c in copies_left}
        self._recheck_tries = 0
        self._recheck_sent = {}
        self._recheck_seen = set()
        self._recheck_att = {c: int(led.view(c[0]).sent[c[1]]) + 1 for c in self._recheck}
        return self._send_recheck(now)

    def _may_send(self, dst: int, src: int) -> bool:
        """Whether a cell may get one more datagram: never more than --copies a cell in an
        epoch, never past the attempt numbers a datagram can carry."""
        v = self.ledger.view(dst)
        sent = int(v.sent[src])
        return sent < 255 and sent - int(v.base[src]) < self.plan.copies

    def _islands(self, code: int) -> list[tuple[int, int]]:
        """Cells in ``code``'s state whose neighbours (in planned order) are both in the
        other state (open among dark, or dark among open)."""
        return [c for d in self.plan.dst_ports for c in self._islands_of(d, code)]

    def _islands_of(self, dst: int, code: int) -> list[tuple[int, int]]:
        planned = self._planned_sorted
        other = PENDING if code == 1 else 1
        state = self.ledger.view(dst).state[planned]
        if len(state) < 3:
            return []
        mid = (state[1:-1] == code) & (state[:-2] == other) & (state[2:] == other)
        return [(dst, int(s)) for s in planned[1:-1][mid]]

    def _lossy_blocks(self) -> dict[int, list[int]]:
        """Per destination port, the blocks whose open cells needed retries."""
        return {
            d: [i for i, b in enumerate(bs) if b.losses > 0]
            for d, bs in self.block_evidence().items()
        }

    def _sample_cells(self, code: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for d in self.plan.dst_ports:
            srcs = self._planned[self.ledger.view(d).state[self._planned] == code]
            if len(srcs):
                pick = self.rng.sample(srcs.tolist(), min(RECHECK_SAMPLE, len(srcs)))
                out += [(d, s) for s in pick]
        return out

    def _send_recheck(self, now: float) -> bool:
        # Open cells until seen (or enough tries that loss cannot explain the silence);
        # dark islands as often (one dark cell amid open ones is far likelier a lossy open
        # cell than a rule of one port); other dark cells once.
        todo = [
            c
            for c, v in self._recheck.items()
            if c not in self._recheck_seen
            and (v in ("open", "dark island") or self._recheck_tries == 0)
        ]
        todo = [c for c in todo if self._may_send(*c)]
        if not todo:
            return False
        self._recheck_tries += 1
        by_src: dict[int, list[int]] = {}
        for d, s in todo:
            self._recheck_sent[(d, s)] = self._recheck_sent.get((d, s), 0) + 1
            by_src.setdefault(s, []).append(d)
        srcs = np.asarray(sorted(by_src), dtype=np.intp)
        full = len(self.plan.dst_ports)
        only = {s: ds for s, ds in by_src.items() if len(ds) != full}
        self._begin(Stage.RECHECK, srcs, only, now, judging=False)
        return True

    def _note_recheck(self, recs: bytes | memoryview) -> None:
        rec = np.frombuffer(recs, dtype=_RECORD)
        for d, s, a in zip(
            rec["dst"].tolist(), rec["src"].tolist(), rec["att"].tolist(), strict=True
        ):
            need = self._recheck_att.get((d, s))
            if need is not None and a >= need:
                self._recheck_seen.add((d, s))

    def _recheck_tries_needed(self) -> int:
        """Tries an open cell gets in the recheck before its silence means a change: enough
        that the path's loss leaves a one-in-a-thousand chance. The loss is the worst of a
        block's and of the cells that needed retries (in an ECMP mix the lossy member's
        flows lose far more than their blocks show)."""
        flat = [b for bs in self.block_evidence().values() for b in bs if b.opened]
        pool = Pool.of(flat)
        worst = max((loss_upper(b, pool) for b in flat), default=0.0)
        if pool.retry_trials:
            worst = max(worst, wilson_upper(pool.retry_losses, pool.retry_trials))
        if worst <= 0.0:
            return RECHECK_TRIES
        if worst >= 0.95:
            return MAX_RECHECK_TRIES
        need = math.ceil(math.log(1e-3) / math.log(worst))
        return max(RECHECK_TRIES, min(MAX_RECHECK_TRIES, need))

    def _after_recheck(self, now: float) -> None:
        pending_open = [
            c
            for c, v in self._recheck.items()
            if v in ("open", "dark island") and c not in self._recheck_seen
        ]
        if (
            pending_open
            and self._recheck_tries < self._recheck_tries_needed()
            and self._send_recheck(now)
        ):
            return
        opened_blocks = {
            (d, i) for d, bs in self.block_evidence().items() for i, b in enumerate(bs) if b.opened
        }
        changed = []
        needed = self._recheck_tries_needed()
        for (d, s), v in self._recheck.items():
            seen = (d, s) in self._recheck_seen
            if v == "open" and not seen:
                if self._recheck_sent.get((d, s), 0) >= needed:  # else --copies cut it short
                    changed.append((d, s, v, "dark"))
            elif v != "open" and seen and (d, int(self._block_of[s])) not in opened_blocks:
                # A dark cell among open ones that got through is loss the rounds missed (it
                # is open now, and stays so); one in a block with nothing open is a change.
                changed.append((d, s, "dark", "open"))
        opened = [c for c, v in self._recheck.items() if v == "open"]
        stopped = len(opened) >= 8 and not any(c in self._recheck_seen for c in opened)
        self._recheck = {}
        if stopped and not any(after == "open" for *_, after in changed):
            # Not one open cell got through again: not a port range that changed, but
            # delivery that stopped (a limit on the path, the agent's host, a path down).
            self.facts.warnings.append(
                f"after the sweep nothing got through any more: none of {len(opened)} open "
                "cells sent again arrived (a session, NAT or connection-tracking limit, the "
                "agent's host out of fragment reassembly memory for large datagrams, or the "
                "path went down); the verdicts are the sweep's, and the run is not complete"
            )
            self._delivery_stopped = True
            self._start_probe(now)
            return
        if len(changed) < 2:
            changed = []  # one odd cell is loss's business, not a changed policy
        if changed and self.facts.epochs < MAX_EPOCHS and not self._fits(self.plan.cells):
            self.facts.warnings.append(
                "the path changed during the run: "
                + _describe_changes(changed)
                + "; the probe's ceiling per run leaves no room to repeat the sweep, so the "
                "verdicts mix the path before and after the change"
            )
            self._start_probe(now)
            return
        if changed and self.facts.epochs < MAX_EPOCHS:
            self._changed = changed
            self.facts.warnings.append(
                "the path changed during the run: "
                + _describe_changes(changed)
                + "; the sweep was repeated and the verdicts are from the repeat"
            )
            self.facts.epochs += 1
            # The recheck's rejects may have emptied an ICMP sender's bucket: a repeat sent
            # at once could then meet a reject range with no token left and see it silent,
            # with nothing to say its silence is in doubt. It waits for a full bucket (at
            # most Linux's burst of six at one a second).
            refill = max(
                (b.ready_at(silence.DEFAULT_BURST) for b in self.senders.values() if b.errors),
                default=now,
            )
            # What the first sweep found open, to say at the end what the repeat closed.
            self._first_open = {
                d: self.ledger.view(d).state[self._planned] == 1 for d in self.plan.dst_ports
            }
            self.ledger = self.ledger.new_epoch()
            self.round = 0
            self._opened_rounds = []
            self.senders = {}
            self._confirms = {}
            self._tested = {}
            self._reject_tests[:] = 0
            self._reject_silent[:] = 0
            self._error_rtt = {}
            self._recent_rtt = {}
            self._missed_controls = {}
            self._unanswered = {}
            if not self._begin_round(now):
                self._start_probe(now)
                return
            limit = now + silence.DEFAULT_BURST * silence.DEFAULT_PERIOD
            self._next_send = max(self._next_send, min(refill, limit))
            return
        if changed:
            self.facts.warnings.append(
                "the path kept changing during the run: "
                + _describe_changes(changed)
                + "; the verdicts are the latest sweep's"
            )
        self._start_probe(now)

    # -- ICMP tests ----------------------------------------------------------------------------

    def _start_probe(self, now: float) -> None:
        if self._open_before_tests is None:
            led, planned = self.ledger, self._planned
            states = {d: led.view(d).state for d in self.plan.dst_ports}
            self._open_before_tests = (
                led,
                {d: st == OPEN for d, st in states.items()},
                sum(int((st[planned] == PENDING).sum()) for st in states.values()),
            )
        if self._bytes_capped or self.icmp_budget <= 0:
            if self._bytes_capped and not self.senders:  # nothing more may be sent
                self._look(self._dark_runs(), now, send=False)
            self._conclude(now, tested=False)
            return
        self._confirmations = self._confirmations_needed()  # the loss is known by now
        for address, cell in silence.verified_senders(self.ledger).items():
            bucket = self.senders.get(address)
            if bucket is None:
                bucket = self.senders[address] = silence.SenderBucket(address)
            bucket.control = cell
            measured = bucket.measured_period()
            if measured is not None:
                bucket.period = measured
            if log.isEnabledFor(logging.DEBUG):
                t0 = self._first_send if self._first_send is not None else self.started
                log.debug(
                    "icmp sender %s: %d errors, at +%s s; period %.3fs",
                    address, bucket.errors,
                    ",".join(f"{t - t0:.3f}" for t in bucket.times[:40]), bucket.period,
                )  # fmt: skip
        runs = self._dark_runs()
        if not self.senders and not self._looked:
            self._looked = True
            if self._look(runs, now):
                return
        if not silence.limited(runs, across=self._capped()):
            self._conclude(now, tested=False)
            return
        self._probe_started = now
        if not self._next_burst(now, runs):
            self._conclude(now, tested=True)

    def _look(self, runs: list[silence.Run], now: float, *, send: bool = True) -> bool:
        """No ICMP error came back at all. A sender's bucket may have been empty since
        before the run (an earlier run, other traffic from this host), and a run shorter than
        its refill never met a token: every reject of it would pass for a drop. Each eighth
        of a dark run not sent to again ``silence.LOOK_AFTER`` after the run's first
        datagram gets a sample in one burst once that much time has passed (the first
        reject in it takes the refilled token); an error starts the tests, none confirms the
        silence. Where the burst cannot go (``--copies`` spent, the run's caps, or not
        ``send``), those cells are ``icmp_limited`` at the end, with a warning. False when
        no burst was sent."""
        due = (self._first_send if self._first_send is not None else self.started) + (
            silence.LOOK_AFTER
        )
        led = self.ledger
        samples: list[list[tuple[int, int]]] = []
        for r in sorted(runs, key=lambda r: -len(r.srcs)):
            if not (r.labels == silence.U).any():
                continue
            n = len(r.srcs)
            k = min(silence.SEGMENTS, n)
            bounds = (np.arange(k + 1) * n) // k
            at = ((np.arange(k) + r.phase) * n / k).astype(np.intp)
            # (per source port: the last datagram to any destination port)
            stale = [
                (r.dst, int(r.srcs[at[j]]))
                for j in range(k)
                if np.nanmax(self._sent_at[r.srcs[bounds[j] : bounds[j + 1]]], initial=-np.inf)
                < due
            ]
            if stale:  # an eighth sent to again after a refill: its silence stands
                samples.append(stale)
        if not samples:
            return False
        # Each run's first sample first (the token goes to the first reject), then the rest.
        order = [cells[j] for j in range(silence.SEGMENTS) for cells in samples if j < len(cells)]
        order = [c for c in order if self._may_send(*c)][: silence.MAX_BURST_CELLS]
        if not send or not order or not self._fits(len(order)):
            # Their silence stays unchecked: said so at the end, not taken for drops.
            for cells in samples:
                d = cells[0][0]
                srcs = np.asarray([src for _, src in cells], dtype=np.intp)
                self._unlooked[d] = np.union1d(self._unlooked.get(d, srcs[:0]), srcs)
            return False
        seq = [(d, s, int(led.view(d).sent[s]) + 1) for d, s in order]
        self._burst = _Burst(seq, set(), sent_at=max(now, due), look=True)
        self._begin(Stage.PROBE, np.zeros(1, dtype=np.intp), {}, now, judging=False)
        self._next_send = max(now, due)
        self.facts.icmp_tests += 1
        return True

    def _next_burst(self, now: float, runs: list[silence.Run]) -> bool:
        budget = self.icmp_budget
        started = self._probe_started if self._probe_started is not None else now
        if now - started >= budget:
            return False
        wanted = silence.all_needs(runs)
        pending_confirms = self._unconfirmed(runs)
        if not wanted and not pending_confirms:
            return False
        controls = self._controls()
        if controls is None:
            self._no_control = True  # (the end's warning says so, not "the budget")
            return False
        # In sending order: cells expected to be drops (they spend no token), then the
        # boundary searches (one token each: the first reject of each), then expected
        # rejects (one token each), then one control per sender. The burst waits until the
        # main sender has refilled that many tokens.
        expected_drops = [(n.dst, n.src) for n in wanted if n.kind == "cheap"]
        cheap = list(dict.fromkeys([*pending_confirms, *expected_drops]))
        cheap = cheap[: silence.MAX_BURST_CELLS]
        taken = set(cheap)
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for n in wanted:
            if n.kind == "search" and n.group is not None and (n.dst, n.src) not in taken:
                groups.setdefault(n.group, []).append((n.dst, n.src))
        # Tokens the main sender can refill before the budget ends: near the end a smaller
        # burst still fits (a boundary search needs only one, and its control one more).
        main = max(self.senders.values(), key=lambda b: b.errors)
        fit = math.ceil((started + budget - main.spent_at()) / main.period) - 1
        tokens_left = min(silence.DEFAULT_BURST, fit)
        if tokens_left < 1:
            return False
        chosen = list(groups)[: tokens_left - 1]
        searches = [cell for g in chosen for cell in groups[g]]
        taken.update(searches)
        costly = [(n.dst, n.src) for n in wanted if n.costly and (n.dst, n.src) not in taken]
        # The controls (one token of each sender) are what confirm drops; a burst of expected
        # rejects alone needs none, unless one of them stayed silent in a test before (it may
        # be a drop, or met an empty bucket).
        led = self.ledger
        need_controls = bool(cheap or chosen) or any(
            self._was_tested(d, s) for d, s in costly[: tokens_left - len(chosen)]
        )
        wanted_costly = costly
        costly = costly[: max(0, tokens_left - len(chosen) - int(need_controls))]
        tokens = len(chosen) + len(costly)
        # Tokens each sender must have refilled: the main one's for every expected reject and
        # its control; any other's for its control.
        asked = {
            a: tokens + int(need_controls) if b is main else 1
            for a, b in self.senders.items()
            if b is main or need_controls
        }
        ready = max(self.senders[a].ready_at(n) for a, n in asked.items())
        if ready - started >= budget:
            return False
        order: list[tuple[int, int]] = [*cheap, *searches, *costly]
        order = [c for c in order if c not in controls.values()]
        seq: list[tuple[int, int, int]] = []
        for d, s in order:
            if self._may_send(d, s):
                seq.append((d, s, int(led.view(d).sent[s]) + 1))
        at: dict[str, int] = {}
        for address, (d, s) in controls.items() if need_controls else ():
            at[address] = len(seq)  # _controls chose cells that may be sent
            seq.append((d, s, int(led.view(d).sent[s]) + 1))
        # After the controls, as many expected rejects again: answered, they are samples
        # the wait did not pay for, and show the sender refills faster than thought.
        extra = [c for c in wanted_costly[len(costly) :] if c not in controls.values()]
        for d, s in extra[: tokens + 1] if at else ():
            if self._may_send(d, s):
                seq.append((d, s, int(led.view(d).sent[s]) + 1))
        if len(seq) == len(at) or not self._fits(len(seq)):
            return False
        pause = self._burst_pause(at)
        split = min(at.values()) if at and pause > 0 else 0
        self._burst = _Burst(
            seq,
            set(cheap + searches + costly),
            sent_at=max(now, ready),
            controls=at,
            asked=asked,
            since=main.spent_at(),
            main=main.address,
            split=split,
            pause=pause if split else 0.0,
        )
        # One burst, sent by _send_burst in a single Send (a queue of one), or in two: the
        # cells, then, ``pause`` later, the controls and what follows them.
        queue = np.zeros(2 if split else 1, dtype=np.intp)
        self._begin(Stage.PROBE, queue, {}, now, judging=False)
        self._next_send = max(now, ready)
        self.facts.icmp_tests += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "icmp test %d at +%.3fs: %d cheap, %d search, %d costly, %d more; controls "
                "at %s; tokens %s; due +%.3fs; period %.3fs",
                self.facts.icmp_tests, now - started, len(cheap), len(searches), len(costly),
                len(seq) - len(cheap) - len(searches) - len(costly) - len(at), at, asked,
                max(0.0, ready - now), main.period,
            )  # fmt: skip
        return True

    def _burst_pause(self, controls: dict[str, int]) -> float:
        """How long a burst's controls wait after its cells: the widest spread between a
        sender's fastest and slowest errors, among the burst's senders (0 below
        ``MIN_PAUSE``). The order argument holds at the sender, not here: a cell whose
        datagrams reach it behind a slow queue (rules after a delay line, a QoS class)
        arrives after a control sent just behind it, which then takes the token it needed."""
        spread = max(
            (hi - lo for a, (lo, hi) in self._error_rtt.items() if a in controls), default=0.0
        )
        if spread < MIN_PAUSE:
            return 0.0
        return min(MAX_PAUSE, spread * 1.25 + MIN_PAUSE)

    def _send_burst(self, now: float) -> Send:
        burst = self._burst
        assert burst is not None
        if burst.split and self._qpos == 0:  # the cells; the controls after the pause
            order = burst.order[: burst.split]
            burst.resume_at = now + burst.pause
        elif burst.split:
            order = burst.order[burst.split :]
        else:
            order = burst.order
        groups: list[tuple[int, int, np.ndarray]] = []
        run: list[int] = []
        key: tuple[int, int] | None = None
        for d, s, a in order:
            if key != (d, a) and run:
                assert key is not None
                groups.append((key[0], key[1], np.asarray(run, dtype=np.intp)))
                run = []
            key = (d, a)
            run.append(s)
        if run and key is not None:
            groups.append((key[0], key[1], np.asarray(run, dtype=np.intp)))
        if self._qpos == 0:
            burst.sent_at = now
        self._qpos += 1
        burst.send_began = now
        if self.pacer.burst:
            # A limiter is suspected on the path: at the pacer's rate, in its small bursts. A
            # policer passes a burst of a few packets, and a test burst sent back to back
            # lost its last datagrams, the controls, to it every time: rejects read as
            # turned drops. A few milliseconds, against a refill of a second.
            return Send(
                tuple(groups), len(order), self.pacer.burst, self.pacer.burst / self._rate()
            )
        return Send(tuple(groups), len(order))  # back to back: no token refills inside it

    def _controls(self) -> dict[str, tuple[int, int]] | None:
        """One cell per ICMP sender that it rejected (verified) and that may be sent again;
        None when a sender has none left: no silent cell can be confirmed without it."""
        out: dict[str, tuple[int, int]] = {}
        for address, b in self.senders.items():
            if b.control is not None and self._may_send(*b.control):
                out[address] = b.control
        if len(out) < len(self.senders):
            found = silence.verified_senders(self.ledger, usable=self._may_send)
            for address, b in self.senders.items():
                if address not in out and address in found:
                    b.control = out[address] = found[address]
        return out if out and len(out) == len(self.senders) else None

    def _capped(self) -> bool:
        """Whether some ICMP sender may have capped its errors (see ``silence.limited``)."""
        return not self.senders or not all(b.uncapped() for b in self.senders.values())

    def _was_tested(self, dst: int, src: int) -> bool:
        tested = self._tested.get(dst)
        return tested is not None and bool(tested[src])

    def _dark_runs(self) -> list[silence.Run]:
        return list(
            silence.dark_runs(self.ledger, self._confirms, self._tested, self._confirmations)
        )

    def _rejects_lose(self) -> bool:
        """Whether tests of rejects have been lost on this path (at least two, a tenth of
        them or more): a missed control is then not alone proof of a slow refill."""
        silent = int(self._reject_silent.sum())
        return silent >= 2 and silent >= 0.1 * int(self._reject_tests.sum())

    def _note_reject_tests(self, src: int, tests: int, silent: int) -> None:
        block = int(self._block_of[src])
        if block < 0:
            return
        if block >= len(self._reject_tests):
            size = int(self._block_of.max()) + 1
            self._reject_tests = np.zeros(size, dtype=np.int64)
            self._reject_silent = np.zeros(size, dtype=np.int64)
        self._reject_tests[block] += tests
        self._reject_silent[block] += silent

    def _confirmations_needed(self) -> np.ndarray:
        """Per source port, the silent tests that confirm a drop there. A test lost on the
        way to the firewall is silent too, so where the path loses datagrams two are not
        enough: as many as leave a chance under 1e-4 that a reject's tests were all lost.
        The loss is the one where the test goes: its block's (the worst over destination
        ports: loss by source ports shows on all of them), and for a block that delivered
        nothing, the worse of the nearest measured blocks on either side (a dark run is
        bounded by open cells, and a loss band upstream of a reject shows beside it); the
        retried cells' where they lost far more than first attempts show (an ECMP member
        that loses half its flows' datagrams); the tests of rejects that were lost in a
        block (``_reject_tests``: a lossy band exactly in front of a reject delivers
        nothing, so only its rejects' tests show its loss); then the worst of each block
        and its two neighbours (a block's open part may be clean where its dark part is
        not). No loss seen anywhere: two."""
        evidence = self.block_evidence()
        flat = [b for bs in evidence.values() for b in bs]
        pool = Pool.of(flat)
        nblocks = max((len(bs) for bs in evidence.values()), default=0)
        loss = np.full(nblocks, np.nan)

        def lossy(b: BlockEvidence) -> bool:
            return lossier(b.losses, b.losses + b.opened, pool.losses, pool.trials)

        # A block no lossier than the plan takes the loss of the plan's blocks that are not
        # lossier either: a policed band elsewhere says nothing of a test's chances here.
        clean = Pool.of([b for b in flat if not lossy(b)])
        for bs in evidence.values():
            for i, b in enumerate(bs):
                if not b.opened:
                    continue
                if lossy(b):
                    p = wilson_upper(b.losses, b.losses + b.opened)
                else:
                    p = wilson_upper(clean.losses, clean.trials) if clean.losses else 0.0
                # Cells that needed a retry and lost far more after it (an ECMP member
                # that loses half its flows' datagrams, whatever the block's first tries)
                if b.retry_losses and lossier(
                    b.retry_losses, b.retry_trials, pool.losses, pool.trials
                ):
                    p = max(p, wilson_upper(b.retry_losses, b.retry_trials))
                loss[i] = np.fmax(loss[i], p)
        # Where tests of rejects were lost (the only loss a band that delivers nothing, in
        # front of a reject, ever shows): at least that loss, in that block.
        for i in np.flatnonzero(self._reject_silent[:nblocks]).tolist():
            p = wilson_upper(int(self._reject_silent[i]), int(self._reject_tests[i]))
            loss[i] = np.fmax(loss[i], p)
        known = np.flatnonzero(~np.isnan(loss))
        if not len(known):
            loss[:] = 0.0
        else:  # the dark blocks: the worse of the nearest measured ones on either side
            idx = np.arange(nblocks)
            after = np.searchsorted(known, idx)
            left = loss[known[np.clip(after - 1, 0, len(known) - 1)]]
            right = loss[known[np.clip(after, 0, len(known) - 1)]]
            loss = np.where(np.isnan(loss), np.fmax(left, right), loss)
            # A block's open part may be clean where its dark part is not (a loss band
            # upstream of a reject starts where the reject does): its neighbours' loss too.
            loss = np.maximum(loss, np.maximum(np.r_[loss[1:], 0.0], np.r_[0.0, loss[:-1]]))
        # 0.5 and over: 14 tests, clipped to the most; no loss: one, raised to two.
        need = np.ceil(np.log(1e-4) / np.log(np.clip(loss, 1e-12, 0.5)))
        need = np.clip(need, silence.CONFIRMATIONS, silence.MAX_CONFIRMATIONS).astype(np.uint8)
        out = np.full(65536, silence.CONFIRMATIONS, dtype=np.uint8)
        mapped = self._block_of >= 0
        out[mapped] = need[self._block_of[mapped]]
        return out

    def _unconfirmed(self, runs: list[silence.Run]) -> list[tuple[int, int]]:
        """Cells silent in a test, awaiting the rest of their confirmations."""
        out: list[tuple[int, int]] = []
        for d, conf in self._confirms.items():
            v = self.ledger.view(d)
            once = np.flatnonzero((conf > 0) & (conf < self._confirmations) & (v.state == PENDING))
            out += [(d, int(s)) for s in once]
        return out

    def _after_burst(self, now: float) -> None:
        burst = self._burst
        self._burst = None
        if burst is not None:
            silent = int(self._reject_silent.sum())
            self._judge_burst(burst)
            if int(self._reject_silent.sum()) != silent:  # a reject's test was lost
                self._confirmations = self._confirmations_needed()
            if burst.look:  # with what it found (or not), as if from the start
                self._start_probe(now)
                return
        runs = self._dark_runs()
        if not self._next_burst(now, runs):
            self._conclude(now, tested=True)

    def _judge_burst(self, burst: _Burst) -> None:
        led = self.ledger
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "icmp test %d judged (sent over %.3fs): answers %s of %d, errors %s",
                self.facts.icmp_tests, burst.send_time, sorted(burst.answered_at),
                len(burst.order), burst.counts,
            )  # fmt: skip
        # A sender answered its control (the last cell it was sent) only if its bucket held
        # a token for every reject of the burst. If it did not, and also sent back fewer
        # errors than the tokens waited for, it refills slower than thought (a search's
        # points on the reject side may take more tokens than the one counted for them).
        answered_all = bool(burst.controls) or all(
            burst.counts.get(a, 0) >= n for a, n in burst.asked.items()
        )
        lossy = self._rejects_lose()
        for address, index in burst.controls.items():
            if burst.answers.get(address, -1) < index:
                answered_all = False
                missed = self._missed_controls[address] = self._missed_controls.get(address, 0) + 1
                # On a path that loses tests of rejects, one missed control is as likely lost
                # as unanswered: only two in a row say the sender refills slower.
                if burst.counts.get(address, 0) < burst.asked.get(address, 1) and (
                    not lossy or missed >= 2
                ):
                    bucket = self.senders[address]
                    bucket.period = min(silence.MAX_PERIOD, bucket.period * 1.5)
                    log.debug("icmp sender %s missed its control: period %.3fs", address,
                              bucket.period)  # fmt: skip
            else:
                self._missed_controls[address] = 0
        for address in burst.controls:  # answered nothing at all, not even a cell before
            quiet = burst.counts.get(address, 0) == 0
            self._unanswered[address] = self._unanswered.get(address, 0) + 1 if quiet else 0
        for i, (d, s, _a) in enumerate(burst.order):
            if i not in burst.controls.values():  # chosen by position (controls are not)
                tested = self._tested.get(d)
                if tested is None:
                    tested = self._tested[d] = np.zeros(65536, dtype=bool)
                tested[s] = True
        if not burst.answers:
            return
        # A candidate is confirmed dropped when every sender answered something after it.
        # (A burst without controls: every sender must have answered something after it.)
        horizon = min(
            (burst.answers.get(s, -1) for s in burst.controls or self.senders), default=-1
        )
        # A burst whose sending took a tenth of a sender's refill period or more (paced, or
        # a busy host stretched it) may have met a refill inside it: an early cell silent
        # for an empty bucket, a later one answered from the new token. Its silences then
        # confirm nothing (its answers still count).
        stretched = any(
            burst.send_time >= STRETCHED * self.senders[a].period
            for a in burst.controls or self.senders
            if a in self.senders
        )
        controls = set(burst.controls.values())
        for i, (d, s, _a) in enumerate(burst.order):
            if i >= horizon:
                break
            conf = self._confirms.get(d)
            if i in burst.answered_at:
                # A reject, tested while its sender had a token: it answered this time, and
                # each earlier test it stayed silent in was lost (counted, and no longer a
                # confirmation: only pending cells are confirmed).
                lost = int(conf[s]) if conf is not None else 0
                self._note_reject_tests(s, 1 + lost, lost)
                if lost and conf is not None:
                    conf[s] = 0
                continue
            if i in controls:  # a known reject, silent while its sender had a token: lost
                self._note_reject_tests(s, 1, 1)
                continue
            if (d, s) not in burst.candidates or stretched:
                continue
            v = led.view(d)
            if v.state[s] != PENDING:
                continue  # answered (rejected) or credited (open)
            if conf is None:
                conf = self._confirms[d] = np.zeros(65536, dtype=np.uint8)
            conf[s] = min(255, int(conf[s]) + 1)
        # A sender that answered more than it was asked for had refilled more tokens than
        # thought since its last error: its period is at most that wait over the count.
        # (Nothing else lowers it: an answered burst only says the wait was long enough.)
        if answered_all and burst.main in self.senders:
            b = self.senders[burst.main]
            n = burst.counts.get(burst.main, 0)
            wait = burst.sent_at - burst.since
            if n > burst.asked.get(burst.main, 1) and wait > 0:
                b.period = max(silence.MIN_PERIOD, min(b.period, wait / n))

    def _conclude(self, now: float, *, tested: bool) -> None:
        if not self._drained and self._needs_drain():
            # Cells still dark: before calling them so, wait once more by the slowest
            # delivery seen (the stages waited by the quiet one).
            self._conclude_tested = tested
            self._begin(Stage.DRAIN, np.zeros(0, dtype=np.intp), {}, now, judging=False)
            return
        runs = self._dark_runs()
        if tested or silence.limited(runs, across=self._capped()):
            self.conclusion = silence.conclude(self.ledger, runs)
            self._icmp_warnings(tested)
        elif self._unlooked:
            # The look could not be sent: their silence was never met by a refilled
            # bucket, so dropped or rejected is not known.
            unchecked = [r for r in runs if r.dst in self._unlooked and
                         np.isin(r.srcs, self._unlooked[r.dst]).any()]  # fmt: skip
            n = silence.conclude(self.ledger, unchecked).icmp_limited
            if n:
                self.facts.warnings.append(
                    f"no ICMP error came back, and {n:,} silent cells could not be sent "
                    "again after a router's refill (--copies or the run's caps left no "
                    "datagram for it): a reject there would look like a drop (icmp_limited)"
                )
        self._finish(True)

    def _icmp_warnings(self, tested: bool) -> None:
        c = self.conclusion
        if c is None:
            return
        # The probe host's own firewall answers from the probe's address: a limiter too
        # (tested like any), but not one on the path.
        buckets = [b for b in self.senders.values() if b.errors]
        own = [b for b in buckets if _same_address(b.address, self.source)]
        path = [b for b in buckets if not _same_address(b.address, self.source)]
        parts = []
        if path:
            rates = ", ".join(_limiter_text(b) for b in path)
            parts.append(f"ICMP errors were rate-limited on the path ({rates})")
        if own:
            parts.append(
                f"ICMP errors from this host's own firewall were rate-limited "
                f"({_limiter_text(own[0])})"
            )
        if c.inferred_rejected or c.inferred_blocked:
            parts.append(
                f"{c.inferred_rejected + c.inferred_blocked:,} cells take their verdict from "
                f"{self.facts.icmp_tests} paced test bursts of their ranges (inferred)"
            )
        if c.icmp_limited:
            why = "--icmp-budget 0" if not tested else f"the {self.icmp_budget:g}s ICMP budget"
            why = f"within {why}"
            if tested and self._no_control:  # the tests ended before the budget did
                why = "as --copies left no cell a sender rejected to test them by"
            parts.append(
                f"{c.icmp_limited:,} silent cells could not be told dropped or rejected "
                f"{why} (icmp_limited)"
            )
        if parts:
            self.facts.warnings.append("; ".join(parts))
        # A sender that answered nothing at all in its last bursts, each holding a cell it
        # rejected before, sent when it had refilled, on a path that loses no tests of
        # rejects: it no longer rejects them. (A missed control alone is not that: the
        # cells before it may have taken the tokens.) A policy changed (a reject became a
        # drop), and what it rejected shows the path as it was then.
        missed = self._unanswered
        quiet = sorted(a for a in self.senders if missed.get(a, 0) >= STOPPED_ANSWERING)
        if quiet and not self._rejects_lose():
            n = min(missed[a] for a in quiet)
            self.facts.warnings.append(
                f"{', '.join(quiet)} answered nothing in the last {n} test bursts, each "
                "holding a cell it had rejected before: its rejects may have become drops "
                "(the path changed during the run), and its rejected cells show the path "
                "as it was then"
            )

    # -- the end ------------------------------------------------------------------------------

    def _note_closed_by_repeat(self) -> None:
        """After a repeated sweep, the cells it found dark that the first sweep had open, all
        of them (the change's warning names only the recheck's samples): a policy changed
        there, or a limit per flow (a source port's first datagram passes, later ones not)
        closed them, which looks the same from here."""
        first = self._first_open
        self._first_open = {}
        parts: list[str] = []
        total = 0
        for d, was_open in first.items():
            state = self.ledger.view(d).state[self._planned]
            dark = (state == PENDING) | (state == 2) | (state == 3)  # blocked or rejected
            srcs = np.sort(self._planned[was_open & dark])
            if not len(srcs):
                continue
            total += len(srcs)
            spans = ranges_of(srcs.tolist())
            if len(spans) <= 4:
                where = format_ports(srcs.tolist())
            else:
                where = f"{len(spans):,} ranges between {srcs[0]} and {srcs[-1]}"
            parts.append(f"dst {d} source ports {where}")
        if parts:
            self.facts.warnings.append(
                f"{total:,} cells the first sweep found open were dark in the repeat ("
                + "; ".join(parts)
                + "): a changed policy, or a limit per flow that passes only a source "
                "port's first datagrams, which looks the same"
            )

    def _finish(self, complete: bool) -> None:
        led = self.ledger
        if complete:
            self._untested_if_never_sent()
        wire = self.plan.size + self.settings.header_bytes
        if self.facts.path_mtu is None and self.route_mtu and wire > self.route_mtu:
            self.facts.path_mtu = {"mtu": self.route_mtu, "from": "route", "size": self.plan.size}
        stats = self.facts.agent_stats
        reasm, timeouts = stats.get("reassembly_failures"), stats.get("reassembly_timeouts")
        # Only ours count: unfragmented probe datagrams cannot fail to reassemble, and the
        # host's counters also move for whatever else it receives.
        if self.facts.path_mtu is not None and isinstance(reasm, int) and reasm > 0:
            # The agent's host lost fragmented datagrams: a dark cell may be an open one
            # whose fragments met a full reassembly memory.
            if isinstance(timeouts, int):
                how = (
                    f"the agent's host lost {reasm:,} fragmented datagrams (its reassembly "
                    "memory was full, or fragments overlapped: a firewall that drops by port "
                    "passes all but the first fragment, and they wait there for 30 s, IPv6 60)"
                )
            else:  # an agent that counts every failure, timeouts too
                how = (
                    f"the agent's host failed to reassemble {reasm:,} fragmented datagrams (a "
                    "firewall that drops by port passes the other fragments, and they fill the "
                    "host's reassembly memory for 30 s, IPv6 60)"
                )
            self.facts.warnings.append(
                f"{how}: dark cells may be open, so they are unknown; with --size under the "
                "path MTU nothing is fragmented"
            )
            self._reassembly_lost = True
        elif self.facts.path_mtu is not None and isinstance(timeouts, int) and timeouts > 0:
            self.facts.warnings.append(
                f"{timeouts:,} fragmented datagrams timed out at the agent's host, their first "
                "fragment never there: a firewall that filters by port sees the ports in that "
                "one only, and passes the rest; the host lost none other, so dark cells keep "
                "their verdicts"
            )
        self._note_closed_by_repeat()
        self._opened_by_tests()
        contradicted = self._contradicted_receipts()
        if contradicted:
            self.facts.warnings.append(
                f"the agent reports {contradicted:,} cells received whose datagrams its own host "
                "answered with a verified port-unreachable: its reports cannot be trusted, and "
                "the run is not complete"
            )
        if complete and (self._delivery_stopped or contradicted or self._reassembly_lost):
            self._move("abort")
            complete = False
        elif complete and led.refused_receipts:
            # An agent that reports what was never sent cannot vouch for what was: the
            # verdicts stand as evidence, but the run is not complete.
            self._move("abort")
            complete = False
        if self.phase in (Phase.SETTLING, Phase.PLANNED) and complete:
            self._move("finish")
        if complete:
            self.facts.bound = false_blocked_bound(self.block_evidence())
        led.finish(complete=complete)
        self._finished = complete
        self.loss = estimate_loss(led.first_attempt_histogram())
        if self.facts.path_mtu is not None:
            m = self.facts.path_mtu
            said = (
                f"the probe's route has an MTU of {m['mtu']}"
                if m["from"] == "route"
                else f"{m['from']} reported a next-hop MTU of {m['mtu']}"
            )
            self.facts.warnings.append(
                f"the datagram size ({self.plan.size} bytes) exceeds the path MTU: {said}; "
                "datagrams went out fragmented, as a server's UDP socket sends them (a "
                "firewall's reject may not answer a fragment, Linux's does not: a rejected "
                "range can then show as blocked)"
            )
        if led.refused_receipts:
            self.facts.warnings.append(
                f"the agent reported {led.refused_receipts:,} receipts for datagrams never sent "
                "(or more receipts than datagrams): they were refused, and the run is not "
                "complete (the agent's reports cannot be trusted)"
            )
        self._scattered_warning()
        self._refused_warning()
        if self._outages:
            times = "once" if len(self._outages) == 1 else f"{len(self._outages)} times"
            self.facts.warnings.append(
                f"delivery stopped by time during the sweep and came back ({times}, for "
                f"{max(self._outages):.2g} s at most: an outage on the path, a firewall "
                "reload); the cells sent meanwhile were sent again"
            )

    def _contradicted_receipts(self) -> int:
        """Open cells whose datagram the agent's own host answered, verified, with "port
        unreachable": the agent claims what its host denies."""
        led = self.ledger
        denied = led.icmp_indexes(
            lambda i: (
                i.verified and i.sender == self.target and (i.type, i.code) in PORT_UNREACHABLE
            )
        )
        if not denied:
            return 0
        n = 0
        for d in self.plan.dst_ports:
            v = led.view(d)
            n += int(np.count_nonzero((v.state == 1) & np.isin(v.icmp, denied)))
        return n

    def _needs_drain(self) -> bool:
        if self._quiet_samples == 0 or self.delay_high <= self.delay_quiet:
            return False  # the stages already waited by the slowest delivery seen
        return any(
            bool((self.ledger.view(d).state[self._planned] == PENDING).any())
            for d in self.plan.dst_ports
        )

    def _untested_if_never_sent(self) -> None:
        """A cell the run never sent (a ceiling stopped it first) is untested, not blocked."""
        for d in self.plan.dst_ports:
            v = self.ledger.view(d)
            planned = self._planned
            never = planned[(v.state[planned] == PENDING) & (v.sent[planned] == v.base[planned])]
            for s in never.tolist():
                self.ledger.note_untested(
                    int(s), "not sent: the probe's ceiling per run came first", [d]
                )

    def _opened_by_tests(self) -> None:
        """Cells dark through every round of the sweep that the ICMP tests then delivered:
        the path changed after the sweep (a policy reloaded, or flapping), unless the sweep
        lost all their datagrams, which its loss makes unlikely for more than a few (at
        most a fifth of dark cells x upper loss squared). They stay open (the latest
        evidence), and the report says so."""
        if self._open_before_tests is None:
            return
        led, before, dark = self._open_before_tests
        if led is not self.ledger:
            return  # the sweep was repeated after: its own recheck speaks for it
        total, where = 0, []
        for d, was in before.items():
            new = np.flatnonzero((self.ledger.view(d).state == OPEN) & ~was)
            if len(new):
                total += len(new)
                where.append(f"dst {d} source ports {int(new[0])}-{int(new[-1])}")
        loss = self.loss.upper if self.loss is not None else 0.0
        if total < OPENED_IN_TESTS or total <= 5 * dark * loss**2:
            return
        shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
        self.facts.warnings.append(
            f"the path changed during the run: {total:,} cells dark through the sweep were "
            f"delivered by the ICMP tests after it ({shown}): a policy reloaded or flapping "
            "(or a sweep that lost all their datagrams); they count as open, the latest "
            "evidence, and their neighbours' verdicts may be of another moment"
        )

    def _refused_warning(self) -> None:
        """What the agent threw away, when it threw anything away: the document's
        ``agent_stats`` has the counts, the report says what they mean."""
        raw = self.facts.agent_stats.get("rejected")
        rejected = raw if isinstance(raw, dict) else {}

        def count(reason: str) -> int:
            n = rejected.get(reason, 0)
            return n if isinstance(n, int) else 0

        mac, size = count("bad_mac"), count("malformed")
        if mac + size:
            if mac and size:
                what = (
                    f"{mac + size:,} datagrams that failed its check ({mac:,} with a MAC that "
                    f"does not verify, {size:,} of the wrong length)"
                )
            elif mac:
                what = f"{mac:,} datagrams whose MAC does not verify"
            else:
                what = f"{size:,} datagrams of the wrong length"
            self.facts.warnings.append(
                f"the agent refused {what}: changed on the way, or not sent by this run; none "
                "counts as received, and the cells they named are retried as lost ones"
            )
        dup, old = count("duplicate"), count("other_run")
        if dup:
            self.facts.warnings.append(
                f"the agent received {dup:,} more copies of datagrams it had already counted "
                "(duplicated on the way, or replayed): each counted once"
            )
        if old:
            self.facts.warnings.append(
                f"the agent received {old:,} datagrams of an earlier run (late, or replayed): "
                "none counts in this one"
            )

    def _lossiest(self) -> tuple[list[dict[str, Any]], float]:
        """Where the loss is, when it is not spread over the plan: the ranges of blocks
        whose loss is significantly above the rest's (``lossier``, against the plan's, then
        against what is left once those are out), lossiest first (``LOSSIEST`` at most),
        and the loss of the rest. The report's pooled estimate alone would read "42%" for a
        policer on one destination port of four, and "5%" for one band losing half."""
        ev = [
            (d, i, b.losses, b.losses + b.opened)
            for d, bs in self.block_evidence().items()
            for i, b in enumerate(bs)
            if b.opened
        ]
        rest = {(d, i) for d, i, _, _ in ev}
        for k in range(3):
            lost = sum(f for d, i, f, _ in ev if (d, i) in rest)
            trials = sum(t for d, i, _, t in ev if (d, i) in rest)
            # Then twice the rest's loss at least (the first pass's pool holds the lossy
            # blocks too): a flow-hashed loss (an ECMP member) spreads over every block,
            # unevenly, and is no place.
            twice = 2 * lost / trials if trials and k else 0.0
            rest = {
                (d, i) for d, i, f, t in ev if not (lossier(f, t, lost, trials) and f > twice * t)
            }
        lossy = sorted((d, i) for d, i, _, _ in ev if (d, i) not in rest)
        if not lossy:
            return [], 0.0
        of = {(d, i): (f, t) for d, i, f, t in ev}
        ports = self._planned_sorted
        found: list[dict[str, Any]] = []
        for d in self.plan.dst_ports:
            v = self.ledger.view(d)
            for a, z in _runs([i for dd, i in lossy if dd == d]):
                f = sum(of[(d, i)][0] for i in range(a, z + 1))
                t = sum(of[(d, i)][1] for i in range(a, z + 1))
                span = ports[a * BLOCK : (z + 1) * BLOCK]
                # From the first to the last cell that needed a retry: a lossy band's
                # edges, not the blocks'.
                late = span[v.first[span].astype(np.int64) - v.base[span] > 1]
                if not len(late):
                    continue
                found.append(
                    {
                        "dst_port": d,
                        "first": int(late[0]),
                        "last": int(late[-1]),
                        "estimate": round(f / t, 5),
                    }
                )
        found.sort(key=lambda r: (-r["estimate"], r["dst_port"], r["first"]))
        lost = sum(f for d, i, f, _ in ev if (d, i) in rest)
        trials = sum(t for d, i, _, t in ev if (d, i) in rest)
        return found[:LOSSIEST], round(lost / trials, 5) if trials else 0.0

    def _filled(self) -> list[tuple[int, int, int, int, int]]:
        """Ranges where delivery stopped by time, not by port range: ``(dst port, first,
        last, open cells, blocked cells)``.

        A NAT pool, a session table or a connection limit that a band's flows fill passes
        the flows that come first and drops every later one, whatever its source port; the
        sweep sends in a random order, so the band's open cells are then exactly the ones
        sent first. A port rule or loss cannot do that: their verdicts have nothing to do
        with the order. So a block whose first sent (pilot and round 1 of this epoch) ``k``
        cells all came through before the first dark one, with a chance under
        ``FILL_CHANCE`` were verdicts unrelated to the order, is one where delivery stopped
        by time. Neighbouring flagged blocks make one range; it grows into the blocks beside
        it while their cells fit (dark and sent after the first dark one, or open and sent
        before it) and ends at its outermost dark cells."""
        ports = self._planned_sorted
        rank = self._rank[ports]
        n = len(ports)
        out: list[tuple[int, int, int, int, int]] = []
        if not n or self._ranked == 0:
            return out
        nb = -(-n // BLOCK)
        pad = nb * BLOCK - n
        for d in self.plan.dst_ports:
            state = self.ledger.view(d).state[ports]
            sent = rank >= 0
            lit = np.r_[(state == 1) & sent, np.zeros(pad, dtype=bool)].reshape(nb, BLOCK)
            dark = np.r_[(state == 2) & sent, np.zeros(pad, dtype=bool)].reshape(nb, BLOCK)
            n_lit, n_dark = lit.sum(axis=1), dark.sum(axis=1)
            hits: dict[int, tuple[int, int]] = {}  # block: (last open, first dark) sent
            for b in np.flatnonzero((n_dark >= FILL_MIN_DARK) & (n_lit >= FILL_MIN_LEAD)):
                at = slice(int(b) * BLOCK, min(n, (int(b) + 1) * BLOCK))
                keep = lit[b][: at.stop - at.start] | dark[b][: at.stop - at.start]
                ranks = np.sort(rank[at][keep])
                order = state[at][keep][np.argsort(rank[at][keep], kind="stable")]
                lead = int(np.argmax(order == 2))  # open cells sent before the first dark one
                if lead < FILL_MIN_LEAD:
                    continue
                k = np.arange(lead)
                chance = float(np.prod((int(n_lit[b]) - k) / (len(order) - k)))
                if chance < FILL_CHANCE:
                    hits[int(b)] = (int(ranks[lead - 1]), int(ranks[lead]))
            for first_b, last_b in _runs(sorted(hits)):
                lo, hi = first_b * BLOCK, min(n, (last_b + 1) * BLOCK)
                # The limit filled between these: the last open cell sent before a block's
                # first dark one, and the first dark one, over the range's blocks.
                filled = max(hits[b][0] for b in range(first_b, last_b + 1))
                t = min(hits[b][1] for b in range(first_b, last_b + 1))
                fits = sent & (((state == 2) & (rank > filled)) | ((state == 1) & (rank < t)))
                misfit = np.flatnonzero(~fits[:lo])
                lo = int(misfit[-1]) + 1 if len(misfit) else 0
                misfit = np.flatnonzero(~fits[hi:])
                hi = hi + int(misfit[0]) if len(misfit) else n
                late = np.flatnonzero((state[lo:hi] == 2) & (rank[lo:hi] > filled))
                if not len(late):
                    continue
                a, z = lo + int(late[0]), lo + int(late[-1])
                span = state[a : z + 1]
                out.append(
                    (
                        d,
                        int(ports[a]),
                        int(ports[z]),
                        int(np.count_nonzero(span == 1)),
                        int(np.count_nonzero(span == 2)),
                    )
                )
        return out

    def _scattered_warning(self) -> None:
        """Flag blocked cells scattered among open ones: loss, or a rule on single ports.

        Scattered means at least three stretches of blocked cells apart from each other by
        open ones (rejected cells between blocked ones are one dark stretch: the edge of a
        reject and drop range is not scattered), and few blocked cells beside the open.
        Blocks where delivery stopped by time (``_filled``) are said as that instead."""
        spans: list[str] = []
        lit: list[str] = []  # the other way round: open cells scattered in blocked ones
        ports = self._planned_sorted
        filled = self._filled()
        if filled:
            named = [f"{d}: {a}-{z}" if a != z else f"{d}: {a}" for d, a, z, _, _ in filled]
            flows = sum(f[3] for f in filled)
            late = sum(f[4] for f in filled)
            self.facts.warnings.append(
                f"{schema.FILLED_WARNING}{_first_few(named)}: the {flows:,} flows sent "
                "there first got through, "
                f"none of the {late:,} sent later (a NAT pool, session table or connection "
                "limit that filled, or a policy that changed): those blocked cells may pass "
                "when the limit has room, and no firewall rule would open them"
            )
        covered = {(d, a, z) for d, a, z, _, _ in filled}
        for d in self.plan.dst_ports:
            state = self.ledger.view(d).state[ports]
            mine = [(a, z) for dd, a, z in covered if dd == d]
            for b in range(0, len(ports), BLOCK):
                if any(
                    a <= ports[min(len(ports), b + BLOCK) - 1] and ports[b] <= z for a, z in mine
                ):
                    continue
                st = state[b : b + BLOCK]
                blocked = int(np.count_nonzero(st == 2))
                opened = int(np.count_nonzero(st == 1))
                where = f"{d}: {ports[b]}-{ports[min(len(ports), b + BLOCK) - 1]}"
                if blocked and opened and blocked <= opened // 4:
                    dark = ((st == 2) | (st == 3)).astype(np.int8)
                    runs = int(np.count_nonzero(np.diff(np.r_[0, dark]) == 1))
                    if runs >= 3:
                        spans.append(where)
                elif blocked and opened and opened <= blocked // 4:
                    light = (st == 1).astype(np.int8)
                    if int(np.count_nonzero(np.diff(np.r_[0, light]) == 1)) >= 3:
                        lit.append(where)
        if spans:
            if self.loss is not None and self.loss.upper < 0.001:
                why = "no loss was seen: a rule on single ports?"
            else:
                why = "loss, not a rule?"
            self.facts.warnings.append(
                f"blocked cells lie scattered among open ones ({why}) in {_first_few(spans)}"
            )
        if lit:
            self.facts.warnings.append(
                "open cells lie scattered in blocked ones (a limit that filled by time, such "
                "as a NAT pool or a session table, a policy that changed, heavy loss, or "
                f"rules on single ports) in {_first_few(lit)}"
            )

    def progress(self, now: float | None = None) -> dict[str, Any]:
        """The progress message; while silent cells are tested, with the seconds left of
        the ICMP budget (``icmp_left``: the cell count stands still meanwhile)."""
        led = self.ledger
        out: dict[str, Any] = {
            "type": "progress",
            "run_id": self.run_id,
            "round": self.round,
            "stage": self.stage.value,
            "cells": led.cells,
            "settled": led.settled,
            "open": led.open,
            "sent": led.sent_total,
            "rate": round(self._rate()),
        }
        if self.stage is Stage.PROBE and self._probe_started is not None and now is not None:
            out["icmp_left"] = max(0, math.ceil(self._probe_started + self.icmp_budget - now))
        return out

    def document(
        self,
        *,
        agent: dict[str, Any],
        probe: dict[str, Any],
        started: float,
        finished: float,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The run document (``udpreach/run-v1``), from the engine alone."""
        led = self.ledger
        facts = self.facts
        est = self.loss or estimate_loss(led.first_attempt_histogram())
        loss: dict[str, Any]
        bound = facts.bound
        if not est.known:
            loss = {
                "estimate": None,
                "upper": None,
                "attempts": facts.max_attempt,
                "false_blocked_bound": None,
                "confidence_target": self.plan.confidence,
                # Nothing delivered: only a run with nothing blocked (and something
                # tested) reached its target; the loss itself is unknown.
                "confidence_reached": bool(self._finished)
                and led.summary()["blocked"] == 0
                and led.summary()["rejected"] > 0,
            }
        else:
            b = bound if bound is not None else 1.0
            loss = {
                "estimate": round(est.estimate, 5),
                "upper": round(est.upper, 5),
                "attempts": facts.max_attempt,
                "false_blocked_bound": round(b, 6),
                "confidence_target": self.plan.confidence,
                "confidence_reached": bool(self._finished)
                and not self._bytes_capped
                and b <= self.plan.confidence,
            }
            where, elsewhere = self._lossiest()
            if where:
                loss["where"] = where
                loss["elsewhere"] = elsewhere
        loss["rate_found"] = round(self.pacer.rate)
        loss["rate_backoffs"] = self.pacer.backoffs
        if self.pacer.limit_found is not None:
            loss["limiter_rate"] = round(self.pacer.limit_found)
        held = sum(self._held_to.values())
        if held and 2 * held >= led.sent_total:
            # The probe's --max-rate / --max-bytes-rate (shared by the runs at a time) held
            # most of the run's datagrams below the plan's rate: the share most went under.
            loss["rate_ceiling"] = max(self._held_to.items(), key=lambda kv: (kv[1], -kv[0]))[0]
        warnings = list(facts.warnings)
        if (
            self.phase is Phase.COMPLETE
            and not self._bytes_capped  # that warning says why already
            and not loss["confidence_reached"]
            and led.summary()["blocked"]
        ):
            # The report says it in red; a pipeline reading only the warnings hears it too.
            target = f"{self.plan.confidence:g}"
            if loss["false_blocked_bound"] is None:
                warnings.append(
                    "confidence target not reached: nothing got through, so the loss on the "
                    "path is unknown and a 'blocked' cell may yet be open"
                )
            else:
                warnings.append(
                    "confidence target not reached: the chance that any 'blocked' cell is "
                    f"really open is up to {loss['false_blocked_bound']:.2g} (target {target})"
                )
        out: dict[str, Any] = {
            "started": started,
            "finished": finished,
            "duration": round(finished - started, 3),
            "loss": loss,
            "probe_stats": {
                "sent": led.sent_total,
                "bytes": led.sent_total * self.datagram_bytes,
                "rounds": facts.rounds,
                "epochs": facts.epochs,
                "icmp_errors": facts.icmp_errors,
                "icmp_unverified": facts.icmp_unverified,
                "icmp_forged": facts.icmp_forged,
                "icmp_tests": facts.icmp_tests,
                "stale_receipts": facts.stale_receipts,
                "malformed_receipt_batches": facts.malformed_batches,
                "refused_receipts": led.refused_receipts,
                "udp_delay": round(self.delay_high, 4) if self.delay_samples else None,
            },
            "agent_stats": facts.agent_stats,
            "observed_sources": led.observed_addresses(),
            "warnings": warnings,
        }
        if facts.path_mtu is not None:
            out["path_mtu"] = dict(facts.path_mtu)
        if self.senders:
            senders: dict[str, dict[str, Any]] = {}
            for address, bucket in self.senders.items():
                if bucket.errors:
                    limit = bucket.limiter()
                    senders[address] = {
                        "errors": bucket.errors,
                        "burst": limit[0] if limit else None,
                        "period": round(limit[1], 3) if limit else None,
                    }
            out["icmp_senders"] = senders
        if extra:
            out.update(extra)
        return build_document(
            run_id=self.run_id,
            complete=self.phase is Phase.COMPLETE,
            agent=agent,
            probe=probe,
            plan=self.plan.to_json(),
            ledger=led,
            extra=out,
        )


_RECORD = np.dtype([("ai", "u1"), ("dst", ">u2"), ("src", ">u2"), ("att", "u1"), ("port", ">u2")])


def _describe_changes(changed: list[tuple[int, int, str, str]]) -> str:
    by: dict[tuple[int, str, str], list[int]] = {}
    for d, s, before, after in changed:
        by.setdefault((d, before, after), []).append(s)
    parts = []
    for (d, before, after), srcs in sorted(by.items()):
        parts.append(
            f"dst {d} source ports {format_ports(sorted(srcs))} were {before}, now {after}"
        )
    return "; ".join(parts)


def _runs(items: list[int]) -> list[tuple[int, int]]:
    """Consecutive integers of a sorted list as (first, last) pairs."""
    out: list[tuple[int, int]] = []
    for i in items:
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _first_few(spans: list[str], most: int = 8) -> str:
    """``spans`` joined, the first ``most`` of them, and how many more."""
    more = f" and {len(spans) - most} more" if len(spans) > most else ""
    return ", ".join(spans[:most]) + more


def _same_address(a: str, b: str) -> bool:
    """Whether two address texts name one address (``2001:2::1`` and ``2001:0002::1``)."""
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _limiter_text(b: silence.SenderBucket) -> str:
    """A sender's rate limit as the report says it: measured, or only its error count."""
    est = b.limiter()
    if est is None:
        return f"{b.address}: {b.errors:,} error{'s' if b.errors != 1 else ''}"
    burst, period = est
    return f"{b.address} about 1 per {period:.2g}s after a burst of {burst}"
