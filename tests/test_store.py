"""The run history: SQLite storage, crash recovery from checkpoints, id prefixes, and the
`history`, `show`, `diff` and `expect --from` commands on top of it."""

from __future__ import annotations

import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import docsamples
import pytest
import typer
from docsamples import after_change, baseline, build_doc
from typer.testing import CliRunner

from udpreach.cli.history import register
from udpreach.core.diff import diff_runs
from udpreach.core.errors import ConfigError
from udpreach.core.expect import judge, parse_expect
from udpreach.core.ledger import IcmpInfo, Ledger
from udpreach.store import (
    MIGRATIONS,
    DamagedRunError,
    RunStore,
    StoreError,
    UnknownRunError,
    _seal,
    default_path,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "runs.sqlite3"


@pytest.fixture
def store(db: Path):
    s = RunStore.open(db)
    yield s
    s.close()


def _begin(store: RunStore, doc: dict[str, Any]) -> None:
    store.begin(
        doc["run_id"],
        started=doc["started"],
        plan=doc["plan"],
        agent=doc["agent"],
        probe=doc["probe"],
    )


def _cells(ranges: list[dict[str, Any]]) -> dict[tuple[int, int], str]:
    return {
        (r["dst_port"], s): r["verdict"] for r in ranges for s in range(r["first"], r["last"] + 1)
    }


# ---------------------------------------------------------------------------------------
# Opening.


def test_default_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_path() == tmp_path / "xdg" / "udpreach" / "runs.sqlite3"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # the spec says: ignore it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_path() == tmp_path / "home" / ".local" / "share" / "udpreach" / "runs.sqlite3"


def test_open_creates_directories_wal_and_schema_version(db: Path) -> None:
    with RunStore.open(db):
        pass
    assert db.exists()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        conn.close()


def test_a_newer_schema_is_refused(db: Path) -> None:
    RunStore.open(db).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        RunStore.open(db)


@pytest.mark.parametrize("kind", ["directory", "garbage", "missing-readonly"])
def test_unusable_paths_are_config_errors(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "x.sqlite3"
    if kind == "directory":
        p.mkdir()
    elif kind == "garbage":
        p.write_bytes(b"this is not a database, not even close" * 100)
    with pytest.raises(ConfigError) as info:
        RunStore.open(p, create=kind != "missing-readonly")
    assert info.value.exit_code == 2
    assert str(p) in str(info.value)


# ---------------------------------------------------------------------------------------
# Writing and reading.


def test_finished_run_loads_back_exactly(store: RunStore) -> None:
    doc = baseline()
    _begin(store, doc)
    store.checkpoint(doc["run_id"], doc["ranges"][:3])
    store.finish(doc["run_id"], doc)
    assert store.load(doc["run_id"]) == doc


def test_finish_without_begin_and_twice(store: RunStore) -> None:
    doc = baseline()
    store.finish(doc["run_id"], doc)
    doc["deviations"] = judge(doc, parse_expect(docsamples.BASELINE_EXPECT))
    store.finish(doc["run_id"], doc)  # the coordinator stores again after judging
    assert store.load(doc["run_id"]) == doc
    (h,) = store.history()
    assert h["deviations"] == 101  # cells: 5353 and 60000-60099


def test_a_ledger_snapshot_checkpoint_rebuilds_scattered_settled_cells(store: RunStore) -> None:
    """The coordinator checkpoints a compressed ledger; reading an interrupted run turns it
    back into ranges: settled cells as they were, the rest unknown (here every other source
    port is settled, the worst case for ranges)."""
    doc = baseline()
    _begin(store, doc)
    led = Ledger([5000, 5001], range(1024, 65536))
    for s in range(1024, 65536, 2):
        led.note_sent(5000, s)
        led.note_receipt(5000, s, 1, "198.18.2.2", s)
    led.note_icmp(5001, 1025, IcmpInfo(3, 13, "198.18.2.1"))
    store.checkpoint(doc["run_id"], led.snapshot())
    got = store.load(doc["run_id"])
    assert got["complete"] is False
    cells = _cells(got["ranges"])
    assert len(cells) == 129024
    assert cells[(5000, 1024)] == "open"
    assert cells[(5000, 1025)] == "unknown"
    assert cells[(5001, 1025)] == "rejected"
    assert got["summary"]["open"] == 32256
    assert got["summary"]["rejected"] == 1
    assert got["summary"]["unknown"] == 129024 - 32256 - 1
    rejected = next(r for r in got["ranges"] if r["verdict"] == "rejected")
    assert rejected["icmp"] == {"type": 3, "code": 13, "from": "198.18.2.1", "verified": True}


def test_a_damaged_snapshot_leaves_every_cell_unknown_with_a_note(store: RunStore) -> None:
    doc = baseline()
    _begin(store, doc)
    led = Ledger([5000, 5001], range(1024, 65536))
    store.checkpoint(doc["run_id"], led.snapshot()[:-7])
    got = store.load(doc["run_id"])
    assert got["summary"]["unknown"] == 129024
    assert "checkpoint is unreadable" in got["note"]


def test_begin_twice_and_checkpoint_of_unknown_run_fail(store: RunStore) -> None:
    doc = baseline()
    _begin(store, doc)
    with pytest.raises(StoreError):
        _begin(store, doc)
    with pytest.raises(StoreError, match="unknown run"):
        store.checkpoint("nope", [])


def test_running_run_is_rebuilt_from_its_last_checkpoint(store: RunStore) -> None:
    doc = baseline()
    _begin(store, doc)
    store.checkpoint(doc["run_id"], doc["ranges"][:1])
    settled = [r for r in doc["ranges"] if r["dst_port"] == 5000]
    store.checkpoint(doc["run_id"], settled)  # replaces the first
    got = store.load(doc["run_id"][:10])
    assert got["complete"] is False
    assert got["status"] == "running"  # its owner (this process) is alive
    cells = _cells(got["ranges"])
    planned = _cells(doc["ranges"])
    assert cells.keys() == planned.keys()  # every planned cell exactly once
    assert sum(r["last"] - r["first"] + 1 for r in got["ranges"]) == len(planned)
    assert all(cells[c] == planned[c] for c in planned if c[0] == 5000)
    assert all(cells[c] == "unknown" for c in planned if c[0] == 5001)
    assert got["summary"] == {
        "cells": 129024,
        "open": 54512,
        "blocked": 10000,
        "rejected": 0,
        "untested": 0,
        "unknown": 64512,
    }
    # Ranges stay maximal and sorted.
    keys = [(r["dst_port"], r["first"]) for r in got["ranges"]]
    assert keys == sorted(keys)


CRASHER = """
import os, sys, json
sys.path.insert(0, {tests!r})
import docsamples
from udpreach.store import RunStore
doc = docsamples.baseline()
st = RunStore.open({db!r})
st.begin(doc["run_id"], started=doc["started"], plan=doc["plan"], agent=doc["agent"],
         probe=doc["probe"])
st.checkpoint(doc["run_id"], [r for r in doc["ranges"] if r["dst_port"] == 5000])
os._exit(9)  # a crash: no close, no finish
"""


def test_a_crashed_coordinator_loses_nothing_settled(db: Path) -> None:
    code = CRASHER.format(tests=str(REPO / "tests"), db=str(db))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, timeout=60, check=False, capture_output=True
    )
    assert proc.returncode == 9, proc.stderr
    with RunStore.open(db) as st:
        doc = st.load("20251126T01")
        (h,) = st.history()
    assert doc["status"] == "incomplete"  # the word a finished incomplete run gets too
    assert h["status"] == "incomplete"
    assert doc["version"]  # the contract's keys, as a finished run's document has them
    assert doc["warnings"] == [doc["note"]]
    assert doc["summary"]["blocked"] == 10000
    assert doc["summary"]["unknown"] == 64512
    assert doc["complete"] is False


def test_prefixes(store: RunStore) -> None:
    for d in (baseline(), after_change(), docsamples.incomplete()):
        store.finish(d["run_id"], d)
    assert store.load("20251126T02")["run_id"] == "20251126T020000-d4e5f6"
    with pytest.raises(UnknownRunError, match="ambiguous") as info:
        store.load("20251126T0")
    assert info.value.exit_code == 2
    with pytest.raises(UnknownRunError, match="no stored run"):
        store.load("zzz")
    with pytest.raises(UnknownRunError, match="no stored run"):
        store.load("20251126%")  # LIKE wildcards are literal here
    with pytest.raises(UnknownRunError, match="no stored run"):
        store.load("20251126t02")  # ids are case-sensitive
    with pytest.raises(UnknownRunError):
        store.load("  ")
    # The end of an id, its random part, where runs of one day share their start.
    assert store.load("d4e5f6")["run_id"] == "20251126T020000-d4e5f6"
    assert store.load("778899")["run_id"] == "20251126T030000-778899"
    with pytest.raises(UnknownRunError, match="no stored run"):
        store.load("D4E5F6")  # ids are case-sensitive at the end too
    with pytest.raises(UnknownRunError, match="no stored run"):
        store.load("%f6")  # LIKE wildcards are literal at the end too
    store.finish("20251127T000000-0000f6", build_doc("20251127T000000-0000f6"))
    with pytest.raises(UnknownRunError, match="'f6' is ambiguous"):
        store.load("f6")  # the end of two of them


def test_history_newest_first_with_limit(store: RunStore) -> None:
    docs = [baseline(), after_change(), docsamples.incomplete()]
    for d in docs:
        store.finish(d["run_id"], d)
    runs = store.history()
    assert [r["run_id"] for r in runs] == [d["run_id"] for d in reversed(docs)]
    assert runs[0]["status"] == "incomplete"
    assert runs[1]["summary"] == docs[1]["summary"]
    assert runs[1]["deviations"] is None  # not judged
    assert [r["run_id"] for r in store.history(limit=1)] == [docs[2]["run_id"]]


def test_a_reader_sees_checkpoints_while_the_writer_is_open(db: Path) -> None:
    doc = baseline()
    with RunStore.open(db) as writer, RunStore.open(db) as reader:
        _begin(writer, doc)
        writer.checkpoint(doc["run_id"], doc["ranges"][:2])
        assert reader.load(doc["run_id"])["summary"]["open"] == 38976


# ---------------------------------------------------------------------------------------
# The commands.


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def filled(db: Path) -> Path:
    with RunStore.open(db) as st:
        for d in (baseline(), after_change()):
            st.finish(d["run_id"], d)
    return db


def invoke(app: typer.Typer, *args: str):
    return CliRunner().invoke(app, list(args))


def test_history_command(cli: typer.Typer, filled: Path) -> None:
    res = invoke(cli, "history", "--db", str(filled))
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("20251126T020000-d4e5f6")
    assert "complete" in lines[0]
    assert "5,000 blocked" in lines[1]
    res = invoke(cli, "history", "--db", str(filled), "--json")
    body = json.loads(res.stdout)
    assert body["schema"] == "udpreach/history-v1"
    assert [r["run_id"] for r in body["runs"]][1] == "20251126T010000-a1b2c3"


def test_show_json_is_the_stored_document(cli: typer.Typer, filled: Path) -> None:
    res = invoke(cli, "show", "20251126T01", "--db", str(filled), "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout) == baseline()
    assert res.stdout.count("\n") == 1


def test_show_prints_what_run_printed(cli: typer.Typer, filled: Path) -> None:
    from rich.console import Console

    from udpreach.render.terminal import render_run

    buf = io.StringIO()
    render_run(after_change(), Console(file=buf, highlight=False, width=80))
    res = invoke(cli, "show", "20251126T02", "--db", str(filled))
    assert res.exit_code == 0
    assert res.stdout == buf.getvalue()


def test_show_writes_reports(cli: typer.Typer, filled: Path, tmp_path: Path) -> None:
    out = {k: tmp_path / f"r.{k}" for k in ("junit", "markdown", "csv", "html")}
    args = [a for k, p in out.items() for a in (f"--{k}", str(p))]
    res = invoke(cli, "show", "20251126T02", "--db", str(filled), *args)
    assert res.exit_code == 0, res.output
    assert ET.parse(out["junit"]).getroot().tag == "testsuites"
    assert "20251126T020000-d4e5f6" in out["markdown"].read_text()
    assert out["csv"].read_text().startswith("dst_port,first,last")
    assert out["html"].read_text().startswith("<!doctype html>")


def test_unwritable_report_is_exit_2(cli: typer.Typer, filled: Path, tmp_path: Path) -> None:
    res = invoke(
        cli, "show", "20251126T02", "--db", str(filled), "--csv", str(tmp_path / "no" / "x.csv")
    )
    assert res.exit_code == 2
    assert f"cannot write --csv {tmp_path / 'no' / 'x.csv'}: there is no folder" in res.stderr
    assert res.stdout == ""  # refused before the report was printed


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["show", "nope"], "no stored run matches 'nope'"),
        (["show", "20251126T0"], "ambiguous"),
        (["diff", "20251126T01", "nope"], "no stored run"),
        (["expect", "--from", "x[bold]y"], "x[bold]y"),
    ],
)
def test_unknown_or_ambiguous_ids_are_exit_2(
    cli: typer.Typer, filled: Path, args: list[str], needle: str
) -> None:
    res = invoke(cli, *args, "--db", str(filled))
    assert res.exit_code == 2
    assert needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert res.stdout == ""


def test_missing_database_is_exit_2_and_not_created(cli: typer.Typer, tmp_path: Path) -> None:
    p = tmp_path / "none.sqlite3"
    res = invoke(cli, "history", "--db", str(p))
    assert res.exit_code == 2
    assert "no run database" in res.stderr
    assert not p.exists()


def test_diff_exit_codes_and_json(cli: typer.Typer, filled: Path) -> None:
    res = invoke(cli, "diff", "20251126T01", "20251126T02", "--db", str(filled), "--json")
    assert res.exit_code == 1
    body = json.loads(res.stdout)
    assert body["schema"] == "udpreach/diff-v1"
    assert body["changes"] == [
        {"dst_port": 5000, "first": 45000, "last": 49999, "before": "blocked", "after": "open"},
        {"dst_port": 5001, "first": 60100, "last": 60199, "before": "open", "after": "rejected"},
    ]
    res = invoke(cli, "diff", "20251126T01", "20251126T01", "--db", str(filled))
    assert res.exit_code == 0
    assert "No verdict changed" in res.stdout
    res = invoke(cli, "diff", "20251126T01", "20251126T02", "--db", str(filled))
    assert res.exit_code == 1
    assert "45000-49999" in res.stdout


def test_diff_of_runs_with_nothing_in_common_is_exit_2(cli: typer.Typer, db: Path) -> None:
    with RunStore.open(db) as st:
        st.finish("a", build_doc("a", src="1024-2047"))
        st.finish("b", build_doc("b", src="3000-4000"))
    res = invoke(cli, "diff", "a", "b", "--db", str(db))
    assert res.exit_code == 2
    # One line, and no "No verdict changed (0 cells compared)" on stdout before it.
    assert res.stdout == ""
    assert res.stderr.splitlines() == ["udpreach: runs a and b have no planned cell in common"]
    res = invoke(cli, "diff", "a", "b", "--db", str(db), "--json")
    assert res.exit_code == 2
    assert json.loads(res.stdout)["schema"] == "udpreach/error-v1"


def test_diff_writes_diff_reports(cli: typer.Typer, filled: Path, tmp_path: Path) -> None:
    csv_path, junit = tmp_path / "d.csv", tmp_path / "d.xml"
    res = invoke(
        cli, "diff", "20251126T01", "20251126T02", "--db", str(filled),
        "--csv", str(csv_path), "--junit", str(junit),
    )  # fmt: skip
    assert res.exit_code == 1
    assert csv_path.read_text().splitlines()[1] == "5000,45000,49999,5000,blocked,open,changed"
    assert ET.parse(junit).getroot().get("failures") == "2"


def test_a_report_given_as_dash_goes_to_stdout(cli: typer.Typer, filled: Path) -> None:
    """``--markdown -`` wrote a file named ``-``. It is standard output now, with the
    terminal report on standard error so that the pipe gets the report alone."""
    res = invoke(cli, "show", "20251126T01", "--db", str(filled), "--markdown", "-")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("#"), res.stdout[:200]
    assert "Source-port ranges" in res.stderr  # the terminal report, out of the pipe's way
    # ... and, off a terminal, as clean as on stdout: no line padded with spaces, even
    # where the header wraps
    narrow = CliRunner().invoke(
        cli, ["show", "20251126T01", "--db", str(filled), "--markdown", "-"],
        env={"COLUMNS": "62"},  # the header wraps at the two spaces before "complete"
    )  # fmt: skip
    assert [line for line in narrow.stderr.splitlines() if line.endswith(" ")] == []
    assert not Path("-").exists()
    res = invoke(
        cli, "diff", "20251126T01", "20251126T02", "--db", str(filled), "--csv", "-"
    )  # fmt: skip
    assert res.exit_code == 1
    assert res.stdout.splitlines()[1] == "5000,45000,49999,5000,blocked,open,changed"
    for extra in (["--json"], ["--csv", "-"]):
        res = invoke(cli, "show", "20251126T01", "--db", str(filled), "--markdown", "-", *extra)
        assert res.exit_code == 2, res.output
        assert "standard output" in res.stderr


def test_show_refuses_a_report_path_before_printing(cli: typer.Typer, filled: Path) -> None:
    """``show --html /nonexistent/x.html`` printed the whole report, then refused the file."""
    res = invoke(cli, "show", "20251126T01", "--db", str(filled), "--html", "/nonexistent/x.html")
    assert res.exit_code == 2
    assert res.stdout == ""
    assert res.stderr.splitlines() == [
        "udpreach: cannot write --html /nonexistent/x.html: there is no folder /nonexistent"
    ]


def test_expect_from_prints_a_file_the_run_satisfies(cli: typer.Typer, filled: Path) -> None:
    res = invoke(cli, "expect", "--from", "20251126T01", "--db", str(filled))
    assert res.exit_code == 0
    entries = parse_expect(res.stdout, "stdout")
    assert judge(baseline(), entries) == []
    assert [d["first"] for d in judge(after_change(), entries)] == [45000, 60100]
    assert "1 untested or unknown" in res.stderr


def test_expect_from_an_incomplete_run_is_refused(cli: typer.Typer, tmp_path: Path) -> None:
    """A run stopped half-way settled scattered cells in its random order: an expectation
    file from it judged those and silently left the rest unjudged (a CI baseline that
    never checks most of the path). It is one line and exit 2, and nothing on stdout."""
    run = tmp_path / "stopped.json"
    run.write_text(json.dumps(docsamples.incomplete()))
    res = invoke(cli, "expect", "--from", str(run), "--db", str(tmp_path / "none.sqlite3"))
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    (line,) = res.stderr.splitlines()
    assert line.startswith("udpreach: run 20251126T030000-778899 did not complete (")
    assert "take one from a complete run" in line


# ---------------------------------------------------------------------------------------
# Damage, orphans, failures (issue 15, item 6).


def test_a_row_changed_behind_the_stores_back_is_damaged(store: RunStore) -> None:
    docs = [baseline(), after_change(), docsamples.incomplete()]
    for d in docs:
        store.finish(d["run_id"], d)
    bad = docs[1]["run_id"]
    doc_text = store._conn.execute("SELECT doc FROM runs WHERE run_id = ?", (bad,)).fetchone()[0]
    flipped = doc_text.replace('"sent":', '"sent":9', 1)
    assert flipped != doc_text
    store._conn.execute("UPDATE runs SET doc = ? WHERE run_id = ?", (flipped, bad))
    with pytest.raises(DamagedRunError, match=f"run {bad} is damaged") as info:
        store.load(bad)
    assert info.value.exit_code == 3
    runs = store.history()
    assert [r["run_id"] for r in runs] == [docs[2]["run_id"], docs[0]["run_id"]]
    assert len(store.problems) == 1
    assert bad in store.problems[0]
    assert "digest" in store.problems[0]
    # Unreadable JSON under a matching digest (a bug, not damage) is skipped all the same.
    good = docs[0]["run_id"]
    store._write(
        good,
        lambda c: c.execute("UPDATE runs SET summary = '{' WHERE run_id = ?", (good,)).rowcount,
    )
    assert [r["run_id"] for r in store.history()] == [docs[2]["run_id"]]
    assert "unreadable" in store.problems[-1]


def test_an_old_database_gains_digests_and_old_readers_still_read(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(db, isolation_level=None)
    for stmt in MIGRATIONS[0]:
        assert isinstance(stmt, str)
        conn.execute(stmt)
    conn.execute("PRAGMA user_version = 1")
    doc = baseline()
    conn.execute(
        "INSERT INTO runs (run_id, started, status, plan, agent, probe, summary, doc)"
        " VALUES (?, ?, 'complete', ?, ?, ?, ?, ?)",
        (doc["run_id"], doc["started"], json.dumps(doc["plan"]), json.dumps(doc["agent"]),
         json.dumps(doc["probe"]), json.dumps(doc["summary"]), json.dumps(doc)),
    )  # fmt: skip
    conn.close()
    with RunStore.open(db, create=False) as reader:  # read-only: no migration
        assert reader.load(doc["run_id"]) == doc
        assert reader._version == 1
    with RunStore.open(db) as writer:  # the probe migrates and seals what it finds
        assert writer._version == len(MIGRATIONS)
        assert writer.load(doc["run_id"]) == doc
    with RunStore.open(db, create=False) as reader:
        (row,) = reader._read("SELECT * FROM runs")
        assert row["digest"] is not None
        assert reader.history()[0]["run_id"] == doc["run_id"]


def test_readers_cannot_write(db: Path, store: RunStore) -> None:
    store.finish(baseline()["run_id"], baseline())
    with RunStore.open(db, create=False) as reader:
        assert reader.readonly
        with pytest.raises(StoreError, match="readonly"):
            reader.finish("x", after_change())


def test_every_write_failure_is_a_store_error(store: RunStore) -> None:
    doc = baseline()
    with pytest.raises(StoreError):
        store.finish("nan", {**doc, "loss": float("nan")})  # not JSON
    with pytest.raises(StoreError):
        store.finish("set", {**doc, "plan": {1, 2}})
    store.close()
    for call in (
        lambda: _begin(store, doc),
        lambda: store.checkpoint(doc["run_id"], []),
        lambda: store.finish(doc["run_id"], doc),
    ):
        with pytest.raises(StoreError):
            call()


def test_a_store_works_from_worker_threads(store: RunStore) -> None:
    import threading

    docs = [baseline(), after_change(), docsamples.incomplete()]
    errors: list[BaseException] = []

    def write(d: dict[str, Any]) -> None:
        try:
            _begin(store, d)
            store.checkpoint(d["run_id"], d["ranges"][:1])
            store.finish(d["run_id"], d)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(d,)) for d in docs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(r["run_id"] for r in store.history()) == sorted(d["run_id"] for d in docs)
    assert store.problems == []


def test_orphans_of_a_dead_probe_are_marked_incomplete(db: Path) -> None:
    code = CRASHER.format(tests=str(REPO / "tests"), db=str(db))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, timeout=60, check=False, capture_output=True
    )
    assert proc.returncode == 9, proc.stderr
    with RunStore.open(db) as st:
        live = after_change()
        _begin(st, live)  # a run of this (living) process: not an orphan
        st._conn.execute("BEGIN IMMEDIATE")
        other = docsamples.incomplete()
        st._conn.execute(
            "INSERT INTO runs (run_id, started, status, owner, plan, agent, probe)"
            " VALUES (?, ?, 'running', 'elsewhere:1:x', ?, ?, ?)",
            (other["run_id"], other["started"], json.dumps(other["plan"]),
             json.dumps(other["agent"]), json.dumps(other["probe"])),
        )  # fmt: skip
        _seal(st._conn, other["run_id"])
        st._conn.execute("COMMIT")
        found = st.recover_orphans()
        assert found == [baseline()["run_id"]]
        doc = st.load(found[0])
        statuses = {r["run_id"]: r["status"] for r in st.history()}
    assert doc["complete"] is False
    assert "status" not in doc
    assert any("the probe stopped before this run finished" in w for w in doc["warnings"])
    assert doc["summary"]["blocked"] == 10000  # what it had settled is kept
    assert doc["summary"]["unknown"] == 64512
    assert statuses == {
        baseline()["run_id"]: "incomplete",
        live["run_id"]: "running",
        other["run_id"]: "running",  # another host's: it cannot be known dead
    }


def test_an_earlier_process_with_our_pid_is_gone() -> None:
    from udpreach.store import _INCARNATION, _owner_gone

    me = f"{socket.gethostname()}:{os.getpid()}"
    assert _owner_gone(f"{me}:{_INCARNATION}") is False
    assert _owner_gone(f"{me}:00000000") is True  # a restarted container's pid 1
    assert _owner_gone(me) is False  # an old owner without incarnation: cannot tell


def test_a_new_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """The history names agents, addresses and the policies found: mode 0600, like the
    secret, for the database and the files SQLite keeps beside it."""
    db = tmp_path / "runs.sqlite3"
    with RunStore.open(db) as store:
        store.finish("20251126T020000-d4e5f6", {"run_id": "20251126T020000-d4e5f6"})
        beside = [p for p in tmp_path.iterdir() if p.name.startswith("runs.sqlite3")]
        assert len(beside) >= 2  # the database and its write-ahead log
        for p in beside:
            assert p.stat().st_mode & 0o777 == 0o600, p


def test_saved_json_documents_are_runs_too(cli: typer.Typer, tmp_path: Path) -> None:
    """`run --json > before.json` (the README's example): show, diff and expect --from read
    the file as a stored run, with no database at all; a file that is no run document, or
    a .json name with no file, is one line and exit 2."""
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    before.write_text(json.dumps(baseline()))
    after.write_text(json.dumps(after_change()))
    nodb = tmp_path / "none" / "runs.sqlite3"
    shown = invoke(cli, "show", str(before), "--db", str(nodb), "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["run_id"] == baseline()["run_id"]
    d = invoke(cli, "diff", str(before), str(after), "--db", str(nodb), "--json")
    assert d.exit_code == 1, d.output
    assert json.loads(d.stdout) == json.loads(json.dumps(diff_runs(baseline(), after_change())))
    exp = invoke(cli, "expect", "--from", str(before), "--db", str(nodb))
    assert exp.exit_code == 0, exp.output
    assert "[[expect]]" in exp.stdout
    assert not nodb.parent.exists()
    bad = tmp_path / "bad.json"
    for text, why in (('{"schema": "x"}', "not a udpreach/run-v1 document"),
                      ("[1, NaN]", "NaN is not JSON"), ("{", "Expecting")):  # fmt: skip
        bad.write_text(text)
        res = invoke(cli, "show", str(bad))
        assert res.exit_code == 2
        assert f"{bad} is not a udpreach run document" in res.stderr
        assert why in res.stderr
    res = invoke(cli, "diff", str(tmp_path / "missing.json"), str(before))
    assert res.exit_code == 2
    assert "no file" in res.stderr


def test_a_file_never_hides_a_stored_run(
    cli: typer.Typer, filled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file in the current folder named like a run id (`show RUN > RUN`) is not read as
    the run: only a name with a slash or ending in .json is a file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "20251126T02").write_text("the report, as text")
    res = invoke(cli, "show", "20251126T02", "--db", str(filled), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["run_id"] == "20251126T020000-d4e5f6"
    res = invoke(cli, "show", "./20251126T02", "--db", str(filled))
    assert res.exit_code == 2
    assert "20251126T02 is not a udpreach run document" in res.stderr
    long = invoke(cli, "show", "x" * 300, "--db", str(filled))
    assert long.exit_code == 2
    assert "no stored run matches" in long.stderr
