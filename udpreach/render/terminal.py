"""Rendering a run document for people: summary, port-range table, compact matrix.

Everything here reads only the run document, so ``show`` prints a stored run exactly as
``run`` printed it.

Theory of operation: a report must tell the truth at any width, in colour or not, on a
terminal or into a pipe. So nothing that names a port range, an address, an ICMP detail or
a command is ever cut or split:

* Free text is laid out by ``Para``, which wraps at spaces only; a token longer than the
  width (an IPv6 address at 30 columns) stands on its own line and runs past the edge,
  where the terminal, not udpreach, wraps it.
* A table is used only when every value fits its column on one line (the details hold one
  phrase a line), at any width, on a terminal or not; where any column would wrap, the
  same rows come as a list, one field a line.
* A command is one line, always (``Command``), so it pastes as it was printed.
* The matrix narrows its columns to the width; every verdict has its own glyph, coloured
  where colour shows (colour alone is lost on colour-blind eyes, and in a pipe, with
  ``NO_COLOR`` or on ``TERM=dumb``), and plain ASCII ones where the output encoding is not
  UTF-8.
* Long lists are folded (``udpreach.render.fold``) to at most ``MAX_ROWS`` rows, saying
  so and where the exact list is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from rich.console import Console, ConsoleOptions, Group, JustifyMethod, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from udpreach.core.document import recommendations_of
from udpreach.core.expect import judgement_of
from udpreach.core.intervals import Range
from udpreach.render import facts
from udpreach.render.fold import Row, fold

COLOURS = {
    "open": "green",
    "blocked": "red",
    "rejected": "dark_orange",
    "untested": "magenta",
    "unknown": "grey50",
}
# Every verdict has a glyph of its own, in colour or not; ASCII where the encoding needs it.
GLYPHS_PLAIN = {
    "open": "·",
    "blocked": "█",
    "rejected": "▒",
    "untested": "-",
    "unknown": "?",
    "mixed": "▞",
}
GLYPHS_ASCII = {
    "open": ".",
    "blocked": "#",
    "rejected": "x",
    "untested": "-",
    "unknown": "?",
    "mixed": "~",
}
MATRIX_COLUMNS = 64
MIN_MATRIX_COLUMNS = 8
MAX_ROWS = 40  # rows of a range table before folding
MAX_RULES = 8  # recommended rules printed
MAX_RULE_SPANS = 32  # source-port spans of a rule printed as a command
MAX_IPTABLES = 4  # iptables commands printed per rule
WHERE_EXACT = "the exact list: --csv FILE or --json"


# ---------------------------------------------------------------------------------------
# Layout primitives.


def _plain(console: Console) -> bool:
    """True when colour will not show (a pipe, NO_COLOR, TERM=dumb)."""
    return console.no_color or console.color_system is None


def _ascii(console: Console, options: ConsoleOptions) -> bool:
    """True when the output cannot carry more than ASCII."""
    return options.ascii_only or not (console.encoding or "").lower().startswith("utf")


def _words(text: Text) -> list[Text]:
    """The words of a text; an empty word stands for each extra space between two."""
    return list(text.split(" ", allow_blank=True))


class Para:
    """Text wrapped at spaces only; ``indent`` before the first line, ``indent + hang``
    before the others. A word is never split: one longer than the width has a line of its
    own and runs past the edge."""

    def __init__(self, text: Text | str, *, indent: int = 0, hang: int = 2) -> None:
        self.text = text if isinstance(text, Text) else Text(text)
        self.indent = indent
        self.hang = hang

    def lines(self, width: int) -> list[Text]:
        out: list[Text] = []
        line = Text(" " * self.indent)
        start = self.indent
        for word in _words(self.text):
            if line.cell_len > start and line.cell_len + 1 + word.cell_len > width:
                line.rstrip()  # the spaces it was broken at end no line either
                out.append(line)
                start = self.indent + self.hang
                line = Text(" " * start)
            if line.cell_len == start and not word.plain:
                continue  # no line starts with the spaces it was broken at
            if line.cell_len > start:
                line.append(" ")
            line.append_text(word)
        out.append(line)
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines(options.max_width):
            yield from line.render(console)
            yield Segment.line()

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        words = _words(self.text)
        longest = max((w.cell_len for w in words), default=0)  # empty words count 0
        full = sum(w.cell_len for w in words) + max(0, len(words) - 1)
        return Measurement(self.indent + self.hang + longest, self.indent + full)


class Command:
    """A command to paste: one line, never wrapped, never cut."""

    def __init__(self, command: str, *, indent: int = 2, style: str = "cyan") -> None:
        self.command = facts.one_line(command)
        self.indent = indent
        self.style = style

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Segment(" " * self.indent)
        yield Segment(self.command, console.get_style(self.style))
        yield Segment.line()

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        n = self.indent + len(self.command)
        return Measurement(n, n)


def _styled(text: str, style: str) -> Text:
    return Text(text, style=style)


def _width(value: Text | str) -> int:
    return value.cell_len if isinstance(value, Text) else Text(value).cell_len


def _lines_of(value: Text | str) -> list[Text]:
    return list((value if isinstance(value, Text) else Text(value)).split("\n"))


def _fitted_table(
    title: str,
    header: Sequence[tuple[str, JustifyMethod]],
    rows: Sequence[Sequence[Text | str]],
) -> tuple[Table, int]:
    """A table in which no value wraps, and the width it needs.

    Every column is as wide as its widest line (a value may hold several lines: the
    details, one phrase a line), so the table fits a width only if the returned need is at
    most that width; otherwise rich would wrap a value (a range one word a line) or cut it,
    and the caller lays the rows out as a list instead.

    Args:
        header: (column name, justify) pairs.
    """
    table = Table(title=Text(title), header_style="bold", title_justify="left")
    need = 1  # the left border
    for i, (name, justify) in enumerate(header):
        values = [line for row in rows for line in _lines_of(row[i])]
        col_min = max([_width(name), *(line.cell_len for line in values)])
        table.add_column(name, justify=justify, no_wrap=True, width=col_min)
        need += col_min + 3  # padding on both sides and a border
    for row in rows:  # as Text: a value is never read as rich markup
        table.add_row(*(v if isinstance(v, Text) else Text(v) for v in row))
    return table, need


# ---------------------------------------------------------------------------------------
# Range tables (ranges, deviations, diff changes).


def _label_text(label: str) -> Text:
    if " -> " in label:
        before, after = label.split(" -> ", 1)
        t = Text(before, style=COLOURS.get(before, ""))
        t.append(" -> ")
        t.append(after, style=COLOURS.get(after, ""))
        return t
    return Text(label, style=f"bold {COLOURS.get(label, '')}".strip())


class RangeSection:
    """A titled list of ranges: a table when it fits, a list otherwise; folded to at most
    ``MAX_ROWS`` rows, saying so.

    Args:
        expected: the ranges are deviations (each with ``expected``).
        diff: the ranges are a diff's changes (``before``, ``after``).
        counters: show the sent/received counters.
    """

    def __init__(
        self,
        title: str,
        ranges: Sequence[Range],
        *,
        sampled: bool = False,
        expected: bool = False,
        diff: bool = False,
        counters: bool = True,
    ) -> None:
        self.title = title
        self.expected = expected
        self.diff = diff
        self.counters = counters
        if diff:
            self.folded = fold(
                ranges, MAX_ROWS, label=lambda r: f"{r['before']} -> {r['after']}", wildcard=None
            )
        else:
            self.folded = fold(ranges, MAX_ROWS, sampled=sampled)

    def _fields(self, row: Row) -> dict[str, Text | str]:
        """The row's values by column name (details apart)."""
        out: dict[str, Text | str] = {
            "dst port": str(row.dst_port),
            "source ports": facts.span(row.first, row.last),
            "cells": f"{row.cells:,}",
        }
        if self.expected:
            exp = str(row.source.get("expected", "?")) if row.source is not None else "mixed"
            out["expected"] = Text(exp, style=COLOURS.get(exp, ""))
        out["change" if self.diff else "verdict"] = _label_text(row.label)
        if self.counters:
            out["sent/recv"] = f"{row.sent:,}/{row.received:,}"
        return out

    def _table(self) -> tuple[Table, int]:
        names = list(self._fields(Row(0, 0, 0)))
        right = ("dst port", "source ports", "cells", "sent/recv")
        header: list[tuple[str, JustifyMethod]] = [
            (n, "right" if n in right else "left") for n in names
        ]
        header.append(("details", "left"))
        rows = [
            [*self._fields(row).values(), "\n".join(facts.row_details(row))]
            for row in self.folded.rows
        ]
        return _fitted_table(self.title, header, rows)

    def _list(self) -> list[Any]:
        out: list[Any] = [Para(Text(self.title, style="bold italic"))]
        for row in self.folded.rows:
            f = self._fields(row)
            head = Text(f"dst {f['dst port']}  {f['source ports']}  ")
            head.append_text(Text.assemble(f["change" if self.diff else "verdict"]))
            if self.expected:
                head.append("  expected ")
                head.append_text(Text.assemble(f["expected"]))
            out.append(Para(head))
            line = facts.cells(row.cells)
            if self.counters:
                line += f", {row.sent:,} sent, {row.received:,} received"
            out.append(Para(line, indent=2))
            out += [Para(d, indent=2) for d in facts.row_details(row)]
        return out

    def _note(self) -> Para | None:
        note = facts.fold_note(self.folded)
        return None if note is None else Para(Text(f"{note}; {WHERE_EXACT}", style="italic"))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table, need = self._table()
        if need <= options.max_width:
            yield table
        else:
            yield from self._list()
        note = self._note()
        if note is not None:
            yield note

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        table, _ = self._table()
        wide = Measurement.get(console, options, table)
        narrow = Measurement.get(console, options, Group(*self._list()))
        return Measurement(narrow.minimum, max(wide.maximum, narrow.minimum))


# ---------------------------------------------------------------------------------------
# The matrix.


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
    width = max(1, math.ceil(span / max(1, columns)))
    nb = math.ceil(span / width)
    rows: dict[int, list[dict[str, int]]] = {}
    for r in ranges:
        row = rows.get(r["dst_port"])
        if row is None:
            row = rows[r["dst_port"]] = [{} for _ in range(nb)]
        a, b = r["first"], r["last"]
        while a <= b:
            bi = (a - low) // width
            end = min(b, low + (bi + 1) * width - 1)
            cell = row[bi]
            cell[r["verdict"]] = cell.get(r["verdict"], 0) + (end - a + 1)
            a = end + 1
    return low, high, width, rows


class Matrix:
    """The compact matrix: a row per destination port, a column per bucket of source ports,
    as many columns as the width allows (at most 64)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        ranges = self.doc.get("ranges") or []
        if not ranges:
            yield Para("Matrix: no cells")
            return
        dsts = sorted({int(r["dst_port"]) for r in ranges})
        label_w = max(len("dst"), *(len(str(d)) for d in dsts))
        cols = max(MIN_MATRIX_COLUMNS, min(MATRIX_COLUMNS, options.max_width - label_w - 1))
        low, high, width, rows = bucket_matrix(self.doc, cols)
        nb = len(next(iter(rows.values())))
        # A glyph per verdict, in colour too: a colour alone is lost on colour-blind eyes.
        glyphs = GLYPHS_ASCII if _ascii(console, options) else GLYPHS_PLAIN

        span = f"{low}" if low == high else f"{low}-{high}"
        ports = "port" if low == high else "ports"
        yield Para(Text(f"Matrix: source {ports} {span}, {width:,} per column", style="bold"))
        lo_s, hi_s = str(low), str(high)
        gap = nb - len(lo_s) - len(hi_s)
        yield Text("dst".rjust(label_w) + " " + (lo_s + " " * gap + hi_s if gap >= 1 else lo_s))
        blank = False
        for dst in sorted(rows):
            line = Text(str(dst).rjust(label_w) + " ")
            for counts in rows[dst]:
                if not counts:
                    line.append(" ")
                    blank = True
                    continue
                major = max(counts, key=lambda v: counts[v])
                line.append(glyphs[major if len(counts) == 1 else "mixed"], style=COLOURS[major])
            yield line
        items: list[Text] = []
        for verdict, colour in COLOURS.items():
            items.append(Text.assemble((glyphs[verdict], colour), f" {verdict}"))
        mixed = "" if _plain(console) else "; colour of the majority"
        items.append(Text(f"{glyphs['mixed']} mixed (several verdicts{mixed})"))
        if blank:
            items.append(Text("blank: no planned port"))
        yield from _pack(items, options.max_width)


def _pack(items: list[Text], width: int) -> Iterator[Text]:
    """Items side by side, two spaces apart, as many a line as fit; one wider than the
    line alone is wrapped at its spaces, its next lines indented."""
    line = Text()
    for item in items:
        if line.cell_len and line.cell_len + 2 + item.cell_len > width:
            yield line
            line = Text()
        if item.cell_len > width:
            yield from Para(item, hang=2).lines(width)
            continue
        if line.cell_len:
            line.append("  ")
        line.append_text(item)
    yield line


# ---------------------------------------------------------------------------------------
# The report.


# Columns the report keeps when something is shown beside it (the demo's policy).
BESIDE_REPORT_MIN = 76


def fits_beside(width: int, beside_width: int) -> bool:
    """Whether a terminal *width* columns wide shows something *beside_width* wide beside
    the report (else it comes below the report)."""
    return width >= beside_width + 2 + BESIDE_REPORT_MIN


def render_run(doc: dict[str, Any], console: Console, *, beside: Any = None) -> None:
    """Print the whole human report of a run document.

    Args:
        beside: something to show to the left of the summary and range table (the demo puts
            the firewall policy there) when the terminal is wide enough for both
            (``fits_beside``), else below the report.
    """
    parts = run_renderables(doc)
    beside_width = (
        0 if beside is None else Measurement.get(console, console.options, beside).maximum
    )
    if beside is not None and fits_beside(console.width, beside_width):
        grid = Table.grid(padding=(0, 2))
        grid.add_column(width=beside_width, no_wrap=True)  # as wide as it asks, always
        grid.add_column(ratio=1)
        grid.add_row(beside, Group(*parts[:-1]))
        console.print(grid)
        console.print(parts[-1], crop=False)
        return
    for part in parts:
        console.print(part, crop=False)
    if beside is not None:
        console.print(beside, crop=False)


class Policy:
    """A firewall policy shown with a report: a panel as wide as its longest rule, or, where
    the width cannot hold that panel, its title and one rule a line (never wrapped inside a
    rule, never cut: a line wider than the terminal runs past its edge)."""

    def __init__(self, text: str, title: str) -> None:
        self.lines = [line.expandtabs(4).rstrip() for line in text.splitlines()]
        self.title = title
        inner = max([len(title) + 2, *(Text(line).cell_len for line in self.lines)])
        self.width = inner + 4  # borders and padding

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.panel import Panel
        from rich.syntax import Syntax

        if self.width <= options.max_width:
            code = Syntax("\n".join(self.lines), "bash", theme="ansi_dark", word_wrap=False)
            yield Panel(code, title=Text(self.title), width=self.width)
            return
        yield Para(Text(self.title, style="bold"))
        for line in self.lines:
            yield Segment("  " + line)
            yield Segment.line()

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(self.width, self.width)


def _head(doc: dict[str, Any]) -> Text:
    head = Text()
    head.append(f"udpreach run {facts.one_line(doc.get('run_id'))}", style="bold")
    head.append(f"  {facts.when(doc.get('started'))}  ")
    if doc.get("complete"):
        head.append("complete", style="bold green")
    else:
        head.append("INCOMPLETE", style="bold red")
    duration = doc.get("duration")
    if isinstance(duration, int | float) and not isinstance(duration, bool):
        head.append(f"  {duration:.2f}s")
    if isinstance(doc.get("version"), str):
        head.append(f"  udpreach {facts.version(doc)}", style="dim")
    return head


def _summary_line(doc: dict[str, Any]) -> Text:
    s = doc.get("summary", {})
    cells = s.get("cells", 0)
    t = Text(f"{cells:,} cell{'' if cells == 1 else 's'}: ")
    parts = [(f"{s[v]:,} {v}", c) for v, c in COLOURS.items() if s.get(v)]
    for i, (txt, colour) in enumerate(parts):
        if i:
            t.append(", ")
        t.append(txt, style=f"bold {colour}")
    return t


def _loss_line(doc: dict[str, Any]) -> Text:
    c = facts.confidence(doc)
    line = Text(f"loss on the path: {c.loss_text}")
    if c.estimate is not None:
        line.append(f", {c.attempts_text}")
    line.append("; ")
    bound = c.bound_text
    if not c.blocked:
        line.append("no cell blocked")
        if not c.complete:
            # Its bound (1: nothing is known of the unknown cells) read "no cell blocked,
            # chance that any 'blocked' cell is really open: <= 1"; the JSON keeps it.
            line.append(" so far")
        elif not bound.startswith("none"):  # what the document says all the same
            line.append(f", chance that any 'blocked' cell is really open: {bound}")
    else:
        line.append(f"chance that any 'blocked' cell is really open: {bound}")
    if not c.reached:
        why = "" if c.complete else ": the run is incomplete"
        line.append(f" (confidence target not reached{why})", style="bold red")
    elif c.blocked and c.target is not None:
        line.append(f" (confidence target {c.target:.2g} reached)")
    if c.rate_text:
        line.append(f"; {c.rate_text}")
    return line


def run_renderables(doc: dict[str, Any]) -> list[Any]:
    """The report as renderables; the matrix and what follows it come last, as one group."""
    out: list[Any] = [Para(_head(doc))]
    agent = doc.get("agent") or {}
    probe = doc.get("probe") or {}
    reg, obs = agent.get("registered"), agent.get("observed")
    where = facts.one_line(reg) if reg == obs else f"{reg} (observed {obs})"
    line = Text("agent ")
    line.append(facts.one_line(agent.get("name")), style="bold")
    line.append(f" at {where}, ports {facts.dst_ports_text(agent.get('ports'), sep=', ')}")
    out.append(Para(line))
    mode = facts.send_mode(doc)
    out.append(
        Para(
            f"probe {facts.one_line(probe.get('address'))} -> "
            f"{facts.one_line(probe.get('target', obs))}"
            + (f", {mode} mode" if mode != "not recorded" else "")
        )
    )
    out.append(Para(f"plan: {facts.plan_text(doc, sep=', ')}"))
    for w in facts.warnings(doc):
        t = Text("warning: ", style="bold yellow")
        t.append(w)
        out.append(Para(t))
    mtu = facts.path_mtu(doc)
    if mtu:
        out.append(Para(f"path MTU: {mtu}"))
    out.append(Para(_summary_line(doc)))
    out += [Para(x, indent=2) for x in facts.summary_extras(doc)]
    out.append(Para(_loss_line(doc)))
    ranges = doc.get("ranges") or []
    sampled = facts.sampled(doc)
    out.append(RangeSection("Source-port ranges", ranges, sampled=sampled))
    tail: list[Any] = [Matrix(doc)]
    tail += _expectations(doc, sampled)
    tail += _recommendations(doc)
    out.append(Group(*tail))
    return out


def _expectations(doc: dict[str, Any], sampled: bool) -> list[Any]:
    """What the expectations found: how many cells they judged, the deviations, and every
    entry that judged no cell (which, for this run's agent, is not "as expected")."""
    deviations = doc.get("deviations")
    judged = judgement_of(doc)
    if not isinstance(deviations, list) and judged is None:
        return []  # not judged against expectations
    deviations = deviations if isinstance(deviations, list) else []
    out: list[Any] = []
    if judged is not None:
        planned = (doc.get("summary") or {}).get("cells")
        out.append(Para(f"expectations: {facts.judged_text(judged, planned)}"))
        for u in judged["unmatched"]:
            t = Text(facts.unmatched_text(u), style="red" if u.get("fails") else "")
            out.append(Para(t, indent=2))
    if deviations:
        n = sum(int(r["last"]) - int(r["first"]) + 1 for r in deviations)
        out.append(
            RangeSection(
                f"Deviations from expectations ({facts.cells(n)} in "
                f"{facts.ranges(len(deviations))})",
                deviations,
                sampled=sampled,
                expected=True,
            )
        )
    problem = judged.get("problem") if judged is not None else None
    if problem:
        out.append(Para(_styled(f"not as expected: {facts.one_line(problem)}", "bold red")))
    elif not deviations:
        out.append(Para(_styled("as expected: no deviations", "bold green")))
    return out


def _recommendations(doc: dict[str, Any]) -> list[Any]:
    rec = recommendations_of(doc)
    fixed = rec.get("fixed_ports") or []
    lines: list[Any] = []
    summary = doc.get("summary", {})
    if fixed:
        lines.append(
            Para(
                _styled(
                    "fixed notification port candidates (open from every source port tested): "
                    + ", ".join(map(str, fixed)),
                    "green",
                )
            )
        )
    elif doc.get("complete") and summary.get("open", 0) < summary.get("cells", 0):
        lines.append(Para(_styled("no destination port passed from every source port", "red")))
    rules = rec.get("rules") or []
    if rules:
        lines.append(Para("to open what is blocked on this path:"))
    for r in rules[:MAX_RULES]:
        dsts = facts.dst_ports_text(r.get("dst_ports"), sep=", ")
        spans = str(r.get("src_ports", "")).split(",")
        verdicts = "/".join(r.get("verdicts") or [])
        what = facts.counted(int(r.get("cells", 0) or 0), f"{verdicts} cell")
        if len(spans) > MAX_RULE_SPANS:
            lines.append(
                Para(
                    f"# destination port(s) {dsts}: {len(spans):,} source-port ranges "
                    f"({what}): too many to print as a command; --markdown FILE, --html FILE "
                    "or --json has it",
                    indent=2,
                )
            )
            continue
        on_host = r.get("chain") == "input"  # the agent's host itself rejected them
        host = " (in the input chain of the host that rejected them)" if on_host else ""
        lines.append(
            Para(
                f"# {facts.source_ports_label(', '.join(spans))} to destination port(s) "
                f"{dsts} ({what}){host}",
                indent=2,
            )
        )
        lines.append(Command(str(r.get("nft", ""))))
        ipt = r.get("iptables") or []
        ipt = [ipt] if isinstance(ipt, str) else list(ipt)
        lines += [Command(str(cmd)) for cmd in ipt[:MAX_IPTABLES]]
        if len(ipt) > MAX_IPTABLES:
            lines.append(
                Para(
                    f"# and {len(ipt) - MAX_IPTABLES:,} more iptables rules: --json has them",
                    indent=2,
                )
            )
    if len(rules) > MAX_RULES:
        lines.append(
            Para(f"and {len(rules) - MAX_RULES:,} more rules: --markdown FILE or --json has them")
        )
    for note in rec.get("notes") or []:
        lines.append(Para(_styled(f"note: {facts.one_line(note)}", "dim")))
    return lines


# ---------------------------------------------------------------------------------------
# The diff and the agents.


def render_diff(diff: dict[str, Any], console: Console) -> None:
    """Print a diff document (``udpreach/diff-v1``): the changed ranges, then the cells
    whose move the run's ICMP rate limits explain (not counted as changes)."""
    changes = diff.get("changes") or []
    uncertain = diff.get("uncertain") or []
    a, b = facts.one_line(diff.get("run_a")), facts.one_line(diff.get("run_b"))
    compared = diff.get("compared", 0)
    n = sum(int(r["last"]) - int(r["first"]) + 1 for r in changes)
    if changes:
        console.print(
            RangeSection(f"Verdict changes from {a} to {b}", changes, diff=True, counters=False),
            crop=False,
        )
        console.print(
            Para(
                f"{facts.cells(n)} changed verdict in {facts.ranges(len(changes))} "
                f"({facts.cells(compared)} compared)."
            ),
            crop=False,
        )
    else:
        console.print(Para(f"No verdict changed ({facts.cells(compared)} compared)."))
    if uncertain:
        u = sum(int(r["last"]) - int(r["first"]) + 1 for r in uncertain)
        console.print(
            RangeSection(
                "Uncertain: between rejected and blocked while ICMP was rate-limited",
                uncertain,
                diff=True,
                counters=False,
            ),
            crop=False,
        )
        console.print(
            Para(
                f"{facts.cells(u)} moved between rejected and blocked cells that could not be told "
                "from rejected (ICMP was rate-limited): not counted as changes."
            ),
            crop=False,
        )


def render_agents(agents: list[dict[str, Any]], console: Console) -> None:
    """Print the registered agents: a table when it fits, else a list."""
    rows = []
    for a in sorted(agents, key=lambda a: str(a.get("name"))):
        since = a.get("since")
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))
            if isinstance(since, int | float) and not isinstance(since, bool)
            else "?"
        )
        reg, obs = facts.one_line(a.get("registered")), facts.one_line(a.get("observed"))
        rows.append(
            (
                facts.one_line(a.get("name")),
                reg,
                Text(obs) if obs == reg else Text(f"{obs} (NAT)", style="yellow"),
                facts.dst_ports_text(a.get("ports"), sep=", "),
                when,
                "running" if a.get("busy") else "idle",
            )
        )
    console.print(_AgentList(rows), crop=False)


class _AgentList:
    COLUMNS = ("name", "registered", "observed", "ports", "connected since", "state")

    def __init__(self, rows: Iterable[Sequence[Text | str]]) -> None:
        self.rows = list(rows)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        header: list[tuple[str, JustifyMethod]] = [(c, "left") for c in self.COLUMNS]
        table, need = _fitted_table("Registered agents", header, self.rows)
        if need <= options.max_width:
            yield table
            return
        yield Para(Text("Registered agents", style="bold italic"))
        for name, reg, obs, ports, when, state in self.rows:
            yield Para(Text.assemble((Text.assemble(name).plain, "bold")))
            line = Text(f"registered {Text.assemble(reg).plain}, observed ")
            line.append_text(Text.assemble(obs))
            yield Para(line, indent=2)
            yield Para(f"ports {ports}", indent=2)
            yield Para(f"connected since {when}, {state}", indent=2)
