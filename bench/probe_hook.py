"""``python -m bench.probe_hook probe ...``: ``udpreach probe`` with the engine's timeline
in its debug log, for the bench.

The engine (``udpreach.core.sweep.Sweep``) logs nothing itself: it is a pure state machine,
and the trio shell around it only performs its actions. The bench still needs the send
phase's own rate (the first sweep round, from its start to its last datagram handed to the
sender) to compare with the C sender, and where a slow run spent its time. So this wraps two
of the engine's stage hooks, ``_begin`` (a stage starts sending) and ``_settled`` (its last
datagram had time to arrive and the agent flushed), and logs one line per stage when it
settles::

    run R stage sweep round 1: sent N datagrams (G groups) in S s, settled after T s;
    rate 123456/s burst 0 backoffs 0 limiter -

Nothing runs per datagram or per batch: the wrappers cost two calls per stage. Only the
bench starts the probe this way; ``udpreach probe`` itself is unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from udpreach.core import pacing
from udpreach.core import sweep as engine

log = logging.getLogger("udpreach.bench")
TRACE_ENV = "UDPREACH_BENCH_TRACE"

#: One settled stage, as ``stage_line`` writes it and ``parse_stage_lines`` reads it.
STAGE_LINE = re.compile(
    r"run (?P<run>\S+) stage (?P<stage>\w+) round (?P<round>\d+): sent (?P<sent>\d+) "
    r"datagrams \((?P<groups>\d+) groups\) in (?P<send>[0-9.]+)s, settled after "
    r"(?P<settle>[0-9.]+)s; rate (?P<rate>\d+)/s burst (?P<burst>\d+) backoffs "
    r"(?P<backoffs>-?\d+) limiter (?P<limiter>\d+|-)"
)


@dataclass(frozen=True)
class StageRecord:
    """One settled stage of one run."""

    run_id: str
    stage: str
    round: int
    sent: int  # datagrams handed to the sender in this stage
    groups: int  # source ports among them
    send_seconds: float  # from the stage's start to its last datagram handed over
    settle_seconds: float  # from the stage's start to settled
    rate: int  # the pacer's rate when it settled
    burst: int
    backoffs: int
    limiter: int | None


def stage_line(
    sweep: engine.Sweep, started: float, sent_before: int, groups: int, now: float
) -> str:
    """The log line of the stage ``sweep`` just settled (begun at ``started``)."""
    pacer = sweep.pacer
    last_send = max(started, float(getattr(sweep, "_last_send", started)))
    limiter = "-" if pacer.limit_found is None else str(round(pacer.limit_found))
    return (
        f"run {sweep.run_id or '-'} stage {sweep.stage.value} round {sweep.round}: "
        f"sent {sweep.ledger.sent_total - sent_before} datagrams ({groups} groups) in "
        f"{last_send - started:.4f}s, settled after {now - started:.4f}s; "
        f"rate {round(pacer.rate)}/s burst {pacer.burst} backoffs {pacer.backoffs} "
        f"limiter {limiter}"
    )


def parse_stage_lines(text: str) -> list[StageRecord]:
    """Every stage line in a log's text, in order."""
    out: list[StageRecord] = []
    for m in STAGE_LINE.finditer(text):
        limiter = m.group("limiter")
        out.append(
            StageRecord(
                run_id=m.group("run"),
                stage=m.group("stage"),
                round=int(m.group("round")),
                sent=int(m.group("sent")),
                groups=int(m.group("groups")),
                send_seconds=float(m.group("send")),
                settle_seconds=float(m.group("settle")),
                rate=int(m.group("rate")),
                burst=int(m.group("burst")),
                backoffs=int(m.group("backoffs")),
                limiter=None if limiter == "-" else int(limiter),
            )
        )
    return out


def install(emit: Callable[[str], None] | None = None) -> Callable[[], None]:
    """Wrap the engine's stage hooks so that each settled stage is logged (or handed to
    ``emit``). Returns a function that undoes it (for tests)."""
    cls = engine.Sweep
    begin, settled = cls._begin, cls._settled
    out = emit or log.debug

    def _begin(self: engine.Sweep, *args: Any, **kwargs: Any) -> None:
        begin(self, *args, **kwargs)
        now = float(args[3] if len(args) > 3 else kwargs["now"])
        self.__dict__["_bench_stage"] = (now, self.ledger.sent_total, len(self._queue))

    def _settled(self: engine.Sweep, now: float) -> None:
        started, sent_before, groups = self.__dict__.get("_bench_stage", (now, 0, 0))
        out(stage_line(self, started, sent_before, groups, now))
        settled(self, now)

    cls._begin = _begin  # type: ignore[method-assign]
    cls._settled = _settled  # type: ignore[method-assign]
    undo_trace = _trace_windows(out) if os.environ.get(TRACE_ENV) else None

    def undo() -> None:
        cls._begin = begin  # type: ignore[method-assign]
        cls._settled = settled  # type: ignore[method-assign]
        if undo_trace is not None:
            undo_trace()

    return undo


def _trace_windows(out: Callable[[str], None]) -> Callable[[], None]:
    """With ``UDPREACH_BENCH_TRACE`` set (diagnosis only, not in a bench's figures): one
    line per window the pacer judges, and per retry round it judges."""
    cls = pacing.Pacer
    on_window, on_retry = cls.on_window, cls.on_retry_round

    def _on_window(self: pacing.Pacer, w: pacing.Window, now: float) -> None:
        before = (self.rate, self.burst)
        on_window(self, w, now)
        ref = self.reference
        out(
            f"window t={w.start:.4f}-{w.end:.4f} judged {now:.4f} rate {w.rate:.0f} "
            f"burst {w.burst} sent {w.sent} delivered {w.delivered} "
            f"ref {ref if ref is None else round(ref, 3)} -> rate {self.rate:.0f} "
            f"burst {self.burst} (was {before[0]:.0f}/{before[1]}) "
            f"limit {self.limit_found if self.limit_found is None else round(self.limit_found)}"
        )

    def _on_retry(
        self: pacing.Pacer, rate: float, duration: float, opened: int, before: int
    ) -> None:
        was = self.rate
        on_retry(self, rate, duration, opened, before)
        out(
            f"retry round rate {rate:.0f} duration {duration:.3f}s opened {opened} "
            f"before {before} -> rate {self.rate:.0f} (was {was:.0f}) burst {self.burst}"
        )

    cls.on_window = _on_window  # type: ignore[method-assign]
    cls.on_retry_round = _on_retry  # type: ignore[method-assign]

    def undo() -> None:
        cls.on_window = on_window  # type: ignore[method-assign]
        cls.on_retry_round = on_retry  # type: ignore[method-assign]

    return undo


def main() -> None:
    install()
    from udpreach.cli import main as cli

    sys.argv[0] = "udpreach"
    cli()


if __name__ == "__main__":
    main()
