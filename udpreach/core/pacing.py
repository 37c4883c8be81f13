"""Pacing: a rate ceiling, and backing off when loss rises with the sending rate.

Theory of operation: the probe sends each round's cells in a random order, so a blocked
source-port range is spread evenly over time and the share of datagrams confirmed in any
window of the round is the same at any instant unless the path's behaviour depends on how
fast we send. A short pilot at a gentle rate measures that share (the reference ratio).
During the sweep each window's confirmed share is compared with it: significantly lower
means a rate limiter or a queue is dropping us, so the rate is halved (multiplicative
decrease); otherwise it grows back towards the ceiling by an eighth per good window, so
it settles just under the rate the path accepts. Correctness never depends on this: unseen
cells are retried in later rounds. The pacer only stops us from wasting datagrams, and
reports the rate it found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PILOT_CELLS = 128
PILOT_RATE = 2000.0
MIN_WINDOW = 128
MIN_DROP = 0.1  # a window must lose 10% more than the reference to count as bad


@dataclass
class Pacer:
    """AIMD rate controller driven by per-window delivery ratios.

    The reference is a pooled ratio (delivered over sent) of the pilot and of every window
    judged good since; pooling, not a maximum of noisy samples, keeps it unbiased, so random
    loss never looks like rate-dependent loss. A window is bad when its ratio is below the
    reference by more than three standard errors of the difference *and* by more than
    ``MIN_DROP`` of the reference. A window sent slower than the pilot whose ratio is that
    much *above* the reference proves the pilot itself was too fast: the reference restarts
    from it.
    """

    ceiling: float
    floor: float = 200.0
    rate: float = 0.0
    ref_sent: int = 0
    ref_delivered: int = 0
    ref_rate: float = 0.0  # the slowest rate the reference has been measured at
    backoffs: int = 0
    history: list[tuple[float, int, int]] = field(default_factory=list)

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
        return max(MIN_WINDOW, int(self.rate * 0.02))

    def set_reference(self, delivered: int, sent: int, rate: float | None = None) -> None:
        """Start the reference from a measurement (the pilot's)."""
        if sent <= 0:
            return
        self.ref_sent, self.ref_delivered = sent, delivered
        self.ref_rate = rate if rate is not None else self.pilot_rate

    def _gap(self, ref: float, sent: int) -> float:
        var = max(ref * (1 - ref), 1e-4) * (1 / sent + 1 / self.ref_sent)
        return max(3 * math.sqrt(var), MIN_DROP * ref)

    def on_window(self, rate: float, sent: int, delivered: int) -> None:
        """Judge one window sent at *rate*; adjust ``self.rate``."""
        if sent <= 0:
            return
        self.history.append((rate, sent, delivered))
        ratio = delivered / sent
        ref = self.reference
        if ref is None:
            return
        gap = self._gap(ref, sent)
        if rate < self.ref_rate and ratio > ref + gap:
            # Slower than the reference was measured at, and better: it was measured too fast.
            self.set_reference(delivered, sent, rate)
            return
        if ref <= 0.0:
            return  # nothing gets through at any rate tried: no signal about rate
        if ratio < ref - gap:
            if rate <= self.rate * 1.01:  # react once per rate level
                self.rate = max(self.floor, rate / 2)
                self.backoffs += 1
            return
        self.ref_sent += sent
        self.ref_delivered += delivered
        self.ref_rate = min(self.ref_rate, rate) if self.ref_rate else rate
        self.rate = min(self.ceiling, self.rate + max(self.floor, self.rate / 8))
