"""The run document (schema ``udpreach/run-v1``): what ``run --json`` prints and we store.

Theory of operation: the document is built once, from the ledger and the run's facts, as
plain JSON-ready data; every report (the rich table, JSON, JUnit, Markdown, CSV, HTML) is
rendered from it and nothing else, so ``show`` can print a stored run exactly as ``run`` did.
It names the udpreach ``version`` that made it and carries its ``recommendations`` (the
fixed-port candidates and the rules that would open what is blocked), so a pipeline reading
the JSON gets what the reports print. Documents stored by an older udpreach have neither
key; readers compute the recommendations from the ranges then (``recommendations_of``).
"""

from __future__ import annotations

import time
from typing import Any

from udpreach import __version__
from udpreach.core import schema
from udpreach.core.ledger import Ledger
from udpreach.core.plan import Plan
from udpreach.core.recommend import recommend

SCHEMA = schema.RUN
DIFF_SCHEMA = schema.DIFF


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
    typed: schema.RunDocument = {  # the contract's keys, checked by type (schema.py)
        "schema": SCHEMA,
        "version": __version__,
        "run_id": run_id,
        "complete": complete,
        "agent": agent,
        "probe": probe,
        "plan": plan,
        "summary": ledger.summary(),
        "ranges": ledger.ranges(),
    }
    doc: dict[str, Any] = dict(typed)
    if extra:
        for k, v in extra.items():
            doc.setdefault(k, v)
    if "recommendations" not in doc:
        doc["recommendations"] = recommend(doc)
    return doc


def never_started(
    *,
    run_id: str,
    agent: dict[str, Any],
    probe: dict[str, Any],
    plan: Plan,
    started: float,
    warnings: list[str],
) -> dict[str, Any]:
    """The document of a run that never started (its agent did not answer): every cell is
    unknown, and the warnings say why."""
    ledger = Ledger(plan.dst_ports, plan.src_ports)
    ledger.finish(complete=False)
    finished = time.time()
    return build_document(
        run_id=run_id,
        complete=False,
        agent=agent,
        probe=probe,
        plan=plan.to_json(),
        ledger=ledger,
        extra={
            "started": started,
            "finished": finished,
            "duration": round(finished - started, 3),
            "loss": None,
            "warnings": list(warnings),
        },
    )


def recommendations_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The document's own recommendations, or (for a document stored before they were
    part of it) the ones its ranges give."""
    rec = doc.get("recommendations")
    if isinstance(rec, dict) and all(
        isinstance(rec.get(k), list) for k in ("fixed_ports", "rules", "notes")
    ):
        return rec
    return recommend(doc)
