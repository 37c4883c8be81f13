"""The real engine and the real agent core with a simulated path between them.

aioquic's ``transfer()`` and h11's ``ConnectionPair``, with udpreach's own halves: ``Sweep``
(the probe's run engine) and ``AgentCore`` (the agent's receive core), over ``simpath``
(a fake clock). The path drops, duplicates, reorders, corrupts, truncates and replays
datagrams, puts other runs' datagrams on the path and NATs sources, deterministically from a
seed, and keeps the ground truth: which untouched datagrams crossed and were reported. The
crediting contract is checked against it cell by cell and count by count.

The engine's own behaviours that ``test_sweep.py`` does not cover are here too: requeues
(backpressure and refusals on the probe host), the stop rule per block of source ports, the
rate it ends at under a limiter, an agent whose host answers once it died, and the caps.
A few tests are of the agent core alone (its de-duplication, naming replays, batch limits).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from simpath import PROBE, Path, Rule, SimRun, truth, verdicts

from agent.core import BATCH_RECORDS, RECENT_RUNS, AgentCore
from udpreach.core.datagram import TokenCodec, derive_run_key
from udpreach.core.framing import RECEIPT, decode_receipts
from udpreach.core.pacing import EARLY_PILOT, PILOT_CELLS
from udpreach.core.plan import AUTO_COPIES_CEILING
from udpreach.core.sweep import MAX_REQUEUES, Stage, SweepSettings

SECRET = b"0123456789abcdef0123456789abcdef"
DSTS = (5000, 5001)
SRCS = "1024-1123"  # 100 source ports: one block, no pilot and no recheck (too few cells)
BUFFER_FULL = "the probe host's send buffer stayed full"
IN_USE = "source port in use on the probe host"
LOCAL_FIREWALL = "sending refused on the probe host (local firewall)"

Cell = tuple[int, int]


def run(path: Path, **kw: Any) -> tuple[SimRun, dict[str, Any]]:
    sim = SimRun(path, **kw)
    return sim, sim.run()


def check_credits(sim: SimRun, doc: dict[str, Any]) -> None:
    """The crediting contract against what crossed: a cell is open exactly when an untouched
    datagram of it reached the agent (and was reported), every (cell, attempt) is reported
    and credited once however many copies crossed, and the agent counts every rejection."""
    assert doc["complete"] is True
    crossed = sim.crossed()
    got = verdicts(doc)
    led = sim.sweep.ledger
    for d in sim.plan.dst_ports:
        first = led.view(d).first
        for s in sim.plan.src_ports:
            assert got[(d, s)] == ("open" if (d, s) in crossed else "blocked"), (d, s)
            assert first[s] == min(crossed.get((d, s), {0})), (d, s)  # its first credit
    distinct = {data for data, _, _ in sim.genuine}
    agent = sim.agent_run
    assert agent.accepted == len(distinct)
    assert agent.rejected["duplicate"] == len(sim.genuine) - len(distinct)
    assert agent.rejected["bad_mac"] == sim.arrived["corrupt"]
    assert agent.rejected["malformed"] == sim.arrived["truncated"]
    assert agent.rejected["other_run"] == sim.arrived["foreign"]
    reported = Counter((d, s, a) for d, s, a, _, _ in sim.receipt_records())
    assert max(reported.values(), default=1) == 1
    assert set(reported) == {(d, s, a) for (d, s), atts in crossed.items() for a in atts}
    assert led.received_total == len(reported)
    assert sum(r["received"] for r in doc["ranges"]) == len(reported)
    assert doc["probe_stats"]["refused_receipts"] == 0
    assert doc["summary"]["open"] == len(crossed)


def codec_for(run_id: str, size: int = 16) -> TokenCodec:
    return TokenCodec(derive_run_key(SECRET, run_id, b"c" * 16, run_id.encode()[:16]), size)


def sent_per_cell(sim: SimRun) -> Counter[Cell]:
    return Counter((d, s) for _, d, s, _ in sim.sent_to)


# --- clean and lossy paths ------------------------------------------------------------


def test_clean_path_credits_every_cell_once_in_one_round() -> None:
    sim, doc = run(Path(), src_ports=SRCS, dst_ports=DSTS)
    check_credits(sim, doc)
    assert doc["probe_stats"]["rounds"] == 1
    assert doc["probe_stats"]["sent"] == 200  # nothing sent again once seen
    assert [(r["dst_port"], r["first"], r["last"], r["verdict"]) for r in doc["ranges"]] == [
        (5000, 1024, 1123, "open"),
        (5001, 1024, 1123, "open"),
    ]
    assert all(r["translated"] is False for r in doc["ranges"])
    assert doc["ranges"][0]["observed"] == {
        "addresses": [PROBE],
        "first_port": 1024,
        "last_port": 1123,
    }
    assert sim.agent_run.stats() == {"accepted": 200, "rejected": {}}


def test_lossy_reordering_path_retries_only_unseen_cells() -> None:
    sim, doc = run(Path(loss=[((0, 65535), 0.4)], jitter=0.002), src_ports=SRCS, dst_ports=DSTS)
    check_credits(sim, doc)
    assert sim.reordered > 50  # the jitter really did reorder
    led = sim.sweep.ledger
    for d, s, a, _, _ in sim.receipt_records():
        assert led.attempts(d, s) == a  # no datagram for a cell once it was seen
    hist = led.first_attempt_histogram()
    assert hist[1] > hist[2] > 0


def test_cell_whose_datagrams_all_dropped_is_blocked() -> None:
    path = Path(rules=[Rule("drop", (1050, 1059), dsts=(5000,))])
    # (No ICMP tests: a run this short would give the dark cells a look after a refill.)
    sim, doc = run(path, src_ports=SRCS, dst_ports=DSTS, settings=SweepSettings(icmp_budget=0))
    check_credits(sim, doc)
    # Open cells once; the dark ones three times: the floor of two, and one more that the
    # stop rule asks for (the block has 190 open cells: two silent attempts are not yet
    # enough to rule out loss).
    assert [
        (r["dst_port"], r["first"], r["last"], r["verdict"], r["sent"]) for r in doc["ranges"]
    ] == [
        (5000, 1024, 1049, "open", 26),
        (5000, 1050, 1059, "blocked", 30),
        (5000, 1060, 1123, "open", 64),
        (5001, 1024, 1123, "open", 100),
    ]


def test_run_that_ends_early_leaves_unknown_not_blocked() -> None:
    path = Path(rules=[Rule("drop", (1100, 1123))])
    sim = SimRun(path, src_ports=SRCS)
    doc = sim.run(stop=lambda sweep: sweep.round >= 2)  # cancelled once round 1 is settled
    assert doc["complete"] is False
    assert doc["probe_stats"]["sent"] == 100
    assert doc["summary"]["unknown"] == 24
    assert doc["summary"]["blocked"] == 0
    assert doc["summary"]["open"] == 76


# --- duplicates, replays, corruption --------------------------------------------------


@pytest.mark.parametrize("intake", ["one", "drain"])
def test_duplicates_and_replays_are_never_credited_twice(intake: str) -> None:
    path = Path(loss=[((0, 65535), 0.3)], duplicate=0.5, replay=0.2, jitter=0.002, seed=5)
    sim, doc = run(path, src_ports=SRCS, dst_ports=DSTS, intake=intake)
    check_credits(sim, doc)
    assert sim.agent_run.rejected["duplicate"] > 50  # the path really did duplicate and replay


def test_attempts_above_eight_are_deduplicated_over_the_path_too() -> None:
    """Attempts 1-8 live in a bitmask per cell, higher ones in a set: both de-duplicate."""
    path = Path(loss=[((0, 65535), 0.75)], duplicate=0.5)
    sim, doc = run(path, src_ports=SRCS, dst_ports=DSTS)
    assert max(sim.sweep.ledger.first_attempt_histogram()) > 8
    check_credits(sim, doc)


@pytest.mark.parametrize("intake", ["one", "drain"])
def test_corrupt_and_truncated_datagrams_are_never_credited(intake: str) -> None:
    path = Path(corrupt=0.3, truncate=0.2, seed=6)
    sim, doc = run(path, src_ports=SRCS, dst_ports=DSTS, size=48, intake=intake)
    check_credits(sim, doc)
    assert sim.arrived["corrupt"] > 20
    assert sim.arrived["truncated"] > 10


def test_corrupted_only_cell_is_blocked() -> None:
    sim, doc = run(Path(corrupt=1.0), src_ports="1024-1025", settings=SweepSettings(icmp_budget=0))
    check_credits(sim, doc)
    assert sim.agent_run.accepted == 0
    assert sim.agent_run.rejected["bad_mac"] == doc["probe_stats"]["sent"] == 4  # two each
    assert doc["summary"]["blocked"] == 2
    assert doc["loss"]["estimate"] is None  # nothing got through: the loss is unknown


def test_replays_of_an_earlier_run_are_counted_as_other_run() -> None:
    agent = AgentCore()
    monday, _ = run(Path(), src_ports=SRCS, run_id="monday", agent_core=agent)
    captured = list(monday.genuine)
    assert len(captured) == 100

    # Tuesday: the path now drops source ports 1100-1123, and someone replays Monday.
    path = Path(rules=[Rule("drop", (1100, 1123))], jitter=0.002, seed=9)
    tuesday = SimRun(path, src_ports=SRCS, run_id="tuesday", agent_core=agent)
    rng = random.Random(9)
    for _ in range(2):
        for data, _, _ in captured:
            tuesday.inject(data, int.from_bytes(data[5:7], "big"), at=rng.uniform(0.0, 0.05))
    doc = tuesday.run()
    check_credits(tuesday, doc)
    assert tuesday.agent_run.rejected["other_run"] == 2 * len(captured)
    assert [(r["first"], r["last"], r["verdict"]) for r in doc["ranges"]] == [
        (1024, 1099, "open"),
        (1100, 1123, "blocked"),
    ]
    assert monday.agent_run.stats() == {"accepted": 100, "rejected": {}}  # untouched


def test_replay_of_an_earlier_run_with_another_size_is_other_run() -> None:
    """--size differs between the runs: the replay is still another run's, not malformed."""
    core = AgentCore()
    old = codec_for("small", 16)
    core.start_run("small", old)
    replay = old.encode(5000, 1024, 1)
    core.start_run("large", codec_for("large", 64))
    core.on_datagram(replay, PROBE, 1024)
    assert core.current is not None
    assert core.current.rejected == Counter({"other_run": 1})


def test_recent_runs_are_named_and_older_ones_are_forgeries() -> None:
    core = AgentCore()
    old = [codec_for(f"r{i}") for i in range(RECENT_RUNS + 1)]
    for i, codec in enumerate(old):
        core.start_run(f"r{i}", codec)
    core.start_run("now", codec_for("now"))
    for codec in old:
        core.on_datagram(codec.encode(5000, 1024, 1), PROBE, 1024)
    assert core.current is not None
    assert core.current.rejected == Counter({"other_run": RECENT_RUNS, "bad_mac": 1})
    assert core.current.accepted == 0


def test_no_run_no_credit() -> None:
    core = AgentCore()
    codec = codec_for("x")
    core.on_datagram(codec.encode(5000, 1024, 1), PROBE, 1024)
    core.start_run("x", codec)
    ended = core.end_run()
    assert ended is not None
    core.on_datagram(codec.encode(5000, 1024, 1), PROBE, 1024)
    assert core.idle_rejected == Counter({"no_run": 2})
    assert ended.accepted == 0


def test_high_attempt_numbers_are_deduplicated_and_reported_as_sent() -> None:
    core = AgentCore()
    codec = codec_for("high")
    agent = core.start_run("high", codec)
    for attempt in (7, 8, 9, 200, 255):
        data = codec.encode(5000, 1024, attempt)
        assert agent.on_datagram(data, PROBE, 1024) is not None
        agent.on_datagram(data, PROBE, 1024)
    assert agent.accepted == 5
    assert agent.rejected == Counter({"duplicate": 5})
    records = [
        rec
        for batch in agent.take_batches()
        for rec in RECEIPT.iter_unpack(decode_receipts(batch)[2])
    ]
    assert records == [(0, 5000, 1024, a, 1024) for a in (7, 8, 9, 200, 255)]


# --- NAT ------------------------------------------------------------------------------


def test_nat_rewriting_source_ports_is_translated() -> None:
    public = "198.19.113.7"
    path = Path(nat=lambda s: 61000 + (s - 1024) * 3, nat_address=public)
    sim, doc = run(path, src_ports=SRCS)
    check_credits(sim, doc)
    (r,) = doc["ranges"]
    assert r["verdict"] == "open"
    assert r["translated"] is True
    assert r["observed"] == {
        "addresses": [public],
        "first_port": 61000,
        "last_port": 61000 + 99 * 3,
    }


def test_nat_that_rewrites_only_the_address_is_translated_and_names_it() -> None:
    """The engine knows the address it sends from: another one seen is a translation even
    with every port kept (an address-only NAT); the document names the address seen."""
    _sim, doc = run(Path(nat_address="198.19.113.7"), src_ports=SRCS)
    (r,) = doc["ranges"]
    assert r["translated"] is True
    assert r["observed"] == {"addresses": ["198.19.113.7"], "first_port": 1024, "last_port": 1123}
    assert doc["observed_sources"] == ["198.19.113.7"]


def test_partly_translated_ranges_split() -> None:
    sim, doc = run(Path(nat=lambda s: s if s < 1074 else s + 30000), src_ports=SRCS)
    check_credits(sim, doc)
    got = [(r["first"], r["last"], r["translated"]) for r in doc["ranges"]]
    assert got == [(1024, 1073, False), (1074, 1123, True)]


@pytest.mark.parametrize("intake", ["one", "drain"])
def test_receipts_name_the_right_address_beyond_255_sources(intake: str) -> None:
    """More source addresses than one receipt batch can name (255): every receipt, and
    every cell of the document, keeps its own. The NAT leaves even ports alone and gives
    each odd one an address of its own (and another port), so each cell is a range of its
    own in the document, which shows what was seen of it."""

    def seen(s: int) -> tuple[str, int]:
        return (PROBE, s) if s % 2 == 0 else (f"10.{s // 256 % 256}.{s % 256}.1", s + 20000)

    path = Path(nat_pool=lambda s: seen(s)[0], nat=lambda s: seen(s)[1], jitter=0.001)
    sim, doc = run(path, src_ports="1024-1623", intake=intake)
    check_credits(sim, doc)
    records = sim.receipt_records()
    assert len({addr for _, _, _, addr, _ in records}) == 301
    assert len(sim.receipts) >= 2  # the agent had to start new batches for the addresses
    for _dst, src, _attempt, addr, port in records:
        assert (addr, port) == seen(src)
    assert len(doc["ranges"]) == 600
    for r in doc["ranges"]:
        addr, port = seen(r["first"])
        assert r["translated"] is (r["first"] % 2 == 1)
        assert r["observed"] == {"addresses": [addr], "first_port": port, "last_port": port}
    assert sorted(doc["observed_sources"]) == sorted({seen(s)[0] for s in range(1024, 1624)})


# --- the agent's receipt batches --------------------------------------------------------


def test_big_batches_ask_for_a_flush() -> None:
    core = AgentCore()
    codec = codec_for("big")
    agent = core.start_run("big", codec)
    for s in range(BATCH_RECORDS - 1):
        agent.on_datagram(codec.encode(5000, 1024 + s, 1), PROBE, 1024 + s)
    assert not agent.needs_flush()
    agent.on_datagram(codec.encode(5001, 1024, 1), PROBE, 1024)
    assert agent.needs_flush()
    assert agent.pending_records() == BATCH_RECORDS
    (batch,) = agent.take_batches()
    assert len(decode_receipts(batch)[2]) == BATCH_RECORDS * RECEIPT.size
    assert agent.take_batches() == []
    assert not agent.needs_flush()


@pytest.mark.parametrize("intake", ["one", "drain"])
def test_a_full_receipt_batch_goes_out_before_the_flush_timer(intake: str) -> None:
    """At a million datagrams a second a batch fills between two of the engine's flushes
    (20 ms apart): the agent sends it as soon as it is full, and nothing is lost."""
    path = Path(agent_flush=1.0, send_cost=1e-7)  # a timer that never fires in time
    sim, doc = run(path, src_ports="1024-9727", rate=1_000_000, intake=intake)
    check_credits(sim, doc)
    assert [n for why, n in sim.batches if why == "full"] == [BATCH_RECORDS]
    assert doc["summary"]["open"] == 8704


# --- the property ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    duplicate=st.sampled_from([0.0, 0.3]),
    corrupt=st.sampled_from([0.0, 0.2]),
    truncate=st.sampled_from([0.0, 0.1]),
    replay=st.sampled_from([0.0, 0.3]),
    nat=st.booleans(),
    copies=st.sampled_from([1, 2, 4, 12, None]),
    size=st.sampled_from([16, 33]),
    intake=st.sampled_from(["one", "drain"]),
)
def test_any_link_credits_exactly_what_crossed(
    seed: int,
    loss: float,
    duplicate: float,
    corrupt: float,
    truncate: float,
    replay: float,
    nat: bool,
    copies: int | None,
    size: int,
    intake: str,
) -> None:
    path = Path(
        loss=[((0, 65535), loss)],
        duplicate=duplicate,
        corrupt=corrupt,
        truncate=truncate,
        replay=replay,
        jitter=0.002,
        nat=(lambda s: s ^ 0x4000) if nat else None,
        nat_address="198.19.113.7" if nat else None,
        seed=seed,
    )
    sim, doc = run(
        path,
        src_ports="2000-2029",
        dst_ports=(5000, 5002),
        copies=copies,
        size=size,
        intake=intake,
        seed=seed,
    )
    check_credits(sim, doc)
    assert doc["loss"]["attempts"] <= (copies or AUTO_COPIES_CEILING)
    for r in doc["ranges"]:
        assert r["translated"] is (nat and r["verdict"] == "open")


# --- requeues: what the probe host could not send --------------------------------------


def test_datagrams_left_for_a_full_buffer_go_out_at_the_end_of_the_round() -> None:
    """A send call queues 300 datagrams and the rest waits (raw mode's ENOBUFS): what
    waited goes out after the round's other datagrams, each once, at the same attempt, to
    the destination ports it still owes (a port whose first datagram went sends only its
    second again)."""
    cells = [(d, s) for d in DSTS for s in range(1024, 2024)]
    sim, doc = run(
        Path(),
        src_ports="1024-2023",
        dst_ports=DSTS,
        sndbuf=300,
        settings=SweepSettings(recheck=False),
    )
    assert doc["summary"]["open"] == 2000
    assert doc["probe_stats"]["rounds"] == 1  # waiting is not loss: no retry round
    assert len(sim.waited) > 200
    assert any((5000, s) not in sim.waited for _, s in sim.waited)  # some waited for one port
    assert sent_per_cell(sim) == Counter(dict.fromkeys(cells, 1))
    assert {attempt for *_, attempt in sim.sent_to} == {1}
    order = [(d, s) for _, d, s, _ in sim.sent_to]
    last_plain = max(i for i, cell in enumerate(order) if cell not in sim.waited)
    first_waited = min(i for i, cell in enumerate(order) if cell in sim.waited)
    assert first_waited > last_plain


def test_a_port_whose_buffer_stays_full_is_untested_after_bounded_requeues() -> None:
    """Bind mode: one port's socket buffer is full. It is sent again at the end of the
    round up to MAX_REQUEUES times; then its cells are untested with the reason, never
    blocked, even where the path drops everything."""
    path = Path(rules=[Rule("drop", (1100, 1199))])
    forever = 10**6
    sim, doc = run(
        path, src_ports="1024-1223", dst_ports=DSTS, stuck={1050: 3, 1060: forever, 1150: forever}
    )
    assert doc["complete"] is True
    got = verdicts(doc)
    sent = sent_per_cell(sim)
    # A buffer that drained after three send calls: sent once, at the end of the round.
    assert sim.backpressured[1050] == 3
    assert [(sent[(d, 1050)], got[(d, 1050)]) for d in DSTS] == [(1, "open"), (1, "open")]
    first_round = [s for _, _, s, attempt in sim.sent_to if attempt == 1]
    assert first_round[-2:] == [1050, 1050]  # its two datagrams close the round
    for s in (1060, 1150):
        assert sim.backpressured[s] == 1 + MAX_REQUEUES
        assert all(sent[(d, s)] == 0 and got[(d, s)] == "untested" for d in DSTS)
        (r,) = [r for r in doc["ranges"] if r["dst_port"] == 5000 and r["first"] == s]
        assert (r["last"], r["verdict"], r["reason"]) == (s, "untested", BUFFER_FULL)
    want = truth(path, DSTS, range(1024, 1224))
    assert {c: v for c, v in got.items() if c[1] not in (1060, 1150)} == {
        c: v for c, v in want.items() if c[1] not in (1060, 1150)
    }


def test_a_port_refused_locally_is_untested_with_its_reason_and_never_retried() -> None:
    path = Path(rules=[Rule("drop", (1100, 1199))])
    refused = {1030: IN_USE, 1110: LOCAL_FIREWALL}
    sim, doc = run(path, src_ports="1024-1223", dst_ports=DSTS, refused=refused)
    assert doc["complete"] is True
    assert doc["probe_stats"]["rounds"] >= 2  # the dark neighbours of 1110 were retried
    assert sim.refusals == Counter({1030: 1, 1110: 1})  # but not 1110 itself
    got = verdicts(doc)
    for s, reason in refused.items():
        assert all(got[(d, s)] == "untested" for d in DSTS)
        assert [r["reason"] for r in doc["ranges"] if r["first"] == s] == [reason, reason]
    assert doc["summary"]["untested"] == 4
    assert doc["summary"]["blocked"] == 2 * 99


# --- the stop rule ------------------------------------------------------------------------


def test_retries_go_on_per_block_until_its_bound_is_met() -> None:
    """Blocks of 256 source ports: a block where every cell was seen is sent once; a block
    where nothing ever got through gets the floor of two attempts; a lossy block with a dark
    range in it is retried until its bound of false "blocked" cells is under its share of
    the target, well before the copies run out."""
    path = Path(
        loss=[((2048, 3071), 0.3)],
        rules=[Rule("drop", (2600, 2700)), Rule("drop", (3584, 3839))],
    )
    settings = SweepSettings(recheck=False, icmp_budget=0)  # the sweep's rounds alone
    sim, doc = run(path, src_ports="1024-5119", settings=settings)
    srcs = range(1024, 5120)
    assert verdicts(doc) == truth(path, (5000,), srcs)
    sent = sent_per_cell(sim)

    def attempts(first: int, last: int) -> set[int]:
        return {sent[(5000, s)] for s in range(first, last + 1)}

    assert attempts(1024, 2047) == attempts(3072, 3583) == attempts(3840, 5119) == {1}
    assert attempts(3584, 3839) == {2}
    (k,) = attempts(2600, 2700)
    assert 2 < k < AUTO_COPIES_CEILING
    assert doc["probe_stats"]["rounds"] == k
    assert doc["loss"]["false_blocked_bound"] <= doc["loss"]["confidence_target"]
    assert doc["loss"]["confidence_reached"] is True


# --- rate back-off ----------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [None, 5000], ids=["clean", "policer-5000"])
def test_the_rate_ends_near_a_limiter_on_the_path(limit: int | None) -> None:
    path = Path(police=(limit, 5)) if limit else Path()
    sim, doc = run(path, src_ports="1024-9215")
    assert verdicts(doc) == truth(path, (5000,), range(1024, 9216))
    loss = doc["loss"]
    if limit is None:
        assert (loss["rate_found"], loss["rate_backoffs"]) == (100_000, 0)
        return
    assert 0.8 * limit <= loss["rate_found"] <= 1.05 * limit
    assert loss["rate_backoffs"] >= 1
    assert sim.now < 1.5 * 8192 / limit  # about as fast as the limiter lets anything through


# --- a lost agent ------------------------------------------------------------------------------


def test_port_unreachable_from_a_dead_agents_host_is_unknown_not_rejected() -> None:
    """The agent dies at 0.3 s; its host answers "port unreachable" for every datagram from
    then on (verified quotes, from the target itself), and the control channel notices a
    second later. Those answers are the agent gone, not the path rejecting."""
    path = Path(
        rules=[Rule("drop", (3000, 3999))],
        agent_lost_at=0.3,
        lost_notice=1.0,
        dead_host_answers=True,
        icmp_unlimited=True,
    )
    sim, doc = run(path, src_ports="1024-9215", rate=10_000)
    assert doc["complete"] is False
    summary = doc["summary"]
    assert summary["rejected"] == 0
    assert summary["blocked"] == 0
    assert summary["open"] > 0
    assert summary["unknown"] == 8192 - summary["open"]
    (note,) = [w for w in doc["warnings"] if "port-unreachable from the agent's host" in w]
    assert int(note.split()[0]) > 1000
    opened = {(d, s) for (d, s), v in verdicts(doc).items() if v == "open"}
    assert max(t for t, d, s, _ in sim.sent_to if (d, s) in opened) < 0.3


# --- caps ----------------------------------------------------------------------------------------


def test_a_repeat_sweep_cut_short_by_the_cap_never_makes_open_cells_blocked() -> None:
    path = Path(later=(0.05, [Rule("drop", (2000, 2999))]))
    settings = SweepSettings(max_datagrams=5000)
    _sim, doc = run(path, src_ports="1024-3071", rate=20_000, settings=settings)
    assert any("path changed during the run" in w for w in doc["warnings"])
    assert any("--max-datagrams" in w for w in doc["warnings"])
    got = verdicts(doc)
    want = truth(path, (5000,), range(1024, 3072), at=1e9)
    assert [c for c, v in want.items() if v == "open" and got[c] == "blocked"] == []


def test_a_byte_cap_below_the_first_round_ends_the_run() -> None:
    sim = SimRun(
        Path(), src_ports="1024-2047", size=1000, settings=SweepSettings(max_bytes=500_000)
    )
    doc = sim.run(limit=10)  # raises if the run has not ended after 10 s of fake time
    assert doc["summary"]["blocked"] == 0


def test_a_byte_cap_below_the_first_round_never_makes_unsent_cells_blocked() -> None:
    sim = SimRun(
        Path(), src_ports="1024-3071", size=1000, settings=SweepSettings(max_bytes=500_000)
    )
    doc = sim.run()
    assert any("--max-bytes" in w for w in doc["warnings"])
    sent = sent_per_cell(sim)
    got = verdicts(doc)
    assert [c for c, v in got.items() if v == "blocked" and not sent[c]] == []


# --- what refused ports do to pacing -------------------------------------------------------------


def test_ports_refused_locally_do_not_slow_the_others_down() -> None:
    """A local firewall refuses a quarter of the source ports: the rest go at the rate."""

    def seconds_per_datagram(sim: SimRun) -> float:
        times = [t for t, _, _, attempt in sim.sent_to if attempt == 1]
        return (times[-1] - times[0]) / len(times)

    refused = dict.fromkeys(range(1024, 3072), LOCAL_FIREWALL)
    plain, _ = run(Path(), src_ports="1024-9215", rate=10_000)
    sim, doc = run(Path(), src_ports="1024-9215", rate=10_000, refused=refused)
    assert doc["summary"]["untested"] == 2048
    assert seconds_per_datagram(sim) <= 1.1 * seconds_per_datagram(plain)


def test_prepare_makes_the_first_rounds_macs_during_the_pilot_and_nothing_after() -> None:
    """The engine's work ahead (what the probe does while the pilot's spacing would have it
    spin): a few MAC chunks a call, for attempt 1 on every destination port of the plan,
    until none is left; they are the MACs a fresh codec makes, and the first round's
    encoding then makes none. Nothing is made once the first round has ended."""
    sim = SimRun(Path(), src_ports="1024-9215", dst_ports=(5000, 5001), rate=100_000)
    calls: list[int] = []
    during_pilot = False

    def watch(sweep: Any) -> bool:
        nonlocal during_pilot
        if sweep.stage is Stage.PILOT and not during_pilot:
            during_pilot = True
            n = 1
            while sweep.prepare():
                n += 1
            calls.append(n)
        return False

    sim.run(stop=watch)
    assert calls == [-(-2 * (8192 // 16) // 8)]  # every chunk of both ports, 8 a call
    codec = sim.sweep.codec
    fresh = TokenCodec(b"k" * 32)
    fresh._xof = codec._xof.copy()  # the same key, a codec that made nothing yet
    for d in (5000, 5001):
        table = codec._tables[d << 8 | 1]
        assert all(table.made[hi] for hi in range(1024 >> 4, 9216 >> 4))
        for src in (1024, 4711, 9215):
            assert codec.mac(d, src, 1) == fresh.mac(d, src, 1)
    assert sim.sweep.round >= 1
    assert sim.sweep.prepare() is False  # the run is over: nothing is left, nothing made


def test_prepare_has_nothing_to_do_without_a_pilot() -> None:
    sim = SimRun(Path(), src_ports="1024-1279")  # too small for a pilot
    assert sim.sweep.prepare() is False
    assert not sim.sweep.codec._tables


def test_the_pilots_reference_counts_only_datagrams_that_went_out() -> None:
    """On a clean path the pilot's reference delivery ratio is 1. Counting refused ports as
    lost lowers it by their share, and the pacer then takes a limiter that drops less than
    that share for normal (it compares each window, counted right, with the reference)."""
    refused = dict.fromkeys(range(1024, 5120), LOCAL_FIREWALL)  # a quarter of the ports
    sim = SimRun(Path(), src_ports="1024-17407", refused=refused)
    sim.run(stop=lambda sweep: sweep.stage is Stage.SWEEP)  # cancelled as round 1 begins
    assert sum(sim.refusals.values()) > 10  # the pilot did meet refused ports
    assert sim.sweep.pacer.reference == 1.0


def _pilot_of(path: Path, **kw: Any) -> tuple[int, float | None, dict[str, Any]]:
    """Datagrams the pilot sent, the reference it left the pacer, and the run's document."""
    seen: dict[str, Any] = {}

    def watch(sweep: Any) -> bool:
        if sweep.stage is Stage.PILOT:
            seen["sent"] = sweep.ledger.sent_total
        elif "reference" not in seen and sweep.stage is Stage.SWEEP:
            seen["reference"] = sweep.pacer.reference
        return False

    doc = SimRun(path, **kw).run(stop=watch)
    return seen["sent"], seen.get("reference"), doc


def test_the_pilot_ends_once_its_first_ports_came_through_and_never_past_a_dark_one() -> None:
    """On a clean path the pilot ends as soon as its first EARLY_PILOT ports are credited
    (the reference is 1; its unsent cells go in round 1). With a tenth of the port space dark
    it meets a dark port among them and sends its whole sample: the reference is what it saw.
    The verdicts are the same either way."""
    sent, reference, doc = _pilot_of(Path(), src_ports="1024-17407", rate=100_000)
    assert EARLY_PILOT <= sent < PILOT_CELLS
    assert reference == 1.0
    assert doc["summary"]["open"] == doc["summary"]["cells"] == 16384
    dark = Path(rules=[Rule("drop", (5000, 6637))])  # 1,638 of 16,384 ports
    sent, reference, doc = _pilot_of(dark, src_ports="1024-17407", rate=100_000)
    assert sent == PILOT_CELLS
    assert reference is not None
    assert 0.8 < reference < 1.0
    assert verdicts(doc) == truth(dark, [5000], range(1024, 17408))


@pytest.mark.parametrize("seed", [1, 4, 8])
def test_the_pilot_goes_on_when_an_error_for_one_of_its_cells_is_already_in(seed: int) -> None:
    """A reject band of 2% (Linux's ICMP limits): with these seeds the pilot's first 44 ports
    came through, but an error for a later one had already arrived. That cell is dark for sure,
    so the reference is not 1: the pilot sends its whole sample and says what it saw."""
    path = Path(rules=[Rule("reject", (30000, 30644))], seed=seed)
    sent, reference, doc = _pilot_of(path, src_ports="1024-33791", seed=seed)
    assert sent == PILOT_CELLS
    assert reference is not None
    assert reference < 1.0
    assert verdicts(doc) == truth(path, [5000], range(1024, 33792))


def test_a_windows_time_runs_from_its_first_datagram() -> None:
    """The pacer judges a limiter by a window's delivered rate: the time before the window's
    first datagram (a stage's start, a checkpoint, the wait for the next batch) is not part
    of it, or the rate found comes out low and every retry goes slower than the path allows;
    and it is judged at the rate and burst it went at, not those of when it was opened."""
    for police in ((5000, 5), (1000, 5)):
        sim = SimRun(Path(police=police), src_ports="1024-17407", rate=100_000)
        sweep = sim.sweep
        # window (its id) -> when its first batch went, and at what rate and burst
        first: dict[int, tuple[float, float, int]] = {}
        real = sweep._send_batch

        def spy(now: float, sweep: Any = sweep, real: Any = real, first: Any = first) -> Any:
            if sweep._windows and not sweep._windows[-1].sent and sweep._burst is None:
                rate = sweep.pilot_rate if sweep.stage is Stage.PILOT else sweep._rate()
                first.setdefault(id(sweep._windows[-1]), (now, rate, sweep.pacer.burst))
            return real(now)

        sweep._send_batch = spy  # type: ignore[method-assign]
        sim.run()
        windows = [w for w in sweep._windows if w.sent and id(w) in first]
        assert len(windows) > 3
        assert [(w.start, w.rate, w.burst) for w in windows] == [first[id(w)] for w in windows]


def test_sources_ahead_counts_the_first_round_during_the_pilot_and_what_the_rate_reaches() -> None:
    """What a bind-mode sender opens sockets ahead for: during the pilot, the rest of the
    pilot and the whole first round; in a round, the rest of its queue; never more than
    the current rate sends from in the time asked about, and nothing once the run ends."""
    seen: list[tuple[Stage, int, int]] = []

    def watch(sweep: Any) -> bool:
        seen.append((sweep.stage, sweep.sources_ahead(3600.0), sweep.sources_ahead(0.01)))
        return False

    sim = SimRun(Path(), src_ports="1024-17407", rate=100_000)
    sim.run(stop=watch)
    pilot = [s for s in seen if s[0] is Stage.PILOT]
    sweep1 = [s for s in seen if s[0] is Stage.SWEEP]
    assert pilot
    assert sweep1
    assert all(16384 <= whole <= 16384 + 128 for _, whole, _ in pilot)
    assert sweep1[0][1] <= 16384
    assert sweep1[-1][1] == 0  # the queue runs down to nothing
    # 10 ms at the rate (at most 100,000 a second, one destination port): at most 1,001
    assert all(soon <= min(whole, 1001) for _, whole, soon in seen)
    assert sim.sweep.sources_ahead(3600.0) == 0
