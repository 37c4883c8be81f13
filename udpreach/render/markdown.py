"""The Markdown report: a summary ready to paste into a change ticket, of a run or of a diff.

Theory of operation: every value that came from the run (names, addresses, warnings, ICMP
details) is escaped for a table cell or put in a code span, so it cannot break the table
or inject markup. Range tables are folded to at most ``MAX_TABLE_ROWS`` rows
(``udpreach.render.fold``) and say so; commands go in fenced blocks, one per line, whole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from udpreach.core.diff import DIFF_SCHEMA
from udpreach.core.document import recommendations_of
from udpreach.core.expect import judgement_of
from udpreach.core.intervals import Range, n_cells
from udpreach.core.portspec import format_ports
from udpreach.render import facts
from udpreach.render.fold import Folded, fold

VERDICTS = facts.VERDICTS
MAX_TABLE_ROWS = 500
MAX_RULES = 100

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def _md(text: object) -> str:
    """Inline text safe inside a Markdown table cell."""
    return _MD_SPECIAL.sub(r"\\\1", facts.one_line(text))


def _code(text: object) -> str:
    """A Markdown code span (no escapes work inside one; a pipe still needs one in a table)."""
    flat = facts.one_line(text).replace("`", "'").replace("|", "\\|")
    return f"`{flat}`"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _folded_table(folded: Folded, header: Sequence[str], columns: str) -> list[str]:
    """A folded range list as a table; ``columns`` as in ``html._range_table``."""
    rows: list[list[object]] = []
    for row in folded.rows:
        cells: list[object] = [row.dst_port, facts.span(row.first, row.last), row.cells]
        for col in columns:
            if col == "v":
                cells.append(row.label)
            elif col == "e":
                cells.append(row.source.get("expected", "?") if row.source else "mixed")
            elif col == "b":
                if row.source is not None:
                    cells += [row.source["before"], row.source["after"]]
                else:
                    cells += ["mixed", "mixed"]
            elif col == "c":
                cells += [row.sent, row.received]
            elif col == "d":
                cells.append(_md("; ".join(facts.row_details(row))))
        rows.append(cells)
    out = _table(header, rows)
    note = facts.fold_note(folded)
    if note:
        out += ["", f"_{_md(note)}; the CSV or JSON export has them all._"]
    return out


def markdown_run(doc: dict[str, Any], *, diff: dict[str, Any] | None = None) -> str:
    """The Markdown report of a run document (see ``write_markdown``)."""
    s = doc.get("summary") or {}
    ranges = doc.get("ranges") or []
    sampled = facts.sampled(doc)
    c = facts.confidence(doc)
    status = "complete" if doc.get("complete") else "**incomplete**"
    out = [
        f"# udpreach run {_code(doc.get('run_id', '?'))}",
        "",
        *_table(
            ["", ""],
            [
                ["Agent", _md(facts.agent_text(doc))],
                ["Probe", _md((doc.get("probe") or {}).get("address", "?"))],
                [
                    "Started",
                    _md(facts.when(doc.get("started")))
                    + (
                        f" ({float(doc['duration']):.1f} s)"
                        if isinstance(doc.get("duration"), int | float)
                        else ""
                    ),
                ],
                ["Plan", _md(facts.plan_text(doc, sep=", "))],
                ["Result", status],
                ["Send mode", _md(facts.send_mode(doc))],
                ["udpreach", _md(facts.version(doc))],
            ],
        ),
        "",
        "## Summary",
        "",
        *_table(["cells", *VERDICTS], [[s.get("cells", 0), *(s.get(v, 0) for v in VERDICTS)]]),
    ]
    for extra in facts.summary_extras(doc):
        out += ["", _md(extra) + "."]
    confidence_rows = [
        ["Loss on the path", _md(c.loss_text)],
        ["Attempts", _md(c.attempts_text)],
        ["Chance that any 'blocked' cell is really open", _md(c.bound_text)],
        [
            "Confidence target reached",
            _md(c.reached_text) if c.reached else f"**{_md(c.reached_text)}**",
        ],
    ]
    if c.rate_text:
        confidence_rows.append(["Pacing", _md(c.rate_text)])
    mtu = facts.path_mtu(doc)
    if mtu:
        confidence_rows.append(["Path MTU", _md(mtu)])
    out += ["", "## Confidence", "", *_table(["", ""], confidence_rows)]
    warns = facts.warnings(doc)
    out += ["", "## Warnings", ""]
    out += [f"- {_md(w)}" for w in warns] if warns else ["None."]
    if "deviations" in doc:
        devs = doc.get("deviations") or []
        out += ["", "## Deviations from expectations", ""]
        judged = judgement_of(doc)
        problem = judged.get("problem") if judged is not None else None
        if judged is not None:
            out += [f"Expectations: {_md(facts.judged_text(judged, s.get('cells')))}.", ""]
            for u in judged["unmatched"]:
                text = _md(facts.unmatched_text(u))
                out.append(f"- **{text}**" if u.get("fails") else f"- {text}")
            if judged["unmatched"]:
                out.append("")
        if problem:
            out += [f"**Not as expected: {_md(facts.one_line(problem))}.**", ""]
        if not devs:
            if not problem:
                out.append("None: every judged cell is as expected.")
        else:
            n = sum(n_cells(r) for r in devs)
            out += [f"**{facts.cells(n)} deviate** in {facts.ranges(len(devs))}.", ""]
            out += _folded_table(
                fold(devs, MAX_TABLE_ROWS, sampled=sampled),
                ["dst port", "source ports", "cells", "verdict", "expected", "details"],
                "ved",
            )
    out += ["", "## Ranges", ""]
    out += _folded_table(
        fold(ranges, MAX_TABLE_ROWS, sampled=sampled),
        ["dst port", "source ports", "cells", "verdict", "sent", "received", "details"],
        "vcd",
    )
    if diff is not None:
        out += ["", f"## Changes since run {_code(diff.get('run_a', '?'))}", ""]
        out += _changes(diff)
    out += ["", "## Recommendations", ""]
    out += _recommendations(doc)
    return "\n".join(out) + "\n"


def _recommendations(doc: dict[str, Any]) -> list[str]:
    rec = recommendations_of(doc)
    fixed = rec.get("fixed_ports") or []
    out = [
        "- Fixed UDP port for clients (FixedUDPPortValue): "
        + (", ".join(str(p) for p in fixed) if fixed else f"none: {facts.no_fixed_port(doc)}")
        + ".",
    ]
    for note in rec.get("notes") or []:
        out.append(f"- Note: {_md(note)}.")
    rules = rec.get("rules") or []
    for rule in rules[:MAX_RULES]:
        out += [
            "",
            "To open "
            + _md(facts.source_ports_label(str(rule.get("src_ports", "")).replace(",", ", ")))
            + f" to destination port(s) {_md(format_ports(rule.get('dst_ports') or []))} "
            f"({facts.counted(int(rule.get('cells', 0) or 0), 'cell')}, "
            f"{'/'.join(rule.get('verdicts') or [])})"
            + (
                ", in the input chain of the host that rejected them"
                if rule.get("chain") == "input"
                else ""
            )
            + ":",
            "",
            "```sh",
            facts.one_line(rule.get("nft", "")),
            "# or, with iptables:",
            *(facts.one_line(cmd) for cmd in rule.get("iptables") or []),
            "```",
        ]
    if len(rules) > MAX_RULES:
        out += ["", f"... and {len(rules) - MAX_RULES} more rules (the JSON document has them)."]
    return out


def _changes(diff: dict[str, Any]) -> list[str]:
    changes = diff.get("changes") or []
    uncertain = diff.get("uncertain") or []
    out = []
    header = ["dst port", "source ports", "cells", "before", "after"]

    def table(rs: list[Range]) -> list[str]:
        folded = fold(rs, MAX_TABLE_ROWS, label=lambda r: f"{r['before']} -> {r['after']}",
                      wildcard=None)  # fmt: skip
        return _folded_table(folded, header, "b")

    if not changes:
        out.append(f"No verdict changed ({facts.cells(diff.get('compared', 0))} compared).")
    else:
        n = sum(n_cells(r) for r in changes)
        out += [
            f"**{n} cells changed verdict** in {len(changes)} ranges "
            f"({facts.cells(diff.get('compared', 0))} compared).",
            "",
        ]
        out += table(changes)
    if uncertain:
        u = sum(n_cells(r) for r in uncertain)
        out += [
            "",
            f"{u} cells moved between rejected and blocked cells that could not be told from "
            "rejected (ICMP was rate-limited): not counted as changes.",
            "",
            *table(uncertain),
        ]
    for key, which in (("only_a", diff.get("run_a")), ("only_b", diff.get("run_b"))):
        only = diff.get(key) or []
        if only:
            out += [
                "",
                f"Not compared: {facts.cells(sum(n_cells(r) for r in only))} planned only in run "
                f"{_code(which)}.",
            ]
    return out


def markdown_diff(diff: dict[str, Any]) -> str:
    """The Markdown report of a diff document."""
    out = [
        f"# udpreach diff {_code(diff.get('run_a', '?'))} → {_code(diff.get('run_b', '?'))}",
        "",
        *_changes(diff),
    ]
    return "\n".join(out) + "\n"


def write_markdown(
    doc: dict[str, Any], path: str | Path, *, diff: dict[str, Any] | None = None
) -> None:
    """Write a Markdown summary ready to paste into a change ticket.

    Args:
        doc: a run document (or a diff document: its changes).
        path: the file to write.
        diff: optionally, a diff against an earlier run, added as a section.
    """
    text = markdown_diff(doc) if doc.get("schema") == DIFF_SCHEMA else markdown_run(doc, diff=diff)
    Path(path).write_text(text, encoding="utf-8")
