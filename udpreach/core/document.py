"""The run document (schema ``udpreach/run-v1``): what ``run --json`` prints and we store.

Theory of operation: the document is built once, from the ledger and the run's facts, as
plain JSON-ready data; every report (the rich table, JSON, JUnit, Markdown, CSV, HTML) is
rendered from it and nothing else, so ``show`` can print a stored run exactly as ``run`` did.
"""

from __future__ import annotations

from typing import Any

from udpreach.core.ledger import Ledger

SCHEMA = "udpreach/run-v1"
DIFF_SCHEMA = "udpreach/diff-v1"


def build_document(
    *,
    run_id: str,
    complete: bool,
    agent: dict[str, Any],
    probe: dict[str, Any],
    plan: dict[str, Any],
    ledger: Ledger,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the contract's document; ``extra`` adds keys after the contract's own."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "run_id": run_id,
        "complete": complete,
        "agent": agent,
        "probe": probe,
        "plan": plan,
        "summary": ledger.summary(),
        "ranges": ledger.ranges(),
    }
    if extra:
        for k, v in extra.items():
            doc.setdefault(k, v)
    return doc
