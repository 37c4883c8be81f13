"""Expectations: parse the ``--expect`` TOML file, judge a run document against it, and
write an expectation file back from a stored run.

Theory of operation: a run document already describes its cells as ranges (one destination
port, a span of source ports, one verdict), so nothing here walks cells one by one. For
each destination port the applicable expectation entries are *painted* in file order onto
an interval list whose value is the index of the entry that owns each source-port span; a
later entry overwrites an earlier one on the spans they share (the contract's override
rule). Judging intersects that owner list with the document's ranges (two sorted interval
lists, one merge pass) and keeps the pieces whose verdict does not satisfy the owner's. A
piece cut out of a longer range gets its share of the range's counters (``sent``,
``received``, ``inferred``, ``icmp_limited``), apportioned so that the pieces of one range
add up to the range's totals.

An entry's verdict is ``open``, ``blocked``, ``rejected`` or ``closed``; ``closed`` is
satisfied by ``blocked`` and ``rejected`` alike (real paths rate-limit ICMP errors, so
which of the two a silent cell is may be beyond a run's budget). Every judged cell belongs
to exactly one entry (the last one covering it), so per-entry results (JUnit) partition the
deviations: an entry is charged only for the cells it owns after overrides. A judged cell
whose verdict is ``untested`` or ``unknown`` satisfies no expectation and is therefore a
deviation (fail closed: what was not measured is not confirmed).

An entry that judges no cell is itself a finding (``judgement``): a mistyped agent name,
destination ports the run did not plan, or an expectation from one ``random:N`` run used on
another (the two samples hardly overlap) would otherwise pass as "no deviations" while
checking nothing. An entry for this run's agent (or any agent) that judged no cell, or a
file that judged no cell at all, makes the run "not as expected"; an entry naming another
agent is listed but fails nothing (one file may serve several agents).

``expect_from`` writes the file back from a run with ``tomli_w``. Where the run's closed
verdicts rest on rate-limited ICMP, a rerun of the same policy can settle them the other
way (a range rejected from samples can come out ``blocked`` with ``icmp_limited`` cells when
the budget runs short): a ``blocked`` range with ``icmp_limited`` cells and a ``rejected``
range with ``inferred`` cells are written as ``closed``, so that the baseline does not fail
the next run of an unchanged path. A reject every cell of which was observed stays
``rejected``.
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from udpreach.core import schema
from udpreach.core.errors import ConfigError, PortSpecError
from udpreach.core.intervals import (
    COUNTERS,
    Interval,
    Range,
    cells_of,
    cut_range,
    freeze,
    is_sampled,
    merge_ranges,
    planned_intervals,
    ranges_by_dst,
    spec_of,
    subtract,
    summarize,
    union,
)
from udpreach.core.ledger import VERDICTS
from udpreach.core.portspec import format_ports, parse_ports, ranges_of, short_spec

__all__ = [
    "CLOSED",
    "EXPECTABLE",
    "VERDICTS",
    "EntryResult",
    "ExpectEntry",
    "entries_of",
    "expect_from",
    "judge",
    "judged_cells",
    "judgement",
    "judgement_of",
    # The range algebra lives in udpreach.core.intervals; the store still imports these
    # five from here.
    "merge_ranges",
    "parse_expect",
    "planned_intervals",
    "satisfies",
    "subtract",
    "summarize",
    "summarize_judgement",
    "union",
    "with_judgement",
]

CLOSED = ("blocked", "rejected")
EXPECTABLE = schema.EXPECTABLE
ENTRY_KEYS = ("agent", "dst_ports", "src_ports", "verdict")
REQUIRED_KEYS = ("dst_ports", "src_ports", "verdict")


def satisfies(verdict: str, expected: str) -> bool:
    """Whether a cell's verdict meets an expectation (``closed``: blocked or rejected)."""
    return verdict == expected or (expected == "closed" and verdict in CLOSED)


# ---------------------------------------------------------------------------------------
# Expectation entries and the TOML file.


@dataclass(frozen=True, repr=False)
class ExpectEntry:
    """One ``[[expect]]`` table: these cells (of this agent, or any) should have ``verdict``.

    ``line`` is the 1-based line of the table in its file (0 when unknown), for messages.
    """

    agent: str | None
    dst_ports: tuple[int, ...]
    src_ports: tuple[int, ...]
    verdict: str
    line: int = 0

    def __repr__(self) -> str:
        return (
            f"ExpectEntry(agent={self.agent!r}, dst_ports={format_ports(self.dst_ports)!r}, "
            f"src_ports={format_ports(self.src_ports)!r}, verdict={self.verdict!r}, "
            f"line={self.line})"
        )

    def to_json(self) -> dict[str, Any]:
        """A compact JSON form (port sets as SPECs), e.g. for the control channel."""
        return {
            "agent": self.agent,
            "dst_ports": format_ports(self.dst_ports),
            "src_ports": format_ports(self.src_ports),
            "verdict": self.verdict,
            "line": self.line,
        }

    @classmethod
    def from_json(cls, obj: Any) -> ExpectEntry:
        """The inverse of ``to_json``; validates everything (the peer may be hostile).

        Raises:
            ConfigError: a missing or malformed field.
        """
        if not isinstance(obj, dict):
            raise ConfigError("expectation entry: not an object")
        agent = obj.get("agent")
        line = obj.get("line", 0)
        if agent is not None and not isinstance(agent, str):
            raise ConfigError("expectation entry: 'agent' must be a string")
        if not isinstance(line, int) or isinstance(line, bool) or line < 0:
            raise ConfigError("expectation entry: 'line' must be a non-negative integer")
        try:
            dst, src, verdict = _check_entry_values(obj)
        except _EntryProblem as exc:
            raise ConfigError(f"expectation entry: {exc}") from None
        return cls(agent=agent, dst_ports=dst, src_ports=src, verdict=verdict, line=line)


class _EntryProblem(Exception):
    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _check_entry_values(table: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    ports: dict[str, tuple[int, ...]] = {}
    for key in ("dst_ports", "src_ports"):
        value = table.get(key)
        if value is None:
            raise _EntryProblem(f"missing key {key!r}", key)
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise _EntryProblem(f'{key!r} must be a port SPEC string such as "5000"', key)
        try:
            ports[key] = parse_ports(str(value))
        except PortSpecError as exc:
            raise _EntryProblem(f"{key}: {exc}", key) from None
    verdict = table.get("verdict")
    if verdict is None:
        raise _EntryProblem("missing key 'verdict'", "verdict")
    if verdict not in EXPECTABLE:
        raise _EntryProblem(f"verdict {verdict!r} is not one of {', '.join(EXPECTABLE)}", "verdict")
    return ports["dst_ports"], ports["src_ports"], str(verdict)


_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")
_HEADER = re.compile(r"^\s*\[\[\s*(?:expect|\"expect\"|'expect')\s*\]\]")
_ANY_HEADER = re.compile(r"^\s*\[")


def parse_expect(text: str, source: str = "<expect>") -> list[ExpectEntry]:
    """Parse an expectation file (contract: ``[[expect]]`` tables).

    Args:
        text: the file's content.
        source: the file name, for messages.

    Returns:
        The entries in file order (later entries override earlier ones).

    Raises:
        ConfigError: one line, ``FILE:LINE: problem``, for a TOML syntax error, an unknown
            or missing key, a bad verdict, a bad port SPEC, or a file with no entries.
    """
    lines = text.splitlines()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        line = len(lines) or 1
        m = _TOML_POS.search(msg)
        if m:
            line = int(m.group(1))
            msg = _TOML_POS.sub(f" (column {m.group(2)})", msg)
        else:
            msg = _TOML_END.sub(" (at end of file)", msg)
        raise ConfigError(f"{source}:{line}: invalid TOML: {msg}") from None

    for key in data:
        if key != "expect":
            header = re.compile(r"^\s*\[\[?\s*[\"']?" + re.escape(key) + r"[\"']?\s*[\].]")
            line = _find_key_line(lines, 0, len(lines), key) or next(
                (n + 1 for n, s in enumerate(lines) if header.match(s)), 1
            )
            raise ConfigError(
                f"{source}:{line}: unknown top-level key {key!r} (want [[expect]] tables)"
            )
    tables = data.get("expect")
    if tables is None:
        raise ConfigError(f"{source}:1: no [[expect]] entries (an empty file judges nothing)")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        line = _find_key_line(lines, 0, len(lines), "expect") or 1
        raise ConfigError(f"{source}:{line}: 'expect' must be an array of tables ([[expect]])")
    if not tables:
        raise ConfigError(f"{source}:1: no [[expect]] entries (an empty file judges nothing)")

    spans = _table_spans(lines)
    inline_line = _find_key_line(lines, 0, len(lines), "expect") or 1
    entries: list[ExpectEntry] = []
    for i, table in enumerate(tables):
        if i < len(spans):
            start, end = spans[i]
            table_line = start + 1
        else:  # written as an inline array: `expect = [{...}]`
            start, end, table_line = 0, 0, inline_line

        def fail(
            msg: str,
            key: str | None,
            start: int = start,
            end: int = end,
            table_line: int = table_line,
            i: int = i,
        ) -> ConfigError:
            line = _find_key_line(lines, start, end, key) or table_line
            return ConfigError(f"{source}:{line}: [[expect]] #{i + 1}: {msg}")

        for key in table:
            if key not in ENTRY_KEYS:
                raise fail(f"unknown key {key!r} (allowed: {', '.join(ENTRY_KEYS)})", key)
        agent = table.get("agent")
        if agent is not None and (not isinstance(agent, str) or not agent):
            raise fail("'agent' must be a non-empty string", "agent")
        try:
            dst, src, verdict = _check_entry_values(table)
        except _EntryProblem as exc:
            # A missing key has no line of its own: point at the table.
            bad_key = exc.key if exc.key in table else None
            raise fail(str(exc), bad_key) from None
        entries.append(ExpectEntry(agent, dst, src, verdict, table_line))
    return entries


def _table_spans(lines: list[str]) -> list[tuple[int, int]]:
    """(start, end) line indexes of each ``[[expect]]`` table, in order."""
    starts = [i for i, s in enumerate(lines) if _HEADER.match(s)]
    spans = []
    for n, s in enumerate(starts):
        end = len(lines)
        for j in range(s + 1, starts[n + 1] if n + 1 < len(starts) else len(lines)):
            if _ANY_HEADER.match(lines[j]):
                end = j
                break
        spans.append((s, end))
    return spans


def _find_key_line(lines: list[str], start: int, end: int, key: str | None) -> int | None:
    if key is None:
        return None
    pat = re.compile(r"^\s*(?:" + re.escape(key) + r"|\"" + re.escape(key) + r"\")\s*=")
    for i in range(start, end):
        if pat.match(lines[i]):
            return i + 1
    return None


# ---------------------------------------------------------------------------------------
# Judging.


def _applicable(doc: dict[str, Any], entries: Sequence[ExpectEntry]) -> list[int]:
    name = (doc.get("agent") or {}).get("name")
    return [i for i, e in enumerate(entries) if e.agent is None or e.agent == name]


def _paint(
    owners: list[tuple[int, int, int]], new: Sequence[Interval], idx: int
) -> list[tuple[int, int, int]]:
    """Overwrite ``owners`` with entry ``idx`` on the intervals ``new``."""
    kept: list[tuple[int, int, int]] = []
    for o in sorted({o for _, _, o in owners}):
        mine = [(a, b) for a, b, x in owners if x == o]
        kept.extend((a, b, o) for a, b in subtract(mine, new))
    kept.extend((a, b, idx) for a, b in new)
    kept.sort()
    return kept


def _owners_by_dst(
    doc: dict[str, Any], entries: Sequence[ExpectEntry], dsts: Iterable[int]
) -> dict[int, list[tuple[int, int, int]]]:
    """Per destination port, the source-port spans owned by each applicable entry."""
    app = _applicable(doc, entries)
    src_iv = {i: ranges_of(entries[i].src_ports) for i in app}
    dst_sets = {i: frozenset(entries[i].dst_ports) for i in app}
    out: dict[int, list[tuple[int, int, int]]] = {}
    for d in dsts:
        owners: list[tuple[int, int, int]] = []
        for i in app:
            if d in dst_sets[i]:
                owners = _paint(owners, src_iv[i], i)
        if owners:
            out[d] = owners
    return out


def _judged_pieces(
    doc: dict[str, Any], entries: Sequence[ExpectEntry]
) -> Iterator[tuple[Range, int, int, int]]:
    """Every judged piece of the document: (doc range, first, last, owning entry index)."""
    by_dst = ranges_by_dst(doc.get("ranges", []))
    owners_by_dst = _owners_by_dst(doc, entries, by_dst)
    for d, owners in owners_by_dst.items():
        rs = by_dst[d]
        i = j = 0
        while i < len(rs) and j < len(owners):
            r = rs[i]
            rf, rl = int(r["first"]), int(r["last"])
            of, ol, idx = owners[j]
            a, b = max(rf, of), min(rl, ol)
            if a <= b:
                yield r, a, b, idx
            if rl < ol:
                i += 1
            else:
                j += 1


def _deviation(r: Range, first: int, last: int, expected: str) -> Range:
    out: Range = {
        "dst_port": r["dst_port"],
        "first": first,
        "last": last,
        "verdict": r["verdict"],
        "expected": expected,
    }
    whole = first == r["first"] and last == r["last"]
    for k in ("translated", *COUNTERS, "icmp", "reason"):
        if k in r:
            out[k] = r[k]
    if not whole:
        piece = cut_range(r, first, last)
        for k in COUNTERS:
            if k in piece:
                out[k] = piece[k]
    return out


def _collect(out: list[Range], keys: list[object], dev: Range) -> None:
    """Append a deviation found in (dst_port, first) order, merging it into its neighbour."""
    icmp = dev.get("icmp")
    key = (
        dev["dst_port"],
        dev["verdict"],
        dev["expected"],
        dev.get("translated"),
        freeze(icmp) if icmp is not None else None,
        dev.get("reason"),
    )
    if out and keys[-1] == key and out[-1]["last"] + 1 == dev["first"]:
        prev = out[-1]
        prev["last"] = dev["last"]
        for k in COUNTERS:
            if k in prev and k in dev:
                prev[k] += dev[k]
    else:
        out.append(dev)
        keys.append(key)


def judge(doc: dict[str, Any], entries: Sequence[ExpectEntry]) -> list[Range]:
    """The deviations of a run document from the expectations.

    Entries for another agent are ignored; a later entry overrides an earlier one on shared
    cells; cells that no entry covers (or that were not planned) are not judged.

    Returns:
        Ranges in the document's form, each with ``expected`` beside ``verdict`` (a cell
        expected ``closed`` deviates only when it is neither blocked nor rejected), maximal
        and sorted by (dst_port, first). Empty when everything judged is as expected.
    """
    verdicts = [e.verdict for e in entries]
    out: list[Range] = []
    keys: list[object] = []
    for r, a, b, idx in _judged_pieces(doc, entries):
        if not satisfies(str(r["verdict"]), verdicts[idx]):
            _collect(out, keys, _deviation(r, a, b, verdicts[idx]))
    return out


@dataclass
class EntryResult:
    """How one expectation entry fared.

    ``cells`` counts the planned cells this entry judged, i.e. those it owns after later
    entries took their share; ``deviations`` are the deviating ranges among them.
    ``applies`` is false for an entry naming another agent.
    """

    entry: ExpectEntry
    index: int
    applies: bool
    cells: int = 0
    deviations: list[Range] = field(default_factory=list)

    @property
    def deviating_cells(self) -> int:
        """Number of deviating cells charged to this entry."""
        return sum(int(r["last"]) - int(r["first"]) + 1 for r in self.deviations)

    @property
    def passed(self) -> bool:
        """True when the entry applies, judged at least one cell, and none deviates."""
        return self.applies and self.cells > 0 and not self.deviations


def summarize_judgement(doc: dict[str, Any], entries: Sequence[ExpectEntry]) -> list[EntryResult]:
    """Per entry (in file order), the cells it judged and the deviations among them.

    Precedence: a cell is charged to the last entry that covers it (the one whose verdict
    is applied), so the entries' deviations partition ``judge(doc, entries)``.
    """
    app = set(_applicable(doc, entries))
    results = [EntryResult(e, i, i in app) for i, e in enumerate(entries)]
    keys: dict[int, list[object]] = defaultdict(list)
    for r, a, b, idx in _judged_pieces(doc, entries):
        results[idx].cells += b - a + 1
        if not satisfies(str(r["verdict"]), entries[idx].verdict):
            _collect(results[idx].deviations, keys[idx], _deviation(r, a, b, entries[idx].verdict))
    return results


def judged_cells(doc: dict[str, Any], entries: Sequence[ExpectEntry]) -> int:
    """Number of planned cells that the entries judge."""
    return sum(b - a + 1 for _, a, b, _ in _judged_pieces(doc, entries))


def entry_label(entry: ExpectEntry, index: int, what: str = "") -> str:
    """``#2 (line 7)``, ``#2 (line 7: what)``: how messages name an entry (``index`` is
    0-based)."""
    line = f"line {entry.line}" if entry.line else ""
    inside = f"{line}: {what}" if line and what else line or what
    return f"#{index + 1}" + (f" ({inside})" if inside else "")


def entry_text(entry: ExpectEntry) -> str:
    """``dst 5000 src 1024-65535 open, agent pc-71``: what an entry asks, in short."""
    text = f"dst {short_spec(entry.dst_ports)} src {short_spec(entry.src_ports)} {entry.verdict}"
    return text + (f", agent {entry.agent}" if entry.agent else "")


def _why_no_cell(doc: dict[str, Any], res: EntryResult, planned: dict[int, list[Interval]]) -> str:
    """Why an entry judged no cell of the document, in words."""
    e = res.entry
    if not res.applies:
        return f"it is for agent {e.agent}, and this run's agent is {_agent_name(doc)}"
    dsts = [d for d in e.dst_ports if d in planned]
    if not dsts:
        return f"none of its destination ports was planned (the run's: {short_spec(planned)})"
    src = ranges_of(e.src_ports)
    if all(subtract(src, planned[d]) == src for d in dsts):
        spans = union(iv for d in dsts for iv in planned[d])
        if is_sampled(spans):
            return (
                f"none of its source ports was among the {cells_of(spans):,} the run "
                "sampled (two random:N samples hardly overlap: an expectation from one "
                "judges little or nothing of another)"
            )
        return f"none of its source ports was planned (the run's: {spec_of(spans)})"
    return "later entries override every one of its cells"


def _agent_name(doc: dict[str, Any]) -> str:
    return str((doc.get("agent") or {}).get("name", "?"))


def judgement(doc: dict[str, Any], entries: Sequence[ExpectEntry]) -> dict[str, Any]:
    """What the expectations made of a run: the document's ``judgement`` key.

    Returns:
        ``cells`` (judged), ``deviating`` (cells), ``entries`` (per entry, in file order:
        ``entry`` (1-based), ``line``, ``agent``, ``dst_ports``, ``src_ports``, ``verdict``,
        ``applies``, ``cells``, ``deviating``), ``unmatched`` (each entry that judged no
        cell: ``entry``, ``line``, ``reason``, and ``fails``: false only for an entry naming
        another agent), ``problem`` (one line when an entry, or the whole file, judged no
        cell in a way that fails, else None) and ``as_expected`` (no deviation and no
        problem).
    """
    results = summarize_judgement(doc, entries)
    planned = {
        d: union((int(r["first"]), int(r["last"])) for r in rs)
        for d, rs in ranges_by_dst(doc.get("ranges", [])).items()
    }
    listed: list[dict[str, Any]] = []
    unmatched: list[dict[str, Any]] = []
    for res in results:
        e = res.entry
        listed.append(
            {
                "entry": res.index + 1,
                "line": e.line,
                "agent": e.agent,
                "dst_ports": format_ports(e.dst_ports),
                "src_ports": format_ports(e.src_ports),
                "verdict": e.verdict,
                "applies": res.applies,
                "cells": res.cells,
                "deviating": res.deviating_cells,
            }
        )
        if res.cells == 0:
            unmatched.append(
                {
                    "entry": res.index + 1,
                    "line": e.line,
                    "reason": _why_no_cell(doc, res, planned),
                    "fails": res.applies,
                }
            )
    cells = sum(res.cells for res in results)
    failing = [u for u in unmatched if u["fails"]]
    problem: str | None = None
    if len(failing) == 1:
        (u,) = failing
        e = entries[u["entry"] - 1]
        problem = (
            f"expectation entry {entry_label(e, u['entry'] - 1, entry_text(e))} judged no "
            f"cell: {u['reason']}"
        )
    elif failing:
        labels = ", ".join(entry_label(entries[u["entry"] - 1], u["entry"] - 1) for u in failing)
        problem = f"{len(failing)} expectation entries judged no cell: {labels}"
    elif cells == 0:
        others = sorted({str(e.agent) for e in entries if e.agent is not None})
        problem = (
            f"the expectations judged no cell: every entry names another agent "
            f"({', '.join(others)}), and this run's agent is {_agent_name(doc)}"
        )
    deviating = sum(res.deviating_cells for res in results)
    return {
        "cells": cells,
        "deviating": deviating,
        "entries": listed,
        "unmatched": unmatched,
        "problem": problem,
        "as_expected": problem is None and deviating == 0,
    }


def judgement_of(doc: dict[str, Any]) -> dict[str, Any] | None:
    """A document's ``judgement``: its own, or made from the entries it records under
    ``expect`` (the coordinator records them; the judgement is read off them). None when
    the run was not judged."""
    own = doc.get("judgement")
    if (
        isinstance(own, dict)
        and isinstance(own.get("cells"), int)
        and isinstance(own.get("unmatched"), list)
        and isinstance(own.get("as_expected"), bool)
    ):
        return own
    try:
        entries = entries_of(doc)
    except ConfigError:
        return None
    return judgement(doc, entries) if entries else None


def with_judgement(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with its ``judgement`` key, when it was judged (the same dict)."""
    found = judgement_of(doc)
    if found is not None:
        doc["judgement"] = found
    return doc


# ---------------------------------------------------------------------------------------
# An expectation file from a stored run.


def _comment(s: object) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in str(s))


def expect_from(doc: dict[str, Any]) -> str:
    """An expectation file (TOML, contract form) that the run itself satisfies exactly.

    Cells whose verdict was ``untested`` or ``unknown`` are left out (not judged); a
    ``blocked`` range with ``icmp_limited`` cells and a ``rejected`` range with ``inferred``
    cells are expected ``closed`` (see the module's text). Per
    destination port the majority verdict becomes a default entry over all of that port's
    judgeable source ports; destination ports with the same source-port set and default
    share one entry; the minority verdicts follow as overriding entries, again with
    destination ports that share a pattern grouped into one entry. No ``agent`` key is
    written: the file then judges whichever agent it is used against.

    Raises:
        ConfigError: the run has no judgeable cell (an empty file would judge nothing).
    """
    by_verdict: dict[int, dict[str, list[Interval]]] = {}
    for d, rs in ranges_by_dst(doc.get("ranges", [])).items():
        per: dict[str, list[Interval]] = defaultdict(list)
        for r in rs:
            verdict = str(r["verdict"])
            if verdict == "blocked" and int(r.get("icmp_limited") or 0) > 0:
                verdict = "closed"  # the run could not tell dropped from rejected here
            elif verdict == "rejected" and int(r.get("inferred") or 0) > 0:
                verdict = "closed"  # rejected from samples: a rerun may run out of budget
            if verdict in EXPECTABLE:
                per[verdict].append((int(r["first"]), int(r["last"])))
        if per:
            by_verdict[d] = {v: union(ivs) for v, ivs in per.items()}

    if not by_verdict:
        raise ConfigError(
            f"run {doc.get('run_id', '?')} has no open, blocked or rejected cell to expect"
        )
    overall: Counter[str] = Counter()
    for per in by_verdict.values():
        for v, ivs in per.items():
            overall[v] += cells_of(ivs)
    rank = {v: (overall[v], -EXPECTABLE.index(v)) for v in EXPECTABLE}

    defaults: dict[tuple[str, tuple[Interval, ...]], list[int]] = defaultdict(list)
    overrides: dict[tuple[str, tuple[Interval, ...]], list[int]] = defaultdict(list)
    for d, per in by_verdict.items():
        major = max(per, key=lambda v: (cells_of(per[v]), rank[v]))
        cover = union(iv for ivs in per.values() for iv in ivs)
        defaults[(major, tuple(cover))].append(d)
        for v in EXPECTABLE:
            if v != major and v in per:
                overrides[(v, tuple(per[v]))].append(d)

    agent = doc.get("agent") or {}
    plan = doc.get("plan") or {}
    judged = sum(overall.values())
    cells = int((doc.get("summary") or {}).get("cells", judged))
    out = [
        f"# udpreach expectations from run {_comment(doc.get('run_id', '?'))}",
        f"# agent {_comment(agent.get('name', '?'))} "
        f"({_comment(agent.get('observed') or agent.get('registered') or '?')}), "
        f"probe {_comment((doc.get('probe') or {}).get('address', '?'))}",
        f"# plan: src_ports {_comment(plan.get('src_ports', '?'))}, "
        f"dst_ports {_comment(format_ports(int(p) for p in plan.get('dst_ports', [])))}",
        f"# {judged} cell{'' if judged == 1 else 's'} judged; {cells - judged} untested or "
        "unknown left out",
        "# A later entry overrides an earlier one on the cells they share.",
    ]
    for group in (defaults, overrides):
        for (verdict, spans), dsts in sorted(
            group.items(), key=lambda kv: (kv[1][0], EXPECTABLE.index(kv[0][0]))
        ):
            entry = {
                "dst_ports": format_ports(dsts),
                "src_ports": spec_of(spans),
                "verdict": verdict,
            }
            note = " (blocked or rejected: ICMP was rate-limited)" if verdict == "closed" else ""
            n = cells_of(spans) * len(dsts)
            out += [
                "",
                f"# {n} cell{'' if n == 1 else 's'}{note}",
                "[[expect]]",
                tomli_w.dumps(entry).rstrip("\n"),
            ]
    return "\n".join(out) + "\n"


def entries_of(doc: dict[str, Any]) -> list[ExpectEntry] | None:
    """The expectation entries recorded in a document (key ``expect``), if any."""
    raw = doc.get("expect")
    if not isinstance(raw, list):
        return None
    return [ExpectEntry.from_json(e) for e in raw]
