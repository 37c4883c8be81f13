"""The CSV export: every range of a run (or every change of a diff), one row each, exact.

Theory of operation: CSV is where the reports send a reader for the exact list, so it is
never folded or capped. Each row is self-describing: after the range's own columns come the
run's facts (version, send mode, the loss estimate and the false-blocked bound, whether the
confidence target was reached, the warnings as a JSON list), the same on every row, so a
spreadsheet filter or ``csv.DictReader`` needs nothing else.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from udpreach.core.diff import DIFF_SCHEMA
from udpreach.core.intervals import n_cells
from udpreach.render import facts

CSV_RUN_HEADER = [
    "dst_port", "first", "last", "cells", "verdict", "translated", "sent", "received",
    "icmp_type", "icmp_code", "icmp_from", "reason",
    "inferred", "icmp_limited", "icmp_verified",
    "run_id", "complete", "udpreach_version", "send_mode",
    "loss_estimate", "loss_upper_99", "false_blocked_bound", "confidence_target",
    "confidence_reached", "warnings",
]  # fmt: skip
CSV_DIFF_HEADER = ["dst_port", "first", "last", "cells", "before", "after", "change"]


def _flag(value: Any) -> str:
    return "" if value is None else "true" if value else "false"


def write_csv(doc: dict[str, Any], path: str | Path) -> None:
    """Write the ranges of a run (or the changes of a diff), one row each, with a header."""
    if doc.get("schema") == DIFF_SCHEMA:
        write_csv_diff(doc, path)
        return
    c = facts.confidence(doc).machine()
    run = [
        facts.one_line(doc.get("run_id", "")),
        _flag(bool(doc.get("complete"))),
        facts.version(doc),
        facts.send_mode(doc),
        c["loss_estimate"],
        c["loss_upper_99"],
        c["false_blocked_bound"],
        c["confidence_target"],
        c["confidence_reached"],
        json.dumps(facts.warnings(doc)),
    ]
    with Path(path).open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_RUN_HEADER)
        for r in doc.get("ranges") or []:
            icmp = r.get("icmp") if isinstance(r.get("icmp"), dict) else {}
            w.writerow(
                [
                    r["dst_port"], r["first"], r["last"], n_cells(r), r["verdict"],
                    _flag(bool(r.get("translated"))),
                    r.get("sent", ""), r.get("received", ""),
                    icmp.get("type", ""), icmp.get("code", ""), icmp.get("from", ""),
                    facts.one_line(r.get("reason", "")),
                    r.get("inferred", 0), r.get("icmp_limited", 0), _flag(icmp.get("verified")),
                    *run,
                ]
            )  # fmt: skip


def write_csv_diff(diff: dict[str, Any], path: str | Path) -> None:
    """Write the changes of a diff document, one row each, with a header; cells whose move
    ICMP rate limits explain follow, as ``change`` = ``uncertain``."""
    rows = [(r, "changed") for r in diff.get("changes") or []]
    rows += [(r, "uncertain") for r in diff.get("uncertain") or []]
    with Path(path).open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_DIFF_HEADER)
        for r, kind in rows:
            w.writerow(
                [r["dst_port"], r["first"], r["last"], n_cells(r), r["before"], r["after"], kind]
            )
