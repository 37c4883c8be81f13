"""``probe.admission``: who may hold a control connection, decided without sockets."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from probe.admission import Admission, Limits, Outcome, network_of


def test_networks_are_slash_24_and_slash_64() -> None:
    lim = Limits()
    assert network_of("198.18.1.77", lim) == "198.18.1.0/24"
    assert network_of("2001:2:0:1::5", lim) == "2001:2:0:1::/64"
    assert network_of("not-an-address", lim) == "not-an-address"
    assert network_of("198.18.1.77", Limits(v4_prefix=32)) == "198.18.1.77/32"


def test_a_full_network_gives_up_its_oldest_startup() -> None:
    adm = Admission(Limits(startups=10, startups_per_network=3))
    for conn in range(3):
        assert adm.open(conn, "198.18.1.5", float(conn)).evict == []
    decision = adm.open(3, "198.18.1.200", 3.0)  # same /24
    assert decision.accepted
    assert decision.evict == [0]
    assert adm.startups == 3
    # Another network is not touched.
    assert adm.open(4, "198.18.2.5", 4.0).evict == []


def test_a_full_budget_takes_from_the_network_holding_the_most() -> None:
    adm = Admission(Limits(startups=4, startups_per_network=4))
    adm.open(1, "198.18.9.1", 0.0)
    for conn in (2, 3, 4):
        adm.open(conn, "198.18.1.1", float(conn))
    assert adm.open(5, "198.18.7.1", 5.0).evict == [2]


def test_authenticated_connections_leave_the_startups_for_their_pool() -> None:
    adm = Admission(Limits(startups=2, startups_per_network=2, agents=1, requesters=1))
    adm.open(1, "198.18.1.1", 0.0)
    adm.open(2, "198.18.1.1", 0.0)
    assert adm.authenticated(1, "agent", 0.1) is None
    assert adm.startups == 1
    assert adm.sessions == {"agent": 1, "requester": 0}
    adm.open(3, "198.18.1.1", 0.2)
    assert (
        adm.authenticated(3, "agent", 0.3) == "connection limit reached: 1 agent sessions at once"
    )
    assert adm.authenticated(2, "requester", 0.3) is None
    adm.closed(3, Outcome.OK, 0.4)
    adm.closed(1, Outcome.OK, 0.4)
    adm.closed(2, Outcome.OK, 0.4)
    assert adm.sessions == {"agent": 0, "requester": 0}
    assert adm.startups == 0


def test_failing_addresses_are_refused_for_a_time_that_grows() -> None:
    adm = Admission(Limits(penalty_points=3, penalty_min=10, penalty_max=40, leak_per_second=0))
    conn = 0

    def fail(t: float) -> None:
        nonlocal conn
        conn += 1
        assert adm.open(conn, "198.18.3.3", t).accepted
        adm.closed(conn, Outcome.AUTH_FAILED, t)

    for _ in range(3):
        fail(0.0)
    refused = adm.open(99, "198.18.3.3", 1.0)
    assert not refused.accepted
    assert "too many failed handshakes from 198.18.3.3; try again in 9s" in refused.reason
    assert adm.open(100, "198.18.3.4", 1.0).accepted  # only that address
    for _ in range(3):
        fail(11.0)
    assert not adm.open(101, "198.18.3.3", 30.0).accepted  # 20 s this time
    assert adm.open(102, "198.18.3.3", 31.5).accepted


def test_evictions_and_successes_cost_nothing_and_points_leak_away() -> None:
    adm = Admission(Limits(penalty_points=2, leak_per_second=1.0))
    for conn in range(10):
        adm.open(conn, "198.18.4.4", float(conn))
        adm.closed(conn, Outcome.EVICTED, float(conn))
    assert adm.open(50, "198.18.4.4", 10.0).accepted
    adm.closed(50, Outcome.TIMEOUT, 10.0)
    adm.open(51, "198.18.4.4", 12.0)
    adm.closed(51, Outcome.TIMEOUT, 12.0)  # the first point has leaked away
    assert adm.open(52, "198.18.4.4", 12.5).accepted


def test_an_address_that_authenticated_is_exempt() -> None:
    adm = Admission(Limits(penalty_points=1, exempt_for=100))
    adm.open(1, "198.18.5.5", 0.0)
    adm.authenticated(1, "requester", 0.0)
    for conn in range(2, 20):
        adm.open(conn, "198.18.5.5", 1.0)
        adm.closed(conn, Outcome.PROTOCOL, 1.0)
    assert adm.open(30, "198.18.5.5", 2.0).accepted
    # Past the exemption, failures count again.
    adm.open(31, "198.18.5.5", 200.0)
    adm.closed(31, Outcome.PROTOCOL, 200.0)
    assert not adm.open(32, "198.18.5.5", 200.5).accepted


def test_tables_stay_bounded() -> None:
    adm = Admission(Limits(max_tracked=50, penalty_points=math.inf))
    for conn in range(1000):
        adm.open(conn, f"10.{conn // 256}.{conn % 256}.1", 0.0)
        adm.closed(conn, Outcome.AUTH_FAILED, 0.0)
    assert len(adm._penalties) <= 50


ops = st.lists(
    st.tuples(
        st.sampled_from(["open", "auth_agent", "auth_req", "close"]),
        st.integers(0, 30),
        st.sampled_from(["198.18.1.1", "198.18.1.2", "198.18.2.1", "2001:2::1", "2001:2:0:9::1"]),
        st.sampled_from(list(Outcome)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_fuzz_budgets_always_hold(steps: list[tuple[str, int, str, Outcome]]) -> None:
    lim = Limits(startups=6, startups_per_network=3, agents=4, requesters=2)
    adm = Admission(lim)
    live: dict[int, str] = {}  # conn -> "startup" | "session" | "gone"
    next_id = 1000
    for t, (op, pick, address, outcome) in enumerate(steps):
        now = float(t)
        if op == "open":
            next_id += 1
            decision = adm.open(next_id, address, now)
            for victim in decision.evict:
                assert live.get(victim) == "startup", (victim, live)
                live[victim] = "gone"
            if decision.accepted:
                live[next_id] = "startup"
        else:
            startups = sorted(c for c, s in live.items() if s == "startup")
            known = sorted(c for c, s in live.items() if s != "gone")
            if op.startswith("auth") and startups:
                conn = startups[pick % len(startups)]
                role = "agent" if op == "auth_agent" else "requester"
                refused = adm.authenticated(conn, role, now)
                live[conn] = "gone" if refused else "session"
                if refused:
                    adm.closed(conn, Outcome.OK, now)
            elif op == "close" and known:
                conn = known[pick % len(known)]
                adm.closed(conn, outcome, now)
                live[conn] = "gone"
        assert 0 <= adm.startups <= lim.startups
        assert adm.startups == sum(1 for s in live.values() if s == "startup")
        assert 0 <= adm.sessions["agent"] <= lim.agents
        assert 0 <= adm.sessions["requester"] <= lim.requesters
        assert sum(adm.sessions.values()) == sum(1 for s in live.values() if s == "session")
