"""The bench's bookkeeping (pure logic; the measurements themselves are `make bench`)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from bench import probe_hook
from bench.bench import (
    Bench,
    BenchError,
    Results,
    Sample,
    Series,
    _paired,
    policer_policy,
    policer_rows,
    render,
)
from udpreach.core.pacing import EARLY_PILOT


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


def _report(res: Results) -> str:
    console = Console(record=True, width=220)
    render(res, console)
    return console.export_text()


def test_the_report_judges_the_c_share_on_pairs() -> None:
    """One round where the machine was slow for both: medians would mix it with the
    others, the pairs do not."""
    res = Results()
    for key, label, rates in (
        ("lab:udpreach:raw", "udpreach run, raw mode", {0: 180e3, 1: 80e3, 2: 171e3}),
        ("lab:sender:c", "C sendmmsg raw (kernel ceiling)", {0: 200e3, 1: 100e3, 2: 190e3}),
    ):
        series = res.get(key, label, "lab")
        series.samples = [Sample(0.5, 64512, 64512, r, round=k) for k, r in rates.items()]
    line = next(x for x in _report(res).splitlines() if "90% of C sendmmsg" in x)
    assert "90% (80%-90%)" in line
    assert "PASS" in line


def _policed(res: Results, key: str, seconds: list[float], **kw: Any) -> None:
    series = res.get(key, key, "lab")
    series.samples = [Sample(t, 64512, 64512, round=i, **kw) for i, t in enumerate(seconds)]


def test_policer_rows_divide_by_the_physical_minimum_plus_the_fixed_cost() -> None:
    res = Results()
    _policed(res, "policer:none", [0.9, 0.8, 1.0])
    _policed(res, "policer:5000", [14.0, 20.0, 15.0], limiter=4800.0, backoffs=3, wrong=0)
    _policed(res, "policer:50000", [3.0, 3.2, 2.9], backoffs=1, wrong=0)
    rows = {row.rate: row for row in policer_rows(res)}
    assert rows[5000].minimum == pytest.approx(12.9024)
    assert rows[5000].fixed == pytest.approx(0.9)
    assert rows[5000].ratio == pytest.approx(15.0 / (12.9024 + 0.9))
    assert rows[50000].ratio == pytest.approx(3.0 / (1.29024 + 0.9))
    assert rows[5000].limiters == "4,800"
    assert rows[50000].limiters == "-"
    text = _report(res)
    five = next(x for x in text.splitlines() if "policer 5,000/s: time" in x)
    fifty = next(x for x in text.splitlines() if "policer 50,000/s: time" in x)
    assert "1.09" in five
    assert "PASS" in five
    assert "1.37" in fifty
    assert "PASS" in fifty
    assert "PASS" in next(x for x in text.splitlines() if "zero wrong cells" in x)


def test_a_wrong_cell_or_a_slow_policed_run_is_a_miss() -> None:
    res = Results()
    _policed(res, "policer:none", [1.0])
    _policed(res, "policer:50000", [5.0], wrong=3)
    text = _report(res)
    assert "MISS" in next(x for x in text.splitlines() if "policer 50,000/s: time" in x)
    wrong = next(x for x in text.splitlines() if "zero wrong cells" in x)
    assert "3 of 64,512" in wrong
    assert "MISS" in wrong
    assert not [row for row in policer_rows(res) if row.rate == 5000]  # never measured


def test_the_policer_is_a_forward_rule_on_the_probes_udp() -> None:
    assert policer_policy(5000, "198.18.2.2") == (
        "ip saddr 198.18.2.2 meta l4proto udp limit rate over 5000/second burst 5 packets drop"
    )
    assert policer_policy(50000, "2001:2::2").startswith("ip6 saddr 2001:2::2 ")


def test_the_probe_hook_logs_each_stage_of_the_real_engine() -> None:
    """The send rate of round 1 comes from these lines: they must survive changes to the
    engine (a renamed hook fails here, not silently in the bench)."""
    from simpath import Path as SimPath
    from simpath import SimRun

    lines: list[str] = []
    undo = probe_hook.install(lines.append)
    try:
        doc = SimRun(SimPath(), src_ports="1024-9999").run()
    finally:
        undo()
    records = probe_hook.parse_stage_lines("\n".join(lines))
    assert len(records) == len(lines)
    stages = [(r.stage, r.round) for r in records]
    assert stages[:2] == [("pilot", 0), ("sweep", 1)]
    pilot, round1 = records[0], records[1]
    # A clean path: the pilot ends once its first EARLY_PILOT ports came through, and round 1
    # sends the rest of the plan, the pilot's unsent cells among them.
    assert pilot.groups == 128
    assert EARLY_PILOT <= pilot.sent < 128
    assert round1.sent == round1.groups == 8976 - pilot.sent
    assert 0 < round1.send_seconds <= round1.settle_seconds
    assert sum(r.sent for r in records) == doc["probe_stats"]["sent"]
    assert {r.run_id for r in records} == {doc["run_id"]}
    # Undone: the engine is as it was.
    lines.clear()
    SimRun(SimPath(), src_ports="1024-2047").run()
    assert lines == []
