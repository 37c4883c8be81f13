"""The loss model (per block, with the retried population's own loss) and the pacer."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpreach.core.loss import (
    BlockEvidence,
    Pool,
    block_bound,
    estimate_loss,
    false_blocked_bound,
    loss_upper,
    wilson_upper,
)
from udpreach.core.pacing import LIMITED_BURST, Pacer, Window

# -- estimates --------------------------------------------------------------------------------


def test_no_loss() -> None:
    est = estimate_loss({1: 1000})
    assert est.estimate == 0.0
    assert 0 < est.upper < 0.01
    assert est.known


def test_known_histogram() -> None:
    est = estimate_loss({1: 80, 2: 16, 3: 4})  # 24 losses, 100 deliveries
    assert est.losses == 24
    assert est.deliveries == 100
    assert est.estimate == pytest.approx(24 / 124)


def test_nothing_delivered_is_unknown_not_zero() -> None:
    est = estimate_loss({})
    assert not est.known


def test_wilson_known_values() -> None:
    assert wilson_upper(0, 0) == 1.0
    assert wilson_upper(0, 100) == pytest.approx(0.0513, abs=1e-3)
    assert wilson_upper(50, 100) == pytest.approx(0.615, abs=2e-3)


@settings(max_examples=300)
@given(st.integers(1, 10**7), st.data())
def test_wilson_upper_is_above_the_estimate(trials: int, data: st.DataObject) -> None:
    failures = data.draw(st.integers(0, trials))
    assert wilson_upper(failures, trials) >= failures / trials - 1e-12


# -- the per-block bound ----------------------------------------------------------------------


def clean(opened: int = 256, unseen: int = 0, attempts: int = 2) -> BlockEvidence:
    return BlockEvidence(opened, 0, 0, 0, unseen, attempts)


def test_a_block_with_nothing_unseen_or_nothing_open_adds_nothing() -> None:
    pool = Pool.of([clean()])
    assert block_bound(clean(unseen=0), pool) == 0.0
    assert block_bound(BlockEvidence(0, 0, 0, 0, 256, 2), pool) == 0.0


def test_a_clean_block_borrows_the_plans_tight_estimate() -> None:
    """A block's own 256 cells cannot show loss below ~2%; when it does not differ from the
    plan's (64,000 cells, no loss), the plan's estimate is used."""
    blocks = [clean() for _ in range(250)] + [clean(opened=128, unseen=128)]
    pool = Pool.of(blocks)
    assert block_bound(blocks[-1], pool) < 1e-6
    assert false_blocked_bound({5000: blocks}) < 1e-4


def test_a_lossy_band_uses_its_own_loss() -> None:
    """Loss confined to one block: its own evidence differs from the plan's, so its own
    (much higher) loss bounds its unseen cells, and one more attempt is not enough."""
    clean_blocks = [clean() for _ in range(240)]
    lossy = BlockEvidence(opened=200, losses=200, retried=100, retry_losses=100, unseen=50,
                          attempts=3)  # fmt: skip
    pool = Pool.of([*clean_blocks, lossy])
    assert loss_upper(lossy, pool) > 0.4
    assert block_bound(lossy, pool) > 1.0
    pooled_only = BlockEvidence(200, 0, 0, 0, 50, 3)
    assert block_bound(pooled_only, pool) < block_bound(lossy, pool)


def test_the_retried_population_reveals_a_lossy_ecmp_member() -> None:
    """A quarter of flows lose half their datagrams, spread over every block: first-attempt
    loss looks small (12.5%), but cells that needed a retry lose 50% each time."""
    blocks = [
        BlockEvidence(opened=248, losses=56, retried=24, retry_losses=24, unseen=20, attempts=5)
        for _ in range(64)
    ]
    pool = Pool.of(blocks)
    first_only = 248 * loss_upper(blocks[0], pool) ** 5
    assert first_only < 0.5  # the pooled first-attempt loss would stop retrying here
    assert block_bound(blocks[0], pool) > 10 * first_only
    assert false_blocked_bound({5000: blocks}) == 1.0  # a chance: at most 1


def test_a_block_dark_on_one_port_and_lossy_on_another_is_lossy_too() -> None:
    """A policer on a source band, sent two destination ports back to back: it passed
    5000's datagram of each pair and dropped 5001's, so 5001's blocks there held nothing
    and were taken for a dark band (4,800 open cells called blocked over the simulated
    path). Loss by source ports shows on every destination port: such a block is as lossy
    as its sibling. Dark on 5001 beside a clean 5000 (a rule by destination port) is not."""
    from udpreach.core.loss import sibling_bounds

    lossy = BlockEvidence(opened=128, losses=300, retried=100, retry_losses=150, unseen=128,
                          attempts=3)  # fmt: skip
    dark = BlockEvidence(opened=0, losses=0, retried=0, retry_losses=0, unseen=256, attempts=3)
    rest = [clean() for _ in range(60)]
    bounds = sibling_bounds({5000: [*rest, lossy], 5001: [*rest, dark]})
    assert bounds[5001][-1] > 1.0  # worth another attempt
    assert bounds[5000] == [0.0] * 61
    assert false_blocked_bound({5000: [*rest, lossy], 5001: [*rest, dark]}) == 1.0
    by_port = sibling_bounds({5000: [*rest, clean()], 5001: [*rest, dark]})
    assert by_port[5001][-1] == 0.0


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 500),
    st.integers(0, 500),
    st.integers(1, 50),
    st.integers(0, 200),
    st.integers(2, 20),
)
def test_more_attempts_never_raise_the_bound(
    opened: int, extra: int, unseen: int, retried: int, attempts: int
) -> None:
    """(From two attempts on: after one, nothing bounds the retried population's loss.)"""
    retried = min(retried, opened)
    losses = retried + extra  # each retried cell lost at least its first attempt
    b1 = BlockEvidence(opened, losses, retried, extra, unseen, attempts)
    b2 = BlockEvidence(opened, losses, retried, extra, unseen, attempts + 1)
    pool = Pool.of([b1])
    assert block_bound(b2, pool) <= block_bound(b1, pool) + 1e-12
    assert 0.0 <= block_bound(b1, pool) <= unseen


# -- the pacer ---------------------------------------------------------------------------------


def window(rate: float, sent: int, delivered: int, start: float, burst: int = 0) -> Window:
    return Window(rate, start, start + sent / rate, sent, delivered, burst)


def pacer_with_reference(ceiling: float = 100_000, ratio: float = 1.0) -> Pacer:
    p = Pacer(ceiling=ceiling)
    p.set_reference(round(128 * ratio), 128, 2000)
    return p


def test_starts_at_the_ceiling_and_never_leaves_floor_and_ceiling() -> None:
    p = Pacer(ceiling=5000, floor=200)
    assert p.rate == 5000
    assert Pacer(ceiling=50, floor=200).floor == 50


def test_noise_is_not_a_reason_to_back_off() -> None:
    p = pacer_with_reference(ratio=0.9)
    p.on_window(window(100_000, 2000, 1760, 0.0), 0.03)  # 88% against 90%
    assert p.rate == 100_000
    assert p.backoffs == 0


def test_a_policer_is_found_from_the_delivered_rate_in_one_step() -> None:
    """100,000/s into a 5,000/s policer: the window delivers about 5,000/s, so the rate goes
    just under that at once (not a halving per window), in small bursts."""
    p = pacer_with_reference()
    p.on_window(window(100_000, 2000, 100, 0.0), 0.03)
    assert 3000 < p.rate < 5000
    assert p.burst == LIMITED_BURST


def test_a_limiter_is_named_only_from_a_window_sent_in_small_bursts() -> None:
    p = pacer_with_reference()
    p.on_window(window(100_000, 2000, 100, 0.0), 0.03)  # big bursts: understated
    assert p.limit_found is None
    t = 0.05
    while p.limit_found is None and t < 5:
        rate = p.rate
        sent = max(128, int(rate * 0.02))
        delivered = min(sent, int(5000 * sent / rate))  # a 5,000/s limiter
        p.on_window(window(rate, sent, delivered, t, burst=LIMITED_BURST), t + sent / rate + 0.01)
        t += sent / rate + 0.02
    assert p.limit_found == pytest.approx(5000, rel=0.05)
    assert p.rate <= 5000


def test_a_band_going_dark_is_not_a_rate_problem() -> None:
    """Windows that deliver 84% after delivering 100%: the pacer tries slower once; slower
    is no better, so the rate comes back and the reference is measured again."""
    p = pacer_with_reference()
    p.on_window(window(100_000, 2000, 1680, 0.0), 0.03)
    assert p.rate < 100_000
    cut = p.rate
    p.on_window(window(cut, 1600, 1344, 0.05), 0.08)  # same share at the lower rate
    assert p.rate == 100_000
    assert p.reference == pytest.approx(0.84)
    assert p.limit_found is None


def test_a_window_in_flight_before_a_change_cannot_change_the_rate_again() -> None:
    p = pacer_with_reference()
    p.on_window(window(100_000, 2000, 100, 0.0), 0.03)
    cut = p.rate
    p.on_window(window(100_000, 2000, 100, 0.02), 0.04)  # sent before the cut
    assert p.rate == cut


def test_an_empty_window_or_no_reference_changes_nothing() -> None:
    p = Pacer(ceiling=10_000)
    p.on_window(window(10_000, 200, 0, 0.0), 0.1)
    assert p.rate == 10_000
    p = pacer_with_reference(ceiling=10_000)
    p.on_window(window(10_000, 0, 0, 0.0), 0.1)
    p.on_window(window(10_000, 200, 0, 0.0), 0.1)  # nothing at all: not a rate question
    assert p.rate == 10_000


def test_recovers_towards_the_ceiling_without_a_limiter() -> None:
    p = pacer_with_reference()
    p.rate = 10_000
    t = 0.0
    for _ in range(20):
        p.on_window(window(p.rate, 500, 500, t), t + 0.5)
        t += 1
    assert p.rate == 100_000


def test_retry_rounds_slow_to_twice_the_delivered_rate() -> None:
    p = Pacer(ceiling=100_000)
    p.on_retry_round(100_000, 0.09, 100, 100)  # heavy loss, 1,100/s delivered
    assert p.rate == pytest.approx(2 * 100 / 0.09)
    # Slower, the deliveries fell with the rate and as large a share was lost: the loss
    # does not track the rate (random loss on a band).
    p2 = Pacer(ceiling=100_000)
    p2.on_retry_round(100_000, 0.1, 2000, 2500)
    slowed = p2.rate
    assert slowed < 100_000
    p2.on_retry_round(slowed, 0.2, 1600, 2000)
    assert p2.rate == 100_000
    # Fewer deliveries at a lower loss are the open cells running out behind a policer:
    # the rate keeps going down towards it.
    p3 = Pacer(ceiling=100_000)
    p3.on_retry_round(100_000, 0.1, 2000, 2500)
    p3.on_retry_round(p3.rate, 0.2, 900, 2000)
    assert p3.rate < slowed


def test_small_retry_rounds_behind_a_policer_add_up() -> None:
    """A 300/s policer on a band: 40 ms rounds at full speed credit about 16 cells each,
    under the evidence a round needs, so the rate never moved (46 rounds, 4,172 open cells
    blocked over the simulated path). Rounds at one rate add up until they hold enough."""
    p = Pacer(ceiling=100_000)
    p.on_retry_round(100_000, 0.036, 16, 34)
    assert p.rate == 100_000  # 34 before: not enough to judge
    p.on_retry_round(100_000, 0.036, 16, 16)
    assert p.rate == pytest.approx(2 * 32 / 0.072)  # judged on both: 444/s delivered
    slowed = p.rate
    p.on_retry_round(slowed, 4.4, 1330, 16)  # slower lets them through: nothing to judge
    assert p.rate == slowed


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 5000), st.floats(0, 1)),
        min_size=1,
        max_size=40,
    )
)
def test_rate_stays_between_floor_and_ceiling(windows: list[tuple[int, float]]) -> None:
    p = pacer_with_reference(ceiling=50_000)
    t = 0.0
    for sent, share in windows:
        rate = p.rate
        p.on_window(window(rate, sent, int(sent * share), t, p.burst), t + sent / rate + 0.01)
        t += sent / rate + 0.02
        assert p.floor <= p.rate <= p.ceiling
        assert not math.isnan(p.rate)
