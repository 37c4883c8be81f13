"""Pacing: a rate ceiling, a limiter found from the deliveries themselves, small bursts.

Theory of operation: the probe sends each round's cells in a random order, so a port band
that is dark (a firewall rule) lowers the share of datagrams delivered in every window of
the round by the same amount, whatever the rate. A short pilot at a gentle rate, one
datagram at a time, measures that share: the reference (on a clean path its first 44 ports
settle it: ``EARLY_PILOT``). Each window of the sweep (about 20 ms of sending, timed from its
first datagram) is then judged once the agent has provably reported on it:

* **Below the reference** by more than chance allows: something on the path may drop us
  for going too fast. The deliveries themselves say how fast the path lets us through: a
  limiter at N per second delivers about N x reference per second, however fast we send.
  So the rate is set just under the delivered rate over the reference (one step, not a
  halving per window), and datagrams go out in bursts of a few, spaced evenly, because a
  policer's burst allowance is often a handful of packets and a 4 ms batch at line rate
  overruns it even when the average rate is right. Then the cut is *verified* on the next
  window: if the delivered rate held (a limiter: it passes N whatever we send) the cut
  stands, and the report names the rate found; if it fell with the sending rate, the loss
  did not track the rate (a band that went dark, a policer on part of the port space),
  so the old rate comes back and the reference is measured again at this level. The pacer
  never backs off because a port band goes dark.
* **At the reference**: the window is pooled into the reference, and the rate grows back
  towards the ceiling (gently once a limiter is known, to hold just under it).

Correctness never depends on this: unseen cells are retried in later rounds. The pacer
only keeps us from wasting datagrams and time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PILOT_CELLS = 128
PILOT_RATE = 2000.0
MIN_WINDOW = 128
WINDOW_SECONDS = 0.02
MIN_DROP = 0.1  # a window must lose 10% more than the reference to count as bad
# The pilot ends early when the first this many source ports it sent all came through: a
# reference of 1 is then off by more than MIN_DROP (a tenth of the port space dark or
# lossy) with a chance of at most 1% ((1 - MIN_DROP) ** 44 = 0.97%), and the rest of the
# pilot's 64 ms at the gentle rate would only confirm it. A path that loses or blocks any of
# them, or has sent an error for a later one, gets the whole pilot. A reference set too high
# never costs a verdict, and in round 1 a window at a lower rate. It can cost time: a policer
# slower than the pilot whose burst lets the first 44 through (300/s with a burst of 50) is
# then first judged from one full-speed window, and retry rounds never go faster than that
# cut (a small plan behind one took 17 s instead of 13.5 s on the simulated path).
EARLY_PILOT = math.ceil(math.log(0.01) / math.log(1 - MIN_DROP))
BATCH_SECONDS = 0.004  # at full speed a batch holds this much sending
PACED_SECONDS = 0.005  # in small bursts, a batch holds this much sending (the sender spaces it)
LIMITED_BURST = 4  # datagrams sent back to back once a limiter is suspected
CUT_MARGIN = 0.95  # run this far under the rate a limiter was found to pass


@dataclass
class Window:
    """Datagrams sent in one stretch of a round at one rate, and how many got through."""

    rate: float
    start: float
    end: float = 0.0
    sent: int = 0
    delivered: int = 0
    burst: int = 0  # the burst size it was sent with (0: a batch per BATCH_SECONDS)


@dataclass
class _Trial:
    """A rate cut awaiting its verification."""

    rate: float  # the rate before the cut
    ratio: float  # the lossy window's delivery ratio
    delivered_rate: float  # and its delivered datagrams per second
    burst: int  # the burst size before the cut


@dataclass
class Pacer:
    """Sets the sending rate and burst size from per-window delivery ratios."""

    ceiling: float
    floor: float = 100.0
    rate: float = 0.0
    burst: int = 0  # datagrams per back-to-back batch (0: a batch per BATCH_SECONDS)
    ref_sent: int = 0
    ref_delivered: int = 0
    ref_rate: float = 0.0  # the slowest rate the reference has been measured at
    backoffs: int = 0
    limit_found: float | None = None  # the rate a limiter on the path was found to pass
    history: list[tuple[float, int, int]] = field(default_factory=list)
    _trial: _Trial | None = None
    _held: int = 0  # windows since the last cut, for gentle probing
    _changed_at: float = -1e9  # when the rate or burst last changed
    # (rate, delivered/s, loss) of the last retry round judged
    _last_retry: tuple[float, float, float] | None = None
    _retry_settled: bool = False  # halving did not help once: the rate is not the cause
    # Retry rounds too short to judge alone, added up while their rate stays:
    # (opened, before, seconds, rate)
    _retry_acc: tuple[int, int, float, float] = (0, 0, 0.0, 0.0)

    def __post_init__(self) -> None:
        self.floor = min(self.floor, self.ceiling)
        if self.rate <= 0:
            self.rate = self.ceiling

    @property
    def pilot_rate(self) -> float:
        return min(self.ceiling, PILOT_RATE)

    @property
    def reference(self) -> float | None:
        return self.ref_delivered / self.ref_sent if self.ref_sent else None

    def window_size(self) -> int:
        """Datagrams per judged window: about 20 ms of sending, at least MIN_WINDOW."""
        return max(MIN_WINDOW, int(self.rate * WINDOW_SECONDS))

    def batch_size(self, rate: float, per_src: int) -> int:
        """Source ports per batch at ``rate`` (each with ``per_src`` datagrams)."""
        if self.burst:
            # Several bursts per batch: the sender spaces them (``Send.spacing``), so the
            # shell's cost per batch does not cap the rate at a few bursts per millisecond.
            return max(1, max(self.burst, int(rate * PACED_SECONDS)) // max(1, per_src))
        return max(1, int(rate * BATCH_SECONDS / max(1, per_src)))

    def set_reference(self, delivered: int, sent: int, rate: float | None = None) -> None:
        """Start the reference from a measurement (the pilot's)."""
        if sent <= 0:
            return
        self.ref_sent, self.ref_delivered = sent, delivered
        self.ref_rate = rate if rate is not None else self.pilot_rate

    def _gap(self, ref: float, sent: int) -> float:
        var = max(ref * (1 - ref), 1e-4) * (1 / sent + 1 / max(1, self.ref_sent))
        return max(3 * math.sqrt(var), MIN_DROP * ref)

    def on_window(self, w: Window, now: float) -> None:
        """Judge one finished window whose deliveries are all known; adjust the rate.

        Only a window sent after the last change of rate (or burst) can change it again:
        the windows still in flight when the rate changed say nothing about the new one.
        """
        if w.sent <= 0:
            return
        self.history.append((w.rate, w.sent, w.delivered))
        ratio = w.delivered / w.sent
        ref = self.reference
        if ref is None:
            return
        if w.delivered == 0 and ref > 0:
            return  # nothing got through at all: not a rate question (the engine decides)
        duration = max(w.end - w.start, w.sent / max(w.rate, 1.0), 1e-3)
        delivered_rate = w.delivered / duration
        gap = self._gap(ref, w.sent)
        good = ratio >= ref - gap
        current = w.start >= self._changed_at
        trial = self._trial
        if trial is not None and current:
            self._trial = None  # the first window at the new rate verifies the cut
            if good:
                return
            if ratio <= trial.ratio + gap:
                # Slower, and no better: the loss does not track the rate (a band went
                # dark). Back to the old rate, and measure the reference again here.
                self.rate = trial.rate
                self.burst = trial.burst
                self.backoffs -= 1
                self._changed_at = now
                self.set_reference(w.delivered, w.sent, w.rate)
                return
        if w.rate < self.ref_rate and ratio > ref + gap:
            # Slower than the reference was measured at, and better: it was measured too fast.
            self.set_reference(w.delivered, w.sent, w.rate)
            return
        if not good:
            if current:
                self._cut(ref, delivered_rate, w, now)
            return
        self.ref_sent += w.sent
        self.ref_delivered += w.delivered
        self.ref_rate = min(self.ref_rate, w.rate) if self.ref_rate else w.rate
        if not current:
            return
        self._held += 1
        if self.limit_found is not None:
            # Hold just under the limiter found; probe above it only now and then.
            if self._held % 8 == 0:
                self.rate = min(self.ceiling, self.rate * 1.05)
                self._changed_at = now
        elif self.rate < self.ceiling:
            self.rate = min(self.ceiling, self.rate * 1.25)
            self._changed_at = now

    def _cut(self, ref: float, delivered_rate: float, w: Window, now: float) -> None:
        """Slow down to just under what the path delivered (the next window verifies it).
        A window sent in big bursts overran a small burst allowance: its delivered rate
        understates the limiter, so only one sent in small bursts names the limiter's
        rate."""
        capacity = delivered_rate / max(ref, 1e-6)
        if w.burst:
            self.limit_found = capacity
        new = max(self.floor, min(w.rate * CUT_MARGIN, CUT_MARGIN * capacity))
        if new >= w.rate * 0.99:
            return
        self._trial = _Trial(w.rate, w.delivered / w.sent, delivered_rate, self.burst)
        self.rate = new
        self.burst = LIMITED_BURST
        self.backoffs += 1
        self._held = 0
        self._changed_at = now

    def on_retry_round(self, rate: float, duration: float, opened: int, before: int) -> None:
        """Judge a retry round: sent at ``rate`` for ``duration`` seconds, it first credited
        ``opened`` cells, the round before it ``before``.

        Among open cells still unseen, each round credits a share 1 - p, so ``opened /
        before`` estimates the loss p of the retries themselves. When it is heavy, the
        retries go slower, at twice the rate they were delivered at (a limiter passes N/s
        whatever we send, so this homes in on N in a round or two). When slowing down made
        the deliveries fall with the rate, the loss did not track it: the old rate is
        restored and the rate is left alone from then on.

        Rounds too small to judge alone (a policer on a band passes its N/s: a round of 40 ms
        of retries credits a dozen cells) are added up, while the rate stays, until they
        hold ``MIN_RETRY_EVIDENCE`` credits; judged alone, they never were, and a band behind
        a 300/s policer went through 46 rounds at full speed and ended blocked.
        """
        if self._retry_settled:
            return
        if before < MIN_RETRY_EVIDENCE <= opened:
            # A small round, then a big one at this rate: the rate now lets the open cells
            # through. Nothing to compare it with yet (a share above 1 is no loss).
            self._retry_acc = (0, 0, 0.0, 0.0)
            self._last_retry = None
            return
        acc_opened, acc_before, acc_time, acc_rate = self._retry_acc
        if abs(acc_rate - rate) <= 0.01 * rate:  # the same rate: add them up
            opened, before, duration = opened + acc_opened, before + acc_before, duration + acc_time
        if before < MIN_RETRY_EVIDENCE:
            self._retry_acc = (opened, before, duration, rate)
            return
        self._retry_acc = (0, 0, 0.0, 0.0)
        delivered = opened / max(duration, 1e-3)
        loss = opened / before
        last = self._last_retry
        self._last_retry = (rate, delivered, loss)
        if loss <= RETRY_LOSS_LIMIT or loss > 1.0:
            return  # light loss, or more credited than the round before: slower worked
        if (
            last is not None
            and rate < last[0] * 0.99
            and delivered < 0.6 * last[1]
            and loss >= 0.9 * last[2]
        ):
            # Slower did not deliver more, and lost as large a share: not the rate. (Fewer
            # deliveries at a lower loss are the open cells running out.)
            self.rate = max(self.rate, last[0])
            self._retry_settled = True
            return
        new = max(self.floor, min(rate / 2, 2 * delivered))
        if new < self.rate * 0.99:
            self.rate = new
            self.burst = LIMITED_BURST
            self.backoffs += 1


RETRY_LOSS_LIMIT = 0.25  # per-attempt loss among retried open cells above which to slow
MIN_RETRY_EVIDENCE = 50  # cells first credited in a round before its loss means anything
