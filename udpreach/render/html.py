"""The HTML report: one self-contained page for a run or for a diff between two runs.

Theory of operation: this module turns a document into plain values (strings and numbers,
grouped for the page) and the templates in ``templates/`` lay them out; Jinja2 escapes every
value (autoescaping), so an agent name, an ICMP sender or a warning that holds markup shows
as text. The page has inline CSS and no script or external asset.

The heat map has one row per destination port and up to 64 columns of source-port buckets
(1008 ports each for the default 1024-65535). A bucket's colour shows its verdict mix as
stacked bands (every verdict present gets at least a fifth of the height, so a single
blocked port in a thousand still shows); the tooltip has the exact counts. Tables are
folded to at most ``MAX_TABLE_ROWS`` rows (``udpreach.render.fold``); the CSV has them all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from udpreach.core.diff import DIFF_SCHEMA
from udpreach.core.document import recommendations_of
from udpreach.core.expect import judgement_of
from udpreach.core.intervals import (
    Interval,
    Range,
    n_cells,
    ranges_by_dst,
    subtract,
)
from udpreach.core.portspec import format_ports
from udpreach.render import facts
from udpreach.render.fold import Folded, fold

if TYPE_CHECKING:  # jinja2 is imported when a page is written, not with the module
    import jinja2

COLOURS = {
    "open": "#1a9850",
    "blocked": "#d73027",
    "rejected": "#f46d43",
    "untested": "#7f7f7f",
    "unknown": "#c4c4c4",
}
VERDICT_TEXT = facts.VERDICT_TEXT
VERDICTS = facts.VERDICTS
MAX_BUCKETS = 64
MIN_BAND = 0.2
MAX_TABLE_ROWS = 500
MAX_RULES = 100

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


@cache
def _environment() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("udpreach.render", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=False,
    )


def _page(template: str, **values: Any) -> str:
    return _environment().get_template(template).render(**values)


# ---------------------------------------------------------------------------------------
# The heat map.


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


def _heatmap(
    ranges: Sequence[Range],
    *,
    key: str,
    order: Sequence[str],
    colours: dict[str, str],
    marks: Sequence[Range] = (),
    label: str = "verdict",
) -> dict[str, Any]:
    """The heat map's values; ``marks`` are ranges whose buckets get an outline."""
    buckets = buckets_for(ranges)
    counts = bucket_counts(ranges, buckets, key)
    marked = (
        {
            d: {i for i, c in enumerate(row) if c}
            for d, row in bucket_counts(marks, buckets, "dst_port").items()
        }
        if marks and buckets
        else {}
    )
    rows = []
    for d, row in counts.items():
        cells = []
        for i, c in enumerate(row):
            a, b = buckets[i]
            shown = {v: n for v, n in c.items() if not v.startswith("~")}
            if not shown:
                cells.append(
                    {
                        "verdict": "none",
                        "first": a,
                        "last": b,
                        "title": f"dst {d}, src {a}-{b}: no planned cell",
                    }
                )
                continue
            kinds = [v for v in order if shown.get(v)]
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
            cells.append(
                {
                    "verdict": kinds[0] if len(kinds) == 1 else "mixed",
                    "first": a,
                    "last": b,
                    "classes": " ".join(cls),
                    "counts": json.dumps({v: shown[v] for v in kinds}, separators=(",", ":")),
                    "title": tip,
                    "background": _background(shown, order, colours),
                }
            )
        rows.append({"dst": d, "cells": cells})
    return {
        "buckets": [{"axis": a if i % 8 == 0 else ""} for i, (a, _) in enumerate(buckets)],
        "rows": rows,
    }


def _legend(
    items: Sequence[tuple[str, str, str]], extra: Sequence[tuple[str, str, str, str]] = ()
) -> list[dict[str, str]]:
    """Legend entries: (key, colour, text) swatches, then (key, style, class, text) samples
    of the heat map's marks."""
    out = [{"key": k, "style": f"background:{c}", "cls": "", "text": t} for k, c, t in items]
    out += [{"key": k, "style": s, "cls": cls, "text": t} for k, s, cls, t in extra]
    return out


# ---------------------------------------------------------------------------------------
# Tables.


def _cell(value: object, kind: str = "") -> dict[str, Any]:
    return {"value": value, "kind": kind}


def _range_table(
    folded: Folded, header: Sequence[str], columns: str, *, diff: bool = False
) -> dict[str, Any]:
    """A folded range list as table values. ``columns`` picks what follows the span:
    ``v`` verdict (chip), ``e`` expected (chip), ``c`` sent and received, ``d`` details."""
    rows = []
    for row in folded.rows:
        cells = [
            _cell(row.dst_port, "n"),
            _cell(facts.span(row.first, row.last), "span"),
            _cell(f"{row.cells:,}", "n"),
        ]
        for col in columns:
            if col == "v":
                cells.append(_cell(row.label, "chip"))
            elif col == "e":
                exp = str(row.source.get("expected", "?")) if row.source is not None else "mixed"
                cells.append(_cell(exp, "chip"))
            elif col == "b":  # a diff's change: before and after
                if row.source is not None:
                    cells += [
                        _cell(row.source["before"], "chip"),
                        _cell(row.source["after"], "chip"),
                    ]
                else:
                    cells += [_cell("mixed"), _cell("mixed")]
            elif col == "c":
                cells += [_cell(f"{row.sent:,}", "n"), _cell(f"{row.received:,}", "n")]
            elif col == "d":
                cells.append(_cell("; ".join(facts.row_details(row))))
        rows.append(cells)
    note = facts.fold_note(folded)
    where = "the CSV export has them all" if not diff else "the JSON diff has them all"
    return {"header": list(header), "rows": rows, "note": f"{note}; {where}." if note else ""}


# ---------------------------------------------------------------------------------------
# The run page.


def _confidence_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    c = facts.confidence(doc)
    rows = [
        ("loss", "Loss on the path", c.loss_text, c.estimate is None),
        ("attempts", "Attempts", c.attempts_text, False),
        ("bound", "Chance that any 'blocked' cell is really open", c.bound_text,
         c.blocked > 0 and c.bound is None),
        ("confidence-reached", "Confidence target reached", c.reached_text, not c.reached),
        ("send-mode", "Send mode", facts.send_mode(doc), False),
    ]  # fmt: skip
    if c.rate_text:
        rows.append(("rate", "Pacing", c.rate_text, False))
    mtu = facts.path_mtu(doc)
    if mtu:
        rows.append(("path-mtu", "Path MTU", mtu, False))
    rows.append(("udpreach-version", "udpreach version", facts.version(doc), False))
    return [{"id": i, "label": lab, "value": v, "bad": bad} for i, lab, v, bad in rows]


def _judged(doc: dict[str, Any]) -> dict[str, Any] | None:
    """How many cells the expectations judged, and the entries that judged none."""
    judged = judgement_of(doc)
    if judged is None:
        return None
    problem = judged.get("problem")
    return {
        "text": facts.judged_text(judged, (doc.get("summary") or {}).get("cells")),
        "unmatched": [
            {"text": facts.unmatched_text(u), "fails": bool(u.get("fails"))}
            for u in judged["unmatched"]
        ],
        "problem": facts.one_line(problem) if problem else "",
    }


def html_run(doc: dict[str, Any]) -> str:
    """The HTML page of a run document."""
    s = doc.get("summary") or {}
    ranges = doc.get("ranges") or []
    sampled = facts.sampled(doc)
    devs = doc.get("deviations") if isinstance(doc.get("deviations"), list) else None
    plan = doc.get("plan") or {}
    rec = recommendations_of(doc)
    listed = facts.src_ports_listed(plan)
    mixed_style = f"background: {_background({'open': 3, 'blocked': 1}, VERDICTS, COLOURS)}"
    return _page(
        "run.html",
        title=f"udpreach run {facts.one_line(doc.get('run_id', '?'))}",
        run_id=facts.one_line(doc.get("run_id", "?")),
        agent=facts.agent_text(doc),
        probe=facts.one_line((doc.get("probe") or {}).get("address", "?")),
        started=facts.when(doc.get("started")),
        duration=(
            f"{float(doc['duration']):.1f} s"
            if isinstance(doc.get("duration"), int | float)
            else ""
        ),
        status=facts.status(doc),
        verdicts=VERDICTS,
        colours=COLOURS,
        summary={"cells": s.get("cells", 0), **{v: s.get(v, 0) for v in VERDICTS}},
        extras=facts.summary_extras(doc),
        confidence=_confidence_rows(doc),
        warnings=facts.warnings(doc),
        legend_items=_legend(
            [(v, COLOURS[v], VERDICT_TEXT[v]) for v in VERDICTS],
            [
                (
                    "mixed",
                    mixed_style,
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
        map=_heatmap(
            ranges,
            key="verdict",
            order=VERDICTS,
            colours=COLOURS,
            marks=devs or (),
            label="deviates from expectations",
        ),
        deviations=(
            None
            if devs is None
            else _range_table(
                fold(devs, MAX_TABLE_ROWS, sampled=sampled),
                ["dst port", "source ports", "cells", "verdict", "expected", "details"],
                "ved",
            )
        ),
        judged=_judged(doc),
        deviating_cells=facts.cells(sum(n_cells(r) for r in devs or [])),
        deviating_ranges=facts.ranges(len(devs or [])),
        plan={
            "src": facts.src_ports_text(plan, sep=", ").removeprefix("source ports "),
            "full": "" if listed else facts.one_line(plan.get("src_ports", "")),
            "dst": facts.dst_ports_text(plan.get("dst_ports")),
            "copies": plan.get("copies", "?"),
            "rate": plan.get("rate", "?"),
            "size": plan.get("size", "?"),
        },
        fixed=", ".join(str(p) for p in rec.get("fixed_ports") or []),
        no_fixed=facts.no_fixed_port(doc),
        rules=[
            {
                "src": facts.source_ports_label(str(rule.get("src_ports", "")).replace(",", ", ")),
                "dst": format_ports(rule.get("dst_ports") or []),
                "cells": facts.counted(int(rule.get("cells", 0) or 0), "cell"),
                "verdicts": "/".join(rule.get("verdicts") or []),
                "nft": rule.get("nft", ""),
                "iptables": list(rule.get("iptables") or []),
            }
            for rule in (rec.get("rules") or [])[:MAX_RULES]
        ],
        more_rules=max(0, len(rec.get("rules") or []) - MAX_RULES),
        notes=[facts.one_line(n) for n in rec.get("notes") or []],
        ranges=_range_table(
            fold(ranges, MAX_TABLE_ROWS, sampled=sampled),
            ["dst port", "source ports", "cells", "verdict", "sent", "received", "details"],
            "vcd",
        ),
        version=facts.version(doc),
    )


# ---------------------------------------------------------------------------------------
# The diff page.


def _change_kind(before: str, after: str) -> str:
    if before == after:
        return "same"
    if after == "open":
        return "opened"
    if before == "open" and after in ("blocked", "rejected"):
        return "closed"
    return "other"


def html_diff(diff: dict[str, Any]) -> str:
    """The HTML page of a diff document."""
    changes = diff.get("changes") or []
    uncertain = diff.get("uncertain") or []
    # The heat map covers the compared cells: changes coloured by kind, the rest "same"
    # (uncertain cells included: they are not changes).
    cells: list[Range] = [dict(r, kind=_change_kind(r["before"], r["after"])) for r in changes]
    changed = ranges_by_dst(changes)
    for d, rs in ranges_by_dst(diff.get("compared_ranges") or []).items():
        holes = [(int(r["first"]), int(r["last"])) for r in changed.get(d, [])]
        base = [(int(r["first"]), int(r["last"])) for r in rs]
        cells += [
            {"dst_port": d, "first": a, "last": b, "kind": "same"} for a, b in subtract(base, holes)
        ]
    order = ("closed", "opened", "other", "same")
    header = ["dst port", "source ports", "cells", "before", "after"]

    def table(rs: list[Range]) -> dict[str, Any]:
        folded = fold(rs, MAX_TABLE_ROWS, label=lambda r: f"{r['before']} -> {r['after']}",
                      wildcard=None)  # fmt: skip
        return _range_table(folded, header, "b", diff=True)

    not_compared = []
    for key, which in (("only_a", diff.get("run_a")), ("only_b", diff.get("run_b"))):
        only = diff.get(key) or []
        if only:
            not_compared.append({"cells": f"{sum(n_cells(r) for r in only):,}", "run": which})
    return _page(
        "diff.html",
        title=f"udpreach diff {diff.get('run_a')} -> {diff.get('run_b')}",
        run_a=facts.one_line(diff.get("run_a", "?")),
        run_b=facts.one_line(diff.get("run_b", "?")),
        changed_cells=sum(n_cells(r) for r in changes),
        changed_ranges=len(changes),
        compared=diff.get("compared", 0),
        uncertain_cells=sum(n_cells(r) for r in uncertain),
        legend_items=_legend([(k, CHANGE_COLOURS[k], CHANGE_TEXT[k]) for k in order]),
        map=_heatmap(cells, key="kind", order=order, colours=CHANGE_COLOURS),
        changes=table(changes),
        uncertain=table(uncertain),
        colours=COLOURS,
        not_compared=not_compared,
    )


# ---------------------------------------------------------------------------------------
# Files.


def write_html(doc: dict[str, Any], path: str | Path) -> None:
    """Write one self-contained HTML page for a run (or a diff document)."""
    text = html_diff(doc) if doc.get("schema") == DIFF_SCHEMA else html_run(doc)
    Path(path).write_text(text, encoding="utf-8")
