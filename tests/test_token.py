"""The datagram token: genuine datagrams verify, nothing else ever credits a cell."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpreach.token import (
    MAX_SIZE,
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
