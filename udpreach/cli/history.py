"""The history commands: ``history``, ``show``, ``diff`` and ``expect --from``.

Thin commands over ``udpreach.store`` (the SQLite run history), ``udpreach.render`` and
``udpreach.core.expect``: open the database, one call, one render. Results go to stdout (with
``--json``: one JSON document and nothing else); notes and errors go to stderr, errors as
one line with the contract's exit code (2 for a bad option, an unusable database or an
unknown or ambiguous run id) through the one error mapper. ``diff`` exits 1 when any verdict
changed. Times are UTC, and say so.
"""

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from udpreach.cli.common import (
    JsonOpt,
    err_console,
    fail,
    mapped,
    note,
    out_console,
    path_option,
    print_json,
)
from udpreach.core import schema
from udpreach.core.errors import ConfigError

MAX_DOCUMENT_FILE = 1 << 30  # bytes: far above any run's document

DbOpt = Annotated[
    Path | None,
    path_option(
        "--db",
        help="The run database (default: $XDG_DATA_HOME/udpreach/runs.sqlite3).",
        show_default=False,
    ),
]
JunitOpt = Annotated[
    Path | None, path_option("--junit", help="Write a JUnit XML report (-: to stdout).")
]
MarkdownOpt = Annotated[
    Path | None,
    path_option("--markdown", help="Write a Markdown summary, for a ticket (-: to stdout)."),
]
CsvOpt = Annotated[
    Path | None, path_option("--csv", help="Write the ranges as CSV (-: to stdout).")
]
HtmlOpt = Annotated[
    Path | None, path_option("--html", help="Write a self-contained HTML page (-: to stdout).")
]


def _load(db: Path | None, *refs: str) -> list[dict[str, Any]]:
    """The run documents ``refs`` name: a stored run's id or unique prefix, or a file that
    ``run --json`` wrote, named as a path (a name ending in .json, or holding a slash: a run
    id has neither, so a file never hides a stored run)."""
    docs: dict[int, dict[str, Any]] = {}
    stored = []
    for i, ref in enumerate(refs):
        if ref.endswith(".json") or "/" in ref or os.sep in ref:
            docs[i] = _read_document(Path(ref))
        else:
            stored.append(i)
    if stored:
        from udpreach.store import RunStore

        with RunStore.open(db, create=False) as store:
            for i in stored:
                docs[i] = store.load(refs[i])
    return [docs[i] for i in range(len(refs))]


def _read_document(path: Path) -> dict[str, Any]:
    """A run document from a file (``run --json > FILE``), checked as a received one is."""
    from udpreach.core.messages import MessageError, check_document

    def refuse(value: str) -> None:
        raise ValueError(f"{value} is not JSON")

    try:
        if path.stat().st_size > MAX_DOCUMENT_FILE:
            raise ConfigError(f"{path} is too large to be a run document")
        doc = json.loads(path.read_bytes(), parse_constant=refuse)
        return check_document(doc)
    except FileNotFoundError:
        raise ConfigError(f"no file {path} (a run id has no slash and no .json)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError, MessageError) as exc:
        raise ConfigError(f"{path} is not a udpreach run document ({exc})") from None


def _to_stdout(as_json: bool, *paths: Path | None) -> bool:
    """Whether a report file is ``-`` (standard output); the terminal report then goes to
    standard error (see ``udpreach.render.exports``). The files that cannot be written are
    refused first, before anything is printed (as ``run`` does before it sends)."""
    if not any(paths):
        return False
    from udpreach.render.exports import check_report_paths, to_stdout

    check_report_paths(*paths)
    return to_stdout(as_json, *paths)


def _write(doc: dict[str, Any], *paths: Path | None) -> None:
    from udpreach.render.exports import write_reports

    write_reports(doc, None, *paths)


def _when(ts: Any) -> str:
    """A stored time as the run report prints it: UTC, with its zone."""
    if not isinstance(ts, int | float):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ts)))


def _note_unfinished(doc: dict[str, Any]) -> None:
    status = doc.get("status")
    if status in ("running", "incomplete"):
        what = "is still running" if status == "running" else "stopped with its probe"
        note(f"note: run {doc.get('run_id')} {what}; cells not settled are shown as unknown")


def history(
    db: DbOpt = None,
    as_json: JsonOpt = False,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Show only the newest N runs.")
    ] = None,
) -> None:
    """List the stored runs, newest first."""
    from udpreach.store import RunStore

    def fetch() -> tuple[list[dict[str, Any]], list[str]]:
        with RunStore.open(db, create=False) as store:
            return store.history(limit), store.problems

    from rich.markup import escape
    from rich.padding import Padding

    runs, problems = fetch()
    for line in problems:  # damaged or unreadable rows: skipped, and said
        note(f"warning: {line}")
    if as_json:
        print_json({"schema": schema.HISTORY, "runs": runs, "warnings": problems})
        return
    if not runs:
        err_console().print("no runs recorded yet")
        return
    out = out_console()
    # Two lines a run (like `git log`), readable at any terminal width.
    for r in runs:
        s = r.get("summary") or {}
        devs = r.get("deviations")
        status = str(r["status"])
        style = {"complete": "green", "incomplete": "red"}.get(status, "yellow")
        counts = ", ".join(f"{int(s[k]):,} {k}" for k in schema.VERDICTS if s.get(k))
        judged = (
            "" if devs is None else f", [bold]{devs:,}[/] deviating" if devs else ", as expected"
        )
        rid, when, agent = str(r["run_id"]), _when(r.get("started")), str(r.get("agent") or "?")
        first = f"[bold]{escape(rid)}[/]  {when}"
        marked = f"agent {escape(agent)}  [{style}]{status}[/]"
        plain = len(rid) + 2 + len(when) + 2 + len(f"agent {agent}  {status}")
        if plain <= out.width:
            out.print(f"{first}  {marked}")
        elif len(rid) + 2 + len(when) <= out.width:
            # A narrow terminal: the agent and status on a line of their own, indented.
            out.print(first)
            out.print(Padding(marked, (0, 0, 0, 4)))
        else:  # narrower still: the time too (never split, never at column 0)
            out.print(f"[bold]{escape(rid)}[/]")
            out.print(Padding(when, (0, 0, 0, 4)))
            out.print(Padding(marked, (0, 0, 0, 4)))
        # Indented as a whole: a line that wraps never starts at column 0 (another run).
        out.print(Padding(f"{int(s.get('cells', 0)):,} cells: {counts or 'none'}{judged}",
                          (0, 0, 0, 4)))  # fmt: skip


def show(
    run_id: Annotated[
        str,
        typer.Argument(
            metavar="RUN_ID",
            help="A run id, a unique start or end of one, or a file `run --json` wrote.",
        ),
    ],
    db: DbOpt = None,
    as_json: JsonOpt = False,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
    csv_out: CsvOpt = None,
    html: HtmlOpt = None,
) -> None:
    """Print a stored run exactly as `run` printed it (--json: the same document)."""
    from udpreach.core.expect import with_judgement

    report_out = _to_stdout(as_json, junit, markdown, csv_out, html)
    (doc,) = _load(db, run_id)
    doc = with_judgement(doc)
    if as_json:
        print_json(doc)
    else:
        from udpreach.render.console import report_console
        from udpreach.render.terminal import render_run

        render_run(doc, report_console(stderr=report_out))
    _note_unfinished(doc)
    _write(doc, junit, markdown, csv_out, html)


def diff(
    run_a: Annotated[
        str,
        typer.Argument(
            metavar="RUN_A", help="The earlier run (id, unique start or end of one, or JSON file)."
        ),
    ],
    run_b: Annotated[
        str,
        typer.Argument(
            metavar="RUN_B", help="The later run (id, unique start or end of one, or JSON file)."
        ),
    ],
    db: DbOpt = None,
    as_json: JsonOpt = False,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
    csv_out: CsvOpt = None,
    html: HtmlOpt = None,
) -> None:
    """List the cells whose verdict changed from RUN_A to RUN_B; exit 1 if any did."""
    from udpreach.render.exports import diff_runs

    report_out = _to_stdout(as_json, junit, markdown, csv_out, html)
    doc_a, doc_b = _load(db, run_a, run_b)
    d = diff_runs(doc_a, doc_b)
    if not d["compared"]:  # before any output: "no verdict changed (0 cells)" misleads
        fail(
            f"runs {d['run_a']} and {d['run_b']} have no planned cell in common",
            2,
            as_json=as_json,
        )
    if as_json:
        print_json(d)
    else:
        _render_diff(d, report_out)
    from udpreach.render.facts import cells

    for key, which in (("only_a", d["run_a"]), ("only_b", d["run_b"])):
        n = sum(r["last"] - r["first"] + 1 for r in d[key])
        if n:
            note(
                f"note: {cells(n)} planned only in run {which} "
                f"{'were' if n != 1 else 'was'} not compared"
            )
    for line in _diff_notes(doc_a, doc_b, d):
        note(f"note: {line}")
    _write(d, junit, markdown, csv_out, html)
    if d["changes"]:
        raise typer.Exit(1)


def _diff_notes(doc_a: dict[str, Any], doc_b: dict[str, Any], d: dict[str, Any]) -> list[str]:
    """What a reader of the diff must know about the two runs themselves."""
    out = []

    def who(doc: dict[str, Any]) -> tuple[str, str]:
        agent = doc.get("agent")
        if not isinstance(agent, dict):
            return "?", "?"
        return str(agent.get("name", "?")), str(agent.get("registered", "?"))

    (na, aa), (nb, ab) = who(doc_a), who(doc_b)
    if (na, aa) != (nb, ab):
        out.append(
            f"the runs measured different agents ({na!r} at {aa}, then {nb!r} at {ab}): "
            "their differences may be two paths, not a change of one"
        )
    unknown = sum(
        int(r["last"]) - int(r["first"]) + 1
        for r in d["changes"]
        if "unknown" in (r["before"], r["after"])
    )
    if unknown:
        ended = [str(x.get("run_id")) for x in (doc_a, doc_b) if not x.get("complete")]
        which = f" (run {' and '.join(ended)} did not finish)" if ended else ""
        out.append(
            f"{unknown:,} of the changed cells were unknown in one run{which}: not measured "
            "there, so not evidence that the path changed"
        )
    return out


def _render_diff(d: dict[str, Any], to_stderr: bool = False) -> None:
    from udpreach.render.console import report_console
    from udpreach.render.terminal import render_diff

    render_diff(d, report_console(stderr=to_stderr))


def expect_from_run(
    from_run: Annotated[
        str,
        typer.Option(
            "--from",
            help="The run (id, unique start or end of one, or JSON file) to take expectations "
            "from.",
        ),
    ],
    db: DbOpt = None,
) -> None:
    """Print an expectation file (TOML) that the stored run satisfies exactly."""
    from udpreach.core.expect import expect_from

    (doc,) = _load(db, from_run)
    s = doc.get("summary") or {}
    if not doc.get("complete"):
        # Its cells that happened to settle are scattered ports in the probe's random
        # order, and the rest would go unjudged: a baseline that silently judges less.
        unknown = int(s.get("unknown", 0))
        fail(
            f"run {doc.get('run_id')} did not complete ({unknown:,} cells unknown): an "
            "expectation file from it would leave them unjudged; take one from a complete run",
            2,
        )
    sys.stdout.write(expect_from(doc))
    sys.stdout.flush()
    left = int(s.get("untested", 0)) + int(s.get("unknown", 0))
    if left:
        note(
            f"note: run {doc.get('run_id')} has {left:,} untested or unknown cells; "
            "they are left out (not judged)"
        )


def register(app: typer.Typer) -> None:
    """Add ``history``, ``show``, ``diff`` and ``expect`` to the application."""
    app.command("history")(mapped(history))
    app.command("show", short_help="Print a stored run exactly as `run` printed it.")(mapped(show))
    app.command("diff", short_help="The cells whose verdict changed between two runs.")(
        mapped(diff)
    )
    app.command("expect", short_help="Print an expectation file (TOML) a run satisfies.")(
        mapped(expect_from_run)
    )
