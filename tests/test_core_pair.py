"""A probe core and an agent core with a fake link between them (aioquic's ``transfer()``).

The probe core is what the runner does synchronously: encode a round of datagrams for the
unresolved cells, note them as sent, and credit the receipts the agent sends back
(``take_batches`` -> ``decode_receipts`` -> ``Ledger.note_receipt``). The link drops,
duplicates, reorders, corrupts, truncates, replays and NATs datagrams, deterministically
from a seed, and keeps the ground truth: which genuine datagrams actually crossed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import BATCH_RECORDS, RECENT_RUNS, AgentCore, AgentRun
from agent.service import DRAIN_CHUNK
from udpreach.core.datagram import TokenCodec, derive_run_key
from udpreach.core.framing import RECEIPT, decode_receipts
from udpreach.core.ledger import Ledger

SECRET = b"0123456789abcdef0123456789abcdef"
PROBE_ADDR = "198.18.2.2"

Cell = tuple[int, int]
Nat = Callable[[int], tuple[str, int]]


def codec_for(run_id: str, size: int = 16) -> TokenCodec:
    return TokenCodec(derive_run_key(SECRET, run_id, b"c" * 16, run_id.encode()[:16]), size)


class ProbeCore:
    """The synchronous half of a run on the probe: a codec and a ledger."""

    def __init__(self, run_id: str, dsts: list[int], srcs: list[int], size: int = 16) -> None:
        self.run_id = run_id
        self.codec = codec_for(run_id, size)
        self.ledger = Ledger(dsts, srcs)
        self.credited: list[tuple[int, int, int, str, int]] = []  # every receipt record
        self.stale_batches = 0

    def send_round(self, attempt: int) -> list[tuple[bytes, int]]:
        out = []
        for d, s in self.ledger.unresolved():
            out.append((self.codec.encode(d, s, attempt), s))
            self.ledger.note_sent(d, s)
        return out

    def on_receipts(self, payload: bytes) -> None:
        run_id, addrs, recs = decode_receipts(payload)
        if run_id != self.run_id:
            self.stale_batches += 1
            return
        for ai, dst, src, attempt, port in RECEIPT.iter_unpack(recs):
            self.credited.append((dst, src, attempt, addrs[ai], port))
            self.ledger.note_receipt(dst, src, attempt, addrs[ai], port)


@dataclass
class Link:
    """The path from probe to agent, with the ground truth of what crossed it."""

    seed: int
    drop: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    truncate: float = 0.0
    replay: float = 0.0  # per round, replay this share of earlier datagrams of the run
    reorder: bool = False
    nat: Nat | None = None
    drop_cells: frozenset[Cell] = frozenset()  # cells whose every datagram is dropped
    rng: random.Random = field(init=False)
    history: list[tuple[bytes, int]] = field(default_factory=list)
    genuine: list[tuple[bytes, str, int]] = field(default_factory=list)  # untouched, delivered
    corrupted: int = 0
    truncated: int = 0
    injected: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _where(self, src: int) -> tuple[str, int]:
        return self.nat(src) if self.nat else (PROBE_ADDR, src)

    def _emit(self, data: bytes, src: int) -> tuple[bytes, str, int]:
        addr, port = self._where(src)
        r = self.rng.random()
        if r < self.corrupt:
            bad = bytearray(data)
            bad[self.rng.randrange(len(bad))] ^= 1 << self.rng.randrange(8)
            self.corrupted += 1
            return bytes(bad), addr, port
        if r < self.corrupt + self.truncate:
            self.truncated += 1
            return data[: self.rng.randrange(len(data))], addr, port
        self.genuine.append((data, addr, port))
        return data, addr, port

    def carry(self, datagrams: list[tuple[bytes, int]]) -> list[tuple[bytes, str, int]]:
        out = []
        for data, src in datagrams:
            dst = int.from_bytes(data[3:5], "big")
            if (dst, src) in self.drop_cells or self.rng.random() < self.drop:
                continue
            out.append(self._emit(data, src))
            if self.rng.random() < self.duplicate:
                out.append(self._emit(data, src))
        if self.replay and self.history:
            for _ in range(int(len(self.history) * self.replay)):
                out.append(self._emit(*self.rng.choice(self.history)))
        self.history.extend(datagrams)
        if self.reorder:
            self.rng.shuffle(out)
        return out

    def inject(self, data: bytes, src: int) -> tuple[bytes, str, int]:
        """A datagram from elsewhere (another run's, captured earlier) put on the path."""
        self.injected += 1
        addr, port = self._where(src)
        return data, addr, port

    # -- ground truth ------------------------------------------------------------------

    def crossed(self) -> dict[Cell, set[int]]:
        """Cells with the attempts of which at least one untouched copy arrived."""
        out: dict[Cell, set[int]] = {}
        for data, _, _ in self.genuine:
            dst, src = (int.from_bytes(data[i : i + 2], "big") for i in (3, 5))
            out.setdefault((dst, src), set()).add(data[7])  # the attempt byte
        return out


def transfer(
    probe: ProbeCore, run: AgentRun, link: Link, attempt: int, batched: bool = False
) -> None:
    arrivals = link.carry(probe.send_round(attempt))
    if batched:  # as the agent's drain() hands them over: recvfrom's pairs, in chunks
        pairs = [(data, (addr, port)) for data, addr, port in arrivals]
        for i in range(0, len(pairs), DRAIN_CHUNK):
            run.on_datagrams(pairs[i : i + DRAIN_CHUNK])
    else:
        for data, addr, port in arrivals:
            run.on_datagram(data, addr, port)
    for batch in run.take_batches():
        probe.on_receipts(batch)


def sweep(probe: ProbeCore, run: AgentRun, link: Link, rounds: int, batched: bool = False) -> None:
    for attempt in range(1, rounds + 1):
        transfer(probe, run, link, attempt, batched)
    probe.ledger.finish(complete=True)


def check_against_ground_truth(probe: ProbeCore, run: AgentRun, link: Link) -> None:
    """The contract's crediting rules, checked cell by cell and count by count."""
    crossed = link.crossed()
    led = probe.ledger
    for d in led.dst_ports:
        for s in led.src_ports:
            want = "open" if (d, s) in crossed else "blocked"
            assert led.verdict(d, s) == want, (d, s)
    distinct = {data for data, _, _ in link.genuine}
    assert run.accepted == len(distinct)
    assert run.rejected["duplicate"] == len(link.genuine) - len(distinct)
    assert run.rejected["bad_mac"] == link.corrupted
    assert run.rejected["malformed"] == link.truncated
    # each (cell, attempt) credited once, however many copies crossed
    assert led.received_total == len(distinct)
    assert sum(r["received"] for r in led.ranges()) == len(distinct)
    got = Counter((d, s, a) for d, s, a, _, _ in probe.credited)
    assert max(got.values(), default=1) == 1
    assert set(got) == {(d, s, a) for (d, s), atts in crossed.items() for a in atts}
    assert led.summary()["open"] == len(crossed)


def start(
    core: AgentCore, run_id: str, dsts: list[int], srcs: list[int], size: int = 16
) -> tuple[ProbeCore, AgentRun]:
    probe = ProbeCore(run_id, dsts, srcs, size)
    return probe, core.start_run(run_id, codec_for(run_id, size))


DSTS = [5000, 5001]
SRCS = list(range(1024, 1124))


# --- clean and lossy paths ------------------------------------------------------------


def test_clean_path_everything_open_in_one_round() -> None:
    core = AgentCore()
    probe, run = start(core, "clean", DSTS, SRCS)
    link = Link(seed=1)
    sweep(probe, run, link, rounds=3)
    check_against_ground_truth(probe, run, link)
    led = probe.ledger
    assert led.sent_total == len(DSTS) * len(SRCS)  # nothing resent once seen
    ranges = led.ranges()
    assert [(r["dst_port"], r["first"], r["last"], r["verdict"]) for r in ranges] == [
        (5000, 1024, 1123, "open"),
        (5001, 1024, 1123, "open"),
    ]
    assert all(r["translated"] is False for r in ranges)
    assert ranges[0]["observed"] == {
        "addresses": [PROBE_ADDR],
        "first_port": 1024,
        "last_port": 1123,
    }
    assert run.stats() == {"accepted": 200, "rejected": {}}


def test_lossy_path_retries_only_unseen_cells() -> None:
    core = AgentCore()
    probe, run = start(core, "lossy", DSTS, SRCS)
    link = Link(seed=2, drop=0.4, reorder=True)
    sweep(probe, run, link, rounds=6)
    check_against_ground_truth(probe, run, link)
    led = probe.ledger
    # a cell is resent only while unseen: its sends are its first credited attempt
    for d, s, a, _, _ in probe.credited:
        assert led.attempts(d, s) == a
    assert led.first_attempt_histogram()[1] > led.first_attempt_histogram().get(2, 0)


def test_cell_whose_datagrams_all_dropped_is_blocked() -> None:
    core = AgentCore()
    hole = frozenset((5000, s) for s in range(1050, 1060))
    probe, run = start(core, "hole", DSTS, SRCS)
    link = Link(seed=3, drop_cells=hole)
    sweep(probe, run, link, rounds=3)
    check_against_ground_truth(probe, run, link)
    led = probe.ledger
    assert [
        (r["dst_port"], r["first"], r["last"], r["verdict"], r["sent"]) for r in led.ranges()
    ] == [
        (5000, 1024, 1049, "open", 26),
        (5000, 1050, 1059, "blocked", 30),
        (5000, 1060, 1123, "open", 64),
        (5001, 1024, 1123, "open", 100),
    ]


def test_run_that_ends_early_leaves_unknown_not_blocked() -> None:
    core = AgentCore()
    probe, run = start(core, "cut", [5000], SRCS)
    link = Link(seed=4, drop_cells=frozenset((5000, s) for s in range(1100, 1124)))
    transfer(probe, run, link, 1)
    probe.ledger.finish(complete=False)
    assert probe.ledger.summary()["unknown"] == 24
    assert probe.ledger.summary()["blocked"] == 0


# --- duplicates, replays, corruption --------------------------------------------------


@pytest.mark.parametrize("batched", [False, True])
def test_duplicates_and_replays_are_never_credited_twice(batched: bool) -> None:
    core = AgentCore()
    probe, run = start(core, "dups", DSTS, SRCS)
    link = Link(seed=5, drop=0.3, duplicate=0.5, replay=0.2, reorder=True)
    sweep(probe, run, link, rounds=5, batched=batched)
    check_against_ground_truth(probe, run, link)
    assert run.rejected["duplicate"] > 50  # the link really did duplicate and replay


@pytest.mark.parametrize("batched", [False, True])
def test_corrupt_and_truncated_datagrams_are_never_credited(batched: bool) -> None:
    core = AgentCore()
    probe, run = start(core, "corrupt", DSTS, SRCS, size=48)
    link = Link(seed=6, corrupt=0.3, truncate=0.2)
    sweep(probe, run, link, rounds=4, batched=batched)
    check_against_ground_truth(probe, run, link)
    assert link.corrupted > 20
    assert link.truncated > 10


def test_corrupted_only_cell_is_blocked() -> None:
    core = AgentCore()
    probe, run = start(core, "corrupt-all", [5000], [1024, 1025])
    link = Link(seed=7, corrupt=1.0)
    sweep(probe, run, link, rounds=3)
    assert run.accepted == 0
    assert run.rejected["bad_mac"] == 6
    assert probe.ledger.summary()["blocked"] == 2


def test_replays_of_an_earlier_run_are_counted_as_other_run() -> None:
    core = AgentCore()
    old_probe, old_run = start(core, "monday", [5000], SRCS)
    old_link = Link(seed=8)
    sweep(old_probe, old_run, old_link, rounds=1)
    captured = [(data, int.from_bytes(data[5:7], "big")) for data, _, _ in old_link.genuine]
    assert len(captured) == len(SRCS)

    # Tuesday: the path now blocks source ports 1100-1123, and someone replays Monday.
    hole = frozenset((5000, s) for s in range(1100, 1124))
    probe, run = start(core, "tuesday", [5000], SRCS)
    link = Link(seed=9, drop_cells=hole, reorder=True)
    for attempt in (1, 2):
        arrivals = link.carry(probe.send_round(attempt))
        arrivals += [link.inject(data, src) for data, src in captured]
        random.Random(attempt).shuffle(arrivals)
        for data, addr, port in arrivals:
            run.on_datagram(data, addr, port)
        for batch in run.take_batches():
            probe.on_receipts(batch)
    probe.ledger.finish(complete=True)
    check_against_ground_truth(probe, run, link)
    assert run.rejected["other_run"] == link.injected == 2 * len(SRCS)
    assert [(r["first"], r["last"], r["verdict"]) for r in probe.ledger.ranges()] == [
        (1024, 1099, "open"),
        (1100, 1123, "blocked"),
    ]
    assert old_run.accepted == len(SRCS)  # Monday's counts are untouched


def test_replay_of_an_earlier_run_with_another_size_is_other_run() -> None:
    """--size differs between the runs: the replay is still another run's, not malformed."""
    core = AgentCore()
    old = codec_for("small", 16)
    core.start_run("small", old)
    replay = old.encode(5000, 1024, 1)
    core.start_run("large", codec_for("large", 64))
    core.on_datagram(replay, PROBE_ADDR, 1024)
    assert core.current is not None
    assert core.current.rejected == Counter({"other_run": 1})


def test_recent_runs_are_named_and_older_ones_are_forgeries() -> None:
    core = AgentCore()
    old = [codec_for(f"r{i}") for i in range(RECENT_RUNS + 1)]
    for i, codec in enumerate(old):
        core.start_run(f"r{i}", codec)
    core.start_run("now", codec_for("now"))
    for codec in old:
        core.on_datagram(codec.encode(5000, 1024, 1), PROBE_ADDR, 1024)
    assert core.current is not None
    assert core.current.rejected == Counter({"other_run": RECENT_RUNS, "bad_mac": 1})
    assert core.current.accepted == 0


def test_no_run_no_credit() -> None:
    core = AgentCore()
    codec = codec_for("x")
    core.on_datagram(codec.encode(5000, 1024, 1), PROBE_ADDR, 1024)
    core.start_run("x", codec)
    run = core.end_run()
    assert run is not None
    core.on_datagram(codec.encode(5000, 1024, 1), PROBE_ADDR, 1024)
    assert core.idle_rejected == Counter({"no_run": 2})
    assert run.accepted == 0


def test_high_attempt_numbers_are_deduplicated_too() -> None:
    core = AgentCore()
    probe, run = start(core, "high", [5000], [1024, 1025])
    for _ in range(255):  # the ledger credits only what was sent
        probe.ledger.note_sent(5000, 1024)
    for attempt in (7, 8, 9, 200, 255):
        data = probe.codec.encode(5000, 1024, attempt)
        assert run.on_datagram(data, PROBE_ADDR, 1024) is not None
        run.on_datagram(data, PROBE_ADDR, 1024)
    for batch in run.take_batches():
        probe.on_receipts(batch)
    assert run.accepted == 5
    assert run.rejected == Counter({"duplicate": 5})
    assert probe.ledger.received_total == 5
    assert probe.ledger.first_attempt_histogram() == {7: 1}


# --- NAT ------------------------------------------------------------------------------


def test_nat_rewriting_source_ports_is_translated() -> None:
    core = AgentCore()
    public = "198.19.113.7"
    probe, run = start(core, "nat", [5000], SRCS)
    link = Link(seed=10, nat=lambda s: (public, 61000 + (s - 1024) * 3))
    sweep(probe, run, link, rounds=2)
    check_against_ground_truth(probe, run, link)
    (r,) = probe.ledger.ranges()
    assert r["verdict"] == "open"
    assert r["translated"] is True
    assert r["observed"] == {
        "addresses": [public],
        "first_port": 61000,
        "last_port": 61000 + 99 * 3,
    }


def test_nat_that_preserves_ports_is_not_translated() -> None:
    core = AgentCore()
    probe, run = start(core, "nat-keep", [5000], SRCS)
    link = Link(seed=11, nat=lambda s: ("198.19.113.7", s))
    sweep(probe, run, link, rounds=2)
    (r,) = probe.ledger.ranges()
    assert r["translated"] is False
    assert r["observed"]["addresses"] == ["198.19.113.7"]


def test_partly_translated_ranges_split() -> None:
    core = AgentCore()
    probe, run = start(core, "nat-part", [5000], SRCS)
    link = Link(seed=12, nat=lambda s: (PROBE_ADDR, s if s < 1074 else s + 30000))
    sweep(probe, run, link, rounds=2)
    got = [(r["first"], r["last"], r["translated"]) for r in probe.ledger.ranges()]
    assert got == [(1024, 1073, False), (1074, 1123, True)]


@pytest.mark.parametrize("batched", [False, True])
def test_receipts_name_the_right_address_beyond_255_sources(batched: bool) -> None:
    """More source addresses than one batch can name: every receipt keeps its own."""
    core = AgentCore()
    srcs = list(range(1024, 1624))
    probe, run = start(core, "many-addrs", [5000], srcs)

    def where(s: int) -> tuple[str, int]:
        return (f"10.{s // 256 % 256}.{s % 256}.1", s)

    sweep(probe, run, Link(seed=13, nat=where, reorder=True), rounds=1, batched=batched)
    assert len(probe.credited) == len(srcs)
    for _dst, src, _attempt, addr, port in probe.credited:
        assert (addr, port) == where(src)
    assert sorted(probe.ledger.observed_addresses()) == sorted(where(s)[0] for s in srcs)


def test_big_batches_ask_for_a_flush() -> None:
    core = AgentCore()
    codec = codec_for("big")
    run = core.start_run("big", codec)
    for s in range(BATCH_RECORDS - 1):
        run.on_datagram(codec.encode(5000, 1024 + s, 1), PROBE_ADDR, 1024 + s)
    assert not run.needs_flush()
    run.on_datagram(codec.encode(5001, 1024, 1), PROBE_ADDR, 1024)
    assert run.needs_flush()
    assert run.pending_records() == BATCH_RECORDS
    (batch,) = run.take_batches()
    assert len(decode_receipts(batch)[2]) == BATCH_RECORDS * RECEIPT.size
    assert run.take_batches() == []
    assert not run.needs_flush()


# --- the property ---------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    drop=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    duplicate=st.sampled_from([0.0, 0.3]),
    corrupt=st.sampled_from([0.0, 0.2]),
    truncate=st.sampled_from([0.0, 0.1]),
    replay=st.sampled_from([0.0, 0.3]),
    nat=st.booleans(),
    rounds=st.integers(1, 4),
    size=st.sampled_from([16, 33]),
    batched=st.booleans(),
)
def test_any_link_credits_exactly_what_crossed(
    seed: int,
    drop: float,
    duplicate: float,
    corrupt: float,
    truncate: float,
    replay: float,
    nat: bool,
    rounds: int,
    size: int,
    batched: bool,
) -> None:
    core = AgentCore()
    probe, run = start(core, f"p{seed}", [5000, 5002], list(range(2000, 2030)), size)
    link = Link(
        seed=seed,
        drop=drop,
        duplicate=duplicate,
        corrupt=corrupt,
        truncate=truncate,
        replay=replay,
        reorder=True,
        nat=(lambda s: ("198.19.113.7", s ^ 0x4000)) if nat else None,
    )
    sweep(probe, run, link, rounds, batched)
    check_against_ground_truth(probe, run, link)
    for r in probe.ledger.ranges():
        assert r["translated"] is (nat and r["verdict"] == "open")
