"""The bench's bookkeeping (pure logic; the measurements themselves are `make bench`)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest

from bench.bench import Bench, BenchError, Sample, Series, _paired


def _series(key: str, rates: dict[int, float]) -> Series:
    s = Series(key, key, "lab")
    s.samples = [Sample(1.0, 10, 10, send_rate=r, round=k) for k, r in rates.items()]
    return s


def test_pairs_are_taken_round_by_round() -> None:
    """Each ratio divides two rates of one round of the rotation; a round either side
    missed (a failed run) gives no pair, and drift across rounds cancels out."""
    ours = _series("ours", {0: 100.0, 1: 200.0, 3: 90.0})
    ceiling = _series("c", {0: 125.0, 1: 250.0, 2: 300.0, 3: 100.0})
    assert _paired(ours, ceiling) == [0.8, 0.8, 0.9]
    assert _paired(ours, None) == []
    assert _paired(_series("none", {}), ceiling) == []


def test_alternate_tags_samples_with_their_round() -> None:
    rounds: list[str] = []

    def job(name: str, fail_in: int = -1) -> Callable[[], Sample]:
        calls = 0

        def run() -> Sample:
            nonlocal calls
            rounds.append(name)
            calls += 1
            if calls - 1 == fail_in:
                raise BenchError("failed")
            return Sample(1.0, 1, 1, send_rate=1.0)

        return run

    a, b = Series("a", "a", "p"), Series("b", "b", "p")
    fake = SimpleNamespace(repeat=3, out_of_time=lambda: False, log=lambda text: None)
    Bench.alternate(fake, [(a, job("a")), (b, job("b", fail_in=1))])  # type: ignore[arg-type]
    assert rounds == ["a", "b", "b", "a", "a", "b"]  # the order rotates each round
    assert [x.round for x in a.samples] == [0, 1, 2]
    assert [x.round for x in b.samples] == [0, 2]
    assert b.failures == ["failed"]


@pytest.mark.parametrize("missing", ["ours", "c"])
def test_no_pairs_without_both_series(missing: str) -> None:
    s = {"ours": _series("ours", {0: 1.0}), "c": _series("c", {0: 2.0})}
    s[missing] = None  # type: ignore[assignment]
    assert _paired(s["ours"], s["c"]) == []


def test_the_report_judges_the_c_share_on_pairs_and_shows_c_beside_the_rate() -> None:
    """One round where the machine was slow for both: medians would mix it with the
    others, the pairs do not. The absolute target shows what C itself reached."""
    from rich.console import Console

    from bench.bench import Results, render

    res = Results()
    for key, label, rates in (
        ("lab:udpreach:raw", "udpreach run, raw mode", {0: 150e3, 1: 80e3, 2: 152e3}),
        ("lab:sender:c", "C sendmmsg raw (kernel ceiling)", {0: 200e3, 1: 100e3, 2: 190e3}),
    ):
        series = res.get(key, label, "lab")
        series.samples = [Sample(0.5, 64512, 64512, r, round=k) for k, r in rates.items()]
    console = Console(record=True, width=200)
    render(res, console)
    text = console.export_text()
    assert "(C: 190k/s)" in text
    line = next(x for x in text.splitlines() if "70% of C sendmmsg" in x)
    assert "80% (75%-80%)" in line
    assert "PASS" in line
