"""Typed control messages (``udpreach.core.messages``): what each side accepts, and that
nothing a peer sends can do more than raise ``MessageError``."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import docsamples
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpreach.core.errors import ProtocolError
from udpreach.core.messages import (
    FROM_AGENT,
    FROM_REQUESTER,
    TO_AGENT,
    TO_REQUESTER,
    AgentInfo,
    AgentList,
    Error,
    Flushed,
    MessageError,
    Progress,
    Register,
    RunRequest,
    RunStart,
    check_document,
    loads,
    outgoing,
    parse,
)

NONCE = "ab" * 16
RUN_START = {"type": "run_start", "run_id": "r1", "nonce": NONCE, "size": 16, "dst_ports": [5000]}


def test_every_message_round_trips_through_json() -> None:
    samples: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (RUN_START, TO_AGENT),
        ({"type": "flush", "seq": 3}, TO_AGENT),
        ({"type": "run_end", "run_id": "r1"}, TO_AGENT),
        ({"type": "ping", "seq": 0}, TO_AGENT),
        ({"type": "tick"}, TO_AGENT),
        ({"type": "registered", "observed": "198.18.1.2"}, TO_AGENT),
        ({"type": "error", "code": "bad_message", "message": "x", "re": "run_start"}, TO_AGENT),
        (
            {
                "type": "register",
                "name": "pc-17",
                "address": "2001:2::1",
                "ports": [5000, 6000],
                "rcvbuf": 4096,
            },
            FROM_AGENT,
        ),
        ({"type": "run_ready", "run_id": "r1", "nonce": NONCE}, FROM_AGENT),
        (
            {"type": "flushed", "seq": 3, "stats": {"accepted": 5, "rejected": {"bad_mac": 1}}},
            FROM_AGENT,
        ),
        (
            {"type": "run_done", "run_id": "r1", "stats": {"accepted": 0, "rejected": {}}},
            FROM_AGENT,
        ),
        ({"type": "pong", "seq": 9}, FROM_AGENT),
        ({"type": "agents"}, FROM_REQUESTER),
        ({"type": "cancel"}, FROM_REQUESTER),
        ({"type": "result_part", "data": "{}"}, TO_REQUESTER),
        ({"type": "result_end", "complete": False}, TO_REQUESTER),
    ]
    for body, table in samples:
        msg = parse(body, table)
        assert parse(json.loads(json.dumps(msg.to_json())), table) == msg, body
        assert msg.to_json()["type"] == body["type"]


def test_a_run_request_keeps_what_the_cli_sends() -> None:
    body = {
        "type": "run",
        "agent": "pc-17",
        "plan": {"src_ports": "random:50", "dst_ports": None, "copies": None, "rate": 1000,
                 "size": 16},
        "wait": 2.5,
        "expect": [{"dst_ports": "5000", "src_ports": "1024-65535", "verdict": "open"}],
    }  # fmt: skip
    req = parse(body, FROM_REQUESTER)
    assert isinstance(req, RunRequest)
    assert req.plan.to_json() == {**body["plan"]}
    assert req.wait == 2.5
    assert req.expect == tuple(body["expect"])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"size": math.inf}, "size"),
        ({"size": -math.inf}, "size"),
        ({"size": math.nan}, "size"),
        ({"size": "16"}, "size"),
        ({"size": 16.0}, "size"),
        ({"size": True}, "size"),
        ({"size": 10**9}, "size"),
        ({"size": 15}, "size"),
        ({"nonce": "ab" * 15}, "nonce"),
        ({"nonce": "zz" * 16}, "nonce"),
        ({"nonce": 7}, "nonce"),
        ({"run_id": ""}, "run_id"),
        ({"run_id": "../x"}, "run_id"),
        ({"run_id": "r" * 65}, "run_id"),
        ({"dst_ports": [0]}, "dst_ports"),
        ({"dst_ports": [70000]}, "dst_ports"),
        ({"dst_ports": [True]}, "dst_ports"),
        ({"dst_ports": list(range(1, 2000))}, "dst_ports"),
        ({"dst_ports": "5000"}, "dst_ports"),
    ],
)
def test_run_start_refuses_what_would_crash_or_mislead_an_agent(
    change: dict[str, Any], field: str
) -> None:
    with pytest.raises(MessageError) as info:
        parse({**RUN_START, **change}, TO_AGENT)
    assert field in str(info.value)
    assert isinstance(info.value, ProtocolError)  # the CLI's exit 3


def test_messages_go_only_where_they_belong() -> None:
    with pytest.raises(MessageError, match="unexpected 'run_start'"):
        parse(RUN_START, FROM_AGENT)
    with pytest.raises(MessageError, match="unexpected 'run'"):
        parse({"type": "run", "agent": "x"}, TO_AGENT)
    with pytest.raises(MessageError, match="unexpected 'register'"):
        parse({"type": "register"}, FROM_REQUESTER)
    with pytest.raises(MessageError, match="without a type"):
        parse({"kind": "ping"}, TO_AGENT)


def test_outgoing_dicts_are_checked_as_the_peer_will() -> None:
    assert isinstance(outgoing(RUN_START, TO_AGENT), RunStart)
    with pytest.raises(MessageError):
        outgoing({**RUN_START, "size": math.inf}, TO_AGENT)
    msg = Register("a", "127.0.0.1", (1,), 0)
    assert outgoing(msg, FROM_AGENT) is msg


def test_stats_and_lists_are_bounded() -> None:
    many = {f"r{i}": 1 for i in range(40)}
    with pytest.raises(MessageError, match="at most 32"):
        parse({"type": "flushed", "seq": 1, "stats": {"accepted": 1, "rejected": many}}, FROM_AGENT)
    with pytest.raises(MessageError):
        parse({"type": "flushed", "seq": 1, "stats": {"accepted": -1}}, FROM_AGENT)
    ok = parse({"type": "flushed", "seq": 1, "stats": None}, FROM_AGENT)
    assert isinstance(ok, Flushed)
    assert ok.stats is None
    with pytest.raises(MessageError):
        parse({"type": "error", "message": "x" * 5000}, TO_AGENT)


def test_agent_lists_and_progress() -> None:
    info = AgentInfo("pc-17", "198.18.1.2", "198.18.1.2", (5000,), 1.7e9, True, 0, "r1", 1.7e9)
    msg = parse(AgentList((info,)).to_json(), TO_REQUESTER)
    assert msg == AgentList((info,))
    with pytest.raises(MessageError):
        parse({"type": "agents", "agents": [{"name": "x"}]}, TO_REQUESTER)
    progress = parse(
        {"type": "progress", "run_id": "r1", "round": 2, "cells": 10, "settled": 4, "open": 3,
         "sent": 12, "rate": 1000, "loss": {"estimate": 0.01}},
        TO_REQUESTER,
    )  # fmt: skip
    assert isinstance(progress, Progress)
    assert progress.get("settled") == 4
    assert progress.to_json()["loss"] == {"estimate": 0.01}
    with pytest.raises(MessageError):
        parse({"type": "progress", "cells": -5}, TO_REQUESTER)


@pytest.mark.parametrize(
    "text", ['{"a":NaN}', '{"a":Infinity}', '{"a":-Infinity}', '{"a":1e400}', "[" * 100_000]
)
def test_loads_refuses_what_python_would_accept(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any ValueError: the message varies
        loads(text)


def test_check_document_accepts_real_documents() -> None:
    for doc in (docsamples.baseline(), docsamples.after_change(), docsamples.incomplete()):
        assert check_document(json.loads(json.dumps(doc))) == doc


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("ranges"),
        lambda d: d.pop("summary"),
        lambda d: d.update(schema="udpreach/run-v9"),
        lambda d: d.update(complete="yes"),
        lambda d: d["summary"].update(open="1"),
        lambda d: d["summary"].update(open=-1),
        lambda d: d["ranges"][0].update(verdict="maybe"),
        lambda d: d["ranges"][0].update(first=70000),
        lambda d: d["ranges"][0].update(first=2, last=1),
        lambda d: d["ranges"][0].update(sent=1.5),
        lambda d: d["ranges"][0].update(translated="no"),
        lambda d: d.update(deviations={}),
        lambda d: d.update(warnings=[1]),
        lambda d: d.update(agent=[]),
    ],
)
def test_check_document_refuses_what_the_reports_would_trip_on(damage: Any) -> None:
    doc = json.loads(json.dumps(docsamples.baseline()))
    damage(doc)
    with pytest.raises(MessageError, match="malformed result"):
        check_document(doc)


# --- fuzzing ------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    ["type", "run_id", "nonce", "size", "dst_ports", "seq", "stats", "name", "address", "ports",
     "rcvbuf", "agent", "plan", "wait", "expect", "agents", "data", "complete", "code",
     "message", "re", "observed", "cells", "settled"]
)  # fmt: skip
types = st.sampled_from(
    ["run_start", "flush", "run_end", "ping", "tick", "registered", "error", "register",
     "run_ready", "flushed", "run_done", "pong", "agents", "run", "cancel", "progress",
     "result_part", "result_end", "nonsense"]
)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(types, st.dictionaries(field_names, json_values, max_size=8))
def test_fuzz_parse_raises_only_message_errors(kind: str, fields: dict[str, Any]) -> None:
    body = {**fields, "type": kind}
    for table in (TO_AGENT, FROM_AGENT, FROM_REQUESTER, TO_REQUESTER):
        try:
            msg = parse(body, table)
        except MessageError:
            continue
        # What is accepted can be sent on: JSON without non-finite numbers.
        json.dumps(msg.to_json(), allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_check_document_raises_only_message_errors(value: Any) -> None:
    for doc in (value, {**docsamples.baseline(), "summary": value}, {"ranges": value}):
        with contextlib.suppress(MessageError):
            check_document(doc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_loads_raises_only_value_errors(raw: bytes) -> None:
    try:
        value = loads(raw)
    except ValueError:
        return
    json.dumps(value, allow_nan=False)


def test_error_messages_name_the_message() -> None:
    with pytest.raises(MessageError, match="'run_start' message: 'size'"):
        parse({**RUN_START, "size": math.inf}, TO_AGENT)
    assert Error.from_json({"type": "error"}) == Error("error", "", None)
