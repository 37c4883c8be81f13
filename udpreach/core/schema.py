"""The names users and pipelines rely on, defined once: verdicts and document schemas.

Every module that writes or reads a verdict or a document's ``"schema"`` takes it from here,
so a name can only change in one place (and, per the contract, only on purpose).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypedDict


class Verdict(StrEnum):
    """What a cell (destination port, source port) ends as."""

    OPEN = "open"
    BLOCKED = "blocked"
    REJECTED = "rejected"
    UNTESTED = "untested"
    UNKNOWN = "unknown"


#: The verdicts in the contract's order (reports list them so).
VERDICTS: tuple[str, ...] = tuple(v.value for v in Verdict)
#: What an expectation may ask for: a verdict, or ``closed`` (blocked or rejected).
EXPECTABLE: tuple[str, ...] = ("open", "blocked", "rejected", "closed")

RUN = "udpreach/run-v1"  # the run document (run --json, show --json, the store)
DIFF = "udpreach/diff-v1"  # diff --json
ERROR = "udpreach/error-v1"  # what a failing command prints with --json
HISTORY = "udpreach/history-v1"  # history --json
AGENTS = "udpreach/agents-v1"  # agents --json
KEYS = "udpreach/keys-v1"  # key list --json
KEYRING = "udpreach/keyring-v1"  # the keyring file
LAB_STATE = "udpreach/lab-v1"  # a lab's state file

#: How the warning of a limit that filled by time begins (``Sweep._scattered_warning``); the
#: ranges it names (``DST: FIRST-LAST``, comma-separated) follow, then ``": "``. The
#: recommendations read them off the document (``recommend``): no rule is given for them.
FILLED_WARNING = "delivery stopped by time, not by port range, in "


# -- the run document's shape (contract.md; extra keys may be added, these keep their meaning)


# "from" is a Python keyword: this one is spelt the functional way.
IcmpDetailsJson = TypedDict(
    "IcmpDetailsJson", {"type": int, "code": int, "from": str, "verified": bool}
)


class Observed(TypedDict):
    addresses: list[str]
    first_port: int
    last_port: int


class _RangeRequired(TypedDict):
    dst_port: int
    first: int
    last: int
    verdict: str  # one of VERDICTS
    translated: bool
    sent: int
    received: int


class Range(_RangeRequired, total=False):
    """One range of consecutive source ports of one destination port with one verdict."""

    icmp: IcmpDetailsJson  # rejected ranges
    inferred: int  # rejected or blocked: cells whose verdict rests on samples of the range
    icmp_limited: int  # blocked: silent only while an ICMP sender was rate-limiting
    reason: str  # untested ranges
    observed: Observed  # open ranges: where the agent saw them from
    expected: str  # in "deviations": what the expectation said


class Summary(TypedDict):
    cells: int
    open: int
    blocked: int
    rejected: int
    untested: int
    unknown: int


class _RunRequired(TypedDict):
    schema: str  # RUN
    version: str
    run_id: str
    complete: bool
    agent: dict[str, Any]
    probe: dict[str, Any]
    plan: dict[str, Any]
    summary: Summary
    ranges: list[Range]


class RunDocument(_RunRequired, total=False):
    """The run document, ``udpreach/run-v1``, as ``run --json`` prints it."""

    warnings: list[str]
    path_mtu: dict[str, Any]
    loss: dict[str, Any] | None
    recommendations: dict[str, Any]
    deviations: list[Range]
    expect: list[dict[str, Any]]
