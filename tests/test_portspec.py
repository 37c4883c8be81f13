"""Port SPECs as users type them: lists, ranges, random:N, 0, and the one-line errors."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpreach.core.errors import ConfigError, PortSpecError
from udpreach.core.portspec import (
    HIGH_FIRST,
    HIGH_PORTS,
    PORT_LAST,
    format_ports,
    parse_ports,
    ranges_of,
)


def test_single_port() -> None:
    assert parse_ports("5000") == (5000,)


def test_list_and_range() -> None:
    assert parse_ports("5000,5001,6000-6002") == (5000, 5001, 6000, 6001, 6002)


def test_overlapping_items_are_merged_and_sorted() -> None:
    assert parse_ports(" 6001 , 5000-5002,5001,6000-6001 ") == (5000, 5001, 5002, 6000, 6001)


def test_every_high_port() -> None:
    ports = parse_ports("1024-65535")
    assert len(ports) == HIGH_PORTS == 64512
    assert ports[0] == HIGH_FIRST == 1024
    assert ports[-1] == PORT_LAST == 65535
    assert ports == tuple(range(1024, 65536))


def test_extreme_ports() -> None:
    assert parse_ports("1,65535") == (1, 65535)


def test_random_n_is_distinct_sorted_high_and_reproducible() -> None:
    got = parse_ports("random:500", allow_random=True, rng=random.Random(7))
    assert len(got) == len(set(got)) == 500
    assert list(got) == sorted(got)
    assert all(1024 <= p <= 65535 for p in got)
    assert got == parse_ports("random:500", allow_random=True, rng=random.Random(7))
    assert got != parse_ports("random:500", allow_random=True, rng=random.Random(8))


def test_random_every_high_port() -> None:
    got = parse_ports("random:64512", allow_random=True, rng=random.Random(1))
    assert got == tuple(range(1024, 65536))


def test_random_without_rng_still_valid() -> None:
    got = parse_ports("random:10", allow_random=True)
    assert len(set(got)) == 10
    assert all(1024 <= p <= 65535 for p in got)


@pytest.mark.parametrize("spec", ["random:0", "random:64513", "random:999999"])
def test_random_n_out_of_range(spec: str) -> None:
    with pytest.raises(PortSpecError, match="random:N"):
        parse_ports(spec, allow_random=True, rng=random.Random(0))


def test_random_refused_where_not_allowed() -> None:
    with pytest.raises(PortSpecError, match="random"):
        parse_ports("random:5")


@pytest.mark.parametrize("spec", ["random:5,6000", "6000,random:5", "random:5-10"])
def test_random_mixed_with_others(spec: str) -> None:
    with pytest.raises(PortSpecError):
        parse_ports(spec, allow_random=True, rng=random.Random(0))


def test_zero_only_with_allow_zero() -> None:
    assert parse_ports("0", allow_zero=True) == (0,)
    with pytest.raises(PortSpecError, match="0"):
        parse_ports("0")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("65536", "65536"),
        ("99999", "99999"),
        ("1000-70000", "70000"),
        ("0-10", "0"),
        ("6002-6000", "6002-6000"),
        ("", "empty"),
        ("   ", "empty"),
        ("5000,,5001", "empty"),
        ("5000,", "empty"),
        ("abc", "abc"),
        ("5000-", "5000-"),
        ("-5000", "-5000"),
        ("5000-6000-7000", "5000-6000-7000"),
        ("50 00", "50 00"),
        ("5000:6000", "5000:6000"),
        ("+5000", "+5000"),
        ("123456", "123456"),
    ],
)
def test_bad_specs_raise_one_line_config_errors(spec: str, needle: str) -> None:
    with pytest.raises(PortSpecError) as info:
        parse_ports(spec, allow_zero=False, allow_random=True, rng=random.Random(0))
    err = info.value
    assert isinstance(err, ConfigError)
    assert err.exit_code == 2
    message = str(err)
    assert "\n" not in message
    assert needle in message


def test_zero_range_refused_even_with_allow_zero() -> None:
    with pytest.raises(PortSpecError):
        parse_ports("0-5", allow_zero=True)


def test_format_ports_compresses() -> None:
    assert format_ports([5000, 6002, 6000, 6001, 5001, 7000]) == "5000-5001,6000-6002,7000"
    assert format_ports(range(1024, 65536)) == "1024-65535"
    assert format_ports([]) == ""


def test_ranges_of_merges_duplicates_and_runs() -> None:
    assert ranges_of([3, 1, 2, 2, 7, 9, 8]) == [(1, 3), (7, 9)]


port_sets = st.sets(st.integers(1, 65535), min_size=1, max_size=300)


@settings(max_examples=200)
@given(port_sets)
def test_format_parse_round_trip(ports: set[int]) -> None:
    spec = format_ports(ports)
    assert parse_ports(spec) == tuple(sorted(ports))


@settings(max_examples=200)
@given(port_sets)
def test_ranges_are_maximal_and_cover_exactly(ports: set[int]) -> None:
    runs = ranges_of(ports)
    covered = [p for a, b in runs for p in range(a, b + 1)]
    assert covered == sorted(ports)
    for (_, last), (first, _) in itertools.pairwise(runs):
        assert first > last + 1  # a gap between neighbours, else they would be one run
