"""The terminal report as people meet it: at 40 to 200 columns, in colour, with NO_COLOR,
piped, on TERM=dumb, in ASCII; and short whatever the run.

What a user would notice: a port range, an address, an ICMP detail or a command cut with
"…" or broken across lines; verdicts that look the same without colour; a report of
thousands of lines for an interrupted run or a random:500 plan.
"""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path
from typing import Any

import docsamples
import pytest
import rendersamples as rs
from rich.console import Console
from typer.testing import CliRunner

from udpreach.core.diff import diff_runs
from udpreach.core.ledger import Ledger
from udpreach.render import facts
from udpreach.render.markdown import markdown_run
from udpreach.render.terminal import (
    GLYPHS_ASCII,
    GLYPHS_PLAIN,
    MAX_ROWS,
    Policy,
    fits_beside,
    render_agents,
    render_diff,
    render_run,
)

WIDTHS = (40, 60, 80, 120, 200)
MODES = ("colour", "no_color", "piped", "dumb", "ascii")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_COLOUR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-7]|38;[25];[0-9;]+)m")


def _console(width: int, mode: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Console, Any]:
    if mode == "dumb":
        monkeypatch.setenv("TERM", "dumb")
    else:
        monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    if mode == "ascii":  # a terminal whose encoding is not UTF-8
        raw = io.BytesIO()
        buf: Any = io.TextIOWrapper(raw, encoding="ascii", errors="strict")
    else:
        buf = io.StringIO()
    kw: dict[str, Any] = {"file": buf, "width": width, "highlight": False}
    if mode in ("colour", "no_color", "dumb", "ascii"):
        kw["force_terminal"] = True
    if mode == "no_color":
        kw["no_color"] = True
    return Console(**kw), buf


def _text(buf: Any) -> str:
    if isinstance(buf, io.TextIOWrapper):
        buf.flush()
        return buf.buffer.getvalue().decode("ascii")  # type: ignore[attr-defined]
    return str(buf.getvalue())


def render(doc: dict, width: int, mode: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """(the output as written, the same without colour codes)."""
    console, buf = _console(width, mode, monkeypatch)
    render_run(doc, console)
    raw = _text(buf)
    return raw, _ANSI.sub("", raw)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _flat_cells(text: str) -> str:
    """The text with table borders gone: a phrase wrapped inside a table cell reads whole
    (its continuation lines have every other column blank)."""
    return _flat(re.sub(r"[│┃|]", " ", text))


# ---------------------------------------------------------------------------------------
# Nothing cut, nothing broken.


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("width", WIDTHS)
def test_no_range_address_detail_or_command_is_cut(
    width: int, mode: str, v6: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = rs.everything(v6=v6)
    raw, out = render(doc, width, mode, monkeypatch)
    assert "…" not in out
    assert "Traceback" not in out
    lines = out.splitlines()
    words = {w.strip(",;()") for line in lines for w in line.split()}
    # Every range, whole, on one line (the document has few enough to list them all).
    for span in rs.verdict_spans(doc):
        assert span in words, f"range {span} missing or split at width {width}"
    # Every address, whole, on one line.
    agent, probe, router = (
        (rs.V6_AGENT, rs.V6_PROBE, rs.V6_ROUTER) if v6 else (rs.AGENT, rs.PROBE, rs.ROUTER)
    )
    for addr in (agent, probe, router):
        assert addr in words, f"{addr} missing or split at width {width}"
    # ICMP details say everything (they may wrap between words, never inside one).
    for r in doc["ranges"]:
        if r["verdict"] == "rejected":
            assert facts.icmp_text(r["icmp"]) in _flat_cells(out)
    # Every command is one line of its own, whole.
    stripped = [line.strip() for line in lines]
    commands = [
        cmd for rule in doc["recommendations"]["rules"] for cmd in [rule["nft"], *rule["iptables"]]
    ]
    # 5000's scattered spans (an nft rule, two iptables rules), 5001's router reject (one
    # of each) and the agent host's own reject of 60100-60199 (its input chain: one of each)
    assert len(commands) == 7
    for cmd in commands:
        assert cmd in stripped, f"command broken at width {width}: {cmd}"
    # What the far side sent is shown as text, never read as markup.
    assert '<script>alert("x")</script> [bold red]not markup[/] & "quotes"' in _flat_cells(out)
    # Colour only where a terminal shows it (NO_COLOR keeps bold and dim).
    assert bool(_COLOUR.search(raw)) == (mode in ("colour", "ascii"))


@pytest.mark.parametrize("width", WIDTHS)
def test_lines_fit_the_width_but_for_single_long_tokens(
    width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = rs.everything(v6=True)
    _, out = render(doc, width, "piped", monkeypatch)
    commands = {
        cmd for rule in doc["recommendations"]["rules"] for cmd in [rule["nft"], *rule["iptables"]]
    }
    for line in out.splitlines():
        if len(line) > width:
            # Only a command (one line by design) or one word longer than the width.
            assert line.strip() in commands or len(line.split()) == 1, line


@pytest.mark.parametrize("mode", ["no_color", "piped", "dumb", "ascii"])
@pytest.mark.parametrize("width", WIDTHS)
def test_without_colour_every_verdict_has_its_own_glyph(
    width: int, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out = render(rs.one_of_each(), width, mode, monkeypatch)
    lines = out.splitlines()
    # The legend (from the matrix row to the "mixed" entry) names one glyph per verdict,
    # all different.
    row_at = next(i for i, line in enumerate(lines) if line.startswith("5000 "))
    end = next(i for i in range(row_at, len(lines)) if "mixed (" in lines[i])
    legend = _flat("\n".join(lines[row_at + 1 : end + 1]))
    glyphs = {}
    for verdict in facts.VERDICTS:
        m = re.search(r"(\S) " + verdict + r"(?: |$)", legend)
        assert m, f"no legend entry for {verdict}"
        glyphs[verdict] = m.group(1)
    assert len(set(glyphs.values())) == 5, glyphs
    expected = GLYPHS_ASCII if mode == "ascii" else GLYPHS_PLAIN
    assert glyphs == {v: expected[v] for v in facts.VERDICTS}
    # The matrix row shows them in the order of the source ports.
    (row,) = [line for line in lines if line.startswith("5000 ")]
    cells = row[5:]
    seen = [g for i, g in enumerate(cells) if g != cells[i - 1] or i == 0]
    pure = [g for g in seen if g in glyphs.values()]
    assert pure == [glyphs[v] for v in facts.VERDICTS], row


def test_in_colour_every_verdict_keeps_its_glyph_and_its_colour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Colour alone is lost on colour-blind eyes: the glyphs stay, coloured."""
    raw, out = render(rs.one_of_each(), 80, "colour", monkeypatch)
    (row,) = [line for line in out.splitlines() if line.startswith("5000 ")]
    cells = row[5:].strip()
    seen = [g for i, g in enumerate(cells) if i == 0 or g != cells[i - 1]]
    pure = [g for g in seen if g != GLYPHS_PLAIN["mixed"]]
    assert pure == [GLYPHS_PLAIN[v] for v in facts.VERDICTS], row
    # Five verdicts, five glyphs, five colours in that row.
    (raw_row,) = [line for line in raw.splitlines() if _ANSI.sub("", line).startswith("5000 ")]
    coloured = set(re.findall(r"\x1b\[([0-9;]*)m([^\x1b])", raw_row))
    by_glyph = {g: c for c, g in coloured if g in pure}
    assert len(by_glyph) == 5, coloured
    assert len(set(by_glyph.values())) == 5, coloured
    flat = _flat(out)
    for v in facts.VERDICTS:
        assert f"{GLYPHS_PLAIN[v]} {v}" in flat  # the legend, glyph by glyph


# ---------------------------------------------------------------------------------------
# The new keys and an unknown loss.


def test_new_keys_are_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = render(rs.everything(), 200, "piped", monkeypatch)
    flat = _flat(out)
    assert "udpreach 0.1.0" in flat
    assert "raw mode" in flat
    assert "path MTU: 1280 bytes (said by 198.18.2.1)" in flat
    assert "warning: ICMP errors from 198.18.2.1 were rate-limited" in flat
    assert "9,000 of 10,000 cells silent while ICMP was rate-limited" in flat
    assert "120 of 10,000 cells inferred from samples of this range" in flat
    assert "from 198.18.2.1, verified (it quoted our datagram)" in flat
    assert "from 198.18.1.2, unverified (it quoted headers only)" in flat
    assert "loss on the path: 0.2% (<= 0.4% at 99%)" in flat
    assert "<= 0.00012 (confidence target 0.01 reached)" in flat


def test_an_unknown_loss_reads_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = render(rs.everything(loss_estimate=None), 120, "piped", monkeypatch)
    flat = _flat(out)
    assert "loss on the path: unknown" in flat
    assert "really open: unknown (confidence target not reached)" in flat
    assert "0%" not in flat


def test_no_delivery_at_all_is_unknown_loss_even_as_the_estimator_writes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Today's estimator reports zero deliveries as estimate 0, bound 0, target reached.
    doc = docsamples.build_doc(spans=[{"dst": 5000, "first": 1024, "last": 65535,
                                       "verdict": "blocked"}])  # fmt: skip
    doc["loss"] = {"estimate": 0.0, "upper": 1.0, "attempts": 2, "false_blocked_bound": 0.0,
                   "confidence_target": 0.01, "confidence_reached": True}  # fmt: skip
    _, out = render(doc, 100, "piped", monkeypatch)
    flat = _flat(out)
    assert "loss on the path: unknown" in flat
    assert "bound 0" not in flat
    assert "0%" not in flat
    assert "confidence target not reached" in flat


def test_a_document_from_an_older_udpreach_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = docsamples.baseline()  # no version, loss, recommendations, send mode or warnings
    assert "version" not in doc
    assert "recommendations" not in doc
    _, out = render(doc, 100, "piped", monkeypatch)
    flat = _flat(out)
    assert "loss on the path: not measured" in flat
    assert "udpreach 0." not in flat  # no version claimed for it
    # Its recommendations come from its ranges.
    assert (
        "nft insert rule inet filter forward ip saddr 198.18.2.2 ip daddr 198.18.1.2 "
        "udp sport 40000-49999 udp dport 5000 accept"
    ) in [line.strip() for line in out.splitlines()]


# ---------------------------------------------------------------------------------------
# Short reports.


@pytest.fixture(scope="module")
def interrupted() -> dict[str, Any]:
    return rs.interrupted_sweep()


@pytest.mark.parametrize("width", WIDTHS)
def test_an_interrupted_full_sweep_is_a_short_report(
    width: int, monkeypatch: pytest.MonkeyPatch, interrupted: dict[str, Any]
) -> None:
    doc = interrupted
    assert len(doc["ranges"]) > 60_000  # the exact document is long
    _, out = render(doc, width, "piped", monkeypatch)
    lines = out.splitlines()
    assert len(lines) <= 60, f"{len(lines)} lines at width {width}"
    flat = _flat_cells(out)
    # Each destination port: one row for the whole sweep, open and unknown counted.
    for d in (5000, 5001):
        rs_ = [r for r in doc["ranges"] if r["dst_port"] == d]
        opened = sum(r["last"] - r["first"] + 1 for r in rs_ if r["verdict"] == "open")
        unknown = 64512 - opened
        assert f"{opened:,} open, {unknown:,} unknown, in {len(rs_):,} ranges" in flat
    assert f"2 rows for {len(doc['ranges']):,} ranges" in flat
    assert "--csv FILE or --json" in flat


@pytest.mark.parametrize("width", WIDTHS)
def test_a_random_500_plan_is_summarised(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = rs.sampled_run()
    assert len(doc["ranges"]) > 900
    _, out = render(doc, width, "piped", monkeypatch)
    lines = out.splitlines()
    assert len(lines) <= 70, f"{len(lines)} lines at width {width}"
    flat = _flat_cells(out)
    assert "500 source ports sampled from 1024-65535 (" in flat  # drawn from, not spanned
    blocked = [r for r in doc["ranges"] if r["verdict"] == "blocked"]
    first, last = blocked[0]["first"], blocked[-1]["last"]
    n = sum(r["last"] - r["first"] + 1 for r in blocked) // 2  # per destination port
    # The blocked samples of each port as one span, and one rule opening that span.
    assert flat.count(f"{first}-{last}") >= 2
    assert f"{n} sampled ports" in flat
    (rule,) = doc["recommendations"]["rules"]
    assert rule["src_ports"] == f"{first}-{last}"
    assert rule["nft"] in [line.strip() for line in lines]


def test_a_long_fragmented_list_is_capped_and_says_where_the_rest_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 64 destination ports, each with alternating verdicts: even folded, more rows than fit.
    dsts = tuple(range(5000, 5064))
    spans = [{"dst": d, "first": 1024 + 2000 * k, "last": 1024 + 2000 * k + 999,
              "verdict": "blocked"} for d in dsts for k in range(30)]  # fmt: skip
    doc = docsamples.build_doc(dst=dsts, spans=spans)
    _, out = render(doc, 120, "piped", monkeypatch)
    flat = _flat(out)
    assert f"{MAX_ROWS} rows for {len(doc['ranges']):,} ranges" in flat
    assert "more rows not shown" in flat
    assert "--csv FILE or --json" in flat
    table_rows = [line for line in out.splitlines() if re.match(r"│\s+50\d\d │", line)]
    assert len(table_rows) <= MAX_ROWS


def test_show_of_a_ctrl_c_run_is_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupted: dict[str, Any]
) -> None:
    """The issue's measurement: `show` of a run whose coordinator was stopped mid-sweep
    (what the store rebuilds from the last checkpoint)."""
    import typer

    from udpreach.cli.history import register
    from udpreach.store import RunStore

    doc = interrupted
    led = Ledger([5000, 5001], range(1024, 65536))
    for d in led.dst_ports:  # the ledger credits only what was sent
        led.note_sent_many(d, range(1024, 65536))
    opened = [
        (0, r["dst_port"], s, 1, s)
        for r in doc["ranges"]
        if r["verdict"] == "open"
        for s in range(r["first"], r["last"] + 1)
    ]
    led.note_receipts(opened, [rs.AGENT], 1)
    db = tmp_path / "runs.sqlite3"
    with RunStore.open(db) as store:
        store.begin(doc["run_id"], started=doc["started"], plan=doc["plan"],
                    agent=doc["agent"], probe=doc["probe"])  # fmt: skip
        store.checkpoint(doc["run_id"], led.snapshot())
    app = typer.Typer()
    register(app)
    monkeypatch.setenv("COLUMNS", "80")
    res = CliRunner().invoke(app, ["show", doc["run_id"][:12], "--db", str(db)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) <= 60, len(lines)
    assert "INCOMPLETE" in res.stdout
    assert "unknown, in" in _flat_cells(res.stdout)


# ---------------------------------------------------------------------------------------
# The diff and the agents.


def test_diff_lists_uncertain_cells_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    a = docsamples.baseline()
    b = docsamples.baseline()
    b["run_id"] = "20251126T090000-b0b0b0"
    (rej,) = [r for r in b["ranges"] if r["verdict"] == "rejected"]
    rej["verdict"] = "blocked"
    rej.pop("icmp")
    rej["icmp_limited"] = 100
    d = diff_runs(a, b)
    for width in WIDTHS:
        console, buf = _console(width, "piped", monkeypatch)
        render_diff(d, console)
        flat = _flat(_text(buf))
        assert "No verdict changed" in flat
        assert "60000-60099" in flat
        assert "100 cells moved between rejected and blocked" in flat
        assert "…" not in flat


def test_a_diff_against_an_interrupted_run_is_not_called_sampled(
    monkeypatch: pytest.MonkeyPatch, interrupted: dict[str, Any]
) -> None:
    """An interrupted run against a complete one: thousands of "unknown -> open" ranges
    with unchanged cells between them fold into a row that counts cells and ranges; the
    plan was not sampled, and the report must not say "sampled ports"."""
    b = copy.deepcopy(interrupted)
    b["run_id"] = "20251126T090000-b0b0b0"
    b["complete"] = True
    for r in b["ranges"]:
        r["verdict"] = "open"
    d = diff_runs(interrupted, b)
    assert len(d["changes"]) > 1000
    console, buf = _console(80, "piped", monkeypatch)
    render_diff(d, console)
    flat = _flat(_text(buf))
    assert "sampled" not in flat
    for dst in (5000, 5001):
        moved = [c for c in d["changes"] if c["dst_port"] == dst]
        cells = sum(c["last"] - c["first"] + 1 for c in moved)
        # The row's cells column has the count; its details say how many ranges it folds.
        assert re.search(rf"\b{cells:,}\b.*\bin {len(moved):,} ranges\b", flat), flat


def test_agents_fit_any_width(monkeypatch: pytest.MonkeyPatch) -> None:
    agents = [
        {"name": "pc-17", "registered": rs.V6_AGENT, "observed": rs.V6_PROBE,
         "ports": [5000, 5001, 6000], "since": 1_764_115_200.0, "busy": True},
        {"name": "[red]x[/red]", "registered": "198.18.1.2", "observed": "198.18.1.2",
         "ports": [5000], "since": 1_764_115_200.0, "busy": False},
    ]  # fmt: skip
    for width in WIDTHS:
        console, buf = _console(width, "piped", monkeypatch)
        render_agents(agents, console)
        out = _text(buf)
        assert "…" not in out
        words = {w.strip(",()") for w in out.split()}
        assert {rs.V6_AGENT, rs.V6_PROBE, "198.18.1.2", "[red]x[/red]"} <= words
        assert "2025-11-26 00:00:00 UTC" in _flat(out)


def test_beside_a_policy_on_a_wide_terminal_nothing_is_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The demo shows the firewall policy to the left of the report at 150 columns or more.
    from rich.panel import Panel

    doc = rs.everything()
    policy = Panel("udp sport 40000-49999 udp dport 5000 drop", title="policy", width=72)
    for width in (150, 170, 200):
        console, buf = _console(width, "piped", monkeypatch)
        render_run(doc, console, beside=policy)
        out = _text(buf)
        assert "…" not in out
        lines = out.splitlines()
        assert lines[0].startswith("╭")  # the policy, and beside it the report
        assert "udpreach run" in lines[0]
        words = {w.strip(",;()") for line in lines for w in line.split()}
        assert set(rs.verdict_spans(doc)) <= words
        stripped = [line.strip() for line in lines]
        for rule in doc["recommendations"]["rules"]:
            assert rule["nft"] in stripped


# ---------------------------------------------------------------------------------------
# The demo's policy: beside the report where both fit, below it otherwise, rules whole.


def _demo_policy() -> Policy:
    from udpreach.demo import _policy_rules
    from udpreach.lab import bundled_policy

    return Policy(_policy_rules(bundled_policy("demo")), "nftables policy on the router (ns)")


@pytest.mark.parametrize("width", [80, 120, 150, 184, 185, 200, 240])
def test_the_policy_is_as_wide_as_its_rules_beside_or_below(
    width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The panel was 72 columns at any width: nft rules wrapped mid-rule even at 200."""
    policy = _demo_policy()
    rules = [line.strip() for line in policy.lines if line.strip()]
    longest = max(len(line) for line in policy.lines)
    assert policy.width == longest + 4  # borders and padding, no more
    console, buf = _console(width, "piped", monkeypatch)
    render_run(rs.everything(), console, beside=policy)
    lines = _text(buf).splitlines()
    beside = fits_beside(width, policy.width)
    assert beside == (width >= policy.width + 2 + 76)
    if beside:
        assert lines[0].startswith("╭")
        assert "udpreach run" in lines[0]
    else:  # the report first, the policy after it
        assert lines[0].startswith("udpreach run")
        at = next(i for i, line in enumerate(lines) if "nftables policy on the router" in line)
        assert at > next(i for i, line in enumerate(lines) if line.startswith("Matrix"))
    for rule in rules:  # every rule whole, on a line of its own
        assert any(rule in line for line in lines), f"rule broken at width {width}: {rule}"
    assert "…" not in "\n".join(lines)


def test_trimmed_lines_drop_trailing_spaces_and_keep_everything_else() -> None:
    import io

    from udpreach.render.console import TrimmedLines

    out = io.StringIO()
    t = TrimmedLines(out)
    t.write("a  \nb")
    assert out.getvalue() == "a\n"  # "b" may go on: held until its line ends
    t.write("c  \n\n  d ")
    assert out.getvalue() == "a\nbc\n\n"
    t.flush()  # the unfinished rest goes out as it is: nothing is lost at exit
    assert out.getvalue() == "a\nbc\n\n  d "


def test_one_cell_is_one_cell_from_one_source_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of one source port said "1 cells: 1 open" and "Matrix: source ports 53-53"."""
    doc = docsamples.build_doc(src="53")
    _, text = render(doc, 80, "plain", monkeypatch)
    flat = _flat(text)
    assert "1 cell: 1 open" in flat
    assert "Matrix: source port 53," in flat
    doc = docsamples.build_doc(src="53-54")
    _, text = render(doc, 80, "plain", monkeypatch)
    assert "2 cells: 2 open" in _flat(text)
    assert "Matrix: source ports 53-54," in _flat(text)
    # The rule to open one blocked cell said "source ports 53 ... (1 blocked cells)".
    one = docsamples.build_doc(
        src="53", spans=[{"dst": 5000, "first": 53, "last": 53, "verdict": "blocked"}]
    )
    _, text = render(one, 120, "plain", monkeypatch)
    assert "# source port 53 to destination port(s) 5000 (1 blocked cell)" in _flat(text)
    md = markdown_run(one)
    assert "To open source port 53 to destination port(s) 5000 (1 cell, blocked):" in md


def test_an_icmpv6_error_is_named_icmpv6() -> None:
    """Over IPv6 the reject read "ICMP type 1 code 1": type 1 is ICMPv6's unreachable."""
    six = {"type": 1, "code": 1, "from": "2001:2:0:92::1", "verified": True}
    four = {"type": 3, "code": 13, "from": "198.18.2.1", "verified": False}
    assert facts.icmp_text(six) == (
        "ICMPv6 type 1 code 1 (administratively prohibited) from 2001:2:0:92::1, verified "
        "(it quoted our datagram)"
    )
    assert facts.icmp_text(four).startswith("ICMP type 3 code 13 (administratively prohibited)")


def test_a_legend_item_wider_than_the_terminal_wraps_indented(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 40 columns in colour "mixed (several verdicts; colour of the majority)" went on
    at column 0, as if it were another item."""
    _, out = render(rs.one_of_each(), 40, "colour", monkeypatch)
    lines = out.splitlines()
    (at,) = [i for i, line in enumerate(lines) if "mixed (several verdicts" in line]
    assert lines[at + 1].startswith("  "), lines[at : at + 2]
    assert "majority)" in lines[at + 1]
    assert all(len(line) <= 40 for line in lines[at : at + 2])
