"""How many copies are enough: the path's loss, estimated where the retries are.

Theory of operation: "blocked" must never mean "lost". Each unseen cell is retried in rounds;
an open cell still unseen after k attempts has had every one of them lost. Every cell finally
credited at attempt a tells of a-1 losses and one delivery, so the run measures loss from its
own evidence. But loss is rarely uniform (a policer on one port band, one lossy member of an
ECMP bundle): an estimate pooled over the whole plan is dominated by the clean part and stops
retrying too early. So the evidence is kept per *block* (one destination port, a run of
consecutive planned source ports), and two models bound each block's false "blocked" cells:

* the first-attempt model: with per-datagram loss p (a one-sided 99% upper limit from the
  block's first attempts), S open cells leave about S * p**k unseen after k attempts;
* the retry model: the loss among cells that *needed* a retry (the population still being
  retried: in an ECMP mixture, the lossy member's flows) is that population's own hazard h,
  so the n cells that needed a retry leave about n * h**(k-1) unseen. A block with few such
  cells borrows strength from the whole plan's hazard (a prior of ``PRIOR_TRIALS`` trials).

A block's bound is the larger of the two; the run's bound is their sum. Retries go on per
block until its bound is under its share of the target, or the copies run out, and the report
says whether the target was reached. With no delivery at all, the loss is unknown: nothing
is claimed about it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

Z_99 = 2.326  # one-sided 99% normal quantile
PRIOR_TRIALS = 10.0  # weight of the whole plan's retry hazard in a block's estimate


@dataclass(frozen=True)
class LossEstimate:
    """The loss seen on open cells (pooled over the plan, for the report)."""

    losses: int  # attempts lost before a cell's first credited attempt
    deliveries: int  # cells credited
    estimate: float  # maximum-likelihood per-datagram loss rate
    upper: float  # one-sided 99% upper confidence limit

    @property
    def known(self) -> bool:
        """False when nothing was ever delivered: then the loss is unknown."""
        return self.deliveries > 0


def wilson_upper(failures: float, trials: float, z: float = Z_99) -> float:
    """One-sided Wilson score upper limit for a proportion."""
    if trials <= 0:
        return 1.0
    phat = min(1.0, max(0.0, failures / trials))
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


@dataclass(frozen=True)
class BlockEvidence:
    """One block's loss evidence (see the module docstring)."""

    opened: int  # cells credited
    losses: int  # attempts lost before each credited cell's first credit, summed
    retried: int  # credited cells that needed two attempts or more
    retry_losses: int  # attempts lost after the first, among those
    unseen: int  # cells still unseen (no receipt, no ICMP error)
    attempts: int  # attempts each unseen cell has had (the fewest)

    @property
    def retry_trials(self) -> int:
        return self.retry_losses + self.retried


@dataclass(frozen=True)
class Pool:
    """The whole plan's evidence, which a block uses unless its own says it differs."""

    losses: int
    trials: int
    retry_losses: int
    retry_trials: int

    @classmethod
    def of(cls, blocks: list[BlockEvidence]) -> Pool:
        return cls(
            sum(b.losses for b in blocks),
            sum(b.losses + b.opened for b in blocks),
            sum(b.retry_losses for b in blocks),
            sum(b.retry_trials for b in blocks),
        )


def lossier(failures: int, trials: int, pooled_failures: int, pooled_trials: int) -> bool:
    """Whether a block's loss is significantly above the plan's (3 sigma, one-sided)."""
    if trials <= 0:
        return False
    p0 = pooled_failures / pooled_trials if pooled_trials else 0.0
    expect = trials * p0
    return failures > expect + 3 * math.sqrt(trials * p0 * (1 - p0)) + 1


def _upper(failures: int, trials: int, pooled_failures: int, pooled_trials: int) -> float:
    """A block's loss upper limit: its own where it differs from the plan's, else the
    plan's (whose evidence is much larger)."""
    if lossier(failures, trials, pooled_failures, pooled_trials):
        return wilson_upper(failures, trials)
    return wilson_upper(pooled_failures, pooled_trials)


def loss_upper(b: BlockEvidence, pool: Pool) -> float:
    """A block's per-datagram loss, one-sided 99% upper limit (its own or the plan's)."""
    return _upper(b.losses, b.losses + b.opened, pool.losses, pool.trials)


def block_bound(b: BlockEvidence, pool: Pool) -> float:
    """Expected open cells among the block's unseen ones, bounded from above (see the
    module docstring)."""
    if b.unseen <= 0 or b.opened <= 0:
        return 0.0
    k = max(0, b.attempts)
    p1 = _upper(b.losses, b.losses + b.opened, pool.losses, pool.trials)
    first = b.opened * p1**k
    if b.retried <= 0 or k <= 1:
        return min(float(b.unseen), first)
    if lossier(b.retry_losses, b.retry_trials, pool.retry_losses, pool.retry_trials):
        h = wilson_upper(b.retry_losses, b.retry_trials)
    else:
        h = (
            wilson_upper(
                b.retry_losses + PRIOR_TRIALS * (pool.retry_losses / max(1, pool.retry_trials)),
                b.retry_trials + PRIOR_TRIALS,
            )
            if pool.retry_trials < 10 * PRIOR_TRIALS
            else wilson_upper(pool.retry_losses, pool.retry_trials)
        )
    left = h ** (k - 1)
    retry = b.retried * left / max(1e-12, 1.0 - left)
    return min(float(b.unseen), max(first, retry))


SIBLING_ATTEMPTS = 6  # a block dark beside a lossy sibling is retried at most this often


def sibling_bounds(evidence: Mapping[int, list[BlockEvidence]]) -> dict[int, list[float]]:
    """Per destination port and block, the bound for a block with nothing delivered at all
    (``block_bound`` takes it for a dark band: 0) whose source ports are lossier than the
    plan on another destination port: loss by source ports (a policer on a band) is a
    property of those ports on every destination port, and the order the ports are sent in
    can make one destination port's datagrams the ones a policer drops, every time. Such a
    block is as lossy as its worst sibling: the expected open cells among its unseen ones
    are at most ``unseen * p ** attempts``. Its retries go to that port alone, past the
    sibling's competition: after ``SIBLING_ATTEMPTS`` with nothing delivered it is dark (a
    rule by destination port inside a policed band). Dark beside a sibling no lossier than
    the plan (a rule by destination port on a path with some loss) keeps 0."""
    flat = [b for bs in evidence.values() for b in bs]
    pool = Pool.of(flat)
    out: dict[int, list[float]] = {}
    for d, blocks in evidence.items():
        bounds = [0.0] * len(blocks)
        for i, b in enumerate(blocks):
            if b.opened > 0 or b.unseen <= 0 or b.attempts >= SIBLING_ATTEMPTS:
                continue
            p = max(
                (
                    loss_upper(sib[i], pool)
                    for e, sib in evidence.items()
                    if e != d
                    and i < len(sib)
                    and sib[i].opened > 0
                    and lossier(
                        sib[i].losses, sib[i].losses + sib[i].opened, pool.losses, pool.trials
                    )
                ),
                default=0.0,
            )
            if p > 0.0:
                bounds[i] = min(float(b.unseen), b.unseen * p ** max(1, b.attempts))
        out[d] = bounds
    return out


def false_blocked_bound(evidence: Mapping[int, list[BlockEvidence]]) -> float:
    """The chance that any unseen cell of the plan is in fact open, bounded from above (the
    expected number of such cells, by the union bound), per destination port's blocks."""
    flat = [b for bs in evidence.values() for b in bs]
    pool = Pool.of(flat)
    own = sum(block_bound(b, pool) for b in flat)
    siblings = sum(sum(bs) for bs in sibling_bounds(evidence).values())
    return min(1.0, own + siblings)
