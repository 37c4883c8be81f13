"""What every report says about a run, in the same words: the confidence behind the
verdicts, the send mode, the warnings, the version, the plan, and each range's details.

Theory of operation: the terminal report, JUnit, Markdown, CSV and HTML each lay a document
out in their own way, but they must not disagree about what it says, so the wording lives
here once. Everything reads the document defensively: a stored document may come from an
older udpreach (no ``version``, no ``recommendations``, no ``loss``), and a key that is
missing is said to be "not recorded", never guessed.

The loss estimate is *unknown* when nothing arrived at all (no cell open): then nothing
tells loss from blocking, and a report must say so rather than print "0%, bound 0" (what
the estimator's arithmetic gives for zero deliveries). Otherwise the false-blocked bound
and whether the confidence target was reached are the document's own, never recomputed
(an export that said "reached" where the JSON says not would be a lie), with one rule on
top: an incomplete run has not reached its target. A bound below 1e-6 reads ``< 1e-6``:
a sweep's arithmetic can round to 0, but no measurement proves a chance of zero.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from udpreach.core import schema
from udpreach.core.errors import PortSpecError
from udpreach.core.intervals import Range, is_sampled, planned_spans
from udpreach.core.portspec import HIGH_FIRST, PORT_LAST, format_ports, parse_ports, ranges_of
from udpreach.render.fold import Folded, Row

VERDICTS = schema.VERDICTS
VERDICT_TEXT = {
    "open": "open: at least one datagram arrived",
    "blocked": "blocked: nothing arrived, no ICMP error",
    "rejected": "rejected: an ICMP error came back",
    "untested": "untested: the probe could not send from that port",
    "unknown": "unknown: the run ended before the cell was settled",
}
# A plan's source ports are listed in full up to this many spans; beyond, summarised.
LISTED_SPANS = 8

_ICMP4: dict[tuple[int | None, int | None], str] = {
    (3, 0): "net unreachable",
    (3, 1): "host unreachable",
    (3, 2): "protocol unreachable",
    (3, 3): "port unreachable",
    (3, 4): "fragmentation needed",
    (3, 9): "net administratively prohibited",
    (3, 10): "host administratively prohibited",
    (3, 13): "administratively prohibited",
}
_ICMP6: dict[tuple[int | None, int | None], str] = {
    (1, 0): "no route",
    (1, 1): "administratively prohibited",
    (1, 3): "address unreachable",
    (1, 4): "port unreachable",
    (1, 5): "source address failed policy",
    (1, 6): "reject route",
    (2, 0): "packet too big",
}


def one_line(text: object) -> str:
    """Text on one line: whitespace runs (newlines included) become one space."""
    return " ".join(str(text).split())


def count(n: object) -> str:
    """A count with thousands separators (as is, if not a number)."""
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else str(n)


def cells(n: object) -> str:
    """``1 cell``, ``1,024 cells`` (what is not a number: as is, with ``cells``)."""
    if not isinstance(n, int) or isinstance(n, bool):
        return f"{n} cells"
    return f"{n:,} cell{'s' if n != 1 else ''}"


def ranges(n: int) -> str:
    """``1 range``, ``4,219 ranges``."""
    return f"{n:,} range{'s' if n != 1 else ''}"


def span(first: object, last: object) -> str:
    """``40000-49999``, or ``5000`` for one port."""
    return str(first) if first == last else f"{first}-{last}"


def when(ts: Any) -> str:
    """A timestamp in UTC, saying so."""
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
        return "?"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


# ---------------------------------------------------------------------------------------
# Confidence.


@dataclass(frozen=True)
class Confidence:
    """How far the run's ``blocked`` verdicts can be trusted.

    ``estimate`` and ``bound`` are None when unknown; ``recorded`` is False for a document
    without a ``loss`` block at all (an older udpreach, or a run that ended before its
    first round was judged). ``complete`` is the document's own: an incomplete run never
    reached its confidence target, whatever else it says.
    """

    recorded: bool
    estimate: float | None
    upper: float | None
    attempts: int | None
    bound: float | None
    target: float | None
    reached: bool
    blocked: int
    rate_found: int | None
    rate_backoffs: int
    complete: bool = True
    # Where the loss is, when it is not spread over the plan: (dst port, first, last, loss)
    # of the lossiest ranges, and the loss elsewhere (``loss.where``, ``loss.elsewhere``).
    where: tuple[tuple[int, int, int, float], ...] = ()
    elsewhere: float | None = None

    @property
    def loss_text(self) -> str:
        if self.estimate is None or self.upper is None:
            if not self.recorded:
                return "not measured"
            return "unknown (no datagram arrived, so loss cannot be told from blocking)"
        text = f"{100 * self.estimate:.3g}% (<= {100 * self.upper:.2g}% at 99%)"
        if self.where:
            shown = [f"{100 * p:.3g}% in {d}: {a}-{z}" for d, a, z, p in self.where[:3]]
            more = len(self.where) - len(shown)
            if more:
                shown.append(f"{more} more range{'s' if more > 1 else ''}")
            rest = f", {100 * self.elsewhere:.3g}% elsewhere" if self.elsewhere is not None else ""
            text += f", not spread: {', '.join(shown)}{rest}"
        return text

    @property
    def bound_text(self) -> str:
        """The chance that any ``blocked`` cell is really open: the document's bound, or
        ``none`` when no cell is blocked and the bound says nothing more."""
        if self.bound is None:
            return "unknown" if self.blocked else "none: no cell blocked"
        if not self.blocked and self.bound < TINY:
            return "none: no cell blocked"
        return bound_phrase(self.bound)

    @property
    def reached_text(self) -> str:
        target = f" (target {self.target:.2g})" if self.target is not None else ""
        if self.reached:
            return "yes: no cell blocked" if not self.blocked else "yes" + target
        return "NO" + ("" if self.complete else ": the run is incomplete") + target

    @property
    def attempts_text(self) -> str:
        if self.attempts is None:
            return "?"
        return f"up to {self.attempts} attempt{'s' if self.attempts != 1 else ''} per cell"

    @property
    def rate_text(self) -> str | None:
        """What the pacer did, when it backed off."""
        if not self.rate_backoffs:
            return None
        found = f", settled at {self.rate_found:,}/s" if self.rate_found is not None else ""
        return f"rate backed off {self.rate_backoffs}x{found}"

    def machine(self) -> dict[str, str]:
        """The same facts as plain values, for JUnit properties and CSV columns."""
        return {
            "loss_estimate": "unknown" if self.estimate is None else f"{self.estimate:.6g}",
            "loss_upper_99": "unknown" if self.upper is None else f"{self.upper:.6g}",
            "false_blocked_bound": (
                "unknown"
                if self.bound is None
                else "< 1e-6"
                if self.bound < TINY
                else f"{self.bound:.6g}"
            ),
            "confidence_target": "" if self.target is None else f"{self.target:.6g}",
            "confidence_reached": "true" if self.reached else "false",
        }


# A bound below this reads "< 1e-6": never "0" (no measurement proves a chance of zero).
TINY = 1e-6


def bound_phrase(bound: float) -> str:
    """A false-blocked bound in words: ``<= 0.00012``, ``<= 1``, ``< 1e-6``."""
    return "< 1e-6" if bound < TINY else f"<= {bound:.2g}"


def confidence(doc: dict[str, Any]) -> Confidence:
    """The confidence facts of a run document, as the document states them.

    Two rules hold whatever the document says: an incomplete run has not reached its
    target, and where nothing arrived the loss (and so the bound) is unknown, since nothing
    tells loss from blocking then (an older estimator wrote "0%, bound 0" for that).
    """
    summary = doc.get("summary") or {}
    blocked = _int(summary.get("blocked")) or 0
    opened = _int(summary.get("open")) or 0
    complete = bool(doc.get("complete"))
    raw = doc.get("loss")
    loss: dict[str, Any] = raw if isinstance(raw, dict) else {}
    estimate = _number(loss.get("estimate"))
    upper = _number(loss.get("upper"))
    bound = _number(loss.get("false_blocked_bound"))
    deliveries = _int(loss.get("deliveries"))
    if opened == 0 or deliveries == 0:
        estimate = upper = bound = None  # nothing arrived: nothing measured the loss
    if estimate is None:
        upper = bound = None
    said = loss.get("confidence_reached")
    target = _number(loss.get("confidence_target"))
    if not complete:
        reached = False
    elif not blocked:
        reached = said if isinstance(said, bool) else True
    elif bound is None:
        reached = False
    elif isinstance(said, bool):
        reached = said
    else:
        reached = target is not None and bound <= target
    return Confidence(
        recorded=bool(loss),
        estimate=estimate,
        upper=upper,
        attempts=_int(loss.get("attempts")),
        bound=bound,
        target=target,
        reached=reached,
        blocked=blocked,
        rate_found=_int(loss.get("rate_found")),
        rate_backoffs=_int(loss.get("rate_backoffs")) or 0,
        complete=complete,
        where=_where(loss.get("where")) if estimate is not None else (),
        elsewhere=_number(loss.get("elsewhere")),
    )


def _where(raw: Any) -> tuple[tuple[int, int, int, float], ...]:
    """``loss.where`` as (dst port, first, last, loss), the malformed entries left out."""
    out: list[tuple[int, int, int, float]] = []
    for r in raw if isinstance(raw, list) else []:
        if not isinstance(r, dict):
            continue
        d, a, z, p = (
            _int(r.get("dst_port")),
            _int(r.get("first")),
            _int(r.get("last")),
            _number(r.get("estimate")),
        )
        if d is not None and a is not None and z is not None and p is not None:
            out.append((d, a, z, p))
    return tuple(out)


# ---------------------------------------------------------------------------------------
# The run's other facts.


def version(doc: dict[str, Any]) -> str:
    """The udpreach version that made the document."""
    v = doc.get("version")
    return one_line(v) if isinstance(v, str) and v else "not recorded"


def send_mode(doc: dict[str, Any]) -> str:
    """How the probe sent: ``bind`` (ordinary sockets) or ``raw``."""
    mode = (doc.get("probe") or {}).get("send_mode")
    return one_line(mode) if isinstance(mode, str) and mode else "not recorded"


def warnings(doc: dict[str, Any]) -> list[str]:
    """The document's warnings, each on one line."""
    raw = doc.get("warnings")
    if not isinstance(raw, list):
        return []
    return [one_line(w) for w in raw if str(w).strip()]


def path_mtu(doc: dict[str, Any]) -> str | None:
    """The path MTU the run learnt, in words (None when it learnt none)."""
    raw = doc.get("path_mtu")
    if raw is None:
        return None
    if isinstance(raw, dict):
        mtu = raw.get("mtu", raw.get("next_hop_mtu"))
        hop = raw.get("from", raw.get("hop"))
        text = f"{one_line(mtu)} bytes" if mtu is not None else "learnt"
        return text + (f" (said by {one_line(hop)})" if hop else "")
    if _int(raw) is not None:
        return f"{raw} bytes"
    return one_line(raw)


def status(doc: dict[str, Any]) -> str:
    return "complete" if doc.get("complete") else "incomplete"


def no_fixed_port(doc: dict[str, Any]) -> str:
    """Why a run names no fixed-port candidate."""
    if not doc.get("complete"):
        return "the run is incomplete (only a complete run can show a port open for all)"
    return "no destination port was open for every source port tested"


def src_ports_text(plan: dict[str, Any], *, sep: str = ",") -> str:
    """The plan's source ports, as a phrase: the SPEC in full when it is a few spans, else
    a summary (a ``random:500`` plan is 500 scattered ports; the JSON document lists them)."""
    spec = plan.get("src_ports", "?")
    try:
        spans = ranges_of(parse_ports(str(spec)))
    except PortSpecError:
        return f"source ports {one_line(spec)}"
    if len(spans) <= LISTED_SPANS:
        return "source ports " + sep.join(span(a, b) for a, b in spans)
    n = sum(b - a + 1 for a, b in spans)
    lo, hi = spans[0][0], spans[-1][1]
    if is_sampled(spans):
        if lo >= HIGH_FIRST:  # random:N draws from all the high ports, not the samples' span
            return f"{n:,} source ports sampled from {HIGH_FIRST}-{PORT_LAST} ({lo} to {hi})"
        return f"{n:,} source ports sampled from {lo}-{hi}"
    return f"{n:,} source ports in {len(spans):,} spans from {lo}-{hi}"


def src_ports_listed(plan: dict[str, Any]) -> bool:
    """Whether ``src_ports_text`` lists the plan's source ports in full."""
    try:
        return len(ranges_of(parse_ports(str(plan.get("src_ports", "?"))))) <= LISTED_SPANS
    except PortSpecError:
        return True


def dst_ports_text(ports: Any, *, sep: str = ",") -> str:
    if not isinstance(ports, list):
        return "?"
    spec = format_ports(p for p in ports if _int(p) is not None)
    return spec.replace(",", sep) or "?"


def counted(n: int, noun: str) -> str:
    """``1 cell``, ``2,000 cells``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def source_ports_label(spec: str) -> str:
    """``source port 53`` for one port, else ``source ports 53-54, 80``."""
    one = spec.strip().isdigit()
    return f"source port{'' if one else 's'} {spec}"


def plan_text(doc: dict[str, Any], *, sep: str = ",") -> str:
    """The plan in one sentence."""
    plan = doc.get("plan") or {}
    rate = plan.get("rate", "?")
    auto = " (auto)" if plan.get("copies_mode") == "auto" else ""
    ceiling = _int((doc.get("loss") or {}).get("rate_ceiling"))
    held = f" (the probe's rate ceiling held it to {ceiling:,}/s)" if ceiling else ""
    return (
        f"{src_ports_text(plan, sep=sep)} to destination ports "
        f"{dst_ports_text(plan.get('dst_ports'), sep=sep)}; "
        f"copies <= {plan.get('copies', '?')}{auto}, rate <= {count(rate)}/s{held}, "
        f"{plan.get('size', '?')} bytes"
    )


def agent_text(doc: dict[str, Any], *, sep: str = ",") -> str:
    a = doc.get("agent") or {}
    ports = dst_ports_text(a.get("ports"), sep=sep)
    text = f"{one_line(a.get('name', '?'))} (registered {one_line(a.get('registered', '?'))}"
    if a.get("observed") and a.get("observed") != a.get("registered"):
        text += f", observed {one_line(a.get('observed'))}"
    return text + (f", ports {ports})" if ports != "?" else ")")


def sampled(doc: dict[str, Any]) -> bool:
    """Whether the document's plan sampled its source ports (``random:N``)."""
    try:
        return is_sampled(ranges_of(parse_ports(str((doc.get("plan") or {})["src_ports"]))))
    except (KeyError, PortSpecError):
        return is_sampled(planned_spans(doc.get("ranges") or []))


def summary_extras(doc: dict[str, Any]) -> list[str]:
    """What the summary counts do not show: how many verdicts rest on samples, and how
    many blocked cells could be rejects whose ICMP errors were rate-limited."""
    inferred = limited = 0
    for r in doc.get("ranges") or []:
        if "inferred" in r:
            inferred += _int(r["inferred"]) or 0
        if "icmp_limited" in r:
            limited += _int(r["icmp_limited"]) or 0
    out = []
    if limited:
        out.append(
            f"{limited:,} blocked cells were silent only while ICMP was rate-limited: "
            "dropped or rejected is not known"
        )
    if inferred:
        out.append(f"{inferred:,} verdicts inferred from samples of their range")
    return out


# ---------------------------------------------------------------------------------------
# Expectations (udpreach.core.expect.judgement).


def judged_text(judged: dict[str, Any], planned: object = None) -> str:
    """``1,234 of 129,024 cells judged by 2 of 3 entries, 10 deviating``."""
    entries = judged.get("entries") or []
    used = sum(1 for e in entries if _int(e.get("cells")))
    deviating = _int(judged.get("deviating")) or 0
    n = _int(judged.get("cells")) or 0
    total = _int(planned)
    text = f"{n:,} of {cells(total)}" if total is not None else cells(n)
    text += f" judged by {used:,} of {len(entries):,} "
    text += "entry" if len(entries) == 1 else "entries"
    return text + (f", {deviating:,} deviating" if deviating else "")


def unmatched_text(u: dict[str, Any]) -> str:
    """One entry that judged no cell, and why."""
    line = _int(u.get("line"))
    where = f"entry #{u.get('entry', '?')}" + (f" (line {line})" if line else "")
    return f"{where} judged no cell: {one_line(u.get('reason', '?'))}"


# ---------------------------------------------------------------------------------------
# A range's details.


def icmp_text(icmp: Any) -> str:
    """``ICMP type 3 code 13 (administratively prohibited) from 198.18.2.1, verified``
    (``ICMPv6 type 1 code 1 ...`` from an IPv6 sender)."""
    if not isinstance(icmp, dict):
        return "ICMP error"
    t, c, sender = icmp.get("type"), icmp.get("code"), icmp.get("from")
    try:
        v6 = ipaddress.ip_address(str(sender)).version == 6
    except ValueError:
        v6 = False
    name = (_ICMP6 if v6 else _ICMP4).get((_int(t), _int(c)))
    text = f"{'ICMPv6' if v6 else 'ICMP'} type {one_line(t)} code {one_line(c)}"
    text += f" ({name})" if name else ""
    text += f" from {one_line(sender)}"
    verified = icmp.get("verified")
    if verified is True:
        text += ", verified (it quoted our datagram)"
    elif verified is False:
        text += ", unverified (it quoted headers only)"
    return text


def range_details(r: Range, *, whole: bool = True) -> list[str]:
    """The details of one range of a document, one phrase each.

    Args:
        whole: the phrases describe this range alone; False leaves out what holds for this
            range only (what the agent observed, its inferred and icmp_limited counts), for
            a row that stands for several ranges sharing its details.
    """
    out: list[str] = []
    if r.get("translated"):
        obs = r.get("observed") if whole else None
        if isinstance(obs, dict) and obs.get("addresses"):
            addrs = ", ".join(one_line(a) for a in obs.get("addresses") or [])
            ports = span(obs.get("first_port", "?"), obs.get("last_port", "?"))
            out.append(f"translated (NAT): seen from {addrs} ports {ports}")
        else:
            out.append("source port translated (NAT)")
    if r.get("icmp") is not None:
        out.append(icmp_text(r.get("icmp")))
    if r.get("reason"):
        out.append(one_line(r["reason"]))
    if not whole:
        return out
    n = int(r["last"]) - int(r["first"]) + 1
    inferred = _int(r.get("inferred")) or 0
    if inferred:
        out.append(f"{inferred:,} of {n:,} cells inferred from samples of this range")
    limited = _int(r.get("icmp_limited")) or 0
    if limited:
        out.append(
            f"{limited:,} of {n:,} cells silent while ICMP was rate-limited: "
            "dropped or rejected not known"
        )
    return out


# ---------------------------------------------------------------------------------------
# Folded rows (udpreach.render.fold).


def ordered(counts: dict[str, int]) -> list[tuple[str, int]]:
    """Counts per label, verdicts in their usual order."""
    order = {v: i for i, v in enumerate(VERDICTS)}
    return sorted(counts.items(), key=lambda kv: (order.get(kv[0], 99), kv[0]))


def row_details(row: Row) -> list[str]:
    """What a displayed row says beyond its span, cells and label."""
    if row.exact and row.source is not None:
        return range_details(row.source)
    out: list[str] = []
    if row.source is not None:  # one label and one set of details, across gaps
        if row.sampled:  # (the ports between were not planned)
            out.append(f"{row.cells:,} sampled ports ({row.ranges:,} ranges)")
        else:  # (a diff: the cells between did not change)
            out.append(f"in {ranges(row.ranges)}")
        out += range_details(row.source, whole=False)
    else:
        parts = ", ".join(f"{n:,} {lab}" for lab, n in ordered(row.counts))
        out.append(f"{parts}, in {row.ranges:,} ranges")
        if row.translated:
            out.append(f"{row.translated:,} cells translated (NAT)")
        out += [icmp_text(i) for i in row.icmp]
        out += [one_line(r) for r in row.reasons]
        if row.more_details:
            out.append("more ICMP details or reasons in the exact list")
    if row.inferred:
        out.append(f"{row.inferred:,} of {row.cells:,} cells inferred from samples")
    if row.icmp_limited:
        out.append(
            f"{row.icmp_limited:,} of {row.cells:,} cells silent while ICMP was "
            "rate-limited: dropped or rejected not known"
        )
    return out


def fold_note(folded: Folded) -> str | None:
    """What a folded table says about its folding (None: not folded)."""
    if not folded.folded:
        return None
    what = {
        "gaps": "neighbouring samples with one verdict share a row",
        "unknown": "interleaved cells share a row: unknown with the verdict around it",
        "mixed": "interleaved ranges share a row",
    }.get(folded.how or "", "")
    rows = len(folded.rows)
    text = f"{rows:,} row{'s' if rows != 1 else ''} for {folded.ranges:,} ranges"
    text += f" ({what})" if what else ""
    if folded.hidden:
        text += f"; {folded.hidden:,} more rows not shown"
    return text
