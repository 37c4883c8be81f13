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


@dataclass
class Pacer:
    """AIMD rate controller driven by per-window delivery ratios."""

    ceiling: float
    floor: float = 200.0
    rate: float = 0.0
    reference: float | None = None
    reference_n: int = 0
    backoffs: int = 0
    history: list[tuple[float, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.floor = min(self.floor, self.ceiling)
        if self.rate <= 0:
            self.rate = self.ceiling

    @property
    def pilot_rate(self) -> float:
        return min(self.ceiling, PILOT_RATE)

    def window_size(self) -> int:
        """Datagrams per judged window: about 20 ms of sending, at least MIN_WINDOW."""
        return max(MIN_WINDOW, int(self.rate * 0.02))

    def set_reference(self, delivered: int, sent: int) -> None:
        """The pilot's (or a slower window's) delivery ratio becomes the reference."""
        if sent <= 0:
            return
        ratio = delivered / sent
        if self.reference is None or ratio > self.reference:
            self.reference = ratio
            self.reference_n = sent

    def on_window(self, rate: float, sent: int, delivered: int) -> None:
        """Judge one window sent at *rate*; adjust ``self.rate``."""
        if sent <= 0:
            return
        self.history.append((rate, sent, delivered))
        ratio = delivered / sent
        ref = self.reference
        if ref is None or ref <= 0.0:
            return  # nothing gets through: no signal about rate
        # Significantly below the reference (3 sigma of a binomial at the reference ratio)?
        sigma = math.sqrt(max(ref * (1 - ref), 1e-6) / sent)
        if ratio < ref - max(3 * sigma, 0.05 * ref):
            if rate <= self.rate * 1.01:  # react once per rate level
                self.rate = max(self.floor, rate / 2)
                self.backoffs += 1
        else:
            if rate < self.ceiling and ratio >= ref - sigma and rate <= self.rate:
                # Nothing lost at a slower rate than ever before: a better reference.
                self.set_reference(delivered, sent)
            self.rate = min(self.ceiling, self.rate + max(self.floor, self.rate / 8))
