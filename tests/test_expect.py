"""Expectation files: parsing with exact error lines, judging with override precedence, and
writing an expectation file back from a run."""

from __future__ import annotations

import copy
import tomllib

import docsamples
import pytest
from docsamples import BASELINE_EXPECT, baseline, build_doc, cell_verdicts, docs
from hypothesis import given, settings
from hypothesis import strategies as st

from udpreach.core.errors import ConfigError
from udpreach.core.expect import (
    CLOSED,
    ExpectEntry,
    cut_range,
    expect_from,
    judge,
    judged_cells,
    judgement,
    judgement_of,
    merge_ranges,
    parse_expect,
    summarize_judgement,
    with_judgement,
)
from udpreach.core.portspec import parse_ports

# ---------------------------------------------------------------------------------------
# Parsing.


def test_contract_example_parses() -> None:
    text = """\
[[expect]]
agent = "pc-17"            # optional; absent: any agent
dst_ports = "5000"         # a port SPEC
src_ports = "1024-65535"
verdict = "open"           # open | blocked | rejected

[[expect]]
dst_ports = "5000"
src_ports = "40000-49999"
verdict = "blocked"        # a later entry overrides an earlier one on the cells they share
"""
    a, b = parse_expect(text, "x.toml")
    assert (a.agent, a.dst_ports, a.verdict, a.line) == ("pc-17", (5000,), "open", 1)
    assert a.src_ports == tuple(range(1024, 65536))
    assert (b.agent, b.src_ports[0], b.src_ports[-1], b.verdict, b.line) == (
        None,
        40000,
        49999,
        "blocked",
        7,
    )


def test_a_bare_integer_port_is_accepted() -> None:
    (e,) = parse_expect('[[expect]]\ndst_ports = 5000\nsrc_ports = "1024-2047"\nverdict = "open"')
    assert e.dst_ports == (5000,)


def test_repr_is_short() -> None:
    (e,) = parse_expect(
        '[[expect]]\ndst_ports = "5000"\nsrc_ports = "1024-65535"\nverdict = "open"'
    )
    assert len(repr(e)) < 120
    assert "1024-65535" in repr(e)


GOOD = '[[expect]]\ndst_ports = "5000"\nsrc_ports = "1024-65535"\nverdict = "open"\n'


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ('[[expect]]\ndst_ports = "5000\n', 2, "invalid TOML"),
        (GOOD + '\n[[expect]]\ndst_ports = "5000"\nsrc_ports = "1-2"\nverdict = "open"\nfoo = 1\n',
         10, "unknown key 'foo'"),
        (GOOD + '\n[[expect]]\ndst_ports = "5000"\nverdict = "open"\n',
         6, "missing key 'src_ports'"),
        (GOOD + '\n[[expect]]\ndst_ports = "5000"\nsrc_ports = "1-2"\nverdict = "shut"\n',
         9, "verdict 'shut'"),
        (GOOD + '\n[[expect]]\ndst_ports = "5000"\nsrc_ports = "2000-1000"\nverdict = "open"\n',
         8, "reversed range"),
        (GOOD + '\n[[expect]]\ndst_ports = "5000"\nsrc_ports = "random:5"\nverdict = "open"\n',
         8, "random"),
        (GOOD + '\n[[expect]]\ndst_ports = "0"\nsrc_ports = "1-2"\nverdict = "open"\n',
         7, "port 0"),
        (GOOD + '\n[[expect]]\ndst_ports = "5000"\nsrc_ports = "1-2"\nverdict = "untested"\n',
         9, "not one of open, blocked, rejected"),
        (GOOD + '\n[[expect]]\nagent = ""\ndst_ports = "5000"\nsrc_ports = "1"\nverdict = "open"\n',
         7, "'agent'"),
        (GOOD + '\n[[expect]]\ndst_ports = ["5000"]\nsrc_ports = "1"\nverdict = "open"\n',
         7, "port SPEC string"),
        ('title = "x"\n' + GOOD, 1, "unknown top-level key 'title'"),
        (GOOD + "\n[settings]\nx = 1\n", 6, "unknown top-level key 'settings'"),
        ("# nothing here\n", 1, "no [[expect]] entries"),
        ('expect = "5000"\n', 1, "array of tables"),
    ],
)  # fmt: skip
def test_malformed_files_name_file_and_line(text: str, line: int, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_expect(text, "policy.toml")
    msg = str(info.value)
    assert msg.startswith(f"policy.toml:{line}:"), msg
    assert needle in msg
    assert "\n" not in msg
    assert info.value.exit_code == 2


def test_inline_array_form_is_accepted() -> None:
    text = 'expect = [{dst_ports = "5000", src_ports = "1024-2047", verdict = "open"}]\n'
    (e,) = parse_expect(text)
    assert e.verdict == "open"


def test_json_round_trip_is_compact() -> None:
    entries = parse_expect(BASELINE_EXPECT)
    wire = [e.to_json() for e in entries]
    assert wire[0]["src_ports"] == "1024-65535"
    assert [ExpectEntry.from_json(w) for w in wire] == entries


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        {"dst_ports": "5000", "src_ports": "1-2"},
        {"dst_ports": "5000", "src_ports": "1-2", "verdict": "maybe"},
        {"dst_ports": "99999", "src_ports": "1-2", "verdict": "open"},
        {"dst_ports": "5000", "src_ports": "1-2", "verdict": "open", "agent": 7},
        {"dst_ports": "5000", "src_ports": "1-2", "verdict": "open", "line": -1},
        {"dst_ports": True, "src_ports": "1-2", "verdict": "open"},
    ],
)
def test_from_json_refuses_malformed_entries(obj: object) -> None:
    with pytest.raises(ConfigError):
        ExpectEntry.from_json(obj)


# ---------------------------------------------------------------------------------------
# Judging.


def test_baseline_against_its_policy() -> None:
    devs = judge(baseline(), parse_expect(BASELINE_EXPECT))
    assert devs == [
        {
            "dst_port": 5001,
            "first": 5353,
            "last": 5353,
            "verdict": "untested",
            "expected": "open",
            "translated": False,
            "sent": 0,
            "received": 0,
            "reason": "address in use",
        },
        {
            "dst_port": 5001,
            "first": 60000,
            "last": 60099,
            "verdict": "rejected",
            "expected": "open",
            "translated": False,
            "sent": 100,
            "received": 0,
            "icmp": docsamples.ICMP_ADMIN,
        },
    ]


def test_the_change_is_caught_and_cut_out_of_a_longer_range() -> None:
    devs = judge(docsamples.after_change(), parse_expect(BASELINE_EXPECT))
    opened = devs[0]
    assert (opened["dst_port"], opened["first"], opened["last"]) == (5000, 45000, 49999)
    assert (opened["verdict"], opened["expected"]) == ("open", "blocked")
    # 45000-49999 is a piece of the open range 45000-65535: its counters are its share.
    assert (opened["sent"], opened["received"]) == (5000, 5000)


def test_entries_for_another_agent_are_ignored() -> None:
    text = GOOD.replace("[[expect]]\n", '[[expect]]\nagent = "pc-99"\n').replace("open", "blocked")
    assert judge(baseline(), parse_expect(text)) == []
    text = GOOD.replace("[[expect]]\n", '[[expect]]\nagent = "pc-17"\n').replace("open", "blocked")
    assert judge(baseline(), parse_expect(text))


def test_later_entries_override_earlier_ones() -> None:
    wide = '[[expect]]\ndst_ports = "5000"\nsrc_ports = "1024-65535"\nverdict = "open"\n'
    narrow = '[[expect]]\ndst_ports = "5000"\nsrc_ports = "40000-49999"\nverdict = "blocked"\n'
    doc = baseline()
    assert judge(doc, parse_expect(wide + narrow)) == []
    # Reversed, the wide entry wins everywhere and the blocked range deviates.
    devs = judge(doc, parse_expect(narrow + wide))
    assert [(d["first"], d["last"], d["expected"]) for d in devs] == [(40000, 49999, "open")]


def test_uncovered_and_unplanned_cells_are_not_judged() -> None:
    doc = build_doc(src="1024-2047", dst=(5000,), spans=[
        {"dst": 5000, "first": 1500, "last": 1600, "verdict": "blocked"},
    ])  # fmt: skip
    # Covers 1024-1499 only (open), and ports/dst ports the run never planned.
    text = '[[expect]]\ndst_ports = "5000,6000"\nsrc_ports = "1-1499,3000-4000"\nverdict = "open"\n'
    assert judge(doc, parse_expect(text)) == []
    assert judged_cells(doc, parse_expect(text)) == 1499 - 1024 + 1


CLOSED_EXPECT = """\
[[expect]]
dst_ports = "5000-5001"
src_ports = "1024-65535"
verdict = "open"

[[expect]]
dst_ports = "5000"
src_ports = "40000-49999"
verdict = "closed"

[[expect]]
dst_ports = "5001"
src_ports = "5353,60000-60099"
verdict = "closed"
"""


def test_closed_is_met_by_blocked_and_by_rejected() -> None:
    # 5000 blocks 40000-49999 and 5001 rejects 60000-60099: both are "closed"; the
    # untested 5353 is not (what was not measured is not confirmed).
    devs = judge(baseline(), parse_expect(CLOSED_EXPECT))
    assert [(d["dst_port"], d["first"], d["last"], d["verdict"], d["expected"]) for d in devs] == [
        (5001, 5353, 5353, "untested", "closed")
    ]
    # An open cell expected closed deviates, in either direction of the override.
    doc = docsamples.after_change()  # 45000-49999 opened on 5000, 60100-60199 rejected
    devs = judge(doc, parse_expect(CLOSED_EXPECT))
    assert [(d["dst_port"], d["first"], d["last"], d["verdict"]) for d in devs] == [
        (5000, 45000, 49999, "open"),
        (5001, 5353, 5353, "untested"),
        (5001, 60100, 60199, "rejected"),  # expected open by the first entry
    ]
    (res_open, res_5000, res_5001) = summarize_judgement(doc, parse_expect(CLOSED_EXPECT))
    assert res_5000.deviating_cells == 5000
    assert res_5001.deviating_cells == 1
    assert res_open.deviating_cells == 100


def test_a_deviation_carries_its_share_of_inferred_and_icmp_limited_cells() -> None:
    doc = build_doc(src="1024-2047", dst=(5000,), spans=[
        {"dst": 5000, "first": 1100, "last": 1199, "verdict": "blocked"},
    ])  # fmt: skip
    blocked = next(r for r in doc["ranges"] if r["verdict"] == "blocked")
    blocked["icmp_limited"] = 40
    blocked["inferred"] = 10
    text = '[[expect]]\ndst_ports = "5000"\nsrc_ports = "1150-2047"\nverdict = "open"\n'
    (dev,) = judge(doc, parse_expect(text))
    assert (dev["first"], dev["last"]) == (1150, 1199)
    assert (dev["icmp_limited"], dev["inferred"]) == (20, 5)


def test_expect_from_writes_closed_where_the_run_could_not_tell() -> None:
    doc = baseline()
    blocked = next(r for r in doc["ranges"] if r["verdict"] == "blocked")
    blocked["icmp_limited"] = 9000  # 40000-49999 on 5000: dropped or rejected, not known
    text = expect_from(doc)
    data = tomllib.loads(text)
    assert {"dst_ports": "5000", "src_ports": "40000-49999", "verdict": "closed"} in data["expect"]
    assert "# 10000 cells (blocked or rejected: ICMP was rate-limited)" in text
    assert text.count("[[expect]]") == len(data["expect"])  # tables, not an inline array
    entries = parse_expect(text)
    assert judge(doc, entries) == []
    # The next run of the same policy, with those cells rejected this time, still passes.
    again = build_doc(dst=(5000, 5001), spans=[
        {"dst": 5000, "first": 40000, "last": 49999, "verdict": "rejected",
         "icmp": docsamples.ICMP_ADMIN},
        {"dst": 5001, "first": 2000, "last": 2999, "verdict": "open", "translated": True},
        {"dst": 5001, "first": 5353, "last": 5353, "verdict": "untested"},
        {"dst": 5001, "first": 60000, "last": 60099, "verdict": "rejected",
         "icmp": docsamples.ICMP_ADMIN},
    ])  # fmt: skip
    assert judge(again, entries) == []


def test_expect_from_writes_closed_for_a_reject_range_inferred_from_samples() -> None:
    """A new user's CI: a baseline from a run whose reject range was rejected from samples
    of rate-limited ICMP, then a rerun of the unchanged path whose budget ran short (the
    same cells blocked, icmp_limited). ``diff`` calls that no change; the baseline said
    ``rejected`` and failed the rerun with 1,991 deviating cells."""
    doc = baseline()
    rejected = next(r for r in doc["ranges"] if r["verdict"] == "rejected")
    first, last = rejected["first"], rejected["last"]
    rejected["inferred"] = last - first  # all but one from samples of the range
    entries = parse_expect(expect_from(doc))
    assert any(e.verdict == "closed" for e in entries)
    assert judge(doc, entries) == []
    rerun = copy.deepcopy(doc)
    cut = next(r for r in rerun["ranges"] if r["verdict"] == "rejected")
    cut.pop("icmp"), cut.pop("inferred")
    cut.update(verdict="blocked", icmp_limited=last - first + 1)
    assert judge(rerun, entries) == []
    # Every cell observed (a router without an ICMP limit): the baseline keeps "rejected".
    observed = baseline()
    assert "closed" not in expect_from(observed)
    (dev,) = judge(rerun, parse_expect(expect_from(observed)))
    assert dev["expected"] == "rejected"


def test_summarize_charges_each_cell_to_the_entry_that_owns_it() -> None:
    text = BASELINE_EXPECT + '\n[[expect]]\ndst_ports = "5001"\nsrc_ports = "1"\nverdict = "open"\n'
    doc = docsamples.after_change()
    entries = parse_expect(text)
    results = summarize_judgement(doc, entries)
    assert [r.cells for r in results] == [129024 - 10000, 10000, 0]
    assert results[1].deviating_cells == 5000
    assert not results[2].passed  # covers nothing planned
    merged = merge_ranges([d for r in results for d in r.deviations])
    assert merged == judge(doc, entries)


def test_cut_range_apportions_counters_exactly() -> None:
    r = {"dst_port": 1, "first": 10, "last": 16, "verdict": "open", "sent": 10, "received": 9}
    pieces = [cut_range(r, a, b) for a, b in ((10, 11), (12, 12), (13, 16))]
    assert sum(p["sent"] for p in pieces) == 10
    assert sum(p["received"] for p in pieces) == 9


def _reference_deviations(doc: dict, entries: list[ExpectEntry]) -> dict[tuple[int, int], str]:
    """Per cell, one by one: the expected verdict of every deviating cell."""
    cells = cell_verdicts(doc)
    expected: dict[tuple[int, int], str] = {}
    for e in entries:
        if e.agent not in (None, doc["agent"]["name"]):
            continue
        for d in e.dst_ports:
            for s in e.src_ports:
                expected[(d, s)] = e.verdict
    return {
        c: v
        for c, v in expected.items()
        if c in cells and cells[c] != v and not (v == "closed" and cells[c] in CLOSED)
    }


@st.composite
def entry_lists(draw: st.DrawFn) -> list[ExpectEntry]:
    out = []
    for i in range(draw(st.integers(1, 5))):
        first = draw(st.integers(1000, 1230))
        out.append(
            ExpectEntry(
                agent=draw(st.sampled_from((None, None, "pc-17", "other"))),
                dst_ports=tuple(sorted(draw(st.sets(st.integers(4999, 5006), min_size=1)))),
                src_ports=parse_ports(f"{first}-{draw(st.integers(first, 1240))}"),
                verdict=draw(st.sampled_from(("open", "blocked", "rejected", "closed"))),
                line=i + 1,
            )
        )
    return out


@settings(max_examples=300, deadline=None)
@given(doc=docs(), entries=entry_lists())
def test_judge_matches_a_cell_by_cell_reference(doc: dict, entries: list[ExpectEntry]) -> None:
    devs = judge(doc, entries)
    ref = _reference_deviations(doc, entries)
    got: dict[tuple[int, int], str] = {}
    cells = cell_verdicts(doc)
    for d in devs:
        for s in range(d["first"], d["last"] + 1):
            assert (d["dst_port"], s) not in got
            got[(d["dst_port"], s)] = d["expected"]
            assert cells[(d["dst_port"], s)] == d["verdict"]
    assert got == ref
    # Sorted and maximal: neighbours never share every attribute.
    assert devs == sorted(devs, key=lambda r: (r["dst_port"], r["first"]))
    assert merge_ranges(devs) == devs
    # The per-entry breakdown partitions the deviations.
    parts = [x for r in summarize_judgement(doc, entries) for x in r.deviations]
    assert merge_ranges(parts) == devs


@settings(max_examples=300, deadline=None)
@given(doc=docs())
def test_expect_from_round_trips(doc: dict) -> None:
    judgeable = sum(
        r["last"] - r["first"] + 1
        for r in doc["ranges"]
        if r["verdict"] in ("open", "blocked", "rejected")
    )
    if not judgeable:
        with pytest.raises(ConfigError, match="no open, blocked or rejected cell"):
            expect_from(doc)
        return
    entries = parse_expect(expect_from(doc), "generated.toml")
    assert judge(doc, entries) == []
    assert judged_cells(doc, entries) == judgeable


def test_expect_from_groups_destination_ports_with_one_pattern() -> None:
    dsts = tuple(range(5000, 5016))
    spans = [{"dst": d, "first": 40000, "last": 49999, "verdict": "blocked"} for d in dsts]
    doc = build_doc(dst=dsts, spans=spans)
    entries = parse_expect(expect_from(doc))
    assert len(entries) == 2
    assert entries[0].dst_ports == dsts
    assert (entries[0].verdict, entries[1].verdict) == ("open", "blocked")


def test_expect_from_leaves_untested_and_unknown_cells_out() -> None:
    doc = docsamples.incomplete()
    entries = parse_expect(expect_from(doc))
    assert judged_cells(doc, entries) == doc["summary"]["cells"] - doc["summary"]["unknown"]
    # Against the complete baseline, those cells stay unjudged: its reject on 5001
    # (60000-60099, unknown in the incomplete run) is no deviation.
    devs = judge(baseline(), entries)
    assert [(d["dst_port"], d["first"], d["verdict"]) for d in devs] == [(5001, 5353, "untested")]


def test_expect_from_survives_hostile_names() -> None:
    doc = baseline()
    doc["agent"]["name"] = 'evil"\n[[expect]]\nverdict = "x'
    doc["run_id"] = "r\x00\x7f"
    entries = parse_expect(expect_from(doc))
    assert judge(doc, entries) == []


def test_a_full_sweep_is_judged_exactly() -> None:
    """16 x 64,512 cells with 200 blocked spans on each destination port, against an
    entry for everything and an override on one port: every deviating cell is found, and
    only those (the cells counted one by one, on the side). How fast is not asserted here:
    judging works on ranges, never cell by cell."""
    dsts = tuple(range(5000, 5016))
    spans = [
        {"dst": d, "first": 1024 + 97 * k, "last": 1024 + 97 * k + 40, "verdict": "blocked"}
        for d in dsts
        for k in range(0, 600, 3)
    ]
    doc = build_doc(dst=dsts, spans=spans)
    entries = parse_expect(
        '[[expect]]\ndst_ports = "5000-5015"\nsrc_ports = "1024-65535"\nverdict = "open"\n'
        '[[expect]]\ndst_ports = "5003"\nsrc_ports = "40000-49999"\nverdict = "blocked"\n'
    )
    devs = judge(doc, entries)
    blocked = {s for sp in spans if sp["dst"] == 5000 for s in range(sp["first"], sp["last"] + 1)}
    override = set(range(40000, 50000))
    want = {d: blocked for d in dsts if d != 5003}
    want[5003] = (blocked - override) | (override - blocked)
    got: dict[int, set[int]] = {d: set() for d in dsts}
    for d in devs:
        cells = set(range(d["first"], d["last"] + 1))
        assert not cells & got[d["dst_port"]], d  # each cell once
        got[d["dst_port"]] |= cells
        inside = d["dst_port"] == 5003 and d["first"] >= 40000 and d["last"] <= 49999
        assert (d["verdict"], d["expected"]) == (
            ("open", "blocked") if inside else ("blocked", "open")
        ), d
    assert got == want
    assert devs == sorted(devs, key=lambda d: (d["dst_port"], d["first"]))


# ---------------------------------------------------------------------------------------
# Entries that judge no cell (the document's "judgement").


def _entry(dst: str, src: str, verdict: str = "open", agent: str | None = None) -> str:
    who = f'agent = "{agent}"\n' if agent else ""
    return f'[[expect]]\n{who}dst_ports = "{dst}"\nsrc_ports = "{src}"\nverdict = "{verdict}"\n'


def test_each_entry_that_judges_no_cell_is_named_with_its_reason() -> None:
    doc = baseline()  # pc-17: 5000 and 5001, source ports 1024-65535
    text = (
        _entry("5000-5001", "1024-65535")  # line 1: judges everything, at first
        + _entry("5000", "40000-49999", "blocked", agent="pc-18")  # line 5: another agent
        + _entry("6000", "1024-65535")  # line 10: a port the run did not plan
        + _entry("5000", "1-1023")  # line 14: source ports the run did not plan
        + _entry("5001", "2000-2999")  # line 18: overridden by the next one
        + _entry("5001", "1024-9999")  # line 22
    )
    judged = judgement(doc, parse_expect(text))
    assert [e["cells"] for e in judged["entries"]] == [64512 + 55536, 0, 0, 0, 0, 8976]
    assert judged["cells"] == 2 * 64512
    reasons = {u["entry"]: (u["line"], u["fails"], u["reason"]) for u in judged["unmatched"]}
    assert reasons == {
        2: (5, False, "it is for agent pc-18, and this run's agent is pc-17"),
        3: (10, True, "none of its destination ports was planned (the run's: 5000-5001)"),
        4: (14, True, "none of its source ports was planned (the run's: 1024-65535)"),
        5: (18, True, "later entries override every one of its cells"),
    }
    assert judged["problem"] == (
        "3 expectation entries judged no cell: #3 (line 10), #4 (line 14), #5 (line 18)"
    )
    assert judged["as_expected"] is False
    assert judged["deviating"] == 10101  # the blocked, rejected and untested cells


def test_entries_only_for_other_agents_judge_nothing_and_say_so() -> None:
    judged = judgement(baseline(), parse_expect(_entry("5000", "1024-65535", agent="pc-71")))
    assert (judged["cells"], judged["as_expected"]) == (0, False)
    assert judged["problem"] == (
        "the expectations judged no cell: every entry names another agent (pc-71), and this "
        "run's agent is pc-17"
    )


def test_one_entry_that_judges_nothing_is_the_problem_in_full() -> None:
    judged = judgement(baseline(), parse_expect(_entry("5000", "1024-65535") + _entry("6000", "1")))
    assert judged["problem"] == (
        "expectation entry #2 (line 5: dst 6000 src 1 open) judged no cell: none of its "
        "destination ports was planned (the run's: 5000-5001)"
    )


def test_a_judgement_that_judged_everything_is_as_expected_and_rides_along() -> None:
    doc = baseline()
    entries = parse_expect(expect_from(doc))  # the baseline of itself: every cell as expected
    doc["expect"] = [e.to_json() for e in entries]
    assert judgement_of(docsamples.baseline()) is None  # never judged
    judged = with_judgement(doc)["judgement"]
    assert (judged["unmatched"], judged["problem"], judged["as_expected"]) == ([], None, True)
    assert judgement_of(doc) is judged  # a document's own judgement is read, not redone
