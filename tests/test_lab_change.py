"""Network change validation in the lab: before, change the policy, after; diff and expect.

The real CLI throughout: runs from the probe's namespace, ``diff`` and ``expect --from``
against the probe's run history.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import run_cli
from labcli import lab_udpreach

pytestmark = [pytest.mark.root, pytest.mark.slow]

BEFORE = 'iifname "probe0" udp sport 40000-49999 drop\n'
AFTER = (
    'iifname "probe0" udp sport 40000-44999 drop\n'
    'iifname "probe0" udp sport 30000-30999 reject with icmpx type admin-prohibited\n'
)
CHANGES = [
    {"dst_port": 5000, "first": 30000, "last": 30999, "before": "open", "after": "rejected"},
    {"dst_port": 5000, "first": 45000, "last": 49999, "before": "blocked", "after": "open"},
]


def test_before_and_after_a_change(tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite3"
    with lab_udpreach(BEFORE, tmp_path) as lr:
        code, before, err = lr.run()
        assert code == 0, err + lr.logs()
        lr.lab.load_policy(AFTER)
        code, after, err = lr.run()
        assert code == 0, err + lr.logs()

        # diff: exactly the changed ranges, exit 1.
        diff = run_cli("diff", before["run_id"], after["run_id"], "--db", str(db), "--json")
        assert diff.returncode == 1, diff.stderr
        changes = json.loads(diff.stdout)
        assert changes["schema"] == "udpreach/diff-v1"
        assert changes["changes"] == CHANGES
        same = run_cli("diff", before["run_id"], before["run_id"][:17], "--db", str(db))
        assert same.returncode == 0, same.stderr

        # A baseline in one command, then the changed path judged against it.
        baseline = run_cli("expect", "--from", before["run_id"], "--db", str(db))
        assert baseline.returncode == 0, baseline.stderr
        expect_file = tmp_path / "expect.toml"
        expect_file.write_text(baseline.stdout)
        junit, html, md = tmp_path / "j.xml", tmp_path / "r.html", tmp_path / "r.md"
        code, judged, err = lr.run(
            "--expect", str(expect_file), "--junit", str(junit), "--html", str(html),
            "--markdown", str(md),
        )  # fmt: skip
    assert code == 1, err
    deviations = [
        (d["dst_port"], d["first"], d["last"], d["expected"], d["verdict"])
        for d in judged["deviations"]
    ]
    assert deviations == [
        (5000, 30000, 30999, "open", "rejected"),
        (5000, 45000, 49999, "blocked", "open"),
    ]
    suite = ET.parse(junit).getroot()
    failures = suite.findall(".//failure")
    assert failures, "the JUnit report fails on the deviations"
    text = "".join(f.get("message", "") + (f.text or "") for f in failures)
    assert "30000-30999" in text
    assert "45000-49999" in text
    page = html.read_text()
    assert "<script src" not in page
    assert "http://" not in page
    assert "https://" not in page
    assert "45000" in md.read_text()

    # The stored run reads back exactly as run printed it.
    shown = run_cli("show", judged["run_id"], "--db", str(db), "--json")
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["deviations"] == judged["deviations"]
    history = run_cli("history", "--db", str(db), "--json")
    ids = [r["run_id"] for r in json.loads(history.stdout)["runs"]]
    assert ids == [judged["run_id"], after["run_id"], before["run_id"]]
