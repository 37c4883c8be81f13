"""Run requests validated into plans, and the run's life cycle as a table."""

from __future__ import annotations

import random
from typing import Any

import pytest

from udpreach.core.errors import ConfigError, PortSpecError
from udpreach.core.plan import (
    AUTO_COPIES_CEILING,
    DEFAULT_RATE,
    MAX_CELLS,
    Plan,
    default_icmp_budget,
    plan_from_request,
)
from udpreach.core.portspec import format_ports, parse_ports

AGENT_PORTS = (5000, 5001, 6000)
LIMITS = {"max_rate": 200_000, "max_datagrams": 50_000_000}


def plan_of(
    req: dict[str, Any], agent_ports: tuple[int, ...] = AGENT_PORTS, **limits: int
) -> tuple[Plan, list[str]]:
    return plan_from_request(req, agent_ports, **{**LIMITS, **limits})


def test_defaults_are_every_high_port_to_every_agent_port() -> None:
    plan, warnings = plan_of({})
    assert warnings == []
    assert plan.src_ports == tuple(range(1024, 65536))
    assert plan.dst_ports == AGENT_PORTS
    assert plan.cells == 64512 * 3
    assert plan.auto_copies
    assert plan.copies == AUTO_COPIES_CEILING
    assert plan.rate == DEFAULT_RATE
    assert plan.size == 16
    assert plan.to_json() == {
        "src_ports": "1024-65535",
        "dst_ports": [5000, 5001, 6000],
        "copies": AUTO_COPIES_CEILING,
        "rate": DEFAULT_RATE,
        "size": 16,
        "copies_mode": "auto",
        "icmp_budget": 40.0,  # three destination ports (default_icmp_budget)
        "max_delay": 1.0,
    }


@pytest.mark.parametrize(
    ("req", "message"),
    [
        ({"icmp_budget": -1}, "--icmp-budget"),
        ({"icmp_budget": float("nan")}, "--icmp-budget"),
        ({"icmp_budget": 601}, "--icmp-budget"),
        ({"max_delay": 0}, "--max-delay"),
        ({"max_delay": float("inf")}, "--max-delay"),
    ],
)
def test_icmp_budget_and_max_delay_are_judged(req: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_of(req)


@pytest.mark.parametrize(
    ("dst_ports", "budget"), [("5000", 20.0), ("5000,5001", 30.0), ("5000,5001,6000", 40.0)]
)
def test_the_default_icmp_budget_grows_with_the_destination_ports(
    dst_ports: str, budget: float
) -> None:
    """Each destination port's silent runs need tests of their own (a token each at Linux's
    one a second): 20 s for one port, 10 s more for each further one, at most 60 s."""
    plan, _ = plan_of({"dst_ports": dst_ports})
    assert plan.icmp_budget == budget
    assert default_icmp_budget(64) == 60.0
    given, _ = plan_of({"dst_ports": dst_ports, "icmp_budget": 5})
    assert given.icmp_budget == 5.0


def test_explicit_request_is_copied() -> None:
    plan, warnings = plan_of(
        {
            "src_ports": "1024-2047,40000",
            "dst_ports": "5001",
            "copies": 3,
            "rate": 5000,
            "size": 200,
        }
    )
    assert warnings == []
    assert plan.src_ports == (*range(1024, 2048), 40000)
    assert plan.dst_ports == (5001,)
    assert (plan.copies, plan.auto_copies, plan.rate, plan.size) == (3, False, 5000, 200)
    assert plan.to_json()["src_ports"] == "1024-2047,40000"
    assert plan.to_json()["copies_mode"] == "fixed"


def test_random_source_ports() -> None:
    plan, _ = plan_of({"src_ports": "random:100"})
    assert len(plan.src_ports) == 100
    assert all(1024 <= p <= 65535 for p in plan.src_ports)


def test_the_clis_random_choice_survives_the_trip() -> None:
    """The CLI draws random:N and sends the ports as a spec; the plan keeps exactly them."""
    chosen = parse_ports("random:300", allow_random=True, rng=random.Random(3))
    plan, _ = plan_of({"src_ports": format_ports(chosen)})
    assert plan.src_ports == chosen


def test_destination_not_among_the_agents_ports() -> None:
    with pytest.raises(ConfigError, match="7000") as info:
        plan_of({"dst_ports": "5000,7000"})
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


def test_agent_without_ports() -> None:
    with pytest.raises(ConfigError):
        plan_of({}, agent_ports=())


@pytest.mark.parametrize("copies", [0, -1, 256, "many"])
def test_copies_bounds(copies: object) -> None:
    with pytest.raises(ConfigError, match="copies"):
        plan_of({"copies": copies})


@pytest.mark.parametrize("copies", [1, 255])
def test_copies_limits_inclusive(copies: int) -> None:
    plan, _ = plan_of({"copies": copies, "src_ports": "1024-1100"})
    assert plan.copies == copies
    assert not plan.auto_copies


@pytest.mark.parametrize("size", [15, 65508, 1, -16])
def test_size_bounds(size: int) -> None:
    with pytest.raises(ConfigError, match="size"):
        plan_of({"size": size})


@pytest.mark.parametrize("field", ["rate", "size", "confidence"])
def test_zero_is_refused_not_replaced_by_the_default(field: str) -> None:
    """A request that says 0 gets an error, not a silent 100,000/s or 16 bytes."""
    with pytest.raises(ConfigError, match=field):
        plan_of({field: 0})


@pytest.mark.parametrize("size", [16, 65507])
def test_size_limits_inclusive(size: int) -> None:
    plan, _ = plan_of({"size": size})
    assert plan.size == size


@pytest.mark.parametrize("rate", [-1, -100_000])
def test_rate_must_be_positive(rate: int) -> None:
    with pytest.raises(ConfigError, match="rate"):
        plan_of({"rate": rate})


def test_rate_above_the_probes_ceiling_is_clamped_with_a_warning() -> None:
    plan, warnings = plan_of({"rate": 1_000_000}, max_rate=200_000)
    assert plan.rate == 200_000
    (w,) = warnings
    assert "1000000" in w
    assert "200000" in w


def test_rate_at_the_ceiling_is_not_a_warning() -> None:
    plan, warnings = plan_of({"rate": 200_000}, max_rate=200_000)
    assert (plan.rate, warnings) == (200_000, [])


def test_too_many_cells() -> None:
    agent_ports = tuple(range(5000, 5065))  # 65 destination ports x 64,512 sources
    with pytest.raises(ConfigError, match=str(MAX_CELLS)):
        plan_of({}, agent_ports=agent_ports)
    plan, _ = plan_of({"dst_ports": "5000-5063"}, agent_ports=agent_ports)
    assert plan.cells == MAX_CELLS


def test_too_many_datagrams_with_fixed_copies() -> None:
    with pytest.raises(ConfigError, match="datagrams"):
        plan_of({"copies": 10}, max_datagrams=64512 * 3 * 9)
    plan, _ = plan_of({"copies": 9}, max_datagrams=64512 * 3 * 9)
    assert plan.copies == 9


@pytest.mark.parametrize(
    "req",
    [
        {"src_ports": "1024-"},
        {"src_ports": "0"},
        {"src_ports": "70000"},
        {"dst_ports": "5000,random:2"},
        {"rate": "fast"},
        {"size": "big"},
        {"rate": [1]},
        {"confidence": "sure"},
        {"confidence": 1.5},
        {"confidence": -0.1},
    ],
)
def test_malformed_requests(req: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        plan_of(req)


def test_bad_spec_names_the_item() -> None:
    with pytest.raises(PortSpecError, match="6002-6000"):
        plan_of({"src_ports": "6002-6000"})
