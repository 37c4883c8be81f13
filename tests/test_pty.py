"""The real CLI on a real (pseudo-)terminal, as a person runs it: at 60 and 120 columns, with
and without colour, on TERM=dumb, and interrupted with Ctrl-C.

Every run here used to pass with its output redirected while crashing on a terminal (the
progress bar formatted a None total). What these tests hold: exit status, the matrix printed,
no traceback, the live progress line never wider than the terminal and never cut (its
elapsed time whole), no colour with NO_COLOR and no escape sequence at all on TERM=dumb, and
Ctrl-C printing what was settled before exit 3.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rendersamples
from conftest import run_cli, udpreach_argv
from prockit import PtyResult, Services, loopback_services, run_pty

from udpreach.core.expect import judge, parse_expect
from udpreach.core.framing import Authenticated, ControlConnection, Message
from udpreach.render import facts
from udpreach.render.fold import fold
from udpreach.render.terminal import MAX_ROWS
from udpreach.store import RunStore

PROGRESS = re.compile(r"^(round \d+|starting) ")
ELAPSED = re.compile(r"\d+:\d\d:\d\d$")
SGR = re.compile(r"\x1b\[([0-9;]*)m")
VERDICTS = ("open", "blocked", "rejected", "untested", "unknown")


def _colours(raw: str) -> set[str]:
    """The colour parameters of every SGR sequence in *raw* (bold, dim... are not colours)."""
    found = set()
    for m in SGR.finditer(raw):
        for p in m.group(1).split(";"):
            if p.isdigit() and (30 <= int(p) <= 38 or 40 <= int(p) <= 48 or 90 <= int(p) <= 107):
                found.add(p)
    return found


def _check_terminal_output(res: PtyResult, cols: int, no_color: bool) -> None:
    text = res.text
    assert "Traceback" not in text, text
    assert "Matrix" in text, text
    progress = [s for s in res.segments() if PROGRESS.match(s)]
    assert progress, f"no progress line on the terminal: {text}"
    for line in progress:
        assert len(line) <= cols - 1, f"progress wider than {cols} columns: {line!r}"
        assert "…" not in line, line
        assert ELAPSED.search(line), f"elapsed time cut: {line!r}"
    if no_color:
        assert not _colours(res.raw), f"colour despite NO_COLOR: {sorted(_colours(res.raw))}"
    else:
        assert _colours(res.raw), "no colour on a colour terminal"


@pytest.mark.parametrize("no_color", [False, True], ids=["colour", "NO_COLOR"])
@pytest.mark.parametrize("cols", [60, 120])
def test_demo_loopback_on_a_terminal(cols: int, no_color: bool) -> None:
    env = {"NO_COLOR": "1"} if no_color else {}
    res = run_pty(udpreach_argv("demo", "--loopback"), cols=cols, env=env)
    assert res.returncode == 0, res.text
    _check_terminal_output(res, cols, no_color)
    notes = [s for s in res.segments() if s.startswith("udpreach demo")]
    assert notes, res.text
    # The report names its run; the demo says that its history is gone with it.
    assert "its run history went with it" in " ".join(res.text.split())
    for s in res.segments():  # the demo's own notes wrap at words, within the terminal
        assert len(s) <= cols, s


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    tmp = tmp_path_factory.mktemp("pty")
    secret = tmp / "secret"
    secret.write_text("pty-test-secret-0123456789abcdef\n")
    secret.chmod(0o600)
    with loopback_services(tmp, secret, name="pty-agent") as svc:
        yield svc


@pytest.mark.parametrize("no_color", [False, True], ids=["colour", "NO_COLOR"])
@pytest.mark.parametrize("cols", [60, 120])
def test_run_on_a_terminal(services: Services, cols: int, no_color: bool) -> None:
    env = {"NO_COLOR": "1"} if no_color else {}
    res = run_pty(services.run_argv("--src-ports", "1024-20000"), cols=cols, env=env)
    assert res.returncode == 0, res.text
    _check_terminal_output(res, cols, no_color)
    assert "18,977 cells: 18,977 open" in res.text


def test_run_on_a_dumb_terminal_writes_no_escape_sequences(services: Services) -> None:
    res = run_pty(services.run_argv("--src-ports", "1024-20000"), cols=80, env={"TERM": "dumb"})
    assert res.returncode == 0, res.text
    assert "\x1b" not in res.raw, repr(res.raw[:400])
    assert "Matrix" in res.text
    # No redrawing: the progress comes as plain lines (one per round at least).
    assert re.search(r"^round 1: [\d,]+/18,977 cells settled", res.text, re.M), res.text


def test_run_piped_has_no_progress_and_no_escapes(services: Services) -> None:
    proc = run_cli(*services.run_argv("--src-ports", "1024-20000")[3:], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "\x1b" not in proc.stdout
    assert "Matrix" in proc.stdout


def test_ctrl_c_of_run_prints_what_was_settled_and_exits_3(services: Services) -> None:
    def settling(out: str) -> bool:
        return re.search(r"[1-9][\d,]*/64,512 cells settled", out) is not None

    res = run_pty(
        services.run_argv("--rate", "4000"),
        cols=100,
        env={"NO_COLOR": "1"},
        interrupt_when=settling,
    )
    text = res.text
    assert res.returncode == 3, text
    assert "Traceback" not in text
    assert "INCOMPLETE" in text, text  # the report of the partial run
    assert "unknown" in text
    m = re.search(r"udpreach: interrupted: the run was stopped with ([\d,]+) of 64,512 cells", text)
    assert m, text
    assert int(m.group(1).replace(",", "")) > 0
    assert res.seconds < 30, f"took {res.seconds:.1f}s: at 4,000/s a full sweep takes 16 s"


class SilentCoordinator:
    """A coordinator that authenticates, answers a run request with one progress message,
    and then says nothing, whatever it is sent (so a cancel goes unanswered)."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.received: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        cc = ControlConnection("server", self.secret)
        with conn:
            conn.settimeout(30)
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                events = cc.receive_data(data)
                for ev in events:
                    if isinstance(ev, Message):
                        self.received.append(ev.type)
                        if ev.type == "run":
                            cc.send(
                                {"type": "progress", "round": 1, "cells": 64512, "settled": 100}
                            )
                    elif not isinstance(ev, Authenticated):
                        return
                conn.sendall(cc.data_to_send())

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=40)


@pytest.fixture
def silent(secret_file: Path) -> Iterator[SilentCoordinator]:
    coord = SilentCoordinator(secret_file.read_text().strip().encode())
    try:
        yield coord
    finally:
        coord.close()


def _silent_run(coord: SilentCoordinator, secret_file: Path, **kw: Any) -> PtyResult:
    argv = udpreach_argv(
        "run", "--coordinator", f"127.0.0.1:{coord.port}", "--secret-file", str(secret_file),
        "--agent", "nobody",
    )  # fmt: skip
    return run_pty(argv, cols=80, interrupt_when=lambda out: "100/64,512" in out, **kw)


def test_ctrl_c_without_an_answer_gives_up_after_the_grace(
    silent: SilentCoordinator, secret_file: Path
) -> None:
    res = _silent_run(silent, secret_file)
    assert res.returncode == 3, res.text
    assert "Traceback" not in res.text
    assert "Ctrl-C again to quit now" in res.text
    assert "udpreach: interrupted: no partial report from the coordinator within 5s" in res.text
    assert 5 <= res.seconds < 15
    assert silent.received == ["run", "cancel"]


def test_second_ctrl_c_quits_at_once(silent: SilentCoordinator, secret_file: Path) -> None:
    res = _silent_run(silent, secret_file, interrupts=2, interrupt_gap=0.3)
    assert res.returncode == 3, res.text
    assert "udpreach: interrupted again: quit without the partial report" in res.text
    assert res.seconds < 5
    assert silent.received == ["run", "cancel"]


def test_one_interrupt_delivered_twice_is_one_ctrl_c(
    silent: SilentCoordinator, secret_file: Path
) -> None:
    """GNU ``timeout -s INT`` (a CI job's limit) signals the command and then its process
    group: two SIGINTs microseconds apart are one interrupt, which waits for the partial
    report, not a second one that drops it."""
    res = _silent_run(silent, secret_file, interrupts=2, interrupt_gap=0.0)
    assert res.returncode == 3, res.text
    assert "interrupted again" not in res.text
    assert "udpreach: interrupted: no partial report from the coordinator within 5s" in res.text
    assert res.seconds >= 5
    assert silent.received == ["run", "cancel"]


@pytest.mark.parametrize("no_color", [False, True], ids=["colour", "NO_COLOR"])
def test_each_verdict_has_its_own_glyph_with_or_without_colour(no_color: bool) -> None:
    """The demo's legend tells every verdict apart by its glyph alone: without colour, and
    in colour too (a colour-blind user cannot tell green from red: every verdict was `█`)."""
    env = {"NO_COLOR": "1"} if no_color else {}
    res = run_pty(udpreach_argv("demo", "--loopback"), cols=120, env=env)
    assert res.returncode == 0, res.text
    assert bool(_colours(res.raw)) != no_color
    legend = {}
    for verdict in VERDICTS:
        m = re.search(rf"(\S) {verdict}\b", res.text)
        assert m, f"{verdict!r} not in the legend: {res.text}"
        legend[verdict] = m.group(1)
    assert len(set(legend.values())) == len(VERDICTS), legend


# ---------------------------------------------------------------------------------------
# No table column wraps, piped or on a terminal, at any width: a list instead.


def _table_cells(text: str) -> list[list[str]]:
    """The cells of every body row line of the tables in *text*."""
    return [
        [c.strip() for c in line.strip().strip("│").split("│")]
        for line in text.splitlines()
        if line.startswith("│")
    ]


@pytest.fixture(scope="module")
def stored_everything(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A stored run with every detail a row can carry (ICMP, NAT, a hostile reason), judged
    against an expectation that makes its rejected ranges deviations."""

    doc = rendersamples.everything()
    entries = parse_expect('[[expect]]\ndst_ports = "5001"\nsrc_ports = "60000-60199"\n'
                           'verdict = "open"\n')  # fmt: skip
    doc["expect"] = [e.to_json() for e in entries]
    doc["deviations"] = judge(doc, entries)
    db = tmp_path_factory.mktemp("stored") / "runs.sqlite3"
    with RunStore.open(db) as store:
        for stored in (doc, rendersamples.interrupted_sweep()):
            store.finish(stored["run_id"], stored)
    return db, doc


def _check_no_cell_wraps(text: str, doc: dict[str, Any]) -> None:
    """Every details cell holds whole phrases, every source-port cell a whole span, as the
    report's rows (folded as the report folds them) have them."""
    phrases, spans = set(), set()
    for ranges in (doc["ranges"], doc.get("deviations") or []):
        for row in fold(ranges, MAX_ROWS, sampled=facts.sampled(doc)).rows:
            phrases.update(facts.row_details(row))
            spans.add(facts.span(row.first, row.last))
    for cells in _table_cells(text):
        details, span = cells[-1], cells[1]
        assert not details or details in phrases, f"a details cell wrapped: {details!r}"
        assert not span or span in spans, f"a source-port cell wrapped: {span!r}"


def test_piped_show_lists_what_a_table_would_wrap(
    stored_everything: tuple[Path, dict[str, Any]],
) -> None:
    """Piped (80 columns, no terminal): the trial's report kept the wide table and wrapped
    its details one word a line (an ICMP row took 13 lines)."""
    db, doc = stored_everything
    for shown in (doc, rendersamples.interrupted_sweep()):  # the trial's Ctrl-C'd run too
        proc = run_cli("show", shown["run_id"], "--db", str(db), env={"COLUMNS": ""})
        assert proc.returncode == 0, proc.stderr
        _check_no_cell_wraps(proc.stdout, shown)
        assert "┏" not in proc.stdout  # the details do not fit 80 columns: lists
    out = run_cli("show", doc["run_id"], "--db", str(db), env={"COLUMNS": ""}).stdout
    icmp = [line for line in out.splitlines() if "ICMP type 3 code 13" in line]
    assert len(icmp) == 2  # the range and its deviation, each from its own line
    for line in out.splitlines():  # only a command, one line by design, is wider
        assert len(line) <= 80 or line.split()[0] in ("nft", "iptables"), line
    # A saved report diffs cleanly: no line ends in the spaces rich pads tables with.
    for args in (("show", doc["run_id"]), ("history",), ("diff", doc["run_id"], doc["run_id"])):
        piped = run_cli(*args, "--db", str(db), env={"COLUMNS": ""})
        assert piped.returncode == 0, piped.stderr
        assert [line for line in piped.stdout.splitlines() if line.endswith(" ")] == []
        assert piped.stdout.endswith("\n")


@pytest.mark.parametrize("cols", [60, 100, 160, 250])
def test_show_on_a_terminal_never_wraps_a_table_column(
    stored_everything: tuple[Path, dict[str, Any]], cols: int
) -> None:
    db, doc = stored_everything
    res = run_pty(udpreach_argv("show", doc["run_id"], "--db", str(db)), cols=cols)
    assert res.returncode == 0, res.text
    _check_no_cell_wraps(res.text, doc)
    tables = res.text.count("┏")
    if cols >= 250:  # wide enough for every detail on one line: the tables stay
        assert tables == 2, res.text
        assert any(cells[-1].startswith("ICMP type 3 code 13") for cells in _table_cells(res.text))


def test_history_and_key_list_fit_a_narrow_terminal(
    stored_everything: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """At 60 columns `history` wrapped its status onto a line of its own at column 0 (it
    looked like another run) and `key list` wrapped each key's date: each run still starts
    the only unindented line, and nothing is wider than the terminal."""
    db, _ = stored_everything
    for cols in (60, 40):  # at 40 the date and the time of day were split, at column 0
        res = run_pty(udpreach_argv("history", "--db", str(db)), cols=cols)
        assert res.returncode == 0, res.text
        lines = [line for line in res.text.splitlines() if line.strip()]
        assert all(len(line) <= cols for line in lines), res.text
        heads = [line for line in lines if not line.startswith(" ")]
        assert len(heads) == 2, res.text  # the two stored runs
        assert all(re.match(r"\d{8}T?\d*-", line) for line in heads), res.text
        assert any(line.strip().endswith("complete") for line in lines if line.startswith("    "))
        assert any(re.fullmatch(r" +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC.*", line)
                   or re.search(r"  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", line)
                   for line in lines), res.text  # fmt: skip
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    keyring = tmp_path / "config" / "udpreach" / "keyring.json"
    keyring.parent.mkdir(parents=True)  # a --keyring given makes no folders (as --db)
    for argv in (["pc-17-with-a-long-name", "--out", str(tmp_path / "k1")],
                 ["ci", "--operator", "--out", str(tmp_path / "k2")]):  # fmt: skip
        added = run_pty(udpreach_argv("key", "add", *argv, "--keyring", str(keyring)), cols=60)
        assert added.returncode == 0, added.text
    listed = run_pty(udpreach_argv("key", "list", "--keyring", str(keyring)), cols=60, env=env)
    assert listed.returncode == 0, listed.text
    out = [line for line in listed.text.splitlines() if line.strip()]
    assert all(len(line) <= 60 for line in out), listed.text
    assert [line.split()[0] for line in out if not line.startswith(" ")] == [
        "pc-17-with-a-long-name",
        "ci",
    ]


@pytest.mark.root
@pytest.mark.parametrize("cols", [120, 200])
def test_the_lab_demo_says_where_its_policy_is_and_keeps_every_rule_whole(cols: int) -> None:
    """The demo's policy panel was 72 columns wide at any width (nft rules wrapped mid-rule
    at 200) and the header said "policy below" when it came beside."""
    from labkit import skip_without_lab

    from udpreach.demo import _policy_rules
    from udpreach.lab import bundled_policy

    skip_without_lab()
    res = run_pty(udpreach_argv("demo"), cols=cols, timeout=300)
    assert res.returncode == 0, res.text
    assert "Traceback" not in res.text
    where = "beside" if cols >= 185 else "below"  # the panel is 107 columns wide
    assert f"(nftables policy {where} the report)" in " ".join(res.text.split())
    assert "its run history went with it" in " ".join(res.text.split())
    lines = res.text.splitlines()
    policy_at = next(i for i, line in enumerate(lines) if "nftables policy on the router" in line)
    report_at = next(i for i, line in enumerate(lines) if "udpreach run " in line)
    assert (policy_at == report_at) if where == "beside" else (policy_at > report_at)
    for rule in _policy_rules(bundled_policy("demo")).splitlines():
        if rule.strip():
            assert any(rule.strip() in line for line in lines), f"rule broken: {rule.strip()}"


def test_diff_notes_are_wrapped_at_a_narrow_terminal(
    stored_everything: tuple[Path, dict[str, Any]],
) -> None:
    """At 60 columns `diff`'s notes ran on past the edge (78 characters, a new user's
    trial); piped, each stays one line."""
    db, doc = stored_everything
    other = rendersamples.interrupted_sweep()["run_id"]
    res = run_pty(udpreach_argv("diff", doc["run_id"], other, "--db", str(db)), cols=60)
    assert res.returncode in (0, 1), res.text
    lines = [line for line in res.text.splitlines() if line.strip()]
    assert any(line.startswith("note: ") for line in lines), res.text
    assert all(len(line) <= 60 for line in lines), res.text
    piped = run_cli("diff", doc["run_id"], other, "--db", str(db), env={"COLUMNS": ""})
    notes = [line for line in piped.stderr.splitlines() if line.startswith("note: ")]
    assert notes
    assert len(piped.stderr.splitlines()) == len(notes)  # one line each
