"""Reports for people and pipelines: JUnit, Markdown, CSV and HTML, of a run or of a diff
between two runs; and the diff itself.

Theory of operation: every writer takes a document that is already final (a run document,
schema ``udpreach/run-v1``, or a diff document, ``udpreach/diff-v1``) and renders it; the
writers dispatch on the ``schema`` key, so ``write_markdown(diff_doc, path)`` works like
``write_markdown_diff``. Nothing here measures or judges anew except JUnit, which needs the
per-entry breakdown (``expect.summarize_judgement``).

Decisions a reader of the reports should know:

* ``diff_runs`` compares only the cells planned in both runs. Cells planned in one run only
  are not changes (a ``random:N`` sweep would otherwise "change" every cell it skipped); they
  are listed apart, as ``only_a``/``only_b`` ranges, and ``compared`` counts the cells
  actually compared. A change is a change of verdict, ``unknown`` included.
* JUnit has one test case per expectation entry (a case fails on the deviating cells charged
  to that entry, i.e. those it owns after later entries' overrides; an entry for another
  agent or covering no planned cell is skipped), plus one case "run complete". With no
  expectations (none given and none recorded in the document under ``expect``) it asserts
  the tool's purpose instead: one case per destination port that fails when any tested
  source port was blocked or rejected.
* The HTML page is self-contained (inline CSS, no script, no external asset). Its heat map
  has one row per destination port and up to 64 columns of source-port buckets (1008 ports
  each for the default 1024-65535). A bucket's colour shows its verdict mix as stacked bands
  (every verdict present gets at least a fifth of the height, so a single blocked port in a
  thousand still shows); the tooltip has the exact counts.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from udpreach.core.errors import ConfigError
from udpreach.core.expect import (
    VERDICTS,
    ExpectEntry,
    Interval,
    Range,
    entries_of,
    ranges_by_dst,
    subtract,
    summarize_judgement,
    union,
)
from udpreach.core.portspec import format_ports
from udpreach.core.recommend import recommend

DIFF_SCHEMA = "udpreach/diff-v1"
RUN_SCHEMA = "udpreach/run-v1"

COLOURS = {
    "open": "#1a9850",
    "blocked": "#d73027",
    "rejected": "#f46d43",
    "untested": "#7f7f7f",
    "unknown": "#c4c4c4",
}
VERDICT_TEXT = {
    "open": "open: at least one datagram arrived",
    "blocked": "blocked: nothing arrived, no ICMP error",
    "rejected": "rejected: an ICMP error came back",
    "untested": "untested: the probe could not send from that port",
    "unknown": "unknown: the run ended before the cell was settled",
}
MAX_BUCKETS = 64
MIN_BAND = 0.2
MAX_TABLE_ROWS = 500

# ---------------------------------------------------------------------------------------
# The diff.


def diff_runs(doc_a: dict[str, Any], doc_b: dict[str, Any]) -> dict[str, Any]:
    """The contract's diff document: the cells whose verdict changed from A to B.

    Returns:
        ``{"schema": "udpreach/diff-v1", "run_a", "run_b", "changes": [{"dst_port",
        "first", "last", "before", "after"}], "compared", "compared_ranges", "dst_ports",
        "only_a", "only_b"}``; changes are maximal ranges sorted by (dst_port, first).
        Only the cells planned in both runs are compared (``compared`` counts them,
        ``compared_ranges`` lists them, ``dst_ports`` names their destination ports); the
        others are listed in ``only_a`` and ``only_b``. Those three lists hold ranges
        ``{"dst_port", "first", "last"}``.
    """
    by_a = ranges_by_dst(doc_a.get("ranges", []))
    by_b = ranges_by_dst(doc_b.get("ranges", []))
    changes: list[Range] = []
    only_a: list[Range] = []
    only_b: list[Range] = []
    shared: list[Range] = []
    compared = 0
    both: list[int] = []
    for d in sorted(set(by_a) | set(by_b)):
        ra, rb = by_a.get(d, []), by_b.get(d, [])
        ia = union((int(r["first"]), int(r["last"])) for r in ra)
        ib = union((int(r["first"]), int(r["last"])) for r in rb)
        a_only = subtract(ia, ib)
        only_a += [{"dst_port": d, "first": a, "last": b} for a, b in a_only]
        only_b += [{"dst_port": d, "first": a, "last": b} for a, b in subtract(ib, ia)]
        shared += [{"dst_port": d, "first": a, "last": b} for a, b in subtract(ia, a_only)]
        i = j = 0
        seen = False
        while i < len(ra) and j < len(rb):
            x, y = ra[i], rb[j]
            lo, hi = max(int(x["first"]), int(y["first"])), min(int(x["last"]), int(y["last"]))
            if lo <= hi:
                seen = True
                compared += hi - lo + 1
                if x["verdict"] != y["verdict"]:
                    _append_change(changes, d, lo, hi, str(x["verdict"]), str(y["verdict"]))
            if int(x["last"]) < int(y["last"]):
                i += 1
            else:
                j += 1
        if seen:
            both.append(d)
    return {
        "schema": DIFF_SCHEMA,
        "run_a": doc_a.get("run_id"),
        "run_b": doc_b.get("run_id"),
        "changes": changes,
        "compared": compared,
        "compared_ranges": shared,
        "dst_ports": both,
        "only_a": only_a,
        "only_b": only_b,
    }


def _append_change(out: list[Range], d: int, lo: int, hi: int, before: str, after: str) -> None:
    if out:
        p = out[-1]
        if (p["dst_port"], p["before"], p["after"]) == (d, before, after) and p["last"] + 1 == lo:
            p["last"] = hi
            return
    out.append({"dst_port": d, "first": lo, "last": hi, "before": before, "after": after})


def _is_diff(doc: dict[str, Any]) -> bool:
    return doc.get("schema") == DIFF_SCHEMA


# ---------------------------------------------------------------------------------------
# Small formatting helpers.


def _cells(r: Range) -> int:
    return int(r["last"]) - int(r["first"]) + 1


def _span(r: Range) -> str:
    return str(r["first"]) if r["first"] == r["last"] else f"{r['first']}-{r['last']}"


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "?"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _details(r: Range) -> str:
    parts = []
    if r.get("translated"):
        parts.append("source port translated (NAT)")
    icmp = r.get("icmp")
    if isinstance(icmp, dict):
        parts.append(
            f"ICMP type {icmp.get('type')} code {icmp.get('code')} from {icmp.get('from')}"
        )
    if r.get("reason"):
        parts.append(str(r["reason"]))
    return "; ".join(parts)


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _plan_text(doc: dict[str, Any]) -> str:
    plan = doc.get("plan") or {}
    dsts = format_ports(int(p) for p in plan.get("dst_ports", []))
    return (
        f"source ports {plan.get('src_ports', '?')} to destination ports {dsts or '?'}; "
        f"{plan.get('copies', '?')} copies, {plan.get('rate', '?')} datagrams/s, "
        f"{plan.get('size', '?')} bytes"
    )


def _agent_text(doc: dict[str, Any]) -> str:
    a = doc.get("agent") or {}
    ports = format_ports(int(p) for p in a.get("ports", []) if isinstance(p, int))
    text = f"{a.get('name', '?')} (registered {a.get('registered', '?')}"
    if a.get("observed") and a.get("observed") != a.get("registered"):
        text += f", observed {a.get('observed')}"
    return text + (f", ports {ports})" if ports else ")")


def _write_text(path: str | Path, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------
# JUnit.

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


def _dev_line(r: Range) -> str:
    extra = _details(r)
    return (
        f"dst {r['dst_port']} src {_span(r)} ({_cells(r)} cells): {r['verdict']}, "
        f"expected {r['expected']}" + (f" [{extra}]" if extra else "")
    )


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
    _write_text(path, '<?xml version="1.0" encoding="UTF-8"?>\n' + data + "\n")


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
    if _is_diff(doc):
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
    props = ET.SubElement(suite, "properties")
    for k, v in (
        ("run_id", doc.get("run_id")),
        ("agent", agent),
        ("probe", (doc.get("probe") or {}).get("address")),
        ("plan", _plan_text(doc)),
    ):
        ET.SubElement(props, "property", name=k, value=_x(v))

    if entries:
        for res in summarize_judgement(doc, entries):
            e = res.entry
            name = (
                f"expect #{res.index + 1}"
                + (f" (line {e.line})" if e.line else "")
                + f": dst {_clip(format_ports(e.dst_ports), 40)}"
                + f" src {_clip(format_ports(e.src_ports), 60)} {e.verdict}"
                + (f" agent {e.agent}" if e.agent else "")
            )
            case = _case(suite, "udpreach.expect", name)
            if not res.applies:
                _skip(case, f"for agent {e.agent}, not {agent}")
            elif res.cells == 0:
                _skip(case, "covers no planned cell (or every cell is overridden by later entries)")
            elif res.deviations:
                _fail(
                    case,
                    f"{res.deviating_cells} of {res.cells} cells deviate "
                    f"in {len(res.deviations)} ranges",
                    [_dev_line(r) for r in res.deviations],
                )
    else:
        for d, rs in ranges_by_dst(doc.get("ranges", [])).items():
            case = _case(suite, "udpreach.reach", f"dst {d}: every tested source port open")
            bad = [r for r in rs if r["verdict"] in ("blocked", "rejected")]
            if bad:
                _fail(
                    case,
                    f"{sum(_cells(r) for r in bad)} cells blocked or rejected",
                    [
                        f"dst {d} src {_span(r)} ({_cells(r)} cells): {r['verdict']}"
                        + (f" [{_details(r)}]" if _details(r) else "")
                        for r in bad
                    ],
                )
    case = _case(suite, "udpreach.run", "run complete")
    if not doc.get("complete"):
        unknown = [r for r in doc.get("ranges", []) if r["verdict"] == "unknown"]
        _fail(
            case,
            f"run incomplete: {sum(_cells(r) for r in unknown)} cells unknown",
            [f"dst {r['dst_port']} src {_span(r)}: unknown" for r in unknown],
        )
    _finish_suite(root, suite)
    _write_xml(root, path)


def write_junit_diff(diff: dict[str, Any], path: str | Path) -> None:
    """JUnit for a diff: one case per destination port compared, failing on any change."""
    root = ET.Element("testsuites", name="udpreach")
    suite = ET.SubElement(
        root, "testsuite", name=_x(f"udpreach diff {diff.get('run_a')} -> {diff.get('run_b')}")
    )
    by_dst = ranges_by_dst(diff.get("changes", []))
    for d in diff.get("dst_ports", []):
        case = _case(suite, "udpreach.diff", f"dst {d}: no verdict changed")
        rs = by_dst.get(d, [])
        if rs:
            _fail(
                case,
                f"{sum(_cells(r) for r in rs)} cells changed verdict",
                [
                    f"dst {d} src {_span(r)} ({_cells(r)} cells): {r['before']} -> {r['after']}"
                    for r in rs
                ],
            )
    if not diff.get("dst_ports"):
        _fail(_case(suite, "udpreach.diff", "runs share planned cells"), "nothing to compare", [])
    _finish_suite(root, suite)
    _write_xml(root, path)


# ---------------------------------------------------------------------------------------
# Markdown.

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def _md(text: object) -> str:
    """Inline text safe inside a Markdown table cell."""
    flat = " ".join(str(text).split())
    return _MD_SPECIAL.sub(r"\\\1", flat)


def _code(text: object) -> str:
    """A Markdown code span (no escapes work inside one; a pipe still needs one in a table)."""
    flat = " ".join(str(text).split()).replace("`", "'").replace("|", "\\|")
    return f"`{flat}`"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _md_capped(rows: list[list[object]], what: str) -> tuple[list[list[object]], list[str]]:
    if len(rows) <= MAX_TABLE_ROWS:
        return rows, []
    more = len(rows) - MAX_TABLE_ROWS
    return rows[:MAX_TABLE_ROWS], ["", f"... and {more} more {what} (see the CSV or JSON)."]


def write_markdown(
    doc: dict[str, Any], path: str | Path, *, diff: dict[str, Any] | None = None
) -> None:
    """Write a Markdown summary ready to paste into a change ticket.

    Args:
        doc: a run document (or a diff document, rendered as ``write_markdown_diff``).
        path: the file to write.
        diff: optionally, a diff against an earlier run, added as a section.
    """
    if _is_diff(doc):
        write_markdown_diff(doc, path)
        return
    _write_text(path, markdown_run(doc, diff=diff))


def markdown_run(doc: dict[str, Any], *, diff: dict[str, Any] | None = None) -> str:
    """The Markdown text of ``write_markdown``."""
    s = doc.get("summary") or {}
    status = "complete" if doc.get("complete") else "**incomplete**"
    out = [
        f"# udpreach run {_code(doc.get('run_id', '?'))}",
        "",
        *_md_table(
            ["", ""],
            [
                ["Agent", _md(_agent_text(doc))],
                ["Probe", _md((doc.get("probe") or {}).get("address", "?"))],
                [
                    "Started",
                    _md(_when(doc.get("started")))
                    + (f" ({float(doc['duration']):.1f} s)" if "duration" in doc else ""),
                ],
                ["Plan", _md(_plan_text(doc))],
                ["Result", status],
            ],
        ),
        "",
        "## Summary",
        "",
        *_md_table(
            ["cells", *VERDICTS],
            [[s.get("cells", 0), *(s.get(v, 0) for v in VERDICTS)]],
        ),
    ]
    if "deviations" in doc:
        devs = doc.get("deviations") or []
        out += ["", "## Deviations from expectations", ""]
        if not devs:
            out.append("None: every judged cell is as expected.")
        else:
            n = sum(_cells(r) for r in devs)
            out += [f"**{n} cells deviate** in {len(devs)} ranges.", ""]
            rows, tail = _md_capped(
                [
                    [
                        r["dst_port"],
                        _span(r),
                        _cells(r),
                        r["verdict"],
                        r["expected"],
                        _md(_details(r)),
                    ]
                    for r in devs
                ],
                "deviating ranges",
            )
            out += (
                _md_table(
                    ["dst port", "source ports", "cells", "verdict", "expected", "details"], rows
                )
                + tail
            )
    out += ["", "## Ranges", ""]
    rows, tail = _md_capped(
        [
            [
                r["dst_port"],
                _span(r),
                _cells(r),
                r["verdict"],
                r.get("sent", ""),
                r.get("received", ""),
                _md(_details(r)),
            ]
            for r in doc.get("ranges", [])
        ],
        "ranges",
    )
    out += (
        _md_table(
            ["dst port", "source ports", "cells", "verdict", "sent", "received", "details"], rows
        )
        + tail
    )
    if diff is not None:
        out += ["", f"## Changes since run {_code(diff.get('run_a', '?'))}", ""]
        out += _markdown_changes(diff)
    out += ["", "## Recommendations", ""]
    out += _markdown_recommendations(recommend(doc))
    return "\n".join(out) + "\n"


def _markdown_recommendations(rec: dict[str, Any]) -> list[str]:
    fixed = rec["fixed_ports"]
    out = [
        "- Fixed UDP port for clients (FixedUDPPortValue): "
        + (
            ", ".join(str(p) for p in fixed)
            if fixed
            else "none: no destination port was open for every source port tested"
        )
        + ".",
    ]
    for note in rec["notes"]:
        out.append(f"- Note: {_md(note)}.")
    for rule in rec["rules"][:MAX_TABLE_ROWS]:
        out += [
            "",
            f"To open source ports {_md(_clip(rule['src_ports'], 120))} to destination "
            f"port(s) {_md(format_ports(rule['dst_ports']))} ({rule['cells']} cells, "
            f"{'/'.join(rule['verdicts'])}):",
            "",
            "```sh",
            rule["nft"],
            "# or, with iptables:",
            *rule["iptables"],
            "```",
        ]
    return out


def _markdown_changes(diff: dict[str, Any]) -> list[str]:
    changes = diff.get("changes", [])
    out = []
    if not changes:
        out.append(f"No verdict changed ({diff.get('compared', 0)} cells compared).")
    else:
        n = sum(_cells(r) for r in changes)
        out += [
            f"**{n} cells changed verdict** in {len(changes)} ranges "
            f"({diff.get('compared', 0)} cells compared).",
            "",
        ]
        rows, tail = _md_capped(
            [[r["dst_port"], _span(r), _cells(r), r["before"], r["after"]] for r in changes],
            "changed ranges",
        )
        out += _md_table(["dst port", "source ports", "cells", "before", "after"], rows) + tail
    for key, which in (("only_a", diff.get("run_a")), ("only_b", diff.get("run_b"))):
        only = diff.get(key) or []
        if only:
            out += [
                "",
                f"Not compared: {sum(_cells(r) for r in only)} cells planned only in run "
                f"{_code(which)}.",
            ]
    return out


def write_markdown_diff(diff: dict[str, Any], path: str | Path) -> None:
    """Write a Markdown report of a diff document."""
    out = [
        f"# udpreach diff {_code(diff.get('run_a', '?'))} → {_code(diff.get('run_b', '?'))}",
        "",
        *_markdown_changes(diff),
    ]
    _write_text(path, "\n".join(out) + "\n")


# ---------------------------------------------------------------------------------------
# CSV.

CSV_RUN_HEADER = [
    "dst_port", "first", "last", "cells", "verdict", "translated", "sent", "received",
    "icmp_type", "icmp_code", "icmp_from", "reason",
]  # fmt: skip
CSV_DIFF_HEADER = ["dst_port", "first", "last", "cells", "before", "after"]


def write_csv(doc: dict[str, Any], path: str | Path) -> None:
    """Write the ranges of a run (or the changes of a diff), one row each, with a header."""
    if _is_diff(doc):
        write_csv_diff(doc, path)
        return
    with Path(path).open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_RUN_HEADER)
        for r in doc.get("ranges", []):
            icmp = r.get("icmp") if isinstance(r.get("icmp"), dict) else {}
            w.writerow(
                [
                    r["dst_port"], r["first"], r["last"], _cells(r), r["verdict"],
                    "true" if r.get("translated") else "false",
                    r.get("sent", ""), r.get("received", ""),
                    icmp.get("type", ""), icmp.get("code", ""), icmp.get("from", ""),
                    r.get("reason", ""),
                ]
            )  # fmt: skip


def write_csv_diff(diff: dict[str, Any], path: str | Path) -> None:
    """Write the changes of a diff document, one row each, with a header."""
    with Path(path).open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_DIFF_HEADER)
        for r in diff.get("changes", []):
            w.writerow([r["dst_port"], r["first"], r["last"], _cells(r), r["before"], r["after"]])


# ---------------------------------------------------------------------------------------
# HTML.


def buckets_for(ranges: Sequence[Range]) -> list[Interval]:
    """Source-port buckets for the heat map: at most 64 equal spans over the planned ones."""
    if not ranges:
        return []
    lo = min(int(r["first"]) for r in ranges)
    hi = max(int(r["last"]) for r in ranges)
    span = hi - lo + 1
    width = math.ceil(span / min(MAX_BUCKETS, span))
    return [(a, min(hi, a + width - 1)) for a in range(lo, hi + 1, width)]


def bucket_counts(
    ranges: Sequence[Range], buckets: Sequence[Interval], key: str = "verdict"
) -> dict[int, list[dict[str, int]]]:
    """Per destination port, per bucket: cell count per value of ``key`` (plus the
    count of translated cells under ``"~translated"``)."""
    if not buckets:
        return {}
    lo, width = buckets[0][0], buckets[0][1] - buckets[0][0] + 1
    out: dict[int, list[dict[str, int]]] = {}
    for d, rs in ranges_by_dst(ranges).items():
        row: list[dict[str, int]] = [{} for _ in buckets]
        for r in rs:
            f, last = int(r["first"]), int(r["last"])
            for i in range((f - lo) // width, (last - lo) // width + 1):
                a, b = buckets[i]
                n = min(b, last) - max(a, f) + 1
                if n > 0:
                    v = str(r[key])
                    row[i][v] = row[i].get(v, 0) + n
                    if r.get("translated"):
                        row[i]["~translated"] = row[i].get("~translated", 0) + n
        out[d] = row
    return out


def _background(counts: dict[str, int], order: Sequence[str], colours: dict[str, str]) -> str:
    present = [(v, counts[v]) for v in order if counts.get(v)]
    if len(present) == 1:
        return colours[present[0][0]]
    total = sum(n for _, n in present)
    weights = [max(n / total, MIN_BAND) for _, n in present]
    scale = sum(weights)
    stops, pos = [], 0.0
    for (v, _), w in zip(present, weights, strict=True):
        end = pos + 100 * w / scale
        stops.append(f"{colours[v]} {pos:.1f}% {end:.1f}%")
        pos = end
    return f"linear-gradient(to top, {', '.join(stops)})"


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px;
       color: #1d1d1f; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; }
pre { background: #f4f4f4; padding: 8px 10px; overflow-x: auto; white-space: pre-wrap; }
table.t { border-collapse: collapse; } table.t td, table.t th { border: 1px solid #ddd;
       padding: 3px 8px; text-align: left; } table.t th { background: #f4f4f4; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.status-complete { color: #1a7a3f; font-weight: 600; }
.status-incomplete { color: #b3261e; font-weight: 600; }
.chip { display: inline-block; width: 12px; height: 12px; vertical-align: -1px;
        margin-right: 5px; border: 1px solid rgba(0,0,0,.25); }
.heat { display: grid; gap: 1px; align-items: stretch; margin: 8px 0; }
.heat .lbl { font: 12px/22px ui-monospace, monospace; text-align: right; padding-right: 6px; }
.heat .axis { font: 10px/14px ui-monospace, monospace; color: #555; white-space: nowrap;
              overflow: visible; }
.heat .cell { height: 22px; position: relative; }
.heat .cell[data-verdict="none"] { background: repeating-linear-gradient(45deg, #fff 0 3px,
              #e6e6e6 3px 5px); }
.heat .cell.dev { outline: 2px solid #000; outline-offset: -2px; z-index: 1; }
.heat .cell.nat::after, .legend .swatch.nat::after { content: ""; position: absolute;
              right: 2px; top: 2px; width: 4px; height: 4px; border-radius: 2px; background: #fff;
              box-shadow: 0 0 0 1px rgba(0,0,0,.5); }
.legend { display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 6px 0 2px; }
.legend span { white-space: nowrap; }
.legend .swatch { display: inline-block; width: 16px; height: 16px; vertical-align: -3px;
                  margin-right: 5px; border: 1px solid rgba(0,0,0,.25); position: relative;
                  box-sizing: border-box; }
.legend .swatch.dev { outline: 2px solid #000; outline-offset: -2px; }
.legend .swatch.none { background: repeating-linear-gradient(45deg, #fff 0 3px,
                  #e6e6e6 3px 5px); }
.muted { color: #666; }
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _chip(verdict: str) -> str:
    colour = COLOURS.get(verdict, "#fff")
    return f'<span class="chip" style="background:{colour}"></span>{_esc(verdict)}'


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "t") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(text: object, numeric: bool = False, raw: bool = False) -> str:
    content = str(text) if raw else _esc(text)
    return f'<td class="n">{content}</td>' if numeric else f"<td>{content}</td>"


def _capped_rows(rows: list[list[str]], what: str) -> tuple[list[list[str]], str]:
    if len(rows) <= MAX_TABLE_ROWS:
        return rows, ""
    more = len(rows) - MAX_TABLE_ROWS
    return rows[:MAX_TABLE_ROWS], f'<p class="muted">... and {more} more {what} (see the CSV).</p>'


def _heatmap(
    ranges: Sequence[Range],
    *,
    key: str,
    order: Sequence[str],
    colours: dict[str, str],
    marks: Sequence[Range] = (),
    label: str = "verdict",
) -> str:
    """The heat-map grid; ``marks`` are ranges whose buckets get an outline."""
    buckets = buckets_for(ranges)
    if not buckets:
        return '<p class="muted">No cells.</p>'
    counts = bucket_counts(ranges, buckets, key)
    marked = (
        {
            d: {i for i, c in enumerate(row) if c}
            for d, row in bucket_counts(marks, buckets, "dst_port").items()
        }
        if marks
        else {}
    )
    cols = len(buckets)
    out = [
        f'<div class="heat" id="heatmap" data-buckets="{cols}" '
        f'style="grid-template-columns: 4.5em repeat({cols}, minmax(6px, 1fr))">'
    ]
    # Axis: the first port of every eighth bucket.
    out.append('<div class="lbl"></div>')
    for i, (a, _) in enumerate(buckets):
        out.append(f'<div class="axis">{a if i % 8 == 0 else ""}</div>')
    for d, row in counts.items():
        out.append(f'<div class="lbl">{d}</div>')
        for i, c in enumerate(row):
            a, b = buckets[i]
            shown = {v: n for v, n in c.items() if not v.startswith("~")}
            if not shown:
                tip = f"dst {d}, src {a}-{b}: no planned cell"
                out.append(
                    f'<div class="cell" data-verdict="none" data-dst="{d}" data-first="{a}" '
                    f'data-last="{b}" title="{_esc(tip)}"></div>'
                )
                continue
            kinds = [v for v in order if shown.get(v)]
            verdict = kinds[0] if len(kinds) == 1 else "mixed"
            total = sum(shown.values())
            tip = f"dst {d}, src {a}-{b} ({total} cells): " + ", ".join(
                f"{v} {shown[v]}" for v in kinds
            )
            cls = ["cell"]
            if c.get("~translated"):
                cls.append("nat")
                tip += f"; {c['~translated']} translated (NAT)"
            if i in marked.get(d, ()):
                cls.append("dev")
                tip += f"; {label}"
            data = json.dumps({v: shown[v] for v in kinds}, separators=(",", ":"))
            out.append(
                f'<div class="{" ".join(cls)}" data-verdict="{_esc(verdict)}" data-dst="{d}" '
                f'data-first="{a}" data-last="{b}" data-counts="{_esc(data)}" '
                f'title="{_esc(tip)}" style="background: {_background(shown, order, colours)}">'
                "</div>"
            )
    out.append("</div>")
    return "".join(out)


def _legend(
    items: Sequence[tuple[str, str, str]], extra: Sequence[tuple[str, str, str, str]] = ()
) -> str:
    """Legend entries: (key, colour, text) swatches, then (key, style, class, text) samples
    of the heat map's marks."""
    parts = [
        f'<span data-legend="{_esc(k)}"><span class="swatch" style="background:{c}"></span>'
        f"{_esc(text)}</span>"
        for k, c, text in items
    ]
    parts += [
        f'<span data-legend="{_esc(k)}"><span class="swatch {cls}" style="{style}"></span>'
        f"{_esc(text)}</span>"
        for k, style, cls, text in extra
    ]
    return '<div class="legend">' + "".join(parts) + "</div>"


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def write_html(doc: dict[str, Any], path: str | Path) -> None:
    """Write one self-contained HTML page for a run (or a diff document)."""
    if _is_diff(doc):
        write_html_diff(doc, path)
        return
    _write_text(path, html_run(doc))


def html_run(doc: dict[str, Any]) -> str:
    """The HTML text of ``write_html`` for a run document."""
    s = doc.get("summary") or {}
    complete = bool(doc.get("complete"))
    devs = doc.get("deviations") if isinstance(doc.get("deviations"), list) else None
    parts = [
        f"<h1>udpreach run <code>{_esc(doc.get('run_id', '?'))}</code></h1>",
        f"<p>Agent <b>{_esc(_agent_text(doc))}</b>, probe "
        f"<b>{_esc((doc.get('probe') or {}).get('address', '?'))}</b>, started "
        f"{_esc(_when(doc.get('started')))}. "
        f'<span id="status" class="status-{"complete" if complete else "incomplete"}">'
        f"{'complete' if complete else 'incomplete'}</span></p>",
        '<section id="summary"><h2>Summary</h2>',
        _html_table(
            ["cells", *VERDICTS],
            [
                [_td(s.get("cells", 0), True)]
                + [_td(f"{_chip(v)} {s.get(v, 0)}", raw=True) for v in VERDICTS]
            ],
        ),
        "</section>",
        '<section id="matrix"><h2>Matrix: destination port by source-port bucket</h2>',
        _legend(
            [(v, COLOURS[v], VERDICT_TEXT[v]) for v in VERDICTS],
            [
                (
                    "mixed",
                    f"background: {_background({'open': 3, 'blocked': 1}, VERDICTS, COLOURS)}",
                    "",
                    "mixed: one band per verdict present (hover a bucket for its counts)",
                ),
                (
                    "nat",
                    f"background: {COLOURS['open']}",
                    "nat",
                    "dot: source port translated (NAT)",
                ),
                (
                    "deviation",
                    f"background: {COLOURS['open']}",
                    "dev",
                    "outline: deviates from expectations",
                ),
                ("none", "", "none", "hatched: no planned cell"),
            ],
        ),
        _heatmap(
            doc.get("ranges", []),
            key="verdict",
            order=VERDICTS,
            colours=COLOURS,
            marks=devs or (),
            label="deviates from expectations",
        ),
        "</section>",
        '<section id="deviations"><h2>Deviations from expectations</h2>',
    ]
    if devs is None:
        parts.append('<p class="muted">Not judged against expectations.</p>')
    elif not devs:
        parts.append("<p>None: every judged cell is as expected.</p>")
    else:
        n = sum(_cells(r) for r in devs)
        rows, tail = _capped_rows(
            [
                [
                    _td(r["dst_port"], True),
                    _td(_span(r)),
                    _td(_cells(r), True),
                    _td(_chip(str(r["verdict"])), raw=True),
                    _td(_chip(str(r["expected"])), raw=True),
                    _td(_details(r)),
                ]
                for r in devs
            ],
            "deviating ranges",
        )
        parts += [
            f"<p><b>{n} cells deviate</b> in {len(devs)} ranges.</p>",
            _html_table(
                ["dst port", "source ports", "cells", "verdict", "expected", "details"], rows
            ),
            tail,
        ]
    parts.append("</section>")
    plan = doc.get("plan") or {}
    parts += [
        '<section id="plan"><h2>Plan</h2>',
        _html_table(
            ["source ports", "destination ports", "copies", "rate (datagrams/s)", "size (bytes)"],
            [
                [
                    _td(_clip(str(plan.get("src_ports", "?")), 200)),
                    _td(format_ports(int(p) for p in plan.get("dst_ports", []))),
                    _td(plan.get("copies", "?"), True),
                    _td(plan.get("rate", "?"), True),
                    _td(plan.get("size", "?"), True),
                ]
            ],
        ),
        "</section>",
    ]
    rec = recommend(doc)
    fixed = rec["fixed_ports"]
    parts += [
        '<section id="recommendations"><h2>Recommendations</h2>',
        "<p>Fixed UDP port for clients (FixedUDPPortValue): "
        + (
            f'<b id="fixed-ports">{_esc(", ".join(str(p) for p in fixed))}</b>'
            if fixed
            else '<b id="fixed-ports">none</b>: no destination port was open for every '
            "source port tested"
        )
        + ".</p>",
    ]
    for rule in rec["rules"][:MAX_TABLE_ROWS]:
        parts.append(
            f"<p>To open source ports {_esc(_clip(rule['src_ports'], 200))} to destination "
            f"port(s) {_esc(format_ports(rule['dst_ports']))} ({rule['cells']} cells, "
            f"{_esc('/'.join(rule['verdicts']))}):</p>"
            f'<pre class="rule">{_esc(rule["nft"])}\n# or, with iptables:\n'
            f"{_esc(chr(10).join(rule['iptables']))}</pre>"
        )
    parts += [f'<p class="muted">Note: {_esc(n)}.</p>' for n in rec["notes"]]
    parts.append("</section>")
    rows, tail = _capped_rows(
        [
            [
                _td(r["dst_port"], True),
                _td(_span(r)),
                _td(_cells(r), True),
                _td(_chip(str(r["verdict"])), raw=True),
                _td(r.get("sent", ""), True),
                _td(r.get("received", ""), True),
                _td(_details(r)),
            ]
            for r in doc.get("ranges", [])
        ],
        "ranges",
    )
    parts += [
        '<section id="ranges"><h2>Ranges</h2>',
        _html_table(
            ["dst port", "source ports", "cells", "verdict", "sent", "received", "details"], rows
        ),
        tail,
        "</section>",
    ]
    return _page(f"udpreach run {doc.get('run_id', '?')}", "".join(parts))


CHANGE_COLOURS = {
    "opened": "#1a9850",
    "closed": "#d73027",
    "other": "#7b3294",
    "same": "#e8e8e8",
}
CHANGE_TEXT = {
    "opened": "now open (was blocked, rejected, untested or unknown)",
    "closed": "no longer open (now blocked or rejected)",
    "other": "other change (e.g. blocked to rejected, to unknown)",
    "same": "compared, no change",
}


def _change_kind(before: str, after: str) -> str:
    if before == after:
        return "same"
    if after == "open":
        return "opened"
    if before == "open" and after in ("blocked", "rejected"):
        return "closed"
    return "other"


def write_html_diff(diff: dict[str, Any], path: str | Path) -> None:
    """Write one self-contained HTML page for a diff document."""
    _write_text(path, html_diff(diff))


def html_diff(diff: dict[str, Any]) -> str:
    """The HTML text of ``write_html_diff``."""
    changes = diff.get("changes", [])
    n = sum(_cells(r) for r in changes)
    # The heat map covers the compared cells: changes coloured by kind, the rest "same".
    cells: list[Range] = [dict(r, kind=_change_kind(r["before"], r["after"])) for r in changes]
    changed = ranges_by_dst(changes)
    for d, rs in ranges_by_dst(diff.get("compared_ranges", [])).items():
        holes = [(int(r["first"]), int(r["last"])) for r in changed.get(d, [])]
        base = [(int(r["first"]), int(r["last"])) for r in rs]
        cells += [
            {"dst_port": d, "first": a, "last": b, "kind": "same"} for a, b in subtract(base, holes)
        ]
    order = ("closed", "opened", "other", "same")
    parts = [
        f"<h1>udpreach diff <code>{_esc(diff.get('run_a', '?'))}</code> &rarr; "
        f"<code>{_esc(diff.get('run_b', '?'))}</code></h1>",
        f'<p id="verdict-changes"><b>{n} cells changed verdict</b> in {len(changes)} ranges '
        f"({_esc(diff.get('compared', 0))} cells compared).</p>",
        '<section id="matrix"><h2>Changes by destination port and source-port bucket</h2>',
        _legend([(k, CHANGE_COLOURS[k], CHANGE_TEXT[k]) for k in order]),
        _heatmap(cells, key="kind", order=order, colours=CHANGE_COLOURS),
        "</section>",
    ]
    rows, tail = _capped_rows(
        [
            [
                _td(r["dst_port"], True),
                _td(_span(r)),
                _td(_cells(r), True),
                _td(_chip(str(r["before"])), raw=True),
                _td(_chip(str(r["after"])), raw=True),
            ]
            for r in changes
        ],
        "changed ranges",
    )
    parts += [
        '<section id="changes"><h2>Changed ranges</h2>',
        _html_table(["dst port", "source ports", "cells", "before", "after"], rows)
        if changes
        else "<p>No verdict changed.</p>",
        tail,
        "</section>",
    ]
    for key, which in (("only_a", diff.get("run_a")), ("only_b", diff.get("run_b"))):
        only = diff.get(key) or []
        if only:
            parts.append(
                f'<p class="muted">Not compared: {sum(_cells(r) for r in only)} cells planned '
                f"only in run <code>{_esc(which)}</code>.</p>"
            )
    return _page(f"udpreach diff {diff.get('run_a')} -> {diff.get('run_b')}", "".join(parts))


def write_reports(
    doc: dict[str, Any],
    entries: Sequence[ExpectEntry] | None,
    junit: Path | None = None,
    markdown: Path | None = None,
    csv_out: Path | None = None,
    html: Path | None = None,
) -> None:
    """Write whichever report files were asked for (a run or a diff document).

    Raises:
        ConfigError: a file cannot be written.
    """
    try:
        if junit:
            write_junit(doc, entries, junit)
        if markdown:
            write_markdown(doc, markdown)
        if csv_out:
            write_csv(doc, csv_out)
        if html:
            write_html(doc, html)
    except OSError as exc:
        raise ConfigError(f"cannot write report: {exc}") from None
