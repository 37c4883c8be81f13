"""Reports (JUnit, Markdown, CSV, HTML), the diff between two runs, and the
recommendations (fixed port, rules to open what is blocked)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import docsamples
import pytest
from docsamples import BASELINE_EXPECT, after_change, baseline, build_doc, cell_verdicts, docs
from hypothesis import given, settings

from udpreach.core.diff import diff_runs
from udpreach.core.expect import judge, parse_expect
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
    assert "201 of 119024 cells deviate" in fail.get("message", "")
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
    assert "**5201 cells deviate** in 3 ranges." in text
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
    assert "5201 cells deviate" in text


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


def test_a_port_with_unknown_cells_is_not_recommended() -> None:
    rec = recommend(docsamples.incomplete())
    assert rec["fixed_ports"] == []
    assert any("5001" in n and "run again" in n for n in rec["notes"])


def test_ports_sharing_a_pattern_share_a_rule() -> None:
    spans = [{"dst": d, "first": 40000, "last": 49999, "verdict": "blocked"} for d in (5000, 5001)]
    (rule,) = recommend(build_doc(dst=(5000, 5001, 5002), spans=spans))["rules"]
    assert rule["dst_ports"] == [5000, 5001]
    assert rule["nft"].endswith("udp sport 40000-49999 udp dport 5000-5001 accept")


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
