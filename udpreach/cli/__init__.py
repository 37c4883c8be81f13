"""The command line: thin commands, one call into the library, one render.

Results go to stdout; progress, warnings and errors to stderr. Every ``UdpreachError``
becomes one line on stderr and its exit code (0 done, 1 deviations, 2 bad usage or
configuration, 3 could not complete); no traceback ever reaches the user.
"""

import contextlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from udpreach.core.errors import ConfigError, UdpreachError

app = typer.Typer(
    name="udpreach",
    help="Measure which UDP source-port ranges and destination ports get through a path "
    "(mail push-notification reachability: agent, probe, coordinator).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    # Plain (click) help: typer's rich help formatter costs ~80 ms of imports per call.
    rich_markup_mode=None,
)
secret_app = typer.Typer(
    name="secret", help="Create shared secrets.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(secret_app)

T = TypeVar("T")

SecretOpt = Annotated[
    Path | None,
    typer.Option(
        "--secret-file",
        help="File holding the shared secret (mode 0600); or set UDPREACH_SECRET_FILE.",
        show_default=False,
    ),
]
LogLevelOpt = Annotated[
    str, typer.Option("--log-level", help="debug, info, warning or error.", show_default=True)
]
LogJsonOpt = Annotated[bool, typer.Option("--log-json", help="Log JSON lines on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]


def _err_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr, then exit with *code*."""
    _err_console().print(f"[bold red]udpreach:[/] {message}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn: Callable[[], T]) -> T:
    """Run *fn*, mapping domain errors to a one-line message and their exit code."""
    try:
        return fn()
    except UdpreachError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 3)


def parse_endpoint(text: str, what: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port). Raises ConfigError."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def _check_log_level(level: str) -> str:
    from udpreach.logs import LEVELS

    if level.lower() not in LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LEVELS)}")
    return level.lower()


def _run_service(main: Callable[[], Any]) -> None:
    """Run a trio service until SIGINT/SIGTERM, then exit 0 cleanly."""
    import trio

    async def wrapper() -> None:
        async with trio.open_nursery() as nursery:

            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async for _ in sigs:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(signals)
            await main()
            nursery.cancel_scope.cancel()

    # Python before 3.11.4 wraps an exception raised inside ``except*`` in a new group
    # (a traceback instead of our one line): take the error out, fail after the block.
    failure: UdpreachError | None = None
    try:
        trio.run(wrapper)
    except* UdpreachError as group:
        exc: BaseException = group.exceptions[0]
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        assert isinstance(exc, UdpreachError)
        failure = exc
    if failure is not None:
        fail(str(failure), failure.exit_code)


@app.command()
def probe(
    control: Annotated[
        str, typer.Option("--control", help="HOST:PORT of the TCP control endpoint to listen on.")
    ],
    secret_file: SecretOpt = None,
    db: Annotated[Path | None, typer.Option("--db", help="Run history database (SQLite).")] = None,
    source: Annotated[
        str | None,
        typer.Option("--source", help="Local address to send from (default: the routed one)."),
    ] = None,
    allow_target: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-target",
            help="CIDR an agent's registered address may be in when it differs from the "
            "address its connection came from (repeatable).",
        ),
    ] = None,
    max_rate: Annotated[
        int, typer.Option("--max-rate", help="Global ceiling, datagrams per second.")
    ] = 1_000_000,
    max_datagrams: Annotated[
        int, typer.Option("--max-datagrams", help="Ceiling on datagrams sent in one run.")
    ] = 50_000_000,
    max_bytes_rate: Annotated[
        int,
        typer.Option("--max-bytes-rate", help="Global ceiling, payload bytes per second."),
    ] = 12_500_000,
    max_bytes: Annotated[
        int, typer.Option("--max-bytes", help="Ceiling on payload bytes sent in one run.")
    ] = 4_000_000_000,
    keyring: Annotated[
        Path | None,
        typer.Option(
            "--keyring",
            help="Per-agent and operator keys (udpreach key add); default: "
            "$XDG_CONFIG_HOME/udpreach/keyring.json when it exists.",
            show_default=False,
        ),
    ] = None,
    send_mode: Annotated[
        str,
        typer.Option(
            "--send-mode",
            help="auto (raw socket when permitted, else bind), raw (needs CAP_NET_RAW: any "
            "source port, even busy ones) or bind (a socket bound per source port).",
        ),
    ] = "auto",
    ready_file: Annotated[
        Path | None, typer.Option("--ready-file", hidden=True, help="Write the bound address.")
    ] = None,
    log_level: LogLevelOpt = "info",
    log_json: LogJsonOpt = False,
) -> None:
    """Server side: host the coordinator and the UDP probe until SIGINT/SIGTERM."""
    import ipaddress
    import os

    from udpreach.keyring import default_path as default_keyring
    from udpreach.logs import setup_logging
    from udpreach.secret import ENV_VAR as SECRET_ENV
    from udpreach.secret import load_secret

    def setup() -> Any:
        setup_logging(_check_log_level(log_level), log_json)
        host, port = parse_endpoint(control, "--control")
        found = keyring if keyring is not None else default_keyring()
        ring = found if keyring is not None or found.exists() else None
        has_secret = secret_file is not None or bool(os.environ.get(SECRET_ENV))
        secret = load_secret(secret_file) if has_secret or ring is None else None
        nets = []
        for cidr in allow_target or []:
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                raise ConfigError(f"--allow-target: not a CIDR: {cidr!r}") from None
        if send_mode not in ("auto", "raw", "bind"):
            raise ConfigError(f"--send-mode must be auto, raw or bind, got {send_mode!r}")
        if send_mode == "raw":
            from probe.raw import raw_available

            why = raw_available()
            if why is not None:
                raise ConfigError(f"--send-mode raw: {why}")
        if min(max_rate, max_datagrams, max_bytes_rate, max_bytes) <= 0:
            raise ConfigError(
                "--max-rate, --max-datagrams, --max-bytes-rate and --max-bytes must be positive"
            )
        if source is not None:
            try:
                ipaddress.ip_address(source)
            except ValueError:
                raise ConfigError(f"--source: not an IP address: {source!r}") from None
        return host, port, secret, nets, ring

    host, port, secret, nets, ring = guarded(setup)

    from probe.coordinator import Coordinator, ProbeConfig

    cfg = ProbeConfig(
        host=host,
        port=port,
        secret=secret,
        db=str(db) if db else None,
        source=source,
        max_rate=max_rate,
        max_datagrams=max_datagrams,
        max_bytes_rate=max_bytes_rate,
        max_bytes=max_bytes,
        allow_targets=nets,
        keyring=ring,
        send_mode=send_mode,
    )
    store = guarded(lambda: _open_store(db))

    async def main() -> None:
        import trio

        coord = Coordinator(cfg, store=store)
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(coord.serve)
            if ready_file is not None:
                ready_file.write_text(json.dumps({"host": bound[0], "port": bound[1]}))

    try:
        _run_service(main)
    finally:
        if store is not None:
            store.close()


def _open_store(db: Path | None) -> Any:
    from udpreach.store import RunStore

    return RunStore.open(db)


@app.command()
def agent(
    coordinator: Annotated[
        str, typer.Option("--coordinator", help="HOST:PORT of the coordinator.")
    ],
    port: Annotated[
        str,
        typer.Option(
            "--port", help="UDP port(s) to listen on: 5000, 5000,5001,6000-6002, or 0 (ephemeral)."
        ),
    ],
    secret_file: SecretOpt = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Agent name (default: the host name).")
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="Local address to listen on (default: all addresses)."),
    ] = None,
    log_level: LogLevelOpt = "info",
    log_json: LogJsonOpt = False,
) -> None:
    """Client side: listen on UDP port(s), register with the coordinator, report receipts."""
    import socket

    from agent.service import AgentConfig, run_agent
    from probe.coordinator import NAME_RE
    from udpreach.core.framing import parse_key_text
    from udpreach.core.portspec import parse_ports
    from udpreach.logs import setup_logging
    from udpreach.secret import load_secret

    def setup() -> AgentConfig:
        setup_logging(_check_log_level(log_level), log_json)
        host, cport = parse_endpoint(coordinator, "--coordinator")
        ports = parse_ports(port, allow_zero=True)
        if len(ports) > 1024:
            raise ConfigError("an agent listens on at most 1024 ports")
        secret = load_secret(secret_file)
        identity = parse_key_text(secret)  # an agent key names its agent
        agent_name = name or (identity.name if identity else socket.gethostname().split(".")[0])
        if not NAME_RE.match(agent_name):
            raise ConfigError(f"--name {agent_name!r}: use letters, digits, '.', '_' or '-'")
        return AgentConfig(
            host=host,
            port=cport,
            secret=secret,
            ports=ports,
            name=agent_name,
            listen=listen,
        )

    cfg = guarded(setup)

    async def main() -> None:
        await run_agent(cfg)

    _run_service(main)


@app.command()
def run(
    coordinator: Annotated[
        str, typer.Option("--coordinator", help="HOST:PORT of the coordinator.")
    ],
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
            help="Most datagrams per cell (default: as many as the measured loss needs, <= 16).",
        ),
    ] = None,
    rate: Annotated[int, typer.Option("--rate", help="Pacing ceiling, datagrams/s.")] = 100_000,
    size: Annotated[int, typer.Option("--size", help="Payload bytes (16-65507).")] = 16,
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for the agent to register.")
    ] = 0.0,
    as_json: JsonOpt = False,
    expect: Annotated[
        Path | None, typer.Option("--expect", help="Judge the result against this TOML file.")
    ] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write a JUnit XML report.")] = None,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="Write a Markdown summary.")
    ] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write the ranges as CSV.")] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Write a self-contained HTML page.")
    ] = None,
) -> None:
    """Test the path from the probe to an agent and print the pass/fail matrix."""
    from udpreach.core.datagram import MAX_SIZE, MIN_SIZE
    from udpreach.core.portspec import format_ports, parse_ports
    from udpreach.secret import load_secret

    def setup() -> tuple[str, int, bytes, dict[str, Any], list[Any]]:
        host, port = parse_endpoint(coordinator, "--coordinator")
        src = parse_ports(src_ports, allow_random=True)
        dst = format_ports(parse_ports(dst_ports)) if dst_ports is not None else None
        if copies is not None and not 1 <= copies <= 255:
            raise ConfigError(f"--copies must be 1-255, got {copies}")
        if rate <= 0:
            raise ConfigError(f"--rate must be positive, got {rate}")
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ConfigError(f"--size must be {MIN_SIZE}-{MAX_SIZE} bytes, got {size}")
        if wait < 0:
            raise ConfigError("--wait must not be negative")
        entries: list[Any] = []
        if expect is not None:
            from udpreach.core.expect import parse_expect

            try:
                text = expect.read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read {expect}: {exc.strerror}") from None
            entries = parse_expect(text, str(expect))
        plan = {
            "src_ports": format_ports(src),
            "dst_ports": dst,
            "copies": copies,
            "rate": rate,
            "size": size,
        }
        return host, port, load_secret(secret_file), plan, entries

    host, port, secret, plan, entries = guarded(setup)
    doc = guarded(lambda: _do_run(host, port, secret, agent, plan, wait, entries, as_json))
    _emit_run(doc, entries, as_json, junit, markdown, csv_out, html)


def _do_run(
    host: str,
    port: int,
    secret: bytes,
    agent: str,
    plan: dict[str, Any],
    wait: float,
    entries: list[Any],
    quiet: bool,
) -> dict[str, Any]:
    from udpreach.net.blocking import request_run

    progress, on_progress = _progress_bar()
    with progress:
        return request_run(
            host,
            port,
            secret,
            agent=agent,
            plan=plan,
            wait=wait,
            expect=[e.to_json() for e in entries],
            on_progress=on_progress,
        )


def _progress_bar() -> tuple[Any, Callable[[dict[str, Any]], None]]:
    """A live progress bar on stderr when it is a terminal; otherwise nothing at all (and
    rich's progress machinery is not even imported: scripts and CI start faster)."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext(), lambda p: None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # Every text column formats a field we set ourselves, as a string: rich's own
    # ``task.total`` is None until the first progress message, and ``{None:,}`` raises.
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[settled]}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=_err_console(),
        transient=True,
    )
    task = progress.add_task("starting", total=None, settled="", info="")

    def on_progress(p: dict[str, Any]) -> None:
        cells, settled = _count(p.get("cells")), _count(p.get("settled"))
        progress.update(
            task,
            total=cells or None,
            completed=settled,
            description=f"round {_count(p.get('round'))}",
            settled=f"{settled:,}/{cells:,} cells settled",
            info=f"{_count(p.get('sent')):,} sent, {_count(p.get('open')):,} open, "
            f"{_count(p.get('rate')):,}/s",
        )

    return progress, on_progress


def _count(value: Any) -> int:
    """A progress counter as an int (0 for anything a coordinator should not have sent)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _emit_run(
    doc: dict[str, Any],
    entries: list[Any],
    as_json: bool,
    junit: Path | None,
    markdown: Path | None,
    csv_out: Path | None,
    html: Path | None,
) -> None:
    """Print a run document, write the requested files, and exit with the run's status."""
    if as_json:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()
    else:
        from rich.console import Console

        from udpreach.render.terminal import render_run

        render_run(doc, Console(highlight=False))
    if junit or markdown or csv_out or html:
        from udpreach.render.exports import write_reports

        guarded(lambda: write_reports(doc, entries, junit, markdown, csv_out, html))
    if not doc.get("complete"):
        fail("the run ended before every cell was settled (unsettled cells are 'unknown')", 3)
    if doc.get("deviations"):
        raise typer.Exit(1)


@app.command()
def agents(
    coordinator: Annotated[
        str, typer.Option("--coordinator", help="HOST:PORT of the coordinator.")
    ],
    secret_file: SecretOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the agents registered with the coordinator."""
    from udpreach.net.blocking import list_agents
    from udpreach.secret import load_secret

    def go() -> list[dict[str, Any]]:
        host, port = parse_endpoint(coordinator, "--coordinator")
        return list_agents(host, port, load_secret(secret_file))

    found = guarded(go)
    if as_json:
        sys.stdout.write(json.dumps({"agents": found}) + "\n")
    else:
        from rich.console import Console

        from udpreach.render.terminal import render_agents

        render_agents(found, Console(highlight=False))


@secret_app.command("new")
def secret_new(
    path: Annotated[Path, typer.Argument(help="File to create (mode 0600).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a fresh random secret to FILE with mode 0600."""
    from udpreach.secret import new_secret

    made = guarded(lambda: new_secret(path, force=force))
    _err_console().print(f"wrote a new secret to {made} (mode 0600); copy it to the other side")


@app.command()
def demo(
    loopback: Annotated[
        bool, typer.Option("--loopback", help="Use loopback even when the lab is available.")
    ] = False,
    keep: Annotated[bool, typer.Option("--keep", hidden=True)] = False,
) -> None:
    """Start a probe and an agent, run a full sweep, print the matrix."""
    from udpreach.demo import run_demo

    code = guarded(lambda: run_demo(loopback=loopback))
    raise typer.Exit(code)


def _register_extras() -> None:
    from udpreach.cli.history import register
    from udpreach.cli.keys import key_app
    from udpreach.cli.lab import lab_app

    app.add_typer(lab_app)
    app.add_typer(key_app)
    register(app)


_register_extras()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        _err_console().print("udpreach: interrupted")
        sys.exit(130)
