"""Rendering a run document for people: summary, port-range table, compact matrix.

Everything here reads only the run document, so ``show`` prints a stored run exactly as
``run`` printed it.
"""

from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

COLOURS = {
    "open": "green",
    "blocked": "red",
    "rejected": "dark_orange",
    "untested": "magenta",
    "unknown": "grey50",
}
GLYPH_PURE = "█"
GLYPH_MIXED = "▓"
MATRIX_COLUMNS = 64


def _fmt_range(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def bucket_matrix(
    doc: dict[str, Any], columns: int = MATRIX_COLUMNS
) -> tuple[int, int, int, dict[int, list[dict[str, int]]]]:
    """Source-port buckets by destination port: (low, high, width, {dst: [counts per bucket]})."""
    ranges = doc.get("ranges") or []
    if not ranges:
        return 0, 0, 1, {}
    low = min(r["first"] for r in ranges)
    high = max(r["last"] for r in ranges)
    span = high - low + 1
    width = max(1, math.ceil(span / columns))
    nb = math.ceil(span / width)
    rows: dict[int, list[dict[str, int]]] = {}
    for r in ranges:
        row = rows.setdefault(r["dst_port"], [{} for _ in range(nb)])
        a, b = r["first"], r["last"]
        while a <= b:
            bi = (a - low) // width
            end = min(b, low + (bi + 1) * width - 1)
            cell = row[bi]
            cell[r["verdict"]] = cell.get(r["verdict"], 0) + (end - a + 1)
            a = end + 1
    return low, high, width, rows


def render_matrix(doc: dict[str, Any]) -> Table:
    low, high, width, rows = bucket_matrix(doc)
    table = Table(
        title=f"Matrix: source ports {low}-{high}, {width} per column",
        show_header=True,
        header_style="bold",
        box=None,
        pad_edge=False,
    )
    table.add_column("dst port", justify="right")
    table.add_column(f"{low} … {high}", no_wrap=True)
    for dst in sorted(rows):
        line = Text()
        for counts in rows[dst]:
            if not counts:
                line.append(" ")
                continue
            major = max(counts, key=lambda v: counts[v])
            glyph = GLYPH_PURE if len(counts) == 1 else GLYPH_MIXED
            line.append(glyph, style=COLOURS.get(major, "white"))
        table.add_row(str(dst), line)
    legend = Text("  ")
    for verdict, colour in COLOURS.items():
        legend.append(GLYPH_PURE, style=colour)
        legend.append(f" {verdict}  ")
    legend.append(f"{GLYPH_MIXED} mixed (colour of the majority)")
    table.caption = legend.plain
    return table


def _range_table(title: str, ranges: list[dict[str, Any]], *, expected: bool = False) -> Table:
    table = Table(title=title, header_style="bold")
    table.add_column("dst port", justify="right")
    table.add_column("source ports", justify="right")
    table.add_column("count", justify="right")
    if expected:
        table.add_column("expected")
    table.add_column("verdict")
    table.add_column("sent/recv", justify="right")
    table.add_column("translated / details")
    for r in ranges:
        details: list[str] = []
        if r.get("translated"):
            obs = r.get("observed") or {}
            addrs = ",".join(obs.get("addresses") or [])
            details.append(
                f"yes: seen from {addrs} ports "
                f"{_fmt_range(obs.get('first_port', 0), obs.get('last_port', 0))}"
            )
        icmp = r.get("icmp")
        if icmp:
            details.append(f"ICMP type {icmp['type']} code {icmp['code']} from {icmp['from']}")
        if r.get("reason"):
            details.append(str(r["reason"]))
        verdict = r["verdict"]
        row: list[str | Text] = [
            str(r["dst_port"]),
            _fmt_range(r["first"], r["last"]),
            f"{r['last'] - r['first'] + 1:,}",
        ]
        if expected:
            row.append(Text(str(r.get("expected")), style=COLOURS.get(str(r.get("expected")), "")))
        row += [
            Text(verdict, style=f"bold {COLOURS.get(verdict, '')}"),
            f"{r.get('sent', 0):,}/{r.get('received', 0):,}",
            "; ".join(details),
        ]
        table.add_row(*row)
    return table


def _summary_line(doc: dict[str, Any]) -> Text:
    s = doc.get("summary", {})
    t = Text(f"{s.get('cells', 0):,} cells: ")
    parts = []
    for v, colour in COLOURS.items():
        n = s.get(v, 0)
        if n:
            parts.append((f"{n:,} {v}", colour))
    for i, (txt, colour) in enumerate(parts):
        if i:
            t.append(", ")
        t.append(txt, style=f"bold {colour}")
    return t


def render_run(doc: dict[str, Any], console: Console, *, beside: Any = None) -> None:
    """Print the whole human report of a run document.

    Args:
        beside: something to show to the left of the summary and range table (the demo puts
            the firewall policy there), when the terminal is wide enough.
    """
    parts = run_renderables(doc)
    if beside is not None and console.width >= 150:
        grid = Table.grid(padding=(0, 2))
        grid.add_column()
        grid.add_column()
        grid.add_row(beside, Group(*parts[:-1]))
        console.print(grid)
        console.print(parts[-1])
        return
    if beside is not None:
        console.print(beside)
    for part in parts:
        console.print(part)


def run_renderables(doc: dict[str, Any]) -> list[Any]:
    """The report as renderables; the matrix and what follows it come last, as one group."""
    out: list[Any] = []
    agent = doc.get("agent", {})
    probe = doc.get("probe", {})
    plan = doc.get("plan", {})
    started = doc.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "?"
    status = (
        Text("complete", style="bold green")
        if doc.get("complete")
        else Text("INCOMPLETE", style="bold red")
    )
    head = Text()
    head.append(f"udpreach run {doc.get('run_id')}", style="bold")
    head.append(f"  {when}  ")
    head.append_text(status)
    if doc.get("duration") is not None:
        head.append(f"  {doc['duration']:.2f}s")
    out.append(head)
    reg, obs = agent.get("registered"), agent.get("observed")
    where = reg if reg == obs else f"{reg} (observed {obs})"
    out.append(
        f"agent [bold]{agent.get('name')}[/] at {where}, ports "
        f"{','.join(map(str, agent.get('ports', [])))}   "
        f"probe {probe.get('address')} -> {probe.get('target', obs)}"
        f" ({probe.get('send_mode', 'bind')} mode)"
    )
    dst_ports = ",".join(map(str, plan.get("dst_ports", [])))
    out.append(
        f"plan: source ports {plan.get('src_ports')} -> dst {dst_ports}, "
        f"copies <= {plan.get('copies')}"
        f"{' (auto)' if plan.get('copies_mode') == 'auto' else ''}, "
        f"rate <= {plan.get('rate'):,}/s, {plan.get('size')} bytes"
    )
    for w in doc.get("warnings") or []:
        out.append(Text.from_markup(f"[bold yellow]warning:[/] {w}"))
    out.append(_summary_line(doc))
    loss = doc.get("loss")
    if loss:
        plural = "s" if loss["attempts"] != 1 else ""
        line = (
            f"loss on the path: {100 * loss['estimate']:.3g}% "
            f"(<= {100 * loss['upper']:.2g}% at 99%), "
            f"up to {loss['attempts']} attempt{plural} per cell; "
        )
        if doc.get("summary", {}).get("blocked"):
            bound = loss["false_blocked_bound"]
            ok = loss.get("confidence_reached")
            line += f"chance that any 'blocked' cell is really open: <= {bound:.2g}" + (
                "" if ok else "  [bold red](confidence target not reached)[/]"
            )
        else:
            line += "no cell blocked"
        if loss.get("rate_backoffs"):
            line += (
                f"; rate backed off {loss['rate_backoffs']}x, settled at {loss['rate_found']:,}/s"
            )
        out.append(Text.from_markup(line))
    out.append(_range_table("Source-port ranges", doc.get("ranges") or []))
    tail: list[Any] = [render_matrix(doc)]
    deviations = doc.get("deviations")
    if deviations is not None:
        if deviations:
            tail.append(
                _range_table(
                    f"Deviations from expectations ({len(deviations)} ranges)",
                    deviations,
                    expected=True,
                )
            )
        else:
            tail.append(Text.from_markup("[bold green]as expected: no deviations[/]"))
    rec = _recommendations(doc)
    if rec is not None:
        tail.append(rec)
    out.append(Group(*tail))
    return out


def _recommendations(doc: dict[str, Any]) -> Any:
    from udpreach.core.recommend import recommend

    rec = recommend(doc)
    fixed = rec.get("fixed_ports") or []
    lines: list[Any] = []
    if fixed:
        lines.append(
            Text(
                "fixed notification port candidates (open from every source port tested): "
                + ",".join(map(str, fixed)),
                style="green",
            )
        )
    elif doc.get("summary", {}).get("open", 0) < doc.get("summary", {}).get("cells", 0):
        lines.append(Text("no destination port passed from every source port", style="red"))
    rules = rec.get("rules") or []
    if rules:
        lines.append(Text("to open what is blocked on this path:"))
        for r in rules:
            for key in ("nft", "iptables"):
                cmds = r.get(key) or []
                for cmd in [cmds] if isinstance(cmds, str) else cmds:
                    lines.append(Text(f"  {cmd}", style="cyan"))
    return Group(*lines) if lines else None


def render_agents(agents: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="Registered agents", header_style="bold")
    for col in ("name", "registered", "observed", "ports", "connected since", "state"):
        table.add_column(col)
    for a in sorted(agents, key=lambda a: str(a.get("name"))):
        since = a.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(since)) if since else "?"
        reg, obs = str(a.get("registered")), str(a.get("observed"))
        table.add_row(
            str(a.get("name")),
            reg,
            obs if obs == reg else Text(f"{obs} (NAT)", style="yellow"),
            ",".join(map(str, a.get("ports", []))),
            when,
            "running" if a.get("busy") else "idle",
        )
    console.print(table)
