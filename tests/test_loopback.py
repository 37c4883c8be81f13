"""Real sockets on loopback: coordinator, agent and probe in one trio run, port 0 everywhere.

The probe sends from 127.0.0.2 and the agent listens on 127.0.0.1, so that no source port
of the sweep is taken by the agent's own sockets.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from agent.service import AgentConfig, run_agent
from probe.coordinator import Coordinator, ProbeConfig
from udpreach.core.errors import AgentUnavailableError, AuthError, ConfigError
from udpreach.core.portspec import format_ports, parse_ports
from udpreach.net.client import list_agents, request_run

SECRET = b"loopback-test-secret-0123456789"
DEADLINE = 120


@asynccontextmanager
async def harness(
    *,
    ports: tuple[int, ...] = (0,),
    agent_secret: bytes = SECRET,
    name: str = "lo-agent",
    send_mode: str = "auto",
) -> AsyncIterator[dict[str, Any]]:
    cfg = ProbeConfig(
        host="127.0.0.1", port=0, secret=SECRET, source="127.0.0.2", send_mode=send_mode
    )
    coord = Coordinator(cfg)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(coord.serve)
        acfg = AgentConfig(
            host=host,
            port=port,
            secret=agent_secret,
            ports=ports,
            name=name,
            listen="127.0.0.1",
            once=True,
        )
        bound = await nursery.start(run_agent, acfg)
        yield {"host": host, "port": port, "coord": coord, "agent_ports": bound, "name": name}
        nursery.cancel_scope.cancel()


async def _run(h: dict[str, Any], **plan: Any) -> dict[str, Any]:
    progress: list[dict[str, Any]] = []
    doc = await request_run(
        h["host"],
        h["port"],
        SECRET,
        agent=h["name"],
        plan=plan,
        wait=10,
        expect=None,
        on_progress=progress.append,
    )
    assert progress, "the coordinator streams progress while the run goes"
    return doc


def _check_contract(doc: dict[str, Any]) -> None:
    assert doc["schema"] == "udpreach/run-v1"
    keys = {"run_id", "complete", "agent", "probe", "plan", "summary", "ranges"}
    assert keys <= set(doc)
    total = sum(r["last"] - r["first"] + 1 for r in doc["ranges"])
    assert total == doc["summary"]["cells"]
    order = [(r["dst_port"], r["first"]) for r in doc["ranges"]]
    assert order == sorted(order)


async def test_full_sweep_one_port_is_one_open_range() -> None:
    with trio.fail_after(DEADLINE):
        async with harness() as h:
            doc = await _run(h)
    _check_contract(doc)
    (dst,) = h["agent_ports"]
    assert doc["complete"] is True
    assert doc["summary"]["cells"] == 64512
    assert doc["summary"]["open"] == 64512
    assert len(doc["ranges"]) == 1
    r = doc["ranges"][0]
    assert (r["dst_port"], r["first"], r["last"], r["verdict"]) == (dst, 1024, 65535, "open")
    assert r["translated"] is False
    assert r["received"] >= 64512
    assert doc["agent"]["registered"] == doc["agent"]["observed"] == "127.0.0.1"
    assert doc["agent_stats"]["accepted"] == r["received"]


async def test_three_destination_ports() -> None:
    with trio.fail_after(DEADLINE):
        async with harness(ports=(0, 0, 0)) as h:  # three distinct ephemeral ports
            doc = await _run(h, src_ports="1024-65535")
    ports = h["agent_ports"]
    assert len(set(ports)) == 3
    _check_contract(doc)
    assert doc["summary"] == {
        "cells": 3 * 64512,
        "open": 3 * 64512,
        "blocked": 0,
        "rejected": 0,
        "untested": 0,
        "unknown": 0,
    }
    assert [(r["dst_port"], r["first"], r["last"]) for r in doc["ranges"]] == [
        (p, 1024, 65535) for p in sorted(ports)
    ]


async def test_random_source_ports() -> None:
    spec = format_ports(parse_ports("random:500", allow_random=True, rng=random.Random(7)))
    with trio.fail_after(DEADLINE):
        async with harness() as h:
            doc = await _run(h, src_ports=spec)
    _check_contract(doc)
    planned = parse_ports(doc["plan"]["src_ports"])
    assert len(planned) == 500
    assert all(1024 <= p <= 65535 for p in planned)
    assert doc["summary"]["open"] == 500
    covered = {p for r in doc["ranges"] for p in range(r["first"], r["last"] + 1)}
    assert covered == set(planned)


async def test_dst_port_not_listened_on_is_a_usage_error() -> None:
    with trio.fail_after(DEADLINE):
        async with harness() as h:
            with pytest.raises(ConfigError, match="not among the agent's ports"):
                await _run(h, dst_ports="1")


async def test_unknown_agent_is_reported() -> None:
    with trio.fail_after(DEADLINE):
        async with harness() as h:
            with pytest.raises(AgentUnavailableError, match="no agent named"):
                await request_run(
                    h["host"], h["port"], SECRET, agent="nobody", plan={}, wait=0,
                    expect=None, on_progress=lambda p: None,
                )  # fmt: skip


async def test_wrong_secret_is_refused_on_both_paths() -> None:
    with trio.fail_after(DEADLINE):
        async with harness() as h:
            with pytest.raises(AuthError, match="does not know our secret"):
                await list_agents(h["host"], h["port"], b"not-the-right-secret-at-all")
            listed = await list_agents(h["host"], h["port"], SECRET)
            assert [a["name"] for a in listed] == ["lo-agent"]


async def test_agent_with_wrong_secret_never_registers() -> None:
    cfg = ProbeConfig(host="127.0.0.1", port=0, secret=SECRET)
    coord = Coordinator(cfg)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(coord.serve)
            acfg = AgentConfig(
                host=host, port=port, secret=b"wrong-wrong-wrong-wrong-wrong", ports=(0,),
                name="intruder", listen="127.0.0.1", once=True,
            )  # fmt: skip
            with pytest.raises(AuthError):
                await run_agent(acfg)
            assert coord.agents == {}
            nursery.cancel_scope.cancel()


async def test_busy_source_port_is_untested_not_blocked() -> None:
    """Bind mode cannot send from a port this host already uses: untested, with the reason."""
    busy = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    try:
        await busy.bind(("127.0.0.2", 0))
        port = busy.getsockname()[1]
        with trio.fail_after(DEADLINE):
            async with harness(send_mode="bind") as h:
                doc = await _run(h, src_ports=f"{port - 2}-{port + 2}")
    finally:
        busy.close()
    _check_contract(doc)
    verdicts = {r["first"]: r for r in doc["ranges"] if r["first"] == r["last"] == port}
    assert verdicts[port]["verdict"] == "untested"
    assert "in use" in verdicts[port]["reason"]
    assert doc["summary"]["untested"] == 1
    assert doc["summary"]["open"] == 4
    assert doc["summary"]["blocked"] == 0


# -- the CLI's blocking client (no trio in the requesting process) -------------------------


async def test_blocking_client_runs_lists_and_refuses_like_the_trio_client() -> None:
    from functools import partial

    from udpreach.net import blocking as blocking_client

    with trio.fail_after(DEADLINE):
        async with harness() as h:
            host, port = h["host"], h["port"]
            assert await h["coord"].wait_agent("lo-agent", 10) is not None
            listed = await trio.to_thread.run_sync(blocking_client.list_agents, host, port, SECRET)
            assert [a["name"] for a in listed] == ["lo-agent"]
            progress: list[dict[str, Any]] = []
            doc = await trio.to_thread.run_sync(
                partial(
                    blocking_client.request_run, host, port, SECRET, agent="lo-agent",
                    plan={"src_ports": "20000-20999"}, wait=10, expect=None,
                    on_progress=progress.append,
                )
            )  # fmt: skip
            _check_contract(doc)
            assert doc["summary"]["open"] == 1000
            assert progress
            with pytest.raises(AgentUnavailableError, match="no agent named"):
                await trio.to_thread.run_sync(
                    partial(
                        blocking_client.request_run, host, port, SECRET, agent="nobody",
                        plan={}, wait=0, expect=None, on_progress=lambda p: None,
                    )
                )  # fmt: skip
            with pytest.raises(AuthError, match="does not know our secret"):
                await trio.to_thread.run_sync(
                    blocking_client.list_agents, host, port, b"not-the-right-secret-at-all"
                )


async def test_blocking_client_gives_up_on_a_silent_coordinator() -> None:
    """A listener that accepts and never answers: the handshake times out, no hang."""
    from udpreach.core.errors import UnreachableError
    from udpreach.net import blocking as blocking_client

    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    with trio.fail_after(DEADLINE), listener:
        t0 = trio.current_time()
        with pytest.raises(UnreachableError, match="handshake timed out"):
            await trio.to_thread.run_sync(
                blocking_client.connect_blocking, "127.0.0.1", port, SECRET, "control", 0.5
            )
        assert trio.current_time() - t0 < 5


async def test_large_datagrams_come_in_bounded_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """At full speed a batch is 4 ms of sending, but never more than BATCH_BYTES of
    payload: 60 KB datagrams must not make batches of hundreds of megabytes."""
    import probe.raw
    from udpreach.core.sweep import BATCH_BYTES

    real_make_sender = probe.raw.make_sender
    batch_bytes: list[int] = []

    class Recording:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.mode = inner.mode
            self.linger = inner.linger

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def send_cells(self, batch: Any, now: float) -> Any:
            from probe.sender import groups_of

            batch_bytes.append(sum(len(p) for _, _, pl in groups_of(batch) for p in pl))
            return self.inner.send_cells(batch, now)

    monkeypatch.setattr(probe.raw, "make_sender", lambda *a: Recording(real_make_sender(*a)))
    with trio.fail_after(DEADLINE):
        async with harness() as h:
            doc = await _run(h, src_ports="30000-30199", size=60000, rate=1_000_000)
    _check_contract(doc)
    assert doc["summary"]["open"] == 200
    assert BATCH_BYTES < 200 * 60000  # so the 200 ports cannot go in one batch
    assert len(batch_bytes) > 1
    assert max(batch_bytes) <= BATCH_BYTES


async def test_a_source_port_the_kernel_keeps_refusing_is_untested_not_blocked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Backpressure (a full send buffer) requeues a source port's datagrams, a bounded number
    of times; a port still refused after that is 'untested' with the reason, never 'blocked',
    and the run ends."""
    import probe.raw
    from probe.sender import GroupResult, groups_of

    stuck = {20005, 20050}
    real_make_sender = probe.raw.make_sender

    class StuckSender:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.mode = inner.mode
            self.linger = inner.linger
            self.refused = 0

        def __getattr__(self, name: str) -> Any:  # free_slots, oldest_age, reap, close
            return getattr(self.inner, name)

        def send_cells(self, batch: Any, now: float) -> Any:
            groups = groups_of(batch)
            keep = [
                (
                    d,
                    [s for s in ss if s not in stuck],
                    [p for s, p in zip(ss, pl, strict=True) if s not in stuck],
                )
                for d, ss, pl in groups
            ]
            held = sorted({s for _, ss, _ in groups for s in ss if s in stuck})
            if not held:
                return self.inner.send_cells(batch, now)
            self.refused += 1
            sent = self.inner.send_cells(keep, now)
            results = dict(sent or [])
            for d, ss, _ in keep:
                for s in ss:
                    results.setdefault(s, GroupResult([]))
                    if sent is None:
                        results[s].sent.append(d)
            for s in held:
                results[s] = GroupResult([], backpressure=True)
            return list(results.items())

    senders: list[StuckSender] = []

    def make(mode: str, source: str, target: str, linger: float) -> Any:
        senders.append(StuckSender(real_make_sender(mode, source, target, linger)))
        return senders[-1]

    monkeypatch.setattr(probe.raw, "make_sender", make)
    with trio.fail_after(DEADLINE):
        async with harness() as h:
            doc = await _run(h, src_ports="20000-20099")
    _check_contract(doc)
    assert doc["complete"] is True
    untested = [r for r in doc["ranges"] if r["verdict"] == "untested"]
    assert [(r["first"], r["last"]) for r in untested] == [(20005, 20005), (20050, 20050)]
    assert {r["reason"] for r in untested} == {"the probe host's send buffer stayed full"}
    assert doc["summary"]["open"] == 98
    assert doc["summary"]["blocked"] == 0
    assert sum(s.refused for s in senders) <= 2 * 9  # bounded: 8 requeues after the first


def test_blocking_client_bounds_a_name_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that hangs or fails: one line, within the deadline (no lookup is made:
    getaddrinfo is replaced, so no query leaves this host)."""
    import socket
    import time

    from udpreach.core.errors import UnreachableError
    from udpreach.net import blocking as blocking_client

    real = socket.getaddrinfo

    def hanging(host: str, *args: Any, **kw: Any) -> Any:
        if kw.get("flags") == socket.AI_NUMERICHOST:
            return real(host, *args, **kw)  # raises gaierror for a name, as the real one does
        time.sleep(3)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    t0 = time.monotonic()
    with pytest.raises(UnreachableError, match=re.escape("no address for it in 0.3s")):
        blocking_client.connect_blocking("coordinator.test", 7000, SECRET, "control", 0.3)
    assert time.monotonic() - t0 < 2

    def failing(host: str, *args: Any, **kw: Any) -> Any:
        if kw.get("flags") == socket.AI_NUMERICHOST:
            return real(host, *args, **kw)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", failing)
    with pytest.raises(
        UnreachableError, match=re.escape("cannot reach coordinator coordinator.test:7000")
    ):
        blocking_client.connect_blocking("coordinator.test", 7000, SECRET, "control", 5)
