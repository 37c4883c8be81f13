"""How many copies are enough (loss), and how fast to send (pacing)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpreach.core.loss import LossEstimate, attempts_needed, estimate_loss, wilson_upper
from udpreach.core.pacing import MIN_DROP, MIN_WINDOW, PILOT_RATE, Pacer

TARGET = 0.01
FULL_SWEEP = 64512


def geometric_histogram(cells: int, loss: float, attempts: int = 30) -> dict[int, int]:
    """First-credited-attempt counts of *cells* open cells on a path losing *loss*."""
    hist: dict[int, int] = {}
    left = cells
    for a in range(1, attempts + 1):
        n = round(cells * loss ** (a - 1) * (1 - loss))
        n = min(n, left)
        if n:
            hist[a] = n
            left -= n
    if left:
        hist[1] += left
    return hist


# --- the estimate ---------------------------------------------------------------------


def test_no_loss() -> None:
    est = estimate_loss({1: 1000})
    assert (est.losses, est.deliveries, est.estimate) == (0, 1000, 0.0)
    assert 0.0 < est.upper < 0.01


def test_known_histogram() -> None:
    est = estimate_loss({1: 80, 2: 16, 3: 4})
    assert est.losses == 16 + 2 * 4
    assert est.deliveries == 100
    assert est.estimate == pytest.approx(24 / 124)
    assert est.upper > est.estimate


def test_nothing_delivered() -> None:
    est = estimate_loss({})
    assert (est.losses, est.deliveries, est.estimate, est.upper) == (0, 0, 0.0, 1.0)


def test_estimate_recovers_the_loss_rate() -> None:
    for loss in (0.01, 0.2, 0.5):
        est = estimate_loss(geometric_histogram(FULL_SWEEP, loss))
        assert est.estimate == pytest.approx(loss, rel=0.02)
        assert loss < est.upper < loss * 1.1


def test_wilson_known_values() -> None:
    z = 2.326
    assert wilson_upper(0, 100) == pytest.approx((z * z / 100) / (1 + z * z / 100))
    assert wilson_upper(100, 100) == 1.0
    assert wilson_upper(0, 0) == 1.0
    assert wilson_upper(50, 100) == pytest.approx(0.6131, abs=1e-3)


@settings(max_examples=300)
@given(st.integers(1, 10**7), st.data())
def test_wilson_upper_is_monotone_and_above_the_estimate(trials: int, data: st.DataObject) -> None:
    f1 = data.draw(st.integers(0, trials))
    f2 = data.draw(st.integers(f1, trials))
    u1, u2 = wilson_upper(f1, trials), wilson_upper(f2, trials)
    assert f1 / trials <= u1 + 1e-12  # (f == trials gives 1 - 2e-16 in floating point)
    assert u1 <= 1.0
    assert u1 <= u2 + 1e-12


@settings(max_examples=200)
@given(st.integers(0, 10**6), st.integers(1, 10**6))
def test_more_evidence_narrows_the_limit(failures: int, trials: int) -> None:
    failures = min(failures, trials)
    # ten times the trials at the same observed rate: a tighter (lower or equal) limit
    assert wilson_upper(10 * failures, 10 * trials) <= wilson_upper(failures, trials) + 1e-12


# --- attempts needed ------------------------------------------------------------------


def test_twenty_percent_loss_on_a_full_sweep() -> None:
    est = estimate_loss(geometric_histogram(FULL_SWEEP, 0.2))
    assert est.deliveries == FULL_SWEEP
    k = attempts_needed(est, TARGET, ceiling=255)
    s, p = est.deliveries, est.upper
    assert s * p**k < TARGET
    assert s * p ** (k - 1) >= TARGET  # and no more than needed
    assert 9 <= k <= 11
    assert est.false_blocked_bound(k, unseen=100) < TARGET
    # the naive "3 copies" would have left a real chance of false blocks
    assert est.false_blocked_bound(3, unseen=100) > 0.5


def test_zero_loss_needs_the_floor() -> None:
    est = estimate_loss({1: FULL_SWEEP})
    assert attempts_needed(est, TARGET, ceiling=16) == 2
    assert attempts_needed(est, TARGET, ceiling=16, floor=1) == 2  # S*upper**1 > 1%
    assert est.false_blocked_bound(2, unseen=100) < TARGET


def test_nothing_unseen_cannot_be_falsely_blocked() -> None:
    est = estimate_loss(geometric_histogram(FULL_SWEEP, 0.5))
    assert est.false_blocked_bound(2, unseen=0) == 0.0
    assert est.false_blocked_bound(2, unseen=1) > 0.5
    assert est.false_blocked_bound(0, unseen=1) == 1.0


def test_no_deliveries_needs_the_floor() -> None:
    est = estimate_loss({})
    assert attempts_needed(est, TARGET, ceiling=16) == 2
    assert attempts_needed(est, TARGET, ceiling=1, floor=1) == 1
    assert est.false_blocked_bound(5, unseen=100) == 0.0


def test_ceiling_is_respected() -> None:
    est = estimate_loss(geometric_histogram(FULL_SWEEP, 0.5))
    assert attempts_needed(est, TARGET, ceiling=255) > 16
    assert attempts_needed(est, TARGET, ceiling=16) == 16
    assert attempts_needed(est, TARGET, ceiling=3, floor=2) == 3


def test_total_loss_evidence_goes_to_the_ceiling() -> None:
    est = LossEstimate(losses=10, deliveries=1, estimate=10 / 11, upper=1.0)
    assert attempts_needed(est, TARGET, ceiling=16) == 16
    assert est.false_blocked_bound(16, unseen=100) == 1.0


histograms = st.dictionaries(st.integers(1, 20), st.integers(1, 100_000), max_size=8)


@settings(max_examples=300)
@given(histograms, st.integers(1, 255), st.integers(1, 4), st.sampled_from([0.01, 0.001, 0.1]))
def test_attempts_needed_property(
    hist: dict[int, int], ceiling: int, floor: int, target: float
) -> None:
    floor = min(floor, ceiling)  # as the runner calls it
    est = estimate_loss(hist)
    k = attempts_needed(est, target, ceiling=ceiling, floor=floor)
    assert floor <= k <= ceiling
    if est.deliveries and est.upper < 1.0:
        if k < ceiling:
            # stopped early: the bound is met
            assert est.deliveries * est.upper**k <= target * (1 + 1e-9)
        if k > floor:
            # and one fewer would not have met it
            assert est.deliveries * est.upper ** (k - 1) >= target * (1 - 1e-9)


# --- pacing ---------------------------------------------------------------------------


def test_starts_at_the_ceiling() -> None:
    p = Pacer(ceiling=100_000)
    assert p.rate == 100_000
    assert p.pilot_rate == PILOT_RATE
    assert Pacer(ceiling=1000).pilot_rate == 1000
    assert p.window_size() == 2000
    assert Pacer(ceiling=10).window_size() == MIN_WINDOW


def test_backs_off_when_windows_deliver_much_less() -> None:
    p = Pacer(ceiling=100_000)
    p.set_reference(950, 1000)
    p.on_window(p.rate, 2000, 1000)
    assert p.rate == 50_000
    assert p.backoffs == 1


def test_noise_is_not_a_reason_to_back_off() -> None:
    p = Pacer(ceiling=100_000)
    p.set_reference(900, 1000)
    p.on_window(p.rate, 2000, 1780)  # 89% against 90%: well within noise
    assert p.rate == 100_000
    assert p.backoffs == 0


def test_a_late_window_from_the_old_rate_does_not_halve_again() -> None:
    p = Pacer(ceiling=100_000)
    p.set_reference(1000, 1000)
    p.on_window(100_000, 2000, 500)
    assert p.rate == 50_000
    p.on_window(100_000, 2000, 500)  # still in flight when we slowed down
    assert p.rate == 50_000
    assert p.backoffs == 1


def test_never_below_the_floor() -> None:
    p = Pacer(ceiling=100_000, floor=200)
    p.set_reference(1000, 1000)
    for _ in range(40):
        p.on_window(p.rate, 1000, 0)
        assert p.rate >= 200
    assert p.rate == 200


def test_floor_never_above_the_ceiling() -> None:
    p = Pacer(ceiling=50)
    p.set_reference(1000, 1000)
    for _ in range(5):
        p.on_window(p.rate, 100, 0)
    assert p.rate == 50
    for _ in range(5):
        p.on_window(p.rate, 100, 100)
    assert p.rate == 50


def test_recovers_towards_the_ceiling() -> None:
    p = Pacer(ceiling=100_000)
    p.set_reference(1000, 1000)
    for _ in range(6):
        p.on_window(p.rate, 2000, 200)
    low = p.rate
    assert low < 5_000
    seen = [low]
    for _ in range(200):
        p.on_window(p.rate, 2000, 2000)
        seen.append(p.rate)
        assert p.rate <= 100_000
    assert seen == sorted(seen)  # only up
    assert p.rate == 100_000


def test_settles_below_a_rate_limiter() -> None:
    """A path that drops what exceeds 20,000/s: the pacer ends up near, not far below, it."""
    limit = 20_000
    p = Pacer(ceiling=100_000)
    p.set_reference(1000, 1000)
    rates = []
    for _ in range(300):
        sent = 1000
        delivered = sent if p.rate <= limit else int(sent * limit / p.rate)
        p.on_window(p.rate, sent, delivered)
        rates.append(p.rate)
    tail = rates[-100:]
    # A window must lose MIN_DROP more than the reference before it counts, and the rate
    # then grows by an eighth: the overshoot is bounded by about (1 + MIN_DROP) * 9/8.
    assert max(tail) <= limit * (1 + MIN_DROP) * 9 / 8 * 1.02
    assert sum(tail) / len(tail) >= limit * 0.5


@pytest.mark.parametrize("reference", [None, 0])
def test_no_reaction_without_a_reference(reference: int | None) -> None:
    p = Pacer(ceiling=100_000)
    if reference is not None:
        p.set_reference(reference, 1000)
    for _ in range(5):
        p.on_window(p.rate, 1000, 0)
    assert p.rate == 100_000
    assert p.backoffs == 0


def test_empty_window_is_ignored() -> None:
    p = Pacer(ceiling=100_000)
    p.set_reference(1000, 1000)
    p.on_window(p.rate, 0, 0)
    assert p.history == []
    assert p.rate == 100_000


def test_reference_pools_good_windows_and_ignores_noise() -> None:
    """Random loss must not ratchet the reference up (a max of noisy samples would)."""
    p = Pacer(ceiling=100_000)
    p.set_reference(86, 100)  # a lucky pilot at 20% loss
    for _ in range(50):
        p.on_window(p.rate, 2000, 1600)  # the path's true 80%
    assert p.backoffs == 0
    assert p.rate == 100_000
    assert p.reference == pytest.approx(0.8, abs=0.01)
    p.set_reference(0, 0)
    assert p.reference == pytest.approx(0.8, abs=0.01)


def test_a_pilot_that_was_too_fast_is_replaced_by_a_slower_better_window() -> None:
    p = Pacer(ceiling=100_000)
    p.set_reference(40, 100, 2000)  # the pilot itself exceeded an 800/s limiter
    p.on_window(500, 500, 500)  # slower, and everything arrived
    assert p.reference == pytest.approx(1.0)
    assert p.ref_rate == 500


@settings(max_examples=200)
@given(
    st.floats(1, 1e6),
    st.floats(1, 1000),
    st.lists(st.tuples(st.integers(1, 5000), st.floats(0, 1)), max_size=60),
    st.floats(0, 1),
)
def test_rate_stays_between_floor_and_ceiling(
    ceiling: float, floor: float, windows: list[tuple[int, float]], ref: float
) -> None:
    p = Pacer(ceiling=ceiling, floor=floor)
    p.set_reference(round(ref * 1000), 1000)
    for sent, share in windows:
        p.on_window(p.rate, sent, math.floor(sent * share))
        assert min(floor, ceiling) <= p.rate <= ceiling
