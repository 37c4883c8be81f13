"""The agent's bulk receive path credits exactly what the one-at-a-time path always did.

``ReferenceRun`` is ``AgentRun.on_datagram`` as it was written before the bulk path (with
``TokenCodec.verify`` of that time, recomputed from the datagram layout). Hostile and
ordinary streams go through the reference one datagram at a time, and through the agent's
``on_datagrams`` in chunks (and ``on_datagram``, and ``drain`` over a fake socket): the
accepted and rejected counts and every receipt batch, byte for byte, must be the same.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_token import reference_verify

import agent.core
from agent.core import RECENT_RUNS, AgentCore, AgentRun
from agent.service import (
    DRAIN_CHUNK,
    AgentState,
    Listener,
    callback_source,
    drain,
    normalize_addr,
    reconnect_delay,
)
from udpreach.core.datagram import Cell, Reject, TokenCodec, derive_run_key, run_tag
from udpreach.core.errors import ConfigError
from udpreach.core.framing import RECEIPT, decode_receipts, encode_receipts

SECRET = b"0123456789abcdef0123456789abcdef"
DSTS = [5000, 5001, 65535]


def _key(run_id: str) -> bytes:
    return derive_run_key(SECRET, run_id, b"c" * 16, b"a" * 16)


class ReferenceRun:
    """The agent's receive state as it was: one datagram at a time, one Cell each."""

    def __init__(
        self, run_id: str, key: bytes, size: int, previous: list[tuple[bytes, int]], limit: int
    ) -> None:
        self.run_id = run_id
        self.key = key
        self.size = size
        self.previous = previous  # (key, size) of the runs the agent still remembers
        self.limit = limit  # addresses per receipt batch
        self._seen: dict[int, bytearray] = {}
        self._seen_high: set[tuple[int, int, int]] = set()
        self._records = bytearray()
        self._addrs: dict[str, int] = {}
        self._ready: list[bytes] = []
        self.accepted = 0
        self.rejected: Counter[str] = Counter()

    def _owned_by_previous(self, data: bytes) -> bool:
        return any(
            data[:3] == run_tag(k) and isinstance(reference_verify(k, s, data), Cell)
            for k, s in self.previous
        )

    def on_datagram(self, data: bytes, addr: str, port: int) -> Cell | Reject:
        got = reference_verify(self.key, self.size, data)
        if isinstance(got, Reject):
            if self._owned_by_previous(data):
                got = Reject.OTHER_RUN
            self.rejected[got.value] += 1
            return got
        if got.attempt <= 8:
            col = self._seen.get(got.dst_port)
            if col is None:
                col = self._seen[got.dst_port] = bytearray(65536)
            bit = 1 << (got.attempt - 1)
            if col[got.src_port] & bit:
                self.rejected[Reject.DUPLICATE.value] += 1
                return Reject.DUPLICATE
            col[got.src_port] |= bit
        else:
            key = (got.dst_port, got.src_port, got.attempt)
            if key in self._seen_high:
                self.rejected[Reject.DUPLICATE.value] += 1
                return Reject.DUPLICATE
            self._seen_high.add(key)
        self.accepted += 1
        ai = self._addrs.get(addr)
        if ai is None:
            if len(self._addrs) >= self.limit:
                self._seal()
            ai = self._addrs[addr] = len(self._addrs)
        self._records.append(ai)
        self._records += data[3:8]
        self._records += port.to_bytes(2, "big")
        return got

    def _seal(self) -> None:
        if self._records:
            addrs = sorted(self._addrs, key=self._addrs.__getitem__)
            self._ready.append(encode_receipts(self.run_id, addrs, bytes(self._records)))
        self._records.clear()
        self._addrs.clear()

    def take_batches(self) -> list[bytes]:
        self._seal()
        out, self._ready = self._ready, []
        return out


# --- streams --------------------------------------------------------------------------


def raw_host(i: int, form: int) -> str:
    """Source address number *i*, spelled the ways recvfrom may spell it."""
    v4 = f"198.18.{i // 256 % 256}.{i % 256}"
    return [
        v4,
        f"::ffff:{v4}",  # a dual-stack socket's v4-mapped form: the same address
        f"2001:2::{i:x}",
        f"2001:0002:0000::{i:X}",  # not canonical: the same address as the one above
        f"fe80::{i:x}%eth0",  # a scope id, stripped
    ][form % 5]


class Stream:
    """Datagrams as the network might deliver them to one run, with flush points."""

    def __init__(self, size: int, prev_sizes: list[int]) -> None:
        self.size = size
        self.key = _key("now")
        self.codec = TokenCodec(self.key, size)
        # runs before this one, oldest first; only the last RECENT_RUNS are remembered
        self.prev = [(_key(f"prev{i}"), s) for i, s in enumerate(prev_sizes)]
        self.prev_codecs = [TokenCodec(k, s) for k, s in self.prev]
        self.items: list[tuple[bytes, tuple[Any, ...]] | None] = []  # None: flush here
        self.sent: list[bytes] = []

    def recent(self) -> list[tuple[bytes, int]]:
        return self.prev[-RECENT_RUNS:] if self.prev else []

    def add(self, data: bytes, host: str, port: int) -> None:
        addr: tuple[Any, ...] = (host, port, 0, 0) if ":" in host else (host, port)
        self.items.append((data, addr))
        self.sent.append(data)

    def event(self, rng: random.Random, kind: int, host: str, port: int) -> None:
        size, codec = self.size, self.codec
        dst, src = rng.choice(DSTS), rng.choice([0, 1, 1024, 40000, 65535, rng.randrange(65536)])
        attempt = rng.choice([1, 2, 3, 8, 9, 12, 200, 255])
        if kind == 0 or kind == 1 or not self.sent:
            self.add(codec.encode(dst, src, attempt), host, port)  # genuine
        elif kind == 2:
            self.add(rng.choice(self.sent), host, port)  # a duplicate of anything seen
        elif kind == 3:
            self.add(rng.randbytes(size), host, port)  # forged
        elif kind == 4:
            self.add(codec.tag + rng.randbytes(size - 3), host, port)  # forged, right tag
        elif kind == 5:
            bad = bytearray(rng.choice(self.sent).ljust(size, b"\0")[:size])
            bad[rng.randrange(size)] ^= 1 << rng.randrange(8)  # corrupted
            self.add(bytes(bad), host, port)
        elif kind == 6:
            good = codec.encode(dst, src, attempt)
            self.add(good[: rng.randrange(size)], host, port)  # truncated (or empty)
        elif kind == 7:
            self.add(codec.encode(dst, src, attempt) + bytes(rng.randrange(1, 40)), host, port)
        elif kind == 8:
            # a replay of an earlier run: named if recent, else a forgery
            old = rng.choice(self.prev_codecs) if self.prev_codecs else codec
            self.add(old.encode(dst, src, attempt), host, port)
        elif kind == 9:
            self.add(codec.encode(dst, src, 0), host, port)  # attempt 0: never sent
        else:
            self.items.append(None)  # the agent flushes its receipts here


def random_stream(
    seed: int, n: int, addrs: int, size: int, prev_sizes: list[int], flushes: bool = True
) -> Stream:
    rng = random.Random(seed)
    s = Stream(size, prev_sizes)
    kinds = 11 if flushes else 10
    for _ in range(n):
        i = rng.randrange(addrs)
        s.event(rng, rng.randrange(kinds), raw_host(i, rng.randrange(5)), rng.randrange(65536))
    return s


# --- feeding ---------------------------------------------------------------------------


@contextmanager
def batch_addr_limit(limit: int) -> Iterator[None]:
    """Seal receipt batches after *limit* addresses (255 in earnest; fewer to test it often)."""
    with mock.patch.object(agent.core, "MAX_BATCH_ADDRS", limit):
        yield


def _one_at_a_time(run: Any, s: Stream) -> tuple[list[bytes], int, dict[str, int], list[Any]]:
    """Feed the stream to ``run`` datagram by datagram (``None`` items: take the batches)."""
    batches: list[bytes] = []
    verdicts: list[Any] = []
    for item in s.items:
        if item is None:
            batches += run.take_batches()
            continue
        data, addr = item
        verdicts.append(run.on_datagram(data, normalize_addr(addr[0]), addr[1]))
    batches += run.take_batches()
    return batches, run.accepted, dict(run.rejected), verdicts


def run_reference(s: Stream, limit: int) -> tuple[list[bytes], int, dict[str, int], list[Any]]:
    return _one_at_a_time(ReferenceRun("now", s.key, s.size, s.recent(), limit), s)


def _agent_run(s: Stream) -> AgentRun:
    previous: deque[TokenCodec] = deque(s.prev_codecs, maxlen=RECENT_RUNS)
    return AgentRun("now", s.codec, previous)


def run_single(s: Stream) -> tuple[list[bytes], int, dict[str, int], list[Any]]:
    return _one_at_a_time(_agent_run(s), s)


def run_bulk(s: Stream, chunks: random.Random) -> tuple[list[bytes], int, dict[str, int]]:
    sizes = [1, 2, 7, 64, 1000, 100_000]
    run = _agent_run(s)
    batches: list[bytes] = []
    chunk: list[tuple[bytes, Any]] = []
    want = chunks.choice(sizes)
    for item in [*s.items, None]:
        if item is not None:
            chunk.append(item)
            if len(chunk) < want:
                continue
        run.on_datagrams(chunk, normalize_addr)  # a flush point ends a chunk, as in drain()
        chunk, want = [], chunks.choice(sizes)
        if item is None:
            batches += run.take_batches()
    return batches, run.accepted, dict(run.rejected)


def check_same(s: Stream, seed: int, limit: int = 255) -> tuple[list[bytes], dict[str, int]]:
    with batch_addr_limit(limit):
        want_batches, want_accepted, want_rejected, want_verdicts = run_reference(s, limit)
        one = run_single(s)
        bulk = run_bulk(s, random.Random(seed))
    assert one == (want_batches, want_accepted, want_rejected, want_verdicts)
    assert bulk == (want_batches, want_accepted, want_rejected)
    return want_batches, want_rejected


def records(batches: list[bytes]) -> list[tuple[str, int, int, int, int]]:
    out = []
    for b in batches:
        _, addrs, recs = decode_receipts(b)
        out += [(addrs[ai], d, s, a, p) for ai, d, s, a, p in RECEIPT.iter_unpack(recs)]
    return out


# --- the tests -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_hostile_stream_same_counts_and_receipts(seed: int) -> None:
    s = random_stream(seed, 3000, addrs=40, size=16, prev_sizes=[16, 64, 16, 16, 16, 33])
    _, rejected = check_same(s, seed)
    # the stream really held every kind of rejection
    assert set(rejected) == {"duplicate", "bad_mac", "malformed", "other_run"}


@pytest.mark.parametrize("size", [17, 100])
def test_padded_datagrams(size: int) -> None:
    s = random_stream(size, 2000, addrs=10, size=size, prev_sizes=[size, 16])
    check_same(s, size)


def test_more_than_255_source_addresses() -> None:
    s = random_stream(7, 8000, addrs=700, size=16, prev_sizes=[], flushes=False)
    batches, _ = check_same(s, 7)
    named = [len(decode_receipts(b)[1]) for b in batches]
    assert len(batches) >= 3
    assert named[:-1] == [255] * (len(batches) - 1)  # sealed for want of address indexes
    # every record names the normalized address it came from
    hosts = {normalize_addr(raw_host(i, f)) for i in range(700) for f in range(5)}
    assert {addr for addr, *_ in records(batches)} <= hosts


def test_every_attempt_is_deduplicated_on_its_own() -> None:
    s = Stream(16, [])
    for attempt in [*range(1, 256), *range(255, 0, -1)]:
        s.add(s.codec.encode(5000, 1024, attempt), "198.18.0.1", 1024)
    _, rejected = check_same(s, 0)
    assert rejected == {"duplicate": 255}


def test_receipt_records_are_the_datagram_fields() -> None:
    s = Stream(16, [])
    s.add(s.codec.encode(5000, 40000, 9), "::ffff:198.18.0.7", 61000)
    s.add(s.codec.encode(65535, 0, 1), "2001:0002::1", 0)
    batches, _ = check_same(s, 0)
    assert records(batches) == [
        ("198.18.0.7", 5000, 40000, 9, 61000),
        ("2001:2::1", 65535, 0, 1, 0),
    ]


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kinds=st.lists(st.tuples(st.integers(0, 10), st.integers(0, 9), st.integers(0, 4))),
    size=st.sampled_from([16, 17, 33]),
    prev_sizes=st.lists(st.sampled_from([16, 17, 33]), max_size=RECENT_RUNS + 2),
    limit=st.sampled_from([1, 3, 255]),
)
def test_any_stream_same_counts_and_receipts(
    seed: int,
    kinds: list[tuple[int, int, int]],
    size: int,
    prev_sizes: list[int],
    limit: int,
) -> None:
    rng = random.Random(seed)
    s = Stream(size, prev_sizes)
    for kind, i, form in kinds:
        s.event(rng, kind, raw_host(i, form), rng.randrange(65536))
    check_same(s, seed, limit)


def test_no_run_counts_every_datagram_of_a_chunk() -> None:
    core = AgentCore()
    codec = TokenCodec(_key("x"))
    chunk: list[tuple[bytes, Any]] = [(codec.encode(5000, s, 1), ("198.18.0.1", s)) for s in (1, 2)]
    core.on_datagrams(chunk)
    core.on_datagrams([])
    assert core.idle_rejected == Counter({"no_run": 2})
    run = core.start_run("x", codec)
    core.on_datagrams(chunk)
    assert run.accepted == 2
    core.end_run()
    assert codec._tables == {}  # retired: an ended run's MAC tables are freed
    core.on_datagrams(chunk)
    assert dict(core.idle_rejected) == {"no_run": 4}


# --- drain over a fake socket ------------------------------------------------------------


class FakeSocket:
    """recvfrom from a list, then *error* (would block, or a queued ICMP error)."""

    def __init__(self, items: list[tuple[bytes, tuple[Any, ...]]], error: type[OSError]) -> None:
        self.items = list(items)
        self.error = error
        self.calls = 0

    def recvfrom(self, bufsize: int) -> tuple[bytes, tuple[Any, ...]]:
        self.calls += 1
        if self.items:
            return self.items.pop(0)
        raise self.error


@pytest.mark.parametrize("error", [BlockingIOError, InterruptedError, ConnectionRefusedError])
@pytest.mark.parametrize(("count", "limit"), [(0, 4096), (1, 4096), (200, 4096), (200, 130)])
def test_drain_hands_every_datagram_over_in_order(
    error: type[OSError], count: int, limit: int
) -> None:
    s = random_stream(count, count, addrs=5, size=16, prev_sizes=[16])
    items = [i for i in s.items if i is not None]
    sock = FakeSocket(items, error)
    state = AgentState()
    for codec in s.prev_codecs:
        state.core.start_run("old", codec)
    state.core.start_run("now", s.codec)
    listener = Listener(cast(Any, sock), 5000, 0)
    n = drain(state, listener, limit)
    assert n == min(len(items), limit)
    assert sock.calls == n + (n < limit)  # stops at the error, or at the limit
    ref = ReferenceRun("now", s.key, s.size, s.recent(), 255)
    for data, addr in items[:n]:
        ref.on_datagram(data, normalize_addr(addr[0]), addr[1])
    run = state.core.current
    assert run is not None
    assert (run.take_batches(), run.accepted, dict(run.rejected)) == (
        ref.take_batches(),
        ref.accepted,
        dict(ref.rejected),
    )
    assert DRAIN_CHUNK < 200  # the 200-datagram cases cross chunk boundaries


def test_a_listener_pauses_only_while_datagrams_trickle_in_and_its_buffer_takes_a_burst() -> None:
    """``coalesce_wait``: after a pass that emptied the socket with less than a chunk, soon
    after the previous pass, a pause of COALESCE, where the receive buffer holds four
    pauses' worth of datagrams at BURST_RATE; never after a full chunk (more is waiting),
    an empty pass or a gap, and never with an unprivileged agent's default buffer."""
    from agent.listen import COALESCE, coalesce_wait

    root, default = 16 * 1024 * 1024, 212_992  # SO_RCVBUFFORCE's 16 MiB; Linux's default
    assert coalesce_wait(20, 0.0005, root, 16) == COALESCE
    assert coalesce_wait(20, 0.0005, default, 16) == 0.0  # a burst would overflow it
    assert coalesce_wait(20, 0.0005, root, 4000) == 0.0  # big datagrams: 4,000 do not fit
    assert coalesce_wait(DRAIN_CHUNK, 0.0005, root, 16) == 0.0  # a full chunk: read on
    assert coalesce_wait(0, 0.0005, root, 16) == 0.0
    # The first pass after a gap (between a probe's 4 ms batches, or a silence)
    assert coalesce_wait(3, 0.004, root, 16) == 0.0
    assert coalesce_wait(1, float("inf"), root, 16) == 0.0  # the first pass of all


@pytest.mark.parametrize(
    ("bound", "host", "listen", "source"),
    [
        ("::", "127.0.0.1", None, None),  # dual-stack: any source
        ("0.0.0.0", "127.0.0.1", None, None),
        ("0.0.0.0", "coordinator.example", None, "0.0.0.0"),  # by name: over IPv4 only
        ("127.0.0.3", "127.0.0.1", "127.0.0.3", "127.0.0.3"),
        ("::ffff:127.0.0.3", "127.0.0.1", "::ffff:127.0.0.3", "127.0.0.3"),  # IPv4 arrives
        ("127.0.0.3", "127.0.0.1", "localhost3", "127.0.0.3"),  # a name: what it bound to
        ("fe80::1", "fe80::2%eth0", "fe80::1%eth0", "fe80::1%eth0"),  # its scope kept
    ],
)
def test_the_callback_source_is_where_the_agent_listens(
    bound: str, host: str, listen: str | None, source: str | None
) -> None:
    assert callback_source(bound, host, listen) == source


@pytest.mark.parametrize(
    ("bound", "host"), [("::1", "127.0.0.1"), ("127.0.0.3", "::1"), ("0.0.0.0", "::1")]
)
def test_a_listening_address_that_cannot_register_is_refused(bound: str, host: str) -> None:
    with pytest.raises(ConfigError, match="coordinator"):
        callback_source(bound, host)


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999999])
def test_the_reconnect_wait_is_jittered_and_never_past_its_ceiling(draw: float) -> None:
    """The README promises "up to 10 s apart": the jitter (half either way) came on top of
    the doubled backoff's 10 s cap, and an agent waited 14 s."""
    backoff, waits = 0.25, []
    for _ in range(12):
        waits.append(reconnect_delay(backoff, 10.0, draw))
        backoff = min(10.0, backoff * 2)
    assert max(waits) <= 10.0
    assert waits[0] == pytest.approx(0.25 * (0.5 + draw))
    assert waits[-1] == pytest.approx(min(10.0, 10.0 * (0.5 + draw)))
