"""The requesting side of the control channel: ``udpreach run`` and ``udpreach agents``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio

from udpreach.channel import connect
from udpreach.errors import (
    AgentUnavailableError,
    ConfigError,
    ProtocolError,
    UnreachableError,
)

CONNECT_TIMEOUT = 10.0
STALL_TIMEOUT = 60.0  # no word from the coordinator for this long during a run: give up


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
    agents = msg.body.get("agents")
    if msg.type != "agents" or not isinstance(agents, list):
        raise ProtocolError("unexpected answer to the agents request")
    return agents


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
        await chan.send(
            {"type": "run", "agent": agent, "plan": plan, "wait": wait, "expect": expect or []}
        )
        parts: list[str] = []
        deadline = STALL_TIMEOUT + wait
        while True:
            try:
                with trio.fail_after(deadline):
                    msg = await chan.next_message()
            except trio.TooSlowError:
                raise UnreachableError(
                    f"coordinator sent nothing for {deadline:g}s during the run"
                ) from None
            deadline = STALL_TIMEOUT
            body = msg.body
            if msg.type == "progress":
                on_progress(body)
            elif msg.type == "result_part":
                parts.append(str(body.get("data", "")))
            elif msg.type == "result_end":
                try:
                    doc = json.loads("".join(parts))
                except ValueError:
                    raise ProtocolError("coordinator sent a malformed result") from None
                if not isinstance(doc, dict):
                    raise ProtocolError("coordinator sent a malformed result")
                return doc
            elif msg.type == "error":
                code = body.get("code")
                text = str(body.get("message", "refused"))
                if code == "bad_plan":
                    raise ConfigError(text)
                if code in ("unknown_agent", "busy"):
                    raise AgentUnavailableError(text)
                raise UnreachableError(f"coordinator: {text}")
    finally:
        await chan.aclose()
