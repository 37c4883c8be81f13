"""The datagram token: genuine datagrams verify, nothing else ever credits a cell."""

from __future__ import annotations

import hashlib
import hmac
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prockit import python_output

from udpreach.core.datagram import (
    MAX_SIZE,
    MAX_TABLES,
    MIN_SIZE,
    Cell,
    Reject,
    TokenCodec,
    derive_run_key,
    run_tag,
)

SECRET = b"0123456789abcdef0123456789abcdef"
KEY = derive_run_key(SECRET, "run-1", b"c" * 16, b"a" * 16)
OTHER_KEY = derive_run_key(SECRET, "run-2", b"c" * 16, b"a" * 16)
SIZES = [MIN_SIZE, 17, 64, 512, 1472, 9000, MAX_SIZE]


def test_default_size_is_a_16_byte_blob() -> None:
    assert len(TokenCodec(KEY).encode(5000, 40000, 1)) == 16


@pytest.mark.parametrize("size", SIZES)
def test_round_trip(size: int) -> None:
    codec = TokenCodec(KEY, size)
    for dst, src, attempt in [(5000, 40000, 1), (1, 65535, 255), (65535, 1, 7), (0, 0, 1)]:
        data = codec.encode(dst, src, attempt)
        assert len(data) == size
        assert data[:3] == run_tag(KEY)
        assert codec.verify(data) == Cell(dst, src, attempt)
        assert codec.owns(data)


@pytest.mark.parametrize("size", [MIN_SIZE - 1, 0, MAX_SIZE + 1])
def test_size_out_of_range(size: int) -> None:
    with pytest.raises(ValueError, match="size"):
        TokenCodec(KEY, size)


def test_a_fresh_nonce_changes_the_key() -> None:
    a = derive_run_key(SECRET, "run-1", b"c" * 16, b"a" * 16)
    assert a != derive_run_key(SECRET, "run-1", b"c" * 16, b"b" * 16)
    assert a != derive_run_key(SECRET, "run-1", b"d" * 16, b"a" * 16)
    assert a != derive_run_key(SECRET, "run-X", b"c" * 16, b"a" * 16)
    assert a != derive_run_key(b"another secret", "run-1", b"c" * 16, b"a" * 16)


@pytest.mark.parametrize("size", SIZES)
def test_every_single_bit_flip_is_rejected(size: int) -> None:
    codec = TokenCodec(KEY, size)
    good = codec.encode(5000, 40000, 3)
    # every bit of the header and MAC, and a spread of padding positions
    positions = list(range(min(size, 64))) + list(range(64, size, max(1, size // 97)))
    if size > 64:
        positions.append(size - 1)
    for pos in positions:
        for bit in range(8):
            bad = bytearray(good)
            bad[pos] ^= 1 << bit
            got = codec.verify(bytes(bad))
            assert got is Reject.BAD_MAC, (pos, bit)
            assert not codec.owns(bytes(bad))


@pytest.mark.parametrize("size", [MIN_SIZE, 100, MAX_SIZE])
def test_truncated_oversize_and_empty_are_malformed(size: int) -> None:
    codec = TokenCodec(KEY, size)
    good = codec.encode(5000, 40000, 1)
    for data in (b"", good[:1], good[:-1], good + b"\0", good + good, bytes(MAX_SIZE + 100)):
        if len(data) == size:
            continue
        assert codec.verify(data) is Reject.MALFORMED
        assert not codec.owns(data)


def test_random_forgeries_never_verify() -> None:
    rng = random.Random(1)
    for size in (MIN_SIZE, 200):
        codec = TokenCodec(KEY, size)
        for _ in range(2000):
            data = rng.randbytes(size)
            assert codec.verify(data) is Reject.BAD_MAC
        # even with the right run tag in front
        for _ in range(2000):
            data = codec.tag + rng.randbytes(size - 3)
            assert codec.verify(data) is Reject.BAD_MAC


def test_another_runs_datagram_is_not_a_cell() -> None:
    mine, theirs = TokenCodec(KEY), TokenCodec(OTHER_KEY)
    data = theirs.encode(5000, 40000, 1)
    assert mine.verify(data) is Reject.BAD_MAC
    assert not mine.owns(data)
    assert theirs.owns(data)


def test_another_runs_datagram_of_another_size_is_not_a_cell() -> None:
    mine, theirs = TokenCodec(KEY, 16), TokenCodec(OTHER_KEY, 100)
    assert mine.verify(theirs.encode(5000, 40000, 1)) is Reject.MALFORMED


def test_padding_is_zero_and_covered() -> None:
    codec = TokenCodec(KEY, 64)
    data = codec.encode(5000, 40000, 1)
    assert data[16:] == bytes(48)
    assert codec.verify(data[:16] + b"\x01" + data[17:]) is Reject.BAD_MAC


def test_attempt_zero_is_rejected() -> None:
    codec = TokenCodec(KEY)
    data = codec.encode(5000, 40000, 0)
    assert codec.verify(data) is Reject.BAD_MAC
    assert not codec.owns(data)


def test_verify_has_no_state_so_duplicates_verify() -> None:
    codec = TokenCodec(KEY)
    data = codec.encode(5000, 40000, 1)
    assert codec.verify(data) == codec.verify(data) == Cell(5000, 40000, 1)


@settings(max_examples=200)
@given(
    dst=st.integers(0, 65535),
    src=st.integers(0, 65535),
    attempt=st.integers(1, 255),
    size=st.sampled_from([16, 17, 40]),
    data=st.data(),
)
def test_no_mutation_verifies_unless_identical(
    dst: int, src: int, attempt: int, size: int, data: st.DataObject
) -> None:
    codec = TokenCodec(KEY, size)
    good = codec.encode(dst, src, attempt)
    mutated = data.draw(
        st.one_of(
            st.binary(min_size=0, max_size=size + 8),
            st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), max_size=6).map(
                lambda edits: _apply(good, edits)
            ),
            st.integers(0, size).map(lambda n: good[:n]),
        )
    )
    got = codec.verify(mutated)
    if mutated == good:
        assert got == Cell(dst, src, attempt)
    else:
        assert isinstance(got, Reject)
        assert got is not Reject.DUPLICATE


def _apply(good: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(good)
    for pos, value in edits:
        out[pos] = value
    return bytes(out)


# --- the bulk paths: encode_many and check_many ----------------------------------------


# The datagram's authentication written from its layout alone (see ``udpreach.core.datagram``): the
# reference the codec's fast paths, and the agent's batch path (test_agent_fast), are held to.


def reference_mac(run_key: bytes, dst: int, src: int, attempt: int) -> bytes:
    """64 bits of SHAKE128(domain || key || dst || attempt || src >> 4) at 8 * (src & 15)."""
    stream = hashlib.shake_128(
        b"udpreach/v2 datagram mac\0"
        + run_key
        + dst.to_bytes(2, "big")
        + bytes([attempt])
        + (src >> 4).to_bytes(2, "big")
    ).digest(128)
    return stream[8 * (src & 15) : 8 * (src & 15) + 8]


def reference_verify(run_key: bytes, size: int, data: bytes) -> Cell | Reject:
    """What a received datagram is, one datagram at a time."""
    if len(data) != size:
        return Reject.MALFORMED
    tag = hashlib.blake2b(b"udpreach/v1 tag", key=run_key, digest_size=3).digest()
    dst, src, attempt = int.from_bytes(data[3:5], "big"), int.from_bytes(data[5:7], "big"), data[7]
    if data[:3] != tag or data[16:] != bytes(size - 16) or attempt == 0:
        return Reject.BAD_MAC
    if not hmac.compare_digest(reference_mac(run_key, dst, src, attempt), data[8:16]):
        return Reject.BAD_MAC
    return Cell(dst, src, attempt)


def test_the_wire_format_is_pinned() -> None:
    """Known answers: a datagram's bytes only change with the protocol version (an agent
    and a probe of one version must agree byte for byte)."""
    want = {
        (16, 5000, 40000, 1): "b0181913889c4001d4a1171d29332aec",
        (20, 65535, 15, 255): "b01819ffff000fffc02a4e0901ea0f2000000000",
    }
    for (size, dst, src, attempt), hexed in want.items():
        data = bytes.fromhex(hexed)
        assert TokenCodec(KEY, size).encode(dst, src, attempt) == data
        assert reference_verify(KEY, size, data) == Cell(dst, src, attempt)


@settings(max_examples=300)
@given(
    key=st.binary(min_size=32, max_size=32),
    size=st.sampled_from([16, 17, 40, 200]),
    dst=st.integers(0, 65535),
    srcs=st.lists(st.integers(0, 65535), max_size=40)
    | st.lists(st.sampled_from([0, 1, 255, 256, 65534, 65535]), max_size=10),
    attempt=st.integers(1, 255),
)
def test_encode_many_is_encode_for_each(
    key: bytes, size: int, dst: int, srcs: list[int], attempt: int
) -> None:
    codec = TokenCodec(key, size)
    got = codec.encode_many(dst, srcs, attempt)
    assert got == [codec.encode(dst, s, attempt) for s in srcs]
    block = codec.encode_block(dst, srcs, attempt)  # the probe's form: the same bytes
    assert (block.size, block.data) == (size, b"".join(got))
    assert codec.mac_block(dst, srcs, attempt) == b"".join(d[8:16] for d in got)
    for s, data in zip(srcs, got, strict=True):
        assert reference_verify(key, size, data) == Cell(dst, s, attempt)


def test_encode_many_takes_any_sequence() -> None:
    codec = TokenCodec(KEY, 33)
    want = [codec.encode(5000, s, 9) for s in range(1020, 1030)]
    assert codec.encode_many(5000, range(1020, 1030), 9) == want
    assert codec.encode_many(5000, tuple(range(1020, 1030)), 9) == want
    assert codec.encode_many(5000, [], 9) == []
    assert list(codec.encode_block(5000, range(1020, 1030), 9)) == want
    assert len(codec.encode_block(5000, [], 9)) == 0


@pytest.mark.parametrize(
    ("dst", "srcs", "attempt", "match"),
    [
        (5000, [1024], 0, "attempt"),
        (5000, [1024], 256, "attempt"),
        (5000, [1024], -1, "attempt"),
        (-1, [1024], 1, "destination port"),
        (65536, [1024], 1, "destination port"),
        (5000, [1024, -1, 1025], 1, "source port must be 0-65535, got -1"),
        (5000, [1024, 65536], 1, "source port must be 0-65535, got 65536"),
    ],
)
def test_encode_many_refuses_what_cannot_be_encoded(
    dst: int, srcs: list[int], attempt: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        TokenCodec(KEY).encode_many(dst, srcs, attempt)
    with pytest.raises(ValueError, match=match):
        TokenCodec(KEY).encode_block(dst, srcs, attempt)
    with pytest.raises(ValueError, match=match):
        TokenCodec(KEY).mac_block(dst, srcs, attempt)


def test_encode_refuses_out_of_range_as_before() -> None:
    codec = TokenCodec(KEY)
    for args in [(65536, 1, 1), (1, -1, 1), (1, 1, 256)]:
        with pytest.raises(struct.error):
            codec.encode(*args)


@settings(max_examples=200)
@given(
    size=st.sampled_from([16, 17, 40]),
    cells=st.lists(
        st.tuples(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 255)),
        max_size=12,
    ),
    noise=st.lists(st.binary(max_size=48), max_size=12),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)), max_size=12),
    seed=st.integers(0, 2**16),
)
def test_check_many_and_verify_agree_with_the_reference(
    size: int,
    cells: list[tuple[int, int, int]],
    noise: list[bytes],
    flips: list[tuple[int, int]],
    seed: int,
) -> None:
    codec, other = TokenCodec(KEY, size), TokenCodec(OTHER_KEY, size)
    genuine = [codec.encode(*c) for c in cells]  # attempt 0 included: a bad MAC
    flipped = []
    for i, (pos, bit) in enumerate(flips):
        if genuine:
            bad = bytearray(genuine[i % len(genuine)])
            bad[pos % size] ^= 1 << bit
            flipped.append(bytes(bad))
    datagrams = genuine + noise + flipped + [other.encode(*c) for c in cells if c[2]]
    datagrams += [d[:-1] for d in genuine] + [d + b"\0" for d in genuine]
    random.Random(seed).shuffle(datagrams)
    want = [reference_verify(KEY, size, d) for d in datagrams]
    assert [codec.verify(d) for d in datagrams] == want
    assert codec.check_many(datagrams) == [None if isinstance(w, Cell) else w for w in want]
    assert [codec.check(d) for d in datagrams] == codec.check_many(iter(datagrams))
    assert [codec.owns(d) for d in datagrams] == [isinstance(w, Cell) for w in want]


def test_the_mac_tables_stay_bounded_and_right_after_eviction() -> None:
    """Datagrams naming many (dst port, attempt) pairs (a hostile sender can name any)
    keep at most MAX_TABLES tables; a pair whose table went is made again, the same."""
    codec, fresh = TokenCodec(KEY), TokenCodec(KEY)
    pairs = [(dst, attempt) for dst in range(0, 65536, 997) for attempt in (1, 2, 255)]
    assert len(pairs) > 2 * MAX_TABLES
    datagrams = [fresh.encode(dst, dst ^ 0x5A5A, attempt) for dst, attempt in pairs]
    assert codec.check_many(datagrams + datagrams) == [None] * (2 * len(datagrams))
    assert len(codec._tables) <= MAX_TABLES
    assert [codec.encode(dst, dst ^ 0x5A5A, a) for dst, a in pairs] == datagrams
    assert codec.encode_block(0, [0x5A5A, 15, 16], 1).data == b"".join(
        fresh.encode(0, s, 1) for s in (0x5A5A, 15, 16)
    )


def test_datagrams_without_the_run_tag_cost_no_hashing() -> None:
    """The run tag, the attempt and the padding are checked before any MAC is made: noise
    and other runs' datagrams make no MAC table at all."""
    codec, other = TokenCodec(KEY, 40), TokenCodec(OTHER_KEY, 40)
    genuine = TokenCodec(KEY, 40).encode(5000, 40000, 1)
    junk = [
        other.encode(5000, 40000, 1),  # another run: another tag
        genuine[:7] + b"\0" + genuine[8:],  # attempt 0
        genuine[:-1] + b"\1",  # padding that is not zero
        bytes(40),
    ]
    assert codec.check_many(junk) == [Reject.BAD_MAC] * len(junk)
    assert codec._tables == {}
    assert codec.check(genuine) is None
    assert len(codec._tables) == 1


def test_a_retired_codec_frees_its_tables_and_keeps_none() -> None:
    """When a run ends the agent keeps its codec only to name replays: its MAC tables go,
    and replays of it make none (each costs one chunk, nothing to churn)."""
    codec, fresh = TokenCodec(KEY), TokenCodec(KEY)
    replays = [fresh.encode(dst, 1234, 1) for dst in range(5000, 5010)]
    assert all(codec.owns(d) for d in replays)
    assert len(codec._tables) == 10
    codec.retire()
    assert codec._tables == {}
    assert all(codec.owns(d) for d in replays)
    assert codec.encode_many(5000, [1234], 1) == replays[:1]
    assert codec.encode_block(5000, [1234], 1).data == replays[0]
    assert codec._tables == {}


def test_forgeries_with_a_genuine_tag_make_no_table() -> None:
    """A sender who copies the run tag off the wire and names any cell it likes costs the
    agent one chunk per datagram, and never a table: only genuine datagrams are kept."""
    codec, fresh = TokenCodec(KEY), TokenCodec(KEY)
    rng = random.Random(5)
    genuine = fresh.encode(5000, 1, 1)
    forged = [
        genuine[:3]
        + struct.pack(">HHB", rng.randrange(65536), rng.randrange(65536), a)
        + rng.randbytes(8)
        for a in range(1, 256)
    ]
    assert codec.check_many(forged) == [Reject.BAD_MAC] * len(forged)
    assert codec._tables == {}
    assert codec.check_many([genuine, genuine]) == [None, None]
    assert list(codec._tables) == [5000 << 8 | 1]


def test_mac_tables_cost_memory_only_where_used() -> None:
    """Many tables with one MAC each (a run to many destination ports from one source
    port) take a page each, not the 512 KiB a full table holds."""
    code = (
        "from udpreach.core.datagram import TokenCodec\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "codec = TokenCodec(bytes(32), max_tables=2000)\n"
        "codec.encode(0, 40000, 1)\n"
        "before = rss()\n"
        "for d in range(1, 1001):\n"
        "    codec.encode(d, 40000, 1)\n"
        "print(len(codec._tables), rss() - before)\n"
    )
    tables, grown = map(int, python_output(code).split())
    assert tables == 1001
    assert grown < 64 * 2**20  # a page and a bitmap each: ~10 MB; zeroed tables: ~520 MB
