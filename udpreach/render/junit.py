"""The JUnit XML report, for CI: a run judged against its expectations, or a diff.

Theory of operation: one test case per expectation entry (a case fails on the deviating
cells charged to that entry, i.e. those it owns after later entries' overrides; an entry for
another agent is skipped; one that judged no cell of this agent's run fails, as does a file
none of whose entries is for this agent), plus one case "run complete". With no
expectations (none given and none recorded in the document under ``expect``) it asserts the
tool's purpose instead: one case per destination port that fails when any tested source port
was blocked or rejected. JUnit needs the per-entry breakdown, so it is the one report that
judges anew (``expect.summarize_judgement``).

The suite's properties carry what the terminal report says about confidence (the loss
estimate, the false-blocked bound, whether the confidence target was reached), the send
mode, the warnings and udpreach's version; ``system-out`` says the same in words. Failure
texts list at most ``MAX_LINES`` ranges, folded (``udpreach.render.fold``).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from udpreach.core.diff import DIFF_SCHEMA
from udpreach.core.expect import ExpectEntry, entries_of, judgement, summarize_judgement
from udpreach.core.intervals import Range, n_cells, ranges_by_dst
from udpreach.core.portspec import short_spec
from udpreach.render import facts
from udpreach.render.fold import Row, fold

MAX_LINES = 100
NAME_SPEC = 60  # a port SPEC longer than this is summarised in a test case's name

_XML_BAD = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _x(text: object) -> str:
    """Text safe for XML 1.0 (characters it cannot carry become '?')."""
    return _XML_BAD.sub("?", str(text))


def _case(suite: ET.Element, classname: str, name: str) -> ET.Element:
    return ET.SubElement(suite, "testcase", classname=_x(classname), name=_x(name), time="0")


def _fail(case: ET.Element, message: str, lines: Sequence[str]) -> None:
    el = ET.SubElement(case, "failure", message=_x(message), type="deviation")
    el.text = _x("\n".join(lines))


def _skip(case: ET.Element, message: str) -> None:
    ET.SubElement(case, "skipped", message=_x(message))


def _ports_name(ports: Sequence[int]) -> str:
    """A port set for a test case's name: the SPEC, or a summary of a long one."""
    return short_spec(ports, NAME_SPEC)


def _lines(ranges: Sequence[Range], line: Callable[[Row], str], **how: Any) -> list[str]:
    """One line per range, folded to at most MAX_LINES, saying so."""
    folded = fold(ranges, MAX_LINES, **how)
    out = [line(row) for row in folded.rows]
    note = facts.fold_note(folded)
    if note:
        out.append(f"({note}; the CSV or JSON export has them all)")
    return out


def _where(row: Row) -> str:
    return f"dst {row.dst_port} src {facts.span(row.first, row.last)} ({row.cells} cells)"


def _verdict_line(row: Row, *, expected: bool = False) -> str:
    details = facts.row_details(row)
    text = f"{_where(row)}: {row.label}"
    if expected:
        exp = row.source.get("expected", "?") if row.source is not None else "mixed"
        text += f", expected {exp}"
    return text + (f" [{'; '.join(details)}]" if details else "")


def _finish_suite(root: ET.Element, suite: ET.Element) -> None:
    cases = suite.findall("testcase")
    failures = sum(1 for c in cases if c.find("failure") is not None)
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    for el in (root, suite):
        el.set("tests", str(len(cases)))
        el.set("failures", str(failures))
        el.set("errors", "0")
        el.set("skipped", str(skipped))


def _write_xml(root: ET.Element, path: str | Path) -> None:
    ET.indent(root)
    data = ET.tostring(root, encoding="unicode", xml_declaration=False)
    Path(path).write_text('<?xml version="1.0" encoding="UTF-8"?>\n' + data + "\n", "utf-8")


def _properties(suite: ET.Element, doc: dict[str, Any]) -> None:
    c = facts.confidence(doc)
    props = ET.SubElement(suite, "properties")
    values: list[tuple[str, object]] = [
        ("run_id", doc.get("run_id")),
        ("agent", (doc.get("agent") or {}).get("name", "?")),
        ("probe", (doc.get("probe") or {}).get("address")),
        ("plan", facts.plan_text(doc)),
        ("complete", "true" if doc.get("complete") else "false"),
        ("udpreach_version", facts.version(doc)),
        ("send_mode", facts.send_mode(doc)),
        *c.machine().items(),
    ]
    mtu = facts.path_mtu(doc)
    if mtu:
        values.append(("path_mtu", mtu))
    values += [("warning", w) for w in facts.warnings(doc)]
    for k, v in values:
        ET.SubElement(props, "property", name=k, value=_x(facts.one_line(v)))


def _system_out(suite: ET.Element, doc: dict[str, Any]) -> None:
    c = facts.confidence(doc)
    lines = [
        f"udpreach {facts.version(doc)}, send mode {facts.send_mode(doc)}",
        f"loss on the path: {c.loss_text}; {c.attempts_text}",
        f"chance that any 'blocked' cell is really open: {c.bound_text}",
        f"confidence target reached: {c.reached_text}",
    ]
    if c.rate_text:
        lines.append(c.rate_text)
    lines += facts.summary_extras(doc)
    lines += [f"warning: {w}" for w in facts.warnings(doc)]
    ET.SubElement(suite, "system-out").text = _x("\n".join(lines))


def write_junit(
    doc: dict[str, Any], entries: Sequence[ExpectEntry] | None, path: str | Path
) -> None:
    """Write a JUnit XML report of a run (or of a diff document; ``entries`` unused then).

    Args:
        doc: the run document.
        entries: the expectation entries; None or empty: those recorded in the document
            (key ``expect``), else the no-expectation form (see the module comment).
        path: the file to write.
    """
    if doc.get("schema") == DIFF_SCHEMA:
        write_junit_diff(doc, path)
        return
    if not entries:
        entries = entries_of(doc) or []
    agent = (doc.get("agent") or {}).get("name", "?")
    root = ET.Element("testsuites", name="udpreach")
    suite = ET.SubElement(
        root,
        "testsuite",
        name=_x(f"udpreach run {doc.get('run_id', '?')} agent {agent}"),
        time=str(float(doc.get("duration") or 0.0)),
    )
    if isinstance(doc.get("started"), int | float):
        suite.set(
            "timestamp", datetime.fromtimestamp(doc["started"], UTC).strftime("%Y-%m-%dT%H:%M:%S")
        )
    _properties(suite, doc)

    if entries:
        judged = judgement(doc, entries)
        reasons = {u["entry"]: u["reason"] for u in judged["unmatched"]}
        for res in summarize_judgement(doc, entries):
            e = res.entry
            name = (
                f"expect #{res.index + 1}"
                + (f" (line {e.line})" if e.line else "")
                + f": dst {_ports_name(e.dst_ports)} src {_ports_name(e.src_ports)} {e.verdict}"
                + (f" agent {e.agent}" if e.agent else "")
            )
            case = _case(suite, "udpreach.expect", name)
            if not res.applies:
                _skip(case, f"for agent {e.agent}, not {agent}")
            elif res.cells == 0:  # an expectation that checks nothing is no pass
                _fail(case, f"judged no cell: {reasons.get(res.index + 1, '?')}", [])
            elif res.deviations:
                _fail(
                    case,
                    f"{res.deviating_cells:,} of {facts.cells(res.cells)} deviate "
                    f"in {facts.ranges(len(res.deviations))}",
                    _lines(res.deviations, lambda row: _verdict_line(row, expected=True)),
                )
        if judged["problem"] and not any(u["fails"] for u in judged["unmatched"]):
            # No entry is for this run's agent: nothing above failed, yet nothing was judged.
            case = _case(suite, "udpreach.expect", "the expectations judge at least one cell")
            _fail(case, str(judged["problem"]), [])
    else:
        for d, rs in ranges_by_dst(doc.get("ranges") or []).items():
            case = _case(suite, "udpreach.reach", f"dst {d}: every tested source port open")
            bad = [r for r in rs if r["verdict"] in ("blocked", "rejected")]
            if bad:
                _fail(
                    case,
                    f"{sum(n_cells(r) for r in bad)} cells blocked or rejected",
                    _lines(bad, _verdict_line),
                )
    case = _case(suite, "udpreach.run", "run complete")
    if not doc.get("complete"):
        unknown = [r for r in doc.get("ranges") or [] if r["verdict"] == "unknown"]
        _fail(
            case,
            f"run incomplete: {sum(n_cells(r) for r in unknown)} cells unknown",
            _lines(unknown, lambda row: f"{_where(row)}: unknown", wildcard=None),
        )
    _system_out(suite, doc)
    _finish_suite(root, suite)
    _write_xml(root, path)


def write_junit_diff(diff: dict[str, Any], path: str | Path) -> None:
    """JUnit for a diff: one case per destination port compared, failing on any change.

    Cells listed as ``uncertain`` (a move that ICMP rate limits explain) do not fail a case;
    the suite's ``system-out`` counts them.
    """
    root = ET.Element("testsuites", name="udpreach")
    suite = ET.SubElement(
        root, "testsuite", name=_x(f"udpreach diff {diff.get('run_a')} -> {diff.get('run_b')}")
    )
    by_dst = ranges_by_dst(diff.get("changes") or [])

    def change(row: Row) -> str:
        src = row.source
        what = f"{src['before']} -> {src['after']}" if src is not None else row.label
        return f"{_where(row)}: {what}"

    for d in diff.get("dst_ports") or []:
        case = _case(suite, "udpreach.diff", f"dst {d}: no verdict changed")
        rs = by_dst.get(d, [])
        if rs:
            _fail(
                case,
                f"{sum(n_cells(r) for r in rs)} cells changed verdict",
                _lines(rs, change, label=lambda r: f"{r['before']} -> {r['after']}", wildcard=None),
            )
    if not diff.get("dst_ports"):
        _fail(_case(suite, "udpreach.diff", "runs share planned cells"), "nothing to compare", [])
    uncertain = diff.get("uncertain") or []
    if uncertain:
        n = sum(n_cells(r) for r in uncertain)
        ET.SubElement(suite, "system-out").text = _x(
            f"{n} cells moved between rejected and blocked cells that could not be told from "
            "rejected (ICMP was rate-limited): not counted as changes"
        )
    _finish_suite(root, suite)
    _write_xml(root, path)
