"""The requesting side of the control channel for trio programs (the tests, library use).

The CLI uses the blocking twin in ``udpreach.net.blocking`` (no trio import at start-up);
both interpret the coordinator's answers with the same sans-IO ``RunReply``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from udpreach.core.errors import UnreachableError
from udpreach.net.blocking import (
    CONNECT_TIMEOUT,
    STALL_TIMEOUT,
    RunReply,
    agents_from,
    run_request,
)
from udpreach.net.channel import connect


async def list_agents(host: str, port: int, secret: bytes) -> list[dict[str, Any]]:
    chan = await connect(host, port, secret, "control", CONNECT_TIMEOUT)
    try:
        await chan.send({"type": "agents"})
        with trio.fail_after(CONNECT_TIMEOUT):
            msg = await chan.next_message()
    except trio.TooSlowError:
        raise UnreachableError("coordinator did not answer the agents request") from None
    finally:
        await chan.aclose()
    return agents_from(msg)


async def request_run(
    host: str,
    port: int,
    secret: bytes,
    *,
    agent: str,
    plan: dict[str, Any],
    wait: float,
    expect: list[dict[str, Any]] | None,
    on_progress: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Ask the coordinator for a run and return its document.

    Raises:
        AgentUnavailableError: unknown or busy agent (exit 3).
        ConfigError: the coordinator refused the plan (exit 2).
        UnreachableError, AuthError: as for any connection (exit 3).
    """
    chan = await connect(host, port, secret, "control", CONNECT_TIMEOUT)
    try:
        await chan.send(run_request(agent, plan, wait, expect))
        reply = RunReply(on_progress)
        stall = STALL_TIMEOUT + wait
        while True:
            try:
                with trio.fail_after(stall):
                    msg = await chan.next_message()
            except trio.TooSlowError:
                raise UnreachableError(
                    f"coordinator sent nothing for {stall:g}s during the run"
                ) from None
            stall = STALL_TIMEOUT
            doc = reply.feed(msg)
            if doc is not None:
                return doc
    finally:
        await chan.aclose()
