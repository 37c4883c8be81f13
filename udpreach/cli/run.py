"""``udpreach run``, ``udpreach agents`` and ``udpreach demo``: asking the coordinator.

``run`` checks its options, asks the coordinator for a run over a blocking socket (no trio at
start-up), shows the progress on stderr while it lasts, prints the report (or, with
``--json``, the document and nothing else on stdout), writes the requested files, and exits
with the run's status: 0 done (as expected), 1 deviations or an expectation entry that
judged no cell, 3 incomplete, interrupted, or no cell could be tested at all. Ctrl-C (or
SIGTERM) asks the coordinator to stop the run and prints what was settled by then.
"""

from pathlib import Path
from typing import Annotated, Any

import typer

from udpreach.cli.common import (
    CoordinatorOpt,
    JsonOpt,
    SecretOpt,
    fail,
    mapped,
    note,
    one_line,
    out_console,
    parse_endpoint,
    path_option,
    print_json,
)
from udpreach.core import schema
from udpreach.core.errors import ConfigError, PortSpecError
from udpreach.core.messages import NAME_RE


def _plan(
    src_ports: str,
    dst_ports: str | None,
    copies: int | None,
    rate: int,
    size: int,
    wait: float,
    icmp_budget: float | None,
    max_delay: float,
) -> dict[str, Any]:
    """The plan the coordinator is asked for, checked here first (exit 2 on a bad one)."""
    from udpreach.core.datagram import MAX_SIZE, MIN_SIZE
    from udpreach.core.messages import MAX_WAIT
    from udpreach.core.plan import MAX_ICMP_BUDGET, MAX_MAX_DELAY
    from udpreach.core.portspec import format_ports, parse_ports

    try:
        src = parse_ports(src_ports, allow_random=True)
    except PortSpecError as exc:
        raise PortSpecError(f"--src-ports: {exc}") from None
    try:
        dst = format_ports(parse_ports(dst_ports)) if dst_ports is not None else None
    except PortSpecError as exc:
        raise PortSpecError(f"--dst-ports: {exc}") from None
    if copies is not None and not 1 <= copies <= 255:
        raise ConfigError(f"--copies must be 1-255, got {copies}")
    if rate <= 0:
        raise ConfigError(f"--rate must be positive, got {rate}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"--size must be {MIN_SIZE}-{MAX_SIZE} bytes, got {size}")
    if not 0 <= wait <= MAX_WAIT:  # NaN fails both
        raise ConfigError(f"--wait must be 0-{MAX_WAIT:g} seconds")
    if icmp_budget is not None and not 0 <= icmp_budget <= MAX_ICMP_BUDGET:  # NaN fails both
        raise ConfigError(f"--icmp-budget must be 0-{MAX_ICMP_BUDGET:g} seconds")
    if not 0 < max_delay <= MAX_MAX_DELAY:
        raise ConfigError(f"--max-delay must be more than 0 and at most {MAX_MAX_DELAY:g} s")
    return {
        "src_ports": format_ports(src),
        "dst_ports": dst,
        "copies": copies,
        "rate": rate,
        "size": size,
        "icmp_budget": icmp_budget,
        "max_delay": max_delay,
    }


def _expectations(expect: Path | None) -> list[Any]:
    if expect is None:
        return []
    from udpreach.core.expect import parse_expect

    try:
        data = expect.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {expect}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")  # TOML is UTF-8; a BOM (Windows editors) is dropped
    except UnicodeDecodeError as exc:
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        hint = "UTF-16 ('Unicode' in Notepad)" if utf16 else f"byte {exc.start} is not UTF-8"
        raise ConfigError(f"{expect} is not UTF-8 text ({hint}): save it as UTF-8") from None
    return parse_expect(text, str(expect))


@mapped
def run(
    coordinator: CoordinatorOpt,
    agent: Annotated[str, typer.Option("--agent", help="Name of the agent to test.")],
    secret_file: SecretOpt = None,
    src_ports: Annotated[
        str,
        typer.Option("--src-ports", help="Source ports: 1024-65535, a list, or random:N."),
    ] = "1024-65535",
    dst_ports: Annotated[
        str | None,
        typer.Option("--dst-ports", help="Destination ports (default: all of the agent's)."),
    ] = None,
    copies: Annotated[
        int | None,
        typer.Option(
            "--copies",
            help="Most datagrams per cell (default: as many as the measured loss needs, <= 32).",
        ),
    ] = None,
    rate: Annotated[int, typer.Option("--rate", help="Pacing ceiling, datagrams/s.")] = 100_000,
    size: Annotated[int, typer.Option("--size", help="Payload bytes (16-65507).")] = 16,
    icmp_budget: Annotated[
        float | None,
        typer.Option(
            "--icmp-budget",
            help="Seconds to spend telling silent cells apart (dropped or rejected) where "
            "routers rate-limit their ICMP errors (default: 20, plus 10 for each further "
            "destination port, at most 60); 0: none.",
            show_default=False,
        ),
    ] = None,
    max_delay: Annotated[
        float,
        typer.Option(
            "--max-delay",
            help="One-way UDP delay to wait for before any delay was measured, seconds.",
        ),
    ] = 1.0,
    wait: Annotated[
        float,
        typer.Option(
            "--wait", help="Seconds to wait for the agent to register, or to be free if busy."
        ),
    ] = 0.0,
    as_json: JsonOpt = False,
    expect: Annotated[
        Path | None, path_option("--expect", help="Judge the result against this TOML file.")
    ] = None,
    junit: Annotated[Path | None, path_option("--junit", help="Write a JUnit XML report.")] = None,
    markdown: Annotated[
        Path | None, path_option("--markdown", help="Write a Markdown summary.")
    ] = None,
    csv_out: Annotated[Path | None, path_option("--csv", help="Write the ranges as CSV.")] = None,
    html: Annotated[
        Path | None, path_option("--html", help="Write a self-contained HTML page.")
    ] = None,
) -> None:
    """Test the path from the probe to an agent and print the pass/fail matrix."""
    from udpreach.cli.progress import ProgressDisplay
    from udpreach.keyring import forbid_core_dumps
    from udpreach.net.blocking import request_run, sigterm_interrupts
    from udpreach.secret import load_secret

    host, port = parse_endpoint(coordinator, "--coordinator")
    if not NAME_RE.fullmatch(agent):
        raise ConfigError(
            f"--agent {agent!r}: no agent has that name (agents are named with letters, "
            "digits, '.', '_' or '-', starting with a letter or digit, at most 64 characters)"
        )
    plan = _plan(src_ports, dst_ports, copies, rate, size, wait, icmp_budget, max_delay)
    entries = _expectations(expect)
    report_out = False  # a report file given as - is standard output (the terminal's: stderr)
    if junit or markdown or csv_out or html:
        from udpreach.render.exports import check_report_paths, to_stdout

        report_out = to_stdout(as_json, junit, markdown, csv_out, html)
        check_report_paths(junit, markdown, csv_out, html)
    forbid_core_dumps()  # the key file's contents must never land in a core file
    secret = load_secret(secret_file)
    cancelled: list[float] = []

    def on_cancel(grace: float) -> None:
        cancelled.append(grace)
        progress.notice(
            f"interrupted: the coordinator is stopping the run; waiting up to {grace:g}s "
            "for what was settled (Ctrl-C again to quit now)"
        )

    waiting = f"waiting for agent {agent} (up to {wait:g}s)" if wait > 0 else ""
    with sigterm_interrupts(), ProgressDisplay(waiting) as progress:
        doc = request_run(
            host,
            port,
            secret,
            agent=agent,
            plan=plan,
            wait=wait,
            expect=[e.to_json() for e in entries],
            on_progress=progress.update,
            on_cancel=on_cancel,
        )
    if doc.get("expect") or doc.get("judgement"):  # judged: its judgement, read off it
        from udpreach.core.expect import with_judgement

        doc = with_judgement(doc)
    unwritten = None  # why a report file was refused after the run (checked before: the disk)
    if junit or markdown or csv_out or html:
        from udpreach.render.exports import write_reports

        try:
            write_reports(doc, entries, junit, markdown, csv_out, html)
        except ConfigError as exc:
            unwritten = str(exc)
    failure = _failure(doc, cancelled, unwritten, expect)
    if as_json:
        if failure is not None:
            # The run's results are the document; it also says why the command failed, as
            # an error document would (``error``, ``exit``): a pipeline reading stdout loses
            # neither.
            doc = {**doc, "error": one_line(failure[0]), "exit": failure[1]}
        print_json(doc)
    else:
        from udpreach.render.console import report_console
        from udpreach.render.terminal import render_run

        render_run(doc, report_console(stderr=report_out))
    if failure is not None:
        fail(*failure, as_json=as_json)
    if doc.get("deviations"):
        # Said on stderr too: a CI log that keeps only stderr (the report went to a file or
        # a pipe) otherwise shows exit 1 and nothing.
        n = sum(int(r["last"]) - int(r["first"]) + 1 for r in doc["deviations"])
        note(
            f"udpreach: {n:,} cell{'' if n == 1 else 's'} differ from --expect {expect} "
            f"(in {len(doc['deviations']):,} range{'' if len(doc['deviations']) == 1 else 's'})"
        )
        raise typer.Exit(1)


def _failure(
    doc: dict[str, Any], cancelled: list[float], unwritten: str | None, expect: Path | None
) -> tuple[str, int] | None:
    """Why ``run`` fails after the run (one line and the exit status), if it does."""
    also = f"; and {unwritten}" if unwritten else ""
    summary = doc.get("summary") or {}
    cells, untested = _int(summary.get("cells")), _int(summary.get("untested"))
    if cancelled:
        return (
            f"interrupted: the run was stopped with {_settled(summary):,} of {cells:,} cells "
            f"settled; the rest are unknown{also}",
            3,
        )
    if not doc.get("complete"):
        return (
            "the run ended before every cell was settled (unsettled cells are 'unknown')"
            + _why_incomplete(doc)
            + also,
            3,
        )
    if unwritten:
        return f"{unwritten}; the run finished (its results are on standard output)", 3
    if cells and untested == cells:
        return f"no cell could be tested: {_untested_reason(doc)}", 3
    problem = (doc.get("judgement") or {}).get("problem")
    if problem:  # an expectation that judged nothing is not "as expected"
        return f"--expect {expect}: {problem}", 1
    return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _settled(summary: dict[str, Any]) -> int:
    return _int(summary.get("cells")) - _int(summary.get("unknown"))


def _why_incomplete(doc: dict[str, Any]) -> str:
    """``: <the warning that says why the run stopped>`` (the agent stopped answering, the
    probe was stopped), when there is one."""
    for w in doc.get("warnings") or []:
        text = str(w)
        if "agent" in text and any(k in text for k in ("lost", "did not answer", "went away")):
            return f": {text}"
        if text.startswith("the probe was stopped"):
            return f": {text}"
    return ""


def _untested_reason(doc: dict[str, Any]) -> str:
    """Why cells were untested, from the document's untested ranges (the first reason, and
    how many others there are)."""
    reasons: list[str] = []
    for r in doc.get("ranges") or []:
        reason = r.get("reason") if r.get("verdict") == "untested" else None
        if reason and str(reason) not in reasons:
            reasons.append(str(reason))
    if not reasons:
        return "the probe could not send from any planned source port"
    more = f" (and {len(reasons) - 1} other reasons)" if len(reasons) > 1 else ""
    return reasons[0] + more


@mapped
def agents(
    coordinator: CoordinatorOpt, secret_file: SecretOpt = None, as_json: JsonOpt = False
) -> None:
    """List the agents registered with the coordinator."""
    from udpreach.keyring import forbid_core_dumps
    from udpreach.net.blocking import list_agents
    from udpreach.secret import load_secret

    host, port = parse_endpoint(coordinator, "--coordinator")
    forbid_core_dumps()
    found = list_agents(host, port, load_secret(secret_file))
    if as_json:
        print_json({"schema": schema.AGENTS, "agents": [_agent_json(a) for a in found]})
    elif not found:
        note("no agent is registered")
    else:
        from udpreach.render.terminal import render_agents

        render_agents(found, out_console())


def _agent_json(agent: dict[str, Any]) -> dict[str, Any]:
    """An agent as ``agents --json`` lists it: the coordinator's fields, and beside each
    time (seconds since the epoch) the same in ISO 8601, UTC (``since_utc``)."""
    from datetime import UTC, datetime

    out = dict(agent)
    for key in ("since", "busy_since"):
        ts = agent.get(key)
        if isinstance(ts, int | float) and not isinstance(ts, bool):
            try:
                when = datetime.fromtimestamp(float(ts), UTC)
            except (OverflowError, OSError, ValueError):  # not a time a clock gives
                continue
            out[f"{key}_utc"] = when.isoformat(timespec="seconds").replace("+00:00", "Z")
    return out


@mapped
def demo(
    loopback: Annotated[
        bool, typer.Option("--loopback", help="Use loopback even when the lab is available.")
    ] = False,
) -> None:
    """Start a probe and an agent, run a full sweep, print the matrix."""
    from udpreach.demo import run_demo

    raise typer.Exit(run_demo(loopback=loopback))
