"""How many copies are enough: the path's loss rate, estimated from the run itself.

Theory of operation: "blocked" must never mean "lost". Each unseen cell is retried in rounds;
an open cell that is still unseen after k attempts has had every one of them lost, which
happens with probability p**k for a per-datagram loss rate p. The run estimates p from its
own evidence: every cell that was finally credited at attempt a tells us of a-1 losses and
one delivery (a geometric sample). With S open cells seen, the chance that any open cell is
still unseen after k attempts is at most about S * p**k; we keep retrying the unseen cells
until that bound, computed with a one-sided 99% upper confidence limit for p, falls below
the target (1% by default), or the user's ceiling on copies is reached, in which case the
report says the confidence was not reached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

Z_99 = 2.326  # one-sided 99% normal quantile


@dataclass(frozen=True)
class LossEstimate:
    """The loss seen on open cells, and what it means for the unseen ones."""

    losses: int  # attempts lost before a cell's first credited attempt
    deliveries: int  # cells credited
    estimate: float  # maximum-likelihood per-datagram loss rate
    upper: float  # one-sided 99% upper confidence limit

    def false_blocked_bound(self, attempts: int, unseen: int) -> float:
        """Upper bound on the chance that any of *unseen* cells is open after *attempts* each.

        With no delivery at all there is no evidence of loss (and nothing to say it is not
        all blocked): the bound is reported as 0 and the report says the loss is unknown.
        """
        if unseen <= 0 or self.deliveries == 0:
            return 0.0
        if attempts <= 0:
            return 1.0
        return min(1.0, self.deliveries * self.upper**attempts)


def wilson_upper(failures: int, trials: int, z: float = Z_99) -> float:
    """One-sided Wilson score upper limit for a proportion."""
    if trials <= 0:
        return 1.0
    phat = failures / trials
    denom = 1 + z * z / trials
    centre = phat + z * z / (2 * trials)
    half = z * math.sqrt(phat * (1 - phat) / trials + z * z / (4 * trials * trials))
    return min(1.0, (centre + half) / denom)


def estimate_loss(first_attempts: Mapping[int, int]) -> LossEstimate:
    """Estimate loss from a histogram {attempt at which a cell was first credited: cells}."""
    deliveries = sum(first_attempts.values())
    losses = sum((a - 1) * n for a, n in first_attempts.items())
    trials = losses + deliveries
    est = losses / trials if trials else 0.0
    return LossEstimate(losses, deliveries, est, wilson_upper(losses, trials))


def attempts_needed(est: LossEstimate, target: float, ceiling: int, floor: int = 2) -> int:
    """Attempts per unseen cell needed to push the false-blocked bound under *target*."""
    if est.deliveries == 0:
        return min(floor, ceiling)
    if est.upper <= 0.0:
        return min(floor, ceiling)
    if est.upper >= 1.0:
        return ceiling
    k = math.log(target / est.deliveries) / math.log(est.upper)
    return max(floor, min(ceiling, math.ceil(k)))
