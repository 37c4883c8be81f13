"""Typed control messages: each one validated once, where it comes in, then trusted.

Theory of operation: ``framing`` delivers authenticated JSON objects with a ``type``; this
module turns each into a small frozen dataclass, or refuses it with a ``MessageError`` that
names the field. Every number must be a JSON number of the right kind (an integer is never a
bool, a float or a string), finite (``NaN`` and ``Infinity`` are refused by the JSON parser in
``framing`` already, and again here for objects built in-process) and inside a range that
makes sense; every string and list has a ceiling. A side parses only the messages it may
receive (``TO_AGENT``, ``FROM_AGENT``, ``FROM_REQUESTER``, ``TO_REQUESTER``), so a requester
cannot send an agent's receipts and an agent cannot be sent a run request.

Unknown keys are ignored (a newer peer may add some); ``to_json`` writes the message as the
peer expects it. ``check_document`` is the same idea for the run document a requester gets
back: what the renderers and the exit status rely on is checked before anything is printed.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from udpreach.core import schema
from udpreach.core.errors import ProtocolError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # agent and key names
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
MAX_SEQ = 2**53  # JSON numbers are exact up to here
MAX_COUNT = 2**53
MAX_PORTS = 1024  # an agent listens on at most this many ports
MAX_SPEC = 1_000_000  # characters in a port SPEC (a random:N plan written out)
MAX_MESSAGE = 2000  # characters in an error message
MAX_EXPECT = 10_000  # expectation entries in a run request
MAX_AGENTS = 100_000  # entries in an agent list
MAX_PART = 4 * 1024 * 1024  # characters in one result part
MAX_WAIT = 86_400.0
MIN_SIZE = 16  # datagram payload bytes: udpreach.core.datagram's MIN_SIZE and MAX_SIZE
MAX_SIZE = 65507
NONCE_BYTES = 16
_MISSING: Any = object()


class MessageError(ProtocolError):
    """A control message that is not what its type promises (the peer's fault)."""


# -- field readers ------------------------------------------------------------------------


def _field(body: Mapping[str, Any], key: str, default: Any) -> Any:
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise MessageError(f"{_what(body)}: {key!r} is missing")
        return default
    return value


def _what(body: Mapping[str, Any]) -> str:
    kind = body.get("type")
    return f"{kind[:40]!r} message" if isinstance(kind, str) else "message"


def _int(body: Mapping[str, Any], key: str, lo: int, hi: int, default: Any = _MISSING) -> Any:
    value = _field(body, key, default)
    if value is default and default is not _MISSING:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(f"{_what(body)}: {key!r} must be an integer")
    if not lo <= value <= hi:
        raise MessageError(f"{_what(body)}: {key!r} must be {lo}-{hi}, got {value}")
    return value


def _float(body: Mapping[str, Any], key: str, lo: float, hi: float, default: Any = _MISSING) -> Any:
    value = _field(body, key, default)
    if value is default and default is not _MISSING:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError(f"{_what(body)}: {key!r} must be a number")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise MessageError(f"{_what(body)}: {key!r} must be {lo:g}-{hi:g}, got {value!r}")
    return float(value)


def _bool(body: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    value = _field(body, key, default)
    if not isinstance(value, bool):
        raise MessageError(f"{_what(body)}: {key!r} must be true or false")
    return value


def _str(
    body: Mapping[str, Any],
    key: str,
    limit: int,
    pattern: re.Pattern[str] | None = None,
    default: Any = _MISSING,
) -> Any:
    value = _field(body, key, default)
    if value is default and default is not _MISSING:
        return value
    if not isinstance(value, str):
        raise MessageError(f"{_what(body)}: {key!r} must be a string")
    if len(value) > limit:
        raise MessageError(f"{_what(body)}: {key!r} is longer than {limit} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise MessageError(f"{_what(body)}: {key!r} is malformed")
    return value


def _hex(body: Mapping[str, Any], key: str, nbytes: int) -> bytes:
    text = _str(body, key, 2 * nbytes)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != nbytes:
        raise MessageError(f"{_what(body)}: {key!r} must be {nbytes} bytes of hex")
    return raw


def _address(body: Mapping[str, Any], key: str) -> str:
    text = _str(body, key, 64)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise MessageError(f"{_what(body)}: {key!r} is not an IP address") from None


def _ports(body: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = _field(body, key, _MISSING)
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PORTS:
        raise MessageError(f"{_what(body)}: {key!r} must be a list of 1-{MAX_PORTS} ports")
    for p in value:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise MessageError(f"{_what(body)}: {key!r} holds something other than a port")
    return tuple(value)


def _finite_json(value: Any, depth: int = 0) -> bool:
    """True for JSON data without non-finite numbers, nested at most a few levels."""
    if value is None or isinstance(value, bool | str):
        return True
    if isinstance(value, int | float):
        return math.isfinite(value)
    if depth >= 4:
        return False
    if isinstance(value, list):
        return all(_finite_json(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _finite_json(v, depth + 1) for k, v in value.items())
    return False


# -- the messages -------------------------------------------------------------------------


@dataclass(frozen=True)
class Msg:
    """Base class: ``TYPE`` is the wire ``type``."""

    TYPE: ClassVar[str] = ""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls()

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE}


@dataclass(frozen=True)
class AgentStats:
    """What the agent counted in a run: accepted datagrams and rejections by reason."""

    accepted: int = 0
    rejected: tuple[tuple[str, int], ...] = ()
    # Fragmented datagrams the agent's host lost during the run other than by a timeout
    # (a full reassembly memory, overlapping fragments; UDP checksum errors, which such
    # overlaps make): an open cell's datagram may be among them. None where the host does
    # not say. An agent before ``reassembly_timeouts`` existed counted the timeouts here too.
    reassembly_failures: int | None = None
    # Fragmented datagrams that timed out at the host during the run: their first fragment
    # never came (a firewall that filters by port drops only that one). None: not said.
    reassembly_timeouts: int | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        accepted = _int(body, "accepted", 0, MAX_COUNT, 0)
        reasm = _int(body, "reassembly_failures", 0, MAX_COUNT, None)
        timeouts = _int(body, "reassembly_timeouts", 0, MAX_COUNT, None)
        raw = _field(body, "rejected", {})
        if not isinstance(raw, dict) or len(raw) > 32:
            raise MessageError("agent stats: 'rejected' must map at most 32 reasons to counts")
        rejected = []
        for reason, n in raw.items():
            if not isinstance(reason, str) or not CODE_RE.fullmatch(reason):
                raise MessageError("agent stats: a rejection reason is malformed")
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_COUNT:
                raise MessageError(f"agent stats: count for {reason!r} must be an integer")
            rejected.append((reason, n))
        return cls(accepted, tuple(rejected), reasm, timeouts)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"accepted": self.accepted, "rejected": dict(self.rejected)}
        if self.reassembly_failures is not None:
            out["reassembly_failures"] = self.reassembly_failures
        if self.reassembly_timeouts is not None:
            out["reassembly_timeouts"] = self.reassembly_timeouts
        return out


def _stats(body: Mapping[str, Any]) -> AgentStats | None:
    raw = body.get("stats")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise MessageError(f"{_what(body)}: 'stats' must be an object")
    return AgentStats.from_json(raw)


@dataclass(frozen=True)
class Error(Msg):
    """A refusal or failure, in either direction. ``re`` names the message it answers."""

    TYPE: ClassVar[str] = "error"
    code: str = "error"
    message: str = ""
    re: str | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(
            _str(body, "code", 40, CODE_RE, "error"),
            _str(body, "message", MAX_MESSAGE, None, ""),
            _str(body, "re", 40, CODE_RE, None),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "code": self.code, "message": self.message}
        if self.re is not None:
            out["re"] = self.re
        return out


# coordinator -> agent


@dataclass(frozen=True)
class Registered(Msg):
    TYPE: ClassVar[str] = "registered"
    observed: str = ""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(_address(body, "observed"))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE, "observed": self.observed}


@dataclass(frozen=True)
class RunStart(Msg):
    TYPE: ClassVar[str] = "run_start"
    run_id: str = ""
    nonce: bytes = b""
    size: int = MIN_SIZE
    dst_ports: tuple[int, ...] = ()

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        dst = body.get("dst_ports")
        return cls(
            _str(body, "run_id", 64, RUN_ID_RE),
            _hex(body, "nonce", NONCE_BYTES),
            _int(body, "size", MIN_SIZE, MAX_SIZE),
            _ports(body, "dst_ports") if dst is not None else (),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "run_id": self.run_id,
            "nonce": self.nonce.hex(),
            "size": self.size,
            "dst_ports": list(self.dst_ports),
        }


@dataclass(frozen=True)
class Flush(Msg):
    TYPE: ClassVar[str] = "flush"
    seq: int = 0

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(_int(body, "seq", 0, MAX_SEQ))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE, "seq": self.seq}


@dataclass(frozen=True)
class RunEnd(Msg):
    TYPE: ClassVar[str] = "run_end"
    run_id: str = ""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(_str(body, "run_id", 64, RUN_ID_RE))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE, "run_id": self.run_id}


@dataclass(frozen=True)
class Ping(Msg):
    TYPE: ClassVar[str] = "ping"
    seq: int = 0

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(_int(body, "seq", 0, MAX_SEQ))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE, "seq": self.seq}


@dataclass(frozen=True)
class Tick(Msg):
    """A one-way "still here" during long runs (no answer)."""

    TYPE: ClassVar[str] = "tick"


# agent -> coordinator


@dataclass(frozen=True)
class Register(Msg):
    TYPE: ClassVar[str] = "register"
    name: str = ""
    address: str = ""
    ports: tuple[int, ...] = ()
    rcvbuf: int = 0

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(
            _str(body, "name", 64, NAME_RE),
            _address(body, "address"),
            tuple(sorted(set(_ports(body, "ports")))),
            _int(body, "rcvbuf", 0, 2**40, 0),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "name": self.name,
            "address": self.address,
            "ports": list(self.ports),
            "rcvbuf": self.rcvbuf,
        }


@dataclass(frozen=True)
class RunReady(Msg):
    TYPE: ClassVar[str] = "run_ready"
    run_id: str = ""
    nonce: bytes = b""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(_str(body, "run_id", 64, RUN_ID_RE), _hex(body, "nonce", NONCE_BYTES))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE, "run_id": self.run_id, "nonce": self.nonce.hex()}


@dataclass(frozen=True)
class Flushed(Msg):
    TYPE: ClassVar[str] = "flushed"
    seq: int = 0
    stats: AgentStats | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(_int(body, "seq", 0, MAX_SEQ), _stats(body))

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "seq": self.seq,
            "stats": self.stats.to_json() if self.stats is not None else None,
        }


@dataclass(frozen=True)
class RunDone(Msg):
    TYPE: ClassVar[str] = "run_done"
    run_id: str = ""
    stats: AgentStats | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(_str(body, "run_id", 64, RUN_ID_RE), _stats(body))

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "run_id": self.run_id,
            "stats": self.stats.to_json() if self.stats is not None else {},
        }


@dataclass(frozen=True)
class Pong(Msg):
    TYPE: ClassVar[str] = "pong"
    seq: int = 0

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(_int(body, "seq", 0, MAX_SEQ))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE, "seq": self.seq}


# requester -> coordinator


@dataclass(frozen=True)
class AgentsRequest(Msg):
    TYPE: ClassVar[str] = "agents"


@dataclass(frozen=True)
class PlanRequest:
    """The plan as asked for; ``udpreach.core.plan.plan_from_request`` judges the values."""

    src_ports: str | None = None
    dst_ports: str | None = None
    copies: int | None = None
    rate: int | None = None
    size: int | None = None
    confidence: float | None = None
    icmp_budget: float | None = None
    max_delay: float | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        big = 2**31
        return cls(
            _str(body, "src_ports", MAX_SPEC, None, None),
            _str(body, "dst_ports", MAX_SPEC, None, None),
            _int(body, "copies", -big, big, None),
            _int(body, "rate", -big, big, None),
            _int(body, "size", -big, big, None),
            _float(body, "confidence", -1.0, 2.0, None),
            _float(body, "icmp_budget", -1.0, 1e6, None),
            _float(body, "max_delay", -1.0, 1e6, None),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "src_ports": self.src_ports,
            "dst_ports": self.dst_ports,
            "copies": self.copies,
            "rate": self.rate,
            "size": self.size,
        }
        for key in ("confidence", "icmp_budget", "max_delay"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class RunRequest(Msg):
    TYPE: ClassVar[str] = "run"
    agent: str = ""
    plan: PlanRequest = field(default_factory=PlanRequest)
    wait: float = 0.0
    expect: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        plan = _field(body, "plan", {})
        if not isinstance(plan, dict):
            raise MessageError("'run' message: 'plan' must be an object")
        expect = _field(body, "expect", [])
        if not isinstance(expect, list) or len(expect) > MAX_EXPECT:
            raise MessageError(f"'run' message: 'expect' must be a list of <= {MAX_EXPECT}")
        if not all(isinstance(e, dict) and _finite_json(e) for e in expect):
            raise MessageError("'run' message: 'expect' entries must be objects")
        return cls(
            _str(body, "agent", 64),
            PlanRequest.from_json(plan),
            _float(body, "wait", 0.0, MAX_WAIT, 0.0),
            tuple(expect),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "agent": self.agent,
            "plan": self.plan.to_json(),
            "wait": self.wait,
            "expect": list(self.expect),
        }


@dataclass(frozen=True)
class Cancel(Msg):
    """Stop the run this connection asked for; the coordinator still sends its document."""

    TYPE: ClassVar[str] = "cancel"


# coordinator -> requester


@dataclass(frozen=True)
class AgentInfo:
    """One registered agent, as ``udpreach agents`` lists it."""

    name: str
    registered: str
    observed: str
    ports: tuple[int, ...]
    since: float
    busy: bool = False
    rcvbuf: int = 0
    run: str | None = None  # the run holding it
    busy_since: float | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(
            _str(body, "name", 64, NAME_RE),
            _address(body, "registered"),
            _address(body, "observed"),
            _ports(body, "ports"),
            _float(body, "since", 0.0, 1e11),
            _bool(body, "busy", False),
            _int(body, "rcvbuf", 0, 2**40, 0),
            _str(body, "run", 64, RUN_ID_RE, None),
            _float(body, "busy_since", 0.0, 1e11, None),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "registered": self.registered,
            "observed": self.observed,
            "ports": list(self.ports),
            "since": self.since,
            "busy": self.busy,
            "rcvbuf": self.rcvbuf,
            "run": self.run,
            "busy_since": self.busy_since,
        }


@dataclass(frozen=True)
class AgentList(Msg):
    TYPE: ClassVar[str] = "agents"
    agents: tuple[AgentInfo, ...] = ()

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        raw = _field(body, "agents", _MISSING)
        if not isinstance(raw, list) or len(raw) > MAX_AGENTS:
            raise MessageError("'agents' message: 'agents' must be a list")
        if not all(isinstance(a, dict) for a in raw):
            raise MessageError("'agents' message: each agent must be an object")
        return cls(tuple(AgentInfo.from_json(a) for a in raw))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE, "agents": [a.to_json() for a in self.agents]}


@dataclass(frozen=True)
class Progress(Msg):
    """How far a run is; counters the requester shows, plus whatever else the runner adds."""

    TYPE: ClassVar[str] = "progress"
    counters: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        items = []
        for key in ("round", "cells", "settled", "open", "sent", "rate"):
            items.append((key, _int(body, key, 0, MAX_COUNT, 0)))
        for key, value in body.items():
            if key in ("type", "round", "cells", "settled", "open", "sent", "rate"):
                continue
            if len(items) >= 64 or len(key) > 64 or not _finite_json(value):
                raise MessageError("'progress' message: unexpected or malformed field")
            items.append((key, value))
        return cls(tuple(items))

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.counters).get(key, default)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE, **dict(self.counters)}


@dataclass(frozen=True)
class ResultPart(Msg):
    TYPE: ClassVar[str] = "result_part"
    data: str = ""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(_str(body, "data", MAX_PART))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE, "data": self.data}


@dataclass(frozen=True)
class ResultEnd(Msg):
    TYPE: ClassVar[str] = "result_end"
    complete: bool = False

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Self:
        return cls(_bool(body, "complete", False))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.TYPE, "complete": self.complete}


def _table(*classes: type[Msg]) -> dict[str, type[Msg]]:
    return {c.TYPE: c for c in classes}


TO_AGENT = _table(Registered, RunStart, Flush, RunEnd, Ping, Tick, Error)
FROM_AGENT = _table(Register, RunReady, Flushed, RunDone, Pong, Error)
FROM_REQUESTER = _table(AgentsRequest, RunRequest, Cancel)
TO_REQUESTER = _table(AgentList, Progress, ResultPart, ResultEnd, Error)
# What the agent answers to each request of the coordinator's.
REPLY_TO = {"ping": "pong", "run_start": "run_ready", "flush": "flushed", "run_end": "run_done"}


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str | bytes) -> Any:
    """``json.loads`` for what a peer sent: no NaN, no Infinity, no number that overflows
    to one (``1e400``).

    Raises:
        ValueError: not JSON, one of those numbers, or nested beyond Python's recursion limit.
    """
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def parse(body: Mapping[str, Any], expected: Mapping[str, type[Msg]]) -> Msg:
    """The typed message for *body*, one of the *expected* types.

    Raises:
        MessageError: an unexpected type, or a field that is missing, of the wrong type,
            not finite, out of range or too large.
    """
    kind = body.get("type")
    if not isinstance(kind, str):
        raise MessageError("control message without a type")
    cls = expected.get(kind)
    if cls is None:
        raise MessageError(f"unexpected {kind[:40]!r} message")
    return cls.from_json(body)


def outgoing(msg: Msg | Mapping[str, Any], expected: Mapping[str, type[Msg]]) -> Msg:
    """*msg* as a typed message, validating a plain dict as the receiving side will."""
    if isinstance(msg, Msg):
        return msg
    return parse(msg, expected)


# -- the run document, as a requester receives it ----------------------------------------


def _doc_range(r: Any, where: str, verdicts: tuple[str, ...]) -> None:
    if not isinstance(r, dict):
        raise MessageError(f"malformed result: {where} is not an object")
    for key in ("dst_port", "first", "last"):
        v = r.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
            raise MessageError(f"malformed result: {where} has a bad {key!r}")
    if r["first"] > r["last"]:
        raise MessageError(f"malformed result: {where} ends before it starts")
    if r.get("verdict") not in verdicts:
        raise MessageError(f"malformed result: {where} has an unknown verdict")
    for key in ("sent", "received", "inferred", "icmp_limited"):
        v = r.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
            raise MessageError(f"malformed result: {where} has a bad {key!r}")
    if not isinstance(r.get("translated", False), bool):
        raise MessageError(f"malformed result: {where} has a bad 'translated'")


def check_document(doc: Any) -> dict[str, Any]:
    """*doc* if it is a run document the reports can render, else MessageError.

    Checks what a renderer or the exit status depends on: the schema, the run id, the
    ``complete`` flag, the summary counts, every range (ports, verdicts, counters) and the
    deviations; extra keys are left alone.
    """
    from udpreach.core.expect import VERDICTS  # no numpy: cheap for the CLI

    if not isinstance(doc, dict):
        raise MessageError("malformed result: not a JSON object")
    if doc.get("schema") != schema.RUN:
        raise MessageError("malformed result: not a udpreach/run-v1 document")
    if not isinstance(doc.get("run_id"), str) or not isinstance(doc.get("complete"), bool):
        raise MessageError("malformed result: no run id or completeness")
    summary = doc.get("summary")
    if not isinstance(summary, dict):
        raise MessageError("malformed result: no summary")
    for key in ("cells", *VERDICTS):
        v = summary.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
            raise MessageError(f"malformed result: summary has a bad {key!r}")
    for key in ("agent", "plan", "probe"):
        if not isinstance(doc.get(key, {}), dict):
            raise MessageError(f"malformed result: {key!r} is not an object")
    for key in ("ranges", "deviations"):
        ranges = doc.get(key, [] if key == "deviations" else None)
        if not isinstance(ranges, list):
            raise MessageError(f"malformed result: {key!r} is not a list")
        for i, r in enumerate(ranges):
            _doc_range(r, f"{key}[{i}]", VERDICTS)
    warnings = doc.get("warnings", [])
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        raise MessageError("malformed result: 'warnings' is not a list of strings")
    return doc
