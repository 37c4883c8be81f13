"""Reports (JUnit, Markdown, CSV, HTML), the diff between two runs, and the
recommendations (fixed port, rules to open what is blocked)."""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import docsamples
import pytest
import rendersamples
from conftest import run_cli
from docsamples import BASELINE_EXPECT, after_change, baseline, build_doc, cell_verdicts, docs
from hypothesis import given, settings

from udpreach.core import schema
from udpreach.core.diff import diff_runs
from udpreach.core.expect import expect_from, judge, parse_expect
from udpreach.core.intervals import merge_ranges
from udpreach.core.recommend import MULTIPORT_SLOTS, iptables_rules, recommend
from udpreach.render.csv import write_csv
from udpreach.render.html import bucket_counts, buckets_for, write_html
from udpreach.render.junit import write_junit
from udpreach.render.markdown import write_markdown

# ---------------------------------------------------------------------------------------
# The diff.


def test_diff_of_the_change() -> None:
    d = diff_runs(baseline(), after_change())
    assert d["schema"] == "udpreach/diff-v1"
    assert (d["run_a"], d["run_b"]) == ("20251126T010000-a1b2c3", "20251126T020000-d4e5f6")
    assert d["changes"] == [
        {"dst_port": 5000, "first": 45000, "last": 49999, "before": "blocked", "after": "open"},
        {"dst_port": 5001, "first": 60100, "last": 60199, "before": "open", "after": "rejected"},
    ]
    assert d["compared"] == 2 * 64512
    assert d["only_a"] == d["only_b"] == []


def test_diff_of_a_run_with_itself_is_empty() -> None:
    assert diff_runs(baseline(), baseline())["changes"] == []


def test_diff_compares_only_cells_planned_in_both() -> None:
    a = build_doc("a", src="1024-2047", dst=(5000, 5001))
    b = build_doc("b", src="2000-3000", dst=(5000, 6000), spans=[
        {"dst": 5000, "first": 2040, "last": 2999, "verdict": "blocked"},
    ])  # fmt: skip
    d = diff_runs(a, b)
    assert d["changes"] == [
        {"dst_port": 5000, "first": 2040, "last": 2047, "before": "open", "after": "blocked"}
    ]
    assert d["compared"] == 48
    assert d["dst_ports"] == [5000]
    assert d["compared_ranges"] == [{"dst_port": 5000, "first": 2000, "last": 2047}]
    assert d["only_a"] == [
        {"dst_port": 5000, "first": 1024, "last": 1999},
        {"dst_port": 5001, "first": 1024, "last": 2047},
    ]
    assert d["only_b"] == [
        {"dst_port": 5000, "first": 2048, "last": 3000},
        {"dst_port": 6000, "first": 2000, "last": 3000},
    ]


@settings(max_examples=200, deadline=None)
@given(a=docs(), b=docs())
def test_diff_matches_a_cell_by_cell_reference(a: dict, b: dict) -> None:
    ca, cb = cell_verdicts(a), cell_verdicts(b)
    d = diff_runs(a, b)
    got = {
        (r["dst_port"], s): (r["before"], r["after"])
        for r in d["changes"]
        for s in range(r["first"], r["last"] + 1)
    }
    ref = {c: (ca[c], cb[c]) for c in ca.keys() & cb.keys() if ca[c] != cb[c]}
    assert got == ref
    assert d["compared"] == len(ca.keys() & cb.keys())
    assert merge_ranges(d["changes"]) == d["changes"]  # maximal and sorted


# ---------------------------------------------------------------------------------------
# JUnit.


def _junit(doc: dict, entries: Any, tmp_path: Path) -> ET.Element:
    p = tmp_path / "junit.xml"
    write_junit(doc, entries, p)
    return ET.parse(p).getroot()


def test_junit_one_case_per_entry(tmp_path: Path) -> None:
    doc = after_change()
    text = BASELINE_EXPECT + '\n[[expect]]\nagent = "pc-99"\ndst_ports = "5000"\n'
    text += 'src_ports = "1024"\nverdict = "blocked"\n'
    root = _junit(doc, parse_expect(text, "policy.toml"), tmp_path)
    suite = root.find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert len(cases) == 4  # three entries and "run complete"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("4", "2", "1")
    first, second, other, complete = cases
    assert "line 2" in first.get("name", "")
    fail = first.find("failure")
    assert fail is not None
    assert "201 of 119,024 cells deviate" in fail.get("message", "")
    assert "dst 5001 src 60000-60199 (200 cells): rejected, expected open" in (fail.text or "")
    fail = second.find("failure")
    assert fail is not None
    assert "dst 5000 src 45000-49999 (5000 cells): open, expected blocked" in (fail.text or "")
    skipped = other.find("skipped")
    assert skipped is not None
    assert "pc-99" in skipped.get("message", "")
    assert complete.find("failure") is None


def test_junit_uses_the_entries_recorded_in_the_document(tmp_path: Path) -> None:
    doc = after_change()
    entries = parse_expect(BASELINE_EXPECT)
    doc["expect"] = [e.to_json() for e in entries]
    doc["deviations"] = judge(doc, entries)
    assert ET.tostring(_junit(doc, None, tmp_path)) == ET.tostring(_junit(doc, entries, tmp_path))


def test_junit_without_expectations_asserts_reachability(tmp_path: Path) -> None:
    root = _junit(docsamples.incomplete(), None, tmp_path)
    cases = root.findall("testsuite/testcase")
    assert [c.get("name") for c in cases] == [
        "dst 5000: every tested source port open",
        "dst 5001: every tested source port open",
        "run complete",
    ]
    assert cases[0].find("failure") is not None
    assert cases[1].find("failure") is None
    fail = cases[2].find("failure")
    assert fail is not None
    assert "35536 cells unknown" in fail.get("message", "")


def test_junit_survives_characters_xml_cannot_carry(tmp_path: Path) -> None:
    doc = baseline()
    doc["agent"]["name"] = "pc\x00-<&>\x1b"
    root = _junit(doc, None, tmp_path)
    assert "pc?-<&>?" in (root.find("testsuite").get("name") or "")  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------
# Markdown and CSV.


def test_markdown_for_a_change_ticket(tmp_path: Path) -> None:
    doc = after_change()
    doc["deviations"] = judge(doc, parse_expect(BASELINE_EXPECT))
    doc["agent"]["name"] = "pc|17_x"
    p = tmp_path / "r.md"
    write_markdown(doc, p, diff=diff_runs(baseline(), doc))
    text = p.read_text()
    assert text.startswith("# udpreach run `20251126T020000-d4e5f6`")
    assert "| 129024 | 123823 | 5000 | 200 | 1 | 0 |" in text
    assert "**5,201 cells deviate** in 3 ranges." in text
    assert "| 5000 | 45000-49999 | 5000 | open | blocked |  |" in text
    assert "pc\\|17\\_x" in text  # a pipe cannot break the table
    assert "## Changes since run `20251126T010000-a1b2c3`" in text
    assert "| 5001 | 60100-60199 | 100 | open | rejected |" in text
    assert (
        "nft insert rule inet filter forward ip saddr 198.18.2.2 ip daddr 198.18.1.2 "
        "udp sport 40000-44999 udp dport 5000 accept"
    ) in text
    # Every table row has as many cells as its header.
    for block in text.split("\n\n"):
        rows = [r for r in block.splitlines() if r.startswith("|")]
        if rows:
            widths = {len(r.replace("\\|", "").split("|")) for r in rows}
            assert len(widths) == 1, block


def test_markdown_of_a_diff_document(tmp_path: Path) -> None:
    p = tmp_path / "d.md"
    write_markdown(diff_runs(baseline(), after_change()), p)
    text = p.read_text()
    assert "**5100 cells changed verdict** in 2 ranges" in text


def test_csv_has_one_row_per_range(tmp_path: Path) -> None:
    doc = baseline()
    p = tmp_path / "r.csv"
    write_csv(doc, p)
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["ranges"])
    for row, r in zip(rows, doc["ranges"], strict=True):
        assert (int(row["dst_port"]), int(row["first"]), int(row["last"])) == (
            r["dst_port"],
            r["first"],
            r["last"],
        )
        assert row["verdict"] == r["verdict"]
        assert int(row["cells"]) == r["last"] - r["first"] + 1
    rejected = next(r for r in rows if r["verdict"] == "rejected")
    assert (rejected["icmp_type"], rejected["icmp_code"], rejected["icmp_from"]) == (
        "3",
        "13",
        "198.18.2.1",
    )
    assert next(r for r in rows if r["verdict"] == "untested")["reason"] == "address in use"


# ---------------------------------------------------------------------------------------
# HTML structure (what a browser shows is in test_html_browser.py).


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, str | None]] = []
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if "cell" in (a.get("class") or "").split():
            self.cells.append(a)
        for k in ("src", "href"):
            if a.get(k):
                self.refs.append(str(a[k]))


def _parse_html(doc: dict, tmp_path: Path) -> tuple[_Cells, str]:
    p = tmp_path / "r.html"
    write_html(doc, p)
    text = p.read_text()
    parser = _Cells()
    parser.feed(text)
    return parser, text


def test_html_heat_map_cells(tmp_path: Path) -> None:
    doc = after_change()
    doc["deviations"] = judge(doc, parse_expect(BASELINE_EXPECT))
    page, text = _parse_html(doc, tmp_path)
    assert len(page.cells) == 2 * 64
    by = {(int(c["data-dst"] or 0), int(c["data-first"] or 0)): c for c in page.cells}
    # 1024 + 39 * 1008 = 40336: the bucket 40336-41343 is entirely blocked on 5000.
    c = by[(5000, 40336)]
    assert c["data-verdict"] == "blocked"
    assert "blocked 1008" in (c["title"] or "")
    # 39328-40335 holds 39328-39999 open and 40000-40335 blocked.
    c = by[(5000, 39328)]
    assert c["data-verdict"] == "mixed"
    assert json.loads(c["data-counts"] or "") == {"open": 672, "blocked": 336}
    assert "linear-gradient" in (c["style"] or "")
    # NAT and deviations are marked.
    assert "nat" in (by[(5001, 2032)]["class"] or "")
    assert "dev" in (by[(5000, 45376)]["class"] or "")
    assert "dev" not in (by[(5000, 1024)]["class"] or "")
    # Self-contained: no script, no external asset.
    assert page.refs == []
    assert not page.tags & {"script", "link", "img", "iframe"}
    assert 'id="deviations"' in text
    assert "5,201 cells deviate" in text


def test_html_escapes_what_the_agent_sent(tmp_path: Path) -> None:
    doc = baseline()
    doc["agent"]["name"] = '<script>alert(1)</script>"'
    page, text = _parse_html(doc, tmp_path)
    assert "script" not in page.tags
    assert "&lt;script&gt;" in text


def test_html_of_a_sparse_random_plan(tmp_path: Path) -> None:
    doc = build_doc(src="1024,2000,30000,65535", dst=(5000,))
    page, _ = _parse_html(doc, tmp_path)
    planned = [c for c in page.cells if c["data-verdict"] != "none"]
    # 1024 and 2000 share the first bucket (1024-2031); the other buckets are hatched.
    assert [c["data-first"] for c in planned] == ["1024", "29248", "64528"]
    assert [json.loads(c["data-counts"] or "") for c in planned] == [
        {"open": 2},
        {"open": 1},
        {"open": 1},
    ]
    assert len(page.cells) == 64


def test_buckets_cover_every_planned_cell_once() -> None:
    doc = baseline()
    buckets = buckets_for(doc["ranges"])
    assert len(buckets) == 64
    assert all(b - a + 1 == 1008 for a, b in buckets)
    counts = bucket_counts(doc["ranges"], buckets)
    total = sum(n for row in counts.values() for c in row for k, n in c.items() if k[0] != "~")
    assert total == doc["summary"]["cells"]


def test_html_of_a_diff_document(tmp_path: Path) -> None:
    page, text = _parse_html(diff_runs(baseline(), after_change()), tmp_path)
    kinds = {c["data-verdict"] for c in page.cells}
    assert kinds == {"same", "opened", "mixed"}
    assert "5100 cells changed verdict" in text


# ---------------------------------------------------------------------------------------
# Recommendations.


def test_recommendations_for_the_baseline() -> None:
    rec = recommend(baseline())
    assert rec["fixed_ports"] == []
    nft = [r["nft"] for r in rec["rules"]]
    assert nft == [
        "nft insert rule inet filter forward ip saddr 198.18.2.2 ip daddr 198.18.1.2 "
        "udp sport 40000-49999 udp dport 5000 accept",
        "nft insert rule inet filter forward ip saddr 198.18.2.2 ip daddr 198.18.1.2 "
        "udp sport 60000-60099 udp dport 5001 accept",
    ]
    assert rec["rules"][0]["iptables"] == [
        "iptables -I FORWARD -p udp -s 198.18.2.2 -d 198.18.1.2 --dport 5000 "
        "--sport 40000:49999 -j ACCEPT"
    ]
    assert rec["rules"][1]["verdicts"] == ["rejected"]
    assert any("NAT" in n for n in rec["notes"])


def test_a_fully_open_port_is_the_fixed_port_and_ipv6_rules() -> None:
    rec = recommend(docsamples.ipv6())
    assert rec["fixed_ports"] == [6000]
    (rule,) = rec["rules"]
    assert rule["nft"] == (
        "nft insert rule inet filter forward ip6 saddr 2001:2:0:92::2 ip6 daddr 2001:2:0:91::2 "
        "udp sport { 1024-2047, 40000-49999 } udp dport 5000 accept"
    )
    assert rule["iptables"] == [
        "ip6tables -I FORWARD -p udp -s 2001:2:0:92::2 -d 2001:2:0:91::2 --dport 5000 "
        "-m multiport --sports 1024:2047,40000:49999 -j ACCEPT"
    ]


def _rejects_from(
    *ranges: tuple[int, int, int, int, str],
    registered: str = "198.18.1.2",
    target: str = "198.18.1.2",
) -> dict[str, Any]:
    """A complete one-port run: the given (first, last, type, code, from) rejected, the
    rest of 1024-65535 open."""
    out, at = [], 1024
    for first, last, t, c, sender in ranges:
        if at < first:
            out.append({"dst_port": 5000, "first": at, "last": first - 1, "verdict": "open"})
        icmp = {"type": t, "code": c, "from": sender, "verified": True}
        out.append(
            {"dst_port": 5000, "first": first, "last": last, "verdict": "rejected", "icmp": icmp}
        )
        at = last + 1
    if at <= 65535:
        out.append({"dst_port": 5000, "first": at, "last": 65535, "verdict": "open"})
    return {
        "complete": True,
        "ranges": out,
        "probe": {"address": "198.18.2.2", "target": target, "send_mode": "raw"},
        "agent": {"registered": registered, "observed": target},
    }


def test_nothing_listening_behind_nat_gets_no_rule_and_says_why() -> None:
    """Behind NAT, the NAT box's own "port unreachable" for every cell came out as a
    forward-chain rule to accept the lot: no firewall rule opens a port nothing listens on."""
    doc = _rejects_from((1024, 65535, 3, 3, "198.18.2.1"), target="198.18.2.1")
    rec = recommend(doc)
    assert rec["rules"] == []
    assert rec["notes"] == [
        "64,512 cells were rejected by 198.18.2.1 itself with port unreachable: nothing "
        "listens on destination port(s) 5000 there (the agent registered 198.18.1.2, but the "
        "probe reached 198.18.2.1: NAT; forward the port to the agent, or reach it without "
        "NAT); no firewall rule opens that"
    ]


def test_the_agents_own_firewall_gets_an_input_rule_on_its_host() -> None:
    doc = _rejects_from(
        (20000, 24999, 3, 13, "198.18.2.1"),  # the router between them
        (26000, 30999, 3, 13, "198.18.1.2"),  # the agent's host itself
        # iptables' REJECT says port unreachable by default: the port has open cells, so
        # something listens there, and this is the host's firewall too
        (40000, 40099, 3, 3, "198.18.1.2"),
    )
    rec = recommend(doc)
    assert [(r["chain"], r["src_ports"], r["cells"]) for r in rec["rules"]] == [
        ("forward", "20000-24999", 5000),
        ("input", "26000-30999,40000-40099", 5100),
    ]
    assert rec["rules"][1]["nft"] == (
        "nft insert rule inet filter input ip saddr 198.18.2.2 ip daddr 198.18.1.2 "
        "udp sport { 26000-30999, 40000-40099 } udp dport 5000 accept"
    )
    assert rec["rules"][1]["iptables"] == [
        "iptables -I INPUT -p udp -s 198.18.2.2 -d 198.18.1.2 --dport 5000 "
        "-m multiport --sports 26000:30999,40000:40099 -j ACCEPT"
    ]
    notes = rec["notes"]
    assert not [n for n in notes if "nothing listens" in n]
    assert "198.18.1.2 itself rejected some cells (its own firewall)" in notes[-1]


def test_an_incomplete_run_recommends_nothing() -> None:
    rec = recommend(docsamples.incomplete())  # 5000 blocks 40000-49999; 5001 half unknown
    assert (rec["fixed_ports"], rec["rules"]) == ([], [])
    (note,) = rec["notes"]
    assert "the run is incomplete (35,536 cells unknown)" in note
    assert "run again" in note


def test_ports_sharing_a_pattern_share_a_rule() -> None:
    spans = [{"dst": d, "first": 40000, "last": 49999, "verdict": "blocked"} for d in (5000, 5001)]
    (rule,) = recommend(build_doc(dst=(5000, 5001, 5002), spans=spans))["rules"]
    assert rule["dst_ports"] == [5000, 5001]
    assert rule["nft"].endswith("udp sport 40000-49999 udp dport 5000-5001 accept")


def test_cells_a_filled_limit_kept_out_get_no_rule() -> None:
    """The ranges a "delivery stopped by time" warning names (a NAT pool that filled) are
    left out of the rules, whichever of its forms names them (a single port, the first few
    and how many more); a blocked range that straddles one keeps its part outside."""
    spans = [
        {"dst": 5000, "first": 40000, "last": 40999, "verdict": "blocked"},
        {"dst": 5000, "first": 50000, "last": 50999, "verdict": "blocked"},
        {"dst": 5001, "first": 45000, "last": 45000, "verdict": "blocked"},
    ]
    doc = build_doc(dst=(5000, 5001), spans=spans)
    doc["warnings"] = [
        schema.FILLED_WARNING + "5000: 40500-41500, 5001: 45000 and 3 more: the 100 flows "
        "sent there first got through, none of the 900 sent later (...)"
    ]
    advice = recommend(doc)
    by_dst = {tuple(r["dst_ports"]): r["src_ports"] for r in advice["rules"]}
    assert by_dst == {(5000,): "40000-40499,50000-50999"}
    assert advice["rules"][0]["cells"] == 1500
    (said,) = [n for n in advice["notes"] if "where delivery stopped by time" in n]
    assert said.startswith("501 blocked cells")  # 40500-40999 and 45000
    doc["warnings"] = []
    assert len(recommend(doc)["rules"]) == 2  # without the warning, every blocked cell


def test_iptables_multiport_takes_at_most_15_ports() -> None:
    sports = [(p, p) for p in range(20000, 20040, 2)] + [
        (30000 + 10 * k, 30005 + 10 * k) for k in range(9)
    ]
    rules = iptables_rules(4, "198.19.2.1", "198.19.2.2", sports, [5000])
    covered = []
    for rule in rules:
        spec = rule.split("--sports ")[1].split(" ")[0]
        items = spec.split(",")
        assert sum(2 if ":" in i else 1 for i in items) <= MULTIPORT_SLOTS
        covered += items
    assert len(covered) == len(sports)


def test_no_rules_across_address_families() -> None:
    doc = baseline()
    doc["probe"]["address"] = "2001:2:0:99::1"
    rec = recommend(doc)
    assert rec["rules"] == []
    assert any("address families" in n for n in rec["notes"])


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("unshare"),
    reason="checking rules with nft needs root, nft and unshare (a throwaway netns)",
)
def test_nft_accepts_the_rules(tmp_path: Path) -> None:
    spans = [
        {"dst": 5000, "first": 1024, "last": 2047, "verdict": "blocked"},
        {"dst": 5000, "first": 3000, "last": 3000, "verdict": "blocked"},
        {"dst": 5001, "first": 60000, "last": 60099, "verdict": "rejected"},
    ]
    rules = [r["nft"] for r in recommend(build_doc(dst=(5000, 5001), spans=spans))["rules"]]
    rules += [r["nft"] for r in recommend(docsamples.ipv6())["rules"]]
    script = tmp_path / "rules.nft"
    script.write_text(
        "table inet filter {\n chain forward { type filter hook forward priority 0; "
        "policy drop; }\n}\n" + "".join(r.removeprefix("nft ") + "\n" for r in rules)
    )
    proc = subprocess.run(
        ["unshare", "-n", "nft", "-f", str(script)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------
# The diff: cells ICMP rate limits explain are uncertain, not changes.


def _rejected_then_limited(limited: int) -> tuple[dict, dict]:
    """Run A rejects 60000-60099 on 5001; run B finds those cells silent while ICMP was
    rate-limited (a blocked range with ``limited`` icmp_limited cells)."""
    a = baseline()
    b = baseline()
    b["run_id"] = "20251126T090000-b0b0b0"
    (rej,) = [r for r in b["ranges"] if r["verdict"] == "rejected"]
    rej["verdict"] = "blocked"
    rej.pop("icmp")
    rej["icmp_limited"] = limited
    return a, b


def test_a_move_the_icmp_limits_explain_is_uncertain() -> None:
    a, b = _rejected_then_limited(100)
    d = diff_runs(a, b)
    assert d["changes"] == []
    assert d["uncertain"] == [
        {"dst_port": 5001, "first": 60000, "last": 60099, "before": "rejected", "after": "blocked"}
    ]
    # Either direction.
    back = diff_runs(b, a)
    assert back["changes"] == []
    assert [(r["before"], r["after"]) for r in back["uncertain"]] == [("blocked", "rejected")]


def test_more_moved_cells_than_the_icmp_limits_explain_are_changes() -> None:
    a, b = _rejected_then_limited(60)  # 100 cells moved, only 60 could have been limited
    d = diff_runs(a, b)
    assert d["uncertain"] == []
    assert [(r["first"], r["last"], r["before"], r["after"]) for r in d["changes"]] == [
        (60000, 60099, "rejected", "blocked")
    ]


def test_rejected_to_a_plain_blocked_is_a_change() -> None:
    a, b = _rejected_then_limited(0)
    d = diff_runs(a, b)
    assert d["uncertain"] == []
    assert len(d["changes"]) == 1


def _history_app(tmp_path: Path, *docs: dict[str, Any]) -> tuple[Any, Path]:
    """The history commands as an app, over a database holding ``docs``."""
    import typer

    from udpreach.cli.history import register
    from udpreach.store import RunStore

    db = tmp_path / "runs.sqlite3"
    with RunStore.open(db) as st:
        for doc in docs:
            st.finish(doc["run_id"], doc)
    app = typer.Typer()
    register(app)
    return app, db


def test_uncertain_cells_do_not_fail_the_diff_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    a, b = _rejected_then_limited(100)
    app, db = _history_app(tmp_path, a, b)
    out = {k: tmp_path / f"d.{k}" for k in ("junit", "markdown", "csv", "html")}
    args = [x for k, p in out.items() for x in (f"--{k}", str(p))]
    res = CliRunner().invoke(app, ["diff", a["run_id"], b["run_id"], "--db", str(db), *args])
    assert res.exit_code == 0, res.output
    assert "100 cells moved between rejected and blocked" in " ".join(res.stdout.split())
    res = CliRunner().invoke(app, ["diff", a["run_id"], b["run_id"], "--db", str(db), "--json"])
    body = json.loads(res.stdout)
    assert (body["schema"], body["changes"], len(body["uncertain"])) == ("udpreach/diff-v1", [], 1)
    # Every export says it, and none fails on it.
    rows = _csv_rows(out["csv"])
    assert [(r["first"], r["change"]) for r in rows] == [("60000", "uncertain")]
    root = ET.parse(out["junit"]).getroot()
    assert root.get("failures") == "0"
    assert "100 cells moved" in (root.findtext("testsuite/system-out") or "")
    assert "100 cells moved between rejected and blocked" in out["markdown"].read_text()
    assert 'id="uncertain"' in out["html"].read_text()


# ---------------------------------------------------------------------------------------
# The document: version and recommendations; sampled plans get spans.


def test_the_document_names_its_version_and_carries_its_recommendations() -> None:
    import udpreach

    doc = rendersamples.sampled_run()
    assert doc["version"] == udpreach.__version__
    without = {k: v for k, v in doc.items() if k != "recommendations"}
    assert doc["recommendations"] == recommend(without)
    assert json.loads(json.dumps(doc)) == doc  # plain JSON


def test_rules_for_a_sampled_plan_open_spans_not_sampled_ports() -> None:
    doc = rendersamples.sampled_run()
    blocked = [r for r in doc["ranges"] if r["verdict"] == "blocked" and r["dst_port"] == 5000]
    assert len(blocked) > 50  # one range per sampled port, or nearly
    (rule,) = recommend(doc)["rules"]
    assert rule["src_ports"] == f"{blocked[0]['first']}-{blocked[-1]['last']}"
    assert rule["dst_ports"] == [5000, 5001]
    assert rule["sampled"] is True
    assert rule["cells"] == 2 * sum(r["last"] - r["first"] + 1 for r in blocked)
    assert rule["iptables"] == [
        f"iptables -I FORWARD -p udp -s 198.18.2.2 -d 198.18.1.2 --dport 5000:5001 "
        f"--sport {blocked[0]['first']}:{blocked[-1]['last']} -j ACCEPT"
    ]
    assert any("sampled source ports" in n for n in recommend(doc)["notes"])


def test_a_sampled_span_stops_at_a_sample_of_another_verdict() -> None:
    doc = rendersamples.sampled_run()
    b5000 = [r for r in doc["ranges"] if r["verdict"] == "blocked" and r["dst_port"] == 5000]
    middle = b5000[len(b5000) // 2]
    middle["verdict"] = "open"  # an open sample inside the blocked band
    rule = next(r for r in recommend(doc)["rules"] if 5000 in r["dst_ports"])
    assert rule["src_ports"] == (
        f"{b5000[0]['first']}-{b5000[len(b5000) // 2 - 1]['last']},"
        f"{b5000[len(b5000) // 2 + 1]['first']}-{b5000[-1]['last']}"
    )


def test_a_plan_of_a_few_spans_is_not_sampled() -> None:
    doc = build_doc(src="1024-2047,40000-49999", spans=[
        {"dst": 5000, "first": 1024, "last": 2047, "verdict": "blocked"},
        {"dst": 5000, "first": 40000, "last": 49999, "verdict": "blocked"},
    ])  # fmt: skip
    (rule,) = recommend(doc)["rules"]
    assert rule["src_ports"] == "1024-2047,40000-49999"  # never the untested 2048-39999
    assert rule["sampled"] is False


# ---------------------------------------------------------------------------------------
# Every export carries the confidence.


class _Texts(HTMLParser):
    """The text inside each element with an id, and every tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.tags: list[str] = []
        self._open: list[str | None] = []
        self.lis: list[str] = []
        self._li = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._open.append(dict(attrs).get("id"))
        if tag == "li":
            self._li = True
            self.lis.append("")

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()
        if tag == "li":
            self._li = False

    def handle_data(self, data: str) -> None:
        for i in self._open:
            if i:
                self.by_id[i] = self.by_id.get(i, "") + data
        if self._li:
            self.lis[-1] += data


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _exports(doc: dict, tmp_path: Path) -> dict[str, Any]:
    paths = {k: tmp_path / f"r.{k}" for k in ("html", "md", "xml", "csv")}
    write_html(doc, paths["html"])
    write_markdown(doc, paths["md"])
    write_junit(doc, None, paths["xml"])
    write_csv(doc, paths["csv"])
    page = _Texts()
    page.feed(paths["html"].read_text())
    root = ET.parse(paths["xml"]).getroot()
    return {
        "html": page,
        "html_text": paths["html"].read_text(),
        "md": paths["md"].read_text(),
        "props": [(p.get("name"), p.get("value")) for p in root.iter("property")],
        "out": root.findtext("testsuite/system-out") or "",
        "csv": _csv_rows(paths["csv"]),
    }


def test_every_export_carries_loss_bound_confidence_mode_warnings_version(
    tmp_path: Path,
) -> None:
    doc = rendersamples.everything()
    x = _exports(doc, tmp_path)
    warning = "ICMP errors from 198.18.2.1 were rate-limited (about 1 every 1.0 s)"
    # HTML
    ids = x["html"].by_id
    assert ids["loss"] == "0.2% (<= 0.4% at 99%)"
    assert ids["bound"] == "<= 0.00012"
    assert ids["confidence-reached"] == "yes (target 0.01)"
    assert ids["send-mode"] == "raw"
    assert ids["path-mtu"] == "1280 bytes (said by 198.18.2.1)"
    assert ids["udpreach-version"] == ids["version"] == "0.1.0"
    assert warning in x["html"].lis
    # Markdown
    md = x["md"]
    assert "| Loss on the path | 0.2% (<= 0.4% at 99%) |" in md.replace("\\<", "<")
    assert "| Chance that any 'blocked' cell is really open | <= 0.00012 |" in md.replace(
        "\\<", "<"
    )
    assert "| Confidence target reached | yes (target 0.01) |" in md
    assert "| Send mode | raw |" in md
    assert "| udpreach | 0.1.0 |" in md
    assert f"- {warning}" in md
    # JUnit
    props = dict(p for p in x["props"] if p[0] != "warning")
    assert props["loss_estimate"] == "0.002"
    assert props["false_blocked_bound"] == "0.00012"
    assert props["confidence_reached"] == "true"
    assert props["send_mode"] == "raw"
    assert props["udpreach_version"] == "0.1.0"
    assert ("warning", warning) in x["props"]
    assert "loss on the path: 0.2% (<= 0.4% at 99%)" in x["out"]
    # CSV: every row says it.
    for row in x["csv"]:
        assert (row["loss_estimate"], row["false_blocked_bound"]) == ("0.002", "0.00012")
        assert (row["confidence_reached"], row["send_mode"]) == ("true", "raw")
        assert row["udpreach_version"] == "0.1.0"
        assert warning in json.loads(row["warnings"])
    # The new range keys.
    limited = next(r for r in x["csv"] if r["first"] == "40000" and r["dst_port"] == "5000")
    assert (limited["verdict"], limited["icmp_limited"], limited["inferred"]) == (
        "blocked",
        "9000",
        "120",
    )
    verified = {r["first"]: r["icmp_verified"] for r in x["csv"] if r["verdict"] == "rejected"}
    assert verified == {"60000": "true", "60100": "false"}
    assert "9,000 of 10,000 cells silent while ICMP was rate-limited" in x["html_text"]
    assert "9,000 of 10,000 cells silent while ICMP was rate-limited" in md


def test_an_unknown_loss_is_unknown_in_every_export(tmp_path: Path) -> None:
    x = _exports(rendersamples.everything(loss_estimate=None), tmp_path)
    assert x["html"].by_id["loss"].startswith("unknown")
    assert x["html"].by_id["bound"] == "unknown"
    assert x["html"].by_id["confidence-reached"] == "NO (target 0.01)"
    assert "| Loss on the path | unknown" in x["md"]
    props = dict(x["props"])
    assert (props["loss_estimate"], props["false_blocked_bound"]) == ("unknown", "unknown")
    assert props["confidence_reached"] == "false"
    assert {(r["loss_estimate"], r["false_blocked_bound"]) for r in x["csv"]} == {
        ("unknown", "unknown")
    }
    for text in (x["html"].by_id["confidence"], x["md"], x["out"]):
        assert "0%" not in text


def test_an_older_document_is_exported_with_what_it_has(tmp_path: Path) -> None:
    x = _exports(baseline(), tmp_path)  # no version, loss, send mode or warnings
    assert x["html"].by_id["udpreach-version"] == "not recorded"
    assert x["html"].by_id["loss"] == "not measured"
    assert x["html"].by_id["send-mode"] == "not recorded"
    assert dict(x["props"])["udpreach_version"] == "not recorded"
    assert "None." in x["md"].split("## Warnings")[1]


def test_html_escapes_every_hostile_string_through_the_template(tmp_path: Path) -> None:
    doc = rendersamples.everything()
    rej = next(r for r in doc["ranges"] if r["verdict"] == "rejected")
    rej["icmp"]["from"] = "<img src=x onerror=alert(1)>"
    doc["run_id"] = "<b>run</b>"
    x = _exports(doc, tmp_path)
    page, text = x["html"], x["html_text"]
    assert "script" not in page.tags
    assert "img" not in page.tags
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text  # agent name, warning
    assert "&lt;img src=x onerror=alert(1)&gt;" in text  # ICMP sender
    assert "&lt;b&gt;run&lt;/b&gt;" in text  # run id
    # The hostile untested reason and warning read as text.
    assert rendersamples.HOSTILE in page.lis


def test_the_html_template_ships_with_the_package() -> None:
    from importlib.resources import files

    templates = files("udpreach.render") / "templates"
    assert {"base.html", "run.html", "diff.html", "macros.html"} <= {
        p.name for p in templates.iterdir()
    }


def test_reports_of_an_interrupted_sweep_stay_short(tmp_path: Path) -> None:
    doc = rendersamples.interrupted_sweep()
    x = _exports(doc, tmp_path)
    assert len(x["md"].splitlines()) < 80
    assert x["html_text"].count("<tr>") < 60
    assert len(x["csv"]) == len(doc["ranges"])  # the exact list is in the CSV
    assert "2 rows for" in x["md"]
    assert "the CSV or JSON export has them all" in x["md"]
    root = ET.parse(tmp_path / "r.xml").getroot()
    failure = root.find("testsuite/testcase[@name='run complete']/failure")
    assert failure is not None
    assert len((failure.text or "").splitlines()) < 10


# ---------------------------------------------------------------------------------------
# Every export says what the JSON says about confidence (show --json against show --csv
# --junit --markdown --html, through the real CLI).


def _stored(doc: dict[str, Any], tmp_path: Path) -> Path:
    from udpreach.store import RunStore

    db = tmp_path / "runs.sqlite3"
    with RunStore.open(db) as store:
        store.finish(doc["run_id"], doc)
    return db


def _shown(doc: dict[str, Any], tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(show --json, the four exports show writes, show's terminal report) of *doc*."""
    db = _stored(doc, tmp_path)
    as_json = run_cli("show", doc["run_id"], "--db", str(db), "--json")
    assert as_json.returncode == 0, as_json.stderr
    out = tmp_path / "out"
    out.mkdir()
    paths = {k: out / f"r.{k}" for k in ("html", "md", "xml", "csv")}
    shown = run_cli(
        "show", doc["run_id"], "--db", str(db), "--html", str(paths["html"]),
        "--markdown", str(paths["md"]), "--junit", str(paths["xml"]), "--csv", str(paths["csv"]),
        env={"COLUMNS": "100"},
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    page = _Texts()
    page.feed(paths["html"].read_text())
    root = ET.parse(paths["xml"]).getroot()
    x = {
        "html": page,
        "md": paths["md"].read_text(),
        "props": dict((p.get("name"), p.get("value")) for p in root.iter("property")),
        "out": root.findtext("testsuite/system-out") or "",
        "csv": _csv_rows(paths["csv"]),
    }
    return json.loads(as_json.stdout), x, shown.stdout


def test_an_interrupted_run_has_reached_its_target_in_no_export(tmp_path: Path) -> None:
    """The trial: a Ctrl-C'd sweep's JSON says bound 1.0, not reached; the exports said
    bound 0, reached, "yes: no cell blocked"."""
    doc, x, terminal = _shown(rendersamples.interrupted_sweep(), tmp_path)
    assert doc["complete"] is False
    assert doc["loss"]["false_blocked_bound"] == 1.0
    assert doc["loss"]["confidence_reached"] is False
    assert (x["props"]["false_blocked_bound"], x["props"]["confidence_reached"]) == ("1", "false")
    assert {(r["false_blocked_bound"], r["confidence_reached"]) for r in x["csv"]} == {
        ("1", "false")
    }
    not_reached = "NO: the run is incomplete (target 0.01)"
    assert x["html"].by_id["bound"] == "<= 1"
    assert x["html"].by_id["confidence-reached"] == not_reached
    assert "| Chance that any 'blocked' cell is really open | \\<= 1 |" in x["md"]
    assert f"| Confidence target reached | **{not_reached}** |" in x["md"]
    assert f"confidence target reached: {not_reached}" in x["out"]
    assert "chance that any 'blocked' cell is really open: <= 1" in x["out"]
    for text in (x["html"].by_id["confidence"], x["md"], x["out"]):
        assert "yes: no cell blocked" not in text
        assert "none: no cell blocked" not in text
    flat = " ".join(terminal.split())
    assert "(confidence target not reached: the run is incomplete)" in flat
    # Not "no cell blocked, chance that any 'blocked' cell is really open: <= 1" (a new
    # user read that as a contradiction): nothing is known of the unknown cells yet.
    assert "no cell blocked so far" in flat
    assert "really open" not in flat


def test_a_run_that_says_reached_while_incomplete_is_not_reached_anywhere(
    tmp_path: Path,
) -> None:
    """An incomplete run never reached its target, whatever its loss block claims."""
    doc = rendersamples.everything(complete=False)
    doc["loss"]["confidence_reached"] = True
    _, x, terminal = _shown(doc, tmp_path)
    assert x["props"]["confidence_reached"] == "false"
    assert {r["confidence_reached"] for r in x["csv"]} == {"false"}
    assert x["html"].by_id["confidence-reached"].startswith("NO: the run is incomplete")
    assert "confidence target not reached: the run is incomplete" in " ".join(terminal.split())


@pytest.mark.parametrize("bound", [0.0, 3e-9])
def test_a_tiny_bound_reads_below_one_in_a_million_everywhere(bound: float, tmp_path: Path) -> None:
    """The trial's "chance that any 'blocked' cell is really open: <= 0" claimed a
    certainty no measurement gives."""
    doc = rendersamples.everything()
    doc["loss"]["false_blocked_bound"] = bound
    shown, x, terminal = _shown(doc, tmp_path)
    assert shown["loss"]["false_blocked_bound"] == bound  # the JSON keeps its number
    assert x["props"]["false_blocked_bound"] == "< 1e-6"
    assert {r["false_blocked_bound"] for r in x["csv"]} == {"< 1e-6"}
    assert x["html"].by_id["bound"] == "< 1e-6"
    assert "| Chance that any 'blocked' cell is really open | \\< 1e-6 |" in x["md"]
    assert "chance that any 'blocked' cell is really open: < 1e-6" in x["out"]
    flat = " ".join(terminal.split())
    assert "chance that any 'blocked' cell is really open: < 1e-6 (confidence target" in flat
    for text in (x["html"].by_id["bound"], x["md"], x["out"], terminal):
        assert not re.search(r"<= 0(?![.\d])", text), text
        assert not re.search(r"<= [0-9.]+e-0[0-9]", text), text


def test_an_interrupted_run_recommends_no_rules(tmp_path: Path) -> None:
    """A Ctrl-C'd random:500 run: rules for the scattered rejected samples that happened to
    settle would open the wrong ports and miss the unknown ones, so none is offered, and
    one note says why, in the JSON and every report."""
    doc, x, terminal = _shown(rendersamples.interrupted_sample(), tmp_path)
    assert doc["summary"]["rejected"] > 50
    assert doc["summary"]["unknown"] > 400
    rec = doc["recommendations"]
    assert (rec["rules"], rec["fixed_ports"]) == ([], [])
    (note,) = rec["notes"]
    assert note.startswith("no rules and no fixed-port candidate: the run is incomplete")
    for text in (terminal, x["md"], x["html"].by_id["recommendations"]):
        flat = " ".join(text.split())
        assert "nft insert" not in flat
        assert "iptables -I" not in flat
        assert "no rules and no fixed-port candidate: the run is incomplete" in flat
    assert "no destination port passed" not in terminal
    assert "none: the run is incomplete" in x["md"]
    assert x["html"].by_id["fixed-ports"] == "none"


def test_a_random_baseline_against_another_random_run_names_what_it_did_not_judge(
    tmp_path: Path,
) -> None:
    """`expect --from` a random:500 run, judged against another random:500 run of the same
    policy: the two samples hardly overlap, and the blocked entry judged nothing at all."""
    entries = parse_expect(expect_from(rendersamples.sampled_run(2)), "base.toml")
    doc = rendersamples.sampled_run(3)
    doc["expect"] = [e.to_json() for e in entries]  # as the coordinator records a judged run
    doc["deviations"] = judge(doc, entries)
    assert doc["deviations"] == []  # what said "as expected: no deviations"
    shown, x, terminal = _shown(doc, tmp_path)
    judged = shown["judgement"]
    assert (judged["cells"], judged["as_expected"]) == (2, False)
    (u,) = judged["unmatched"]
    assert (u["entry"], u["fails"]) == (2, True)
    assert u["reason"].startswith("none of its source ports was among the 500 the run sampled")
    flat = " ".join(terminal.split())
    assert "expectations: 2 of 1,000 cells judged by 1 of 2 entries" in flat
    assert f"entry #2 (line {u['line']}) judged no cell: none of its source ports" in flat
    assert "not as expected: expectation entry #2" in flat
    assert "as expected: no deviations" not in flat
    # The exports say the same.
    assert "Not as expected: expectation entry #2" in x["html"].by_id["not-as-expected"]
    assert "**Not as expected: expectation entry #2" in x["md"]
    assert "None: every judged cell is as expected." not in x["md"]
    root = ET.parse(tmp_path / "out" / "r.xml").getroot()
    failed = [c.get("name", "") for c in root.iter("testcase") if c.find("failure") is not None]
    assert [n.split(":")[0] for n in failed] == [f"expect #2 (line {u['line']})"]


def test_diff_says_when_its_runs_cannot_show_a_change_of_one_path(tmp_path: Path) -> None:
    """Two agents' runs, or a run that did not finish: the diff still lists the cells, and
    a note on stderr says why they are no evidence that one path changed."""
    from typer.testing import CliRunner

    a = docsamples.baseline()
    b = copy.deepcopy(a)
    b["run_id"] = "20251126T090000-b0b0b0"
    b["agent"] = {**b["agent"], "name": "vm", "registered": "198.18.1.2"}
    b["complete"] = False
    b["ranges"][0]["verdict"] = "unknown"
    app, db = _history_app(tmp_path, a, b)
    res = CliRunner().invoke(app, ["diff", a["run_id"], b["run_id"], "--db", str(db)])
    assert res.exit_code == 1, res.output
    err = " ".join(res.stderr.split())
    assert "then 'vm' at 198.18.1.2): their differences may be two paths" in err
    first = a["ranges"][0]
    n = first["last"] - first["first"] + 1
    assert (
        f"note: {n:,} of the changed cells were unknown in one run (run {b['run_id']} did not "
        "finish)" in err
    )
    same = CliRunner().invoke(app, ["diff", a["run_id"], a["run_id"], "--db", str(db)])
    assert same.exit_code == 0
    assert "note:" not in same.stderr


def test_a_report_that_could_not_be_finished_leaves_no_empty_file(tmp_path: Path) -> None:
    """A full disk left a 0-byte --html file behind (the run itself kept its document)."""
    from udpreach.render import exports

    def fails(path: Path) -> None:
        path.write_text("")  # created, then the disk is full
        raise OSError(28, "No space left on device")

    fresh, kept = tmp_path / "r.html", tmp_path / "old.html"
    kept.write_text("an earlier report")
    for path in (fresh, kept):
        with pytest.raises(OSError, match="No space left"):
            exports._write(fails, path)
    assert not fresh.exists()
    assert kept.exists()  # not this run's to remove
