"""The coordinator's answers to requesters: an unknown agent's error lists the registered
ones, a busy agent's says which run holds it and since when, ``wait`` waits for a busy
agent, ``cancel`` stops a run and still brings its document, and the run history never
costs a document. In one trio run on loopback."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.service import AgentConfig, run_agent
from probe.coordinator import Coordinator, ProbeConfig
from udpreach.core.errors import AgentUnavailableError
from udpreach.net.channel import connect
from udpreach.net.client import request_run
from udpreach.store import RunStore

SECRET = b"requests-test-secret-0123456789ab"
DEADLINE = 90
SLOW = {"src_ports": "1024-65535", "rate": 5000}  # about 13 s


@asynccontextmanager
async def harness(*names: str, store: Any = None) -> AsyncIterator[dict[str, Any]]:
    cfg = ProbeConfig(host="127.0.0.1", port=0, secret=SECRET, source="127.0.0.2")
    coord = Coordinator(cfg, store=store)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(coord.serve)
        for name in names:
            acfg = AgentConfig(
                host=host, port=port, secret=SECRET, ports=(0,), name=name,
                listen="127.0.0.1", once=True,
            )  # fmt: skip
            await nursery.start(run_agent, acfg)
            assert await coord.wait_agent(name, 10) is not None
        yield {"host": host, "port": port, "coord": coord, "nursery": nursery}
        nursery.cancel_scope.cancel()


async def ask(h: dict[str, Any], agent: str, plan: dict[str, Any], wait: float = 0, **kw: Any):  # type: ignore[no-untyped-def]
    return await request_run(
        h["host"], h["port"], SECRET, agent=agent, plan=plan, wait=wait, expect=None,
        on_progress=kw.get("on_progress", lambda p: None),
    )  # fmt: skip


async def test_an_unknown_agent_is_told_with_the_registered_ones() -> None:
    with trio.fail_after(DEADLINE):
        async with harness("alpha", "beta") as h:
            with pytest.raises(AgentUnavailableError) as info:
                await ask(h, "gamma", {"src_ports": "1024-1055"})
    assert str(info.value) == "no agent named 'gamma'; registered: alpha, beta"
    with trio.fail_after(DEADLINE):
        async with harness() as h:
            with pytest.raises(AgentUnavailableError) as info:
                await ask(h, "gamma", {"src_ports": "1024-1055"}, wait=0.3)
    assert str(info.value) == "no agent named 'gamma' (waited 0.3s); no agent is registered"


async def test_a_busy_agent_says_which_run_holds_it_and_wait_waits_for_it() -> None:
    results: dict[str, Any] = {}
    with trio.fail_after(DEADLINE):
        async with harness("alpha") as h:
            started = trio.Event()
            first_done = trio.Event()

            def progress(p: dict[str, Any]) -> None:
                results.setdefault("run_id", p.get("run_id"))
                started.set()

            async def first() -> None:
                results["first"] = await ask(
                    h, "alpha", {"src_ports": "1024-17407", "rate": 5000}, on_progress=progress
                )
                first_done.set()

            h["nursery"].start_soon(first)
            await started.wait()
            with pytest.raises(AgentUnavailableError) as busy:
                await ask(h, "alpha", {"src_ports": "1024-1055"})
            t0 = trio.current_time()
            second = await ask(h, "alpha", {"src_ports": "1024-1055"}, wait=60)
            waited = trio.current_time() - t0
            await first_done.wait()
    message = str(busy.value)
    assert re.fullmatch(
        r"agent 'alpha' is busy with run (\S+) since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC;"
        r" --wait SECONDS waits for it",
        message,
    ), message
    assert results["run_id"] in message
    assert results["first"]["complete"] is True
    assert second["complete"] is True
    assert second["summary"]["open"] == 32
    assert waited > 1.0  # it waited for the first run instead of failing
    assert second["started"] >= results["first"]["finished"] - 0.5


async def test_cancel_stops_the_run_and_brings_its_document() -> None:
    with trio.fail_after(DEADLINE):
        async with harness("alpha") as h:
            chan = await connect(h["host"], h["port"], SECRET, "control", 5)
            try:
                await chan.send({"type": "run", "agent": "alpha", "plan": SLOW, "wait": 0,
                                 "expect": []})  # fmt: skip
                parts: list[str] = []
                cancelled_at = None
                while True:
                    msg = (await chan.next_message()).body
                    if msg["type"] == "progress" and cancelled_at is None and msg["open"] > 1000:
                        await chan.send({"type": "cancel"})
                        cancelled_at = trio.current_time()
                    elif msg["type"] == "result_part":
                        parts.append(msg["data"])
                    elif msg["type"] == "result_end":
                        ended = trio.current_time()
                        complete = msg["complete"]
                        break
            finally:
                await chan.aclose()
            assert cancelled_at is not None
            assert ended - cancelled_at < 5

            doc = json.loads("".join(parts))
            assert complete is False
            assert doc["complete"] is False
            assert doc["summary"]["open"] > 1000
            assert doc["summary"]["unknown"] > 0
            assert doc["summary"]["blocked"] == 0
            assert any("cancelled" in w for w in doc["warnings"]), doc["warnings"]
            # The agent is free again at once.
            again = await ask(h, "alpha", {"src_ports": "1024-1055"})
            assert again["complete"] is True


async def test_a_failing_history_never_costs_the_document(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite3"
    store = RunStore.open(db)
    holder = sqlite3.connect(db, isolation_level=None, timeout=1)
    try:
        with trio.fail_after(DEADLINE):
            async with harness("alpha", store=store) as h:
                holder.execute("BEGIN IMMEDIATE")  # another writer holds the database
                doc = await ask(h, "alpha", {"src_ports": "1024-2047"})
                holder.execute("ROLLBACK")
                after = await ask(h, "alpha", {"src_ports": "1024-1055"})
    finally:
        holder.close()
        store.close()
    assert doc["complete"] is True
    assert doc["summary"]["open"] == 1024
    lines = [w for w in doc["warnings"] if w.startswith("run history:")]
    assert len(lines) == 2, doc["warnings"]
    assert "database is locked" in lines[0]
    assert "this run is not stored (this document is its only copy)" in lines[1]
    assert after["warnings"] == []
    with RunStore.open(db, create=False) as reader:
        assert [r["run_id"] for r in reader.history()] == [after["run_id"]]


async def test_a_probe_failure_during_a_run_is_told_to_the_requester(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug that raises while a run is served reaches the requester as one line naming it
    (exit 3), not as "control connection closed by peer"; the coordinator serves on."""
    from udpreach.core.errors import UnreachableError
    from udpreach.core.sweep import Sweep

    real = Sweep.document

    def broken(self: Sweep, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ValueError("cannot convert float NaN to integer")

    with trio.fail_after(DEADLINE):
        async with harness("alpha") as h:
            monkeypatch.setattr(Sweep, "document", broken)
            with pytest.raises(UnreachableError) as info:
                await ask(h, "alpha", {"src_ports": "1024-1055"})
            monkeypatch.setattr(Sweep, "document", real)
            doc = await ask(h, "alpha", {"src_ports": "1024-1055"})
    assert "the probe failed serving this request" in str(info.value)
    assert "ValueError: cannot convert float NaN to integer" in str(info.value)
    assert doc["summary"]["open"] == 32


async def test_a_requester_that_closes_once_answered_did_not_go_away(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A requester closes as soon as it has its document (or its error): the coordinator
    must not log that as "went away; stopping it". A busy probe is slow to get from the
    last message to the end of the request: here 0.3 s, so the close always comes first."""
    real = Coordinator._serve_run

    async def slow_to_finish(self: Coordinator, *args: Any, **kwargs: Any) -> None:
        await real(self, *args, **kwargs)
        await trio.sleep(0.3)

    monkeypatch.setattr(Coordinator, "_serve_run", slow_to_finish)
    with trio.fail_after(DEADLINE):
        async with harness("alpha") as h:
            doc = await ask(h, "alpha", {"src_ports": "1024-1055"})
            with pytest.raises(AgentUnavailableError):
                await ask(h, "nobody", {"src_ports": "1024-1055"})
            await trio.sleep(0.5)
    assert doc["complete"] is True
    assert "went away" not in caplog.text
