"""``udpreach probe`` and ``udpreach agent``: the two long-running services.

Each parses its options into a config (errors are one line and exit 2), then runs under trio
until SIGINT or SIGTERM, after which it exits 0 without a traceback. A failure inside the
service (a port that cannot be bound, a refused secret) leaves trio as an exception group;
``run_service`` takes the error out with a plain ``except`` (Python before 3.11.4 wraps an
exception raised inside ``except*`` in a new group) and hands it to the one error mapper.
"""

import ipaddress
import json
import logging
import re
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from udpreach.cli.common import (
    CoordinatorOpt,
    LogJsonOpt,
    LogLevelOpt,
    SecretOpt,
    check_log_level,
    mapped,
    parse_endpoint,
    path_option,
)
from udpreach.core.errors import ConfigError, PortSpecError, UdpreachError
from udpreach.core.errors import leaves as error_leaves

log = logging.getLogger("udpreach.probe")

# The coordinator's rule for agent names (probe.coordinator.NAME_RE), checked here so that
# the agent's host never imports the probe; tests/test_cli.py keeps the two equal.
AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SEND_MODES = ("auto", "raw", "bind")


def first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error to report from a group: its first ``UdpreachError``, else its first leaf
    that is not a cancellation, else its first leaf."""
    leaves = error_leaves(group)
    for kind in (UdpreachError, KeyboardInterrupt):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    for leaf in leaves:
        if type(leaf).__name__ != "Cancelled":
            return leaf
    return leaves[0] if leaves else group


# Seconds a stopping probe gives its runs to end and send their documents.
STOP_GRACE = 10.0


def run_service(
    main: Callable[[], Awaitable[None]],
    *,
    logger: logging.Logger = log,
    wind_down: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    """Run a trio service until SIGINT/SIGTERM (Ctrl-Break on Windows), then return.

    With ``wind_down``, the first signal first awaits ``wind_down(signal name)`` (at most
    ``STOP_GRACE`` seconds; the probe ends its runs there, so that their requesters get
    their documents), and a second signal stops at once.
    """
    import trio

    wanted = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGBREAK"):  # Windows: Ctrl-Break, and what service managers send
        wanted.append(signal.SIGBREAK)

    async def wrapper() -> None:
        async with trio.open_nursery() as nursery:

            async def stop_after(wind: Callable[[str], Awaitable[None]], name: str) -> None:
                with trio.move_on_after(STOP_GRACE):
                    await wind(name)
                nursery.cancel_scope.cancel()

            async def signals() -> None:
                with trio.open_signal_receiver(*wanted) as sigs:
                    winding = False
                    async for signum in sigs:
                        name = signal.Signals(signum).name
                        if wind_down is None or winding:
                            logger.info("stopping (%s)", name)
                            nursery.cancel_scope.cancel()
                            return
                        winding = True
                        nursery.start_soon(stop_after, wind_down, name)

            nursery.start_soon(signals)
            await main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(wrapper)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


def _send_mode_line(send_mode: str) -> str:
    """What the probe will send with, said once at start-up."""
    from probe.raw import raw_available

    why = raw_available()
    if send_mode == "bind":
        return "send mode: bind (a socket bound per source port; busy ports are untested)"
    if why is None:
        return f"send mode: {send_mode} -> raw sockets (any source port, even busy ones)"
    # ``why`` ends with its advice to the user who asked for raw ("... or use --send-mode
    # bind"): here bind is what auto chose already, so only the reason is said.
    why = why.split(" (run the probe as root", 1)[0]
    return (
        f"send mode: auto -> bind ({why}: run the probe as root for raw mode); source ports "
        "below 1024 and ports in use here will be untested"
    )


@mapped
def probe(
    control: Annotated[
        str, typer.Option("--control", help="HOST:PORT of the TCP control endpoint to listen on.")
    ],
    secret_file: SecretOpt = None,
    db: Annotated[
        Path | None,
        path_option(
            "--db",
            help="Run history database (SQLite; default $XDG_DATA_HOME/udpreach/runs.sqlite3).",
            show_default=False,
        ),
    ] = None,
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
        typer.Option(
            "--max-bytes-rate",
            help="Global ceiling in bytes per second on the wire (payload and IP/UDP headers; "
            "default a tenth of a gigabit).",
        ),
    ] = 12_500_000,
    max_bytes: Annotated[
        int, typer.Option("--max-bytes", help="Ceiling on bytes sent in one run.")
    ] = 4_000_000_000,
    keyring: Annotated[
        Path | None,
        path_option(
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
        Path | None, path_option("--ready-file", hidden=True, help="Write the bound address.")
    ] = None,
    log_level: LogLevelOpt = "info",
    log_json: LogJsonOpt = False,
) -> None:
    """Server side: host the coordinator and the UDP probe until SIGINT/SIGTERM."""
    import os

    from udpreach.core.framing import KEY_HEADER
    from udpreach.keyring import default_path as default_keyring
    from udpreach.logs import setup_logging
    from udpreach.secret import ENV_VAR as SECRET_ENV
    from udpreach.secret import load_secret

    setup_logging(check_log_level(log_level), log_json)
    host, port = parse_endpoint(control, "--control", listen=True)
    found = keyring if keyring is not None else default_keyring()
    has_secret = secret_file is not None or bool(os.environ.get(SECRET_ENV))
    try:
        ring = found if keyring is not None or found.exists() else None
    except OSError:  # the default keyring's folder is not this user's to look in
        ring = None if has_secret else found  # without a secret, reading it says why
    secret = load_secret(secret_file) if has_secret or ring is None else None
    if secret is not None and secret.startswith(KEY_HEADER + b" "):
        # An agent's or operator's key file: as the coordinator's shared secret, nobody
        # could ever authenticate (their keys derive from the keyring's master key).
        raise ConfigError(
            f"{secret_file or os.environ.get(SECRET_ENV)} is a key file (udpreach key add), "
            "not a shared secret: the coordinator takes keys from its keyring (--keyring); "
            "a shared secret comes from: udpreach secret new FILE"
        )
    nets = []
    for cidr in allow_target or []:
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise ConfigError(f"--allow-target: not a CIDR: {cidr!r}") from None
        net = nets[-1]
        if net.prefixlen < (16 if net.version == 4 else 32):
            log.warning(
                "--allow-target %s: anyone holding the secret may aim this probe's datagrams "
                "at any of its %s addresses; name the agents' own networks instead",
                net,
                f"{net.num_addresses:,}" if net.version == 4 else f"2^{128 - net.prefixlen}",
            )
    if send_mode not in SEND_MODES:
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
            family = (
                socket.AF_INET6 if ipaddress.ip_address(source).version == 6 else socket.AF_INET
            )
        except ValueError:
            raise ConfigError(f"--source: not an IP address: {source!r}") from None
        try:  # the probe sends from its own addresses only (and ICMP must come back to it)
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((source, 0))
        except OSError:
            raise ConfigError(f"--source {source} is not an address of this host") from None

    from probe.coordinator import Coordinator, ProbeConfig
    from udpreach.store import RunStore

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
    if db is not None and not db.expanduser().parent.is_dir():
        # A path the user typed: a typo must not make directories (the default path's,
        # ~/.local/share/udpreach, are made as needed).
        raise ConfigError(f"--db {db}: no directory {db.expanduser().parent}")
    store = RunStore.open(db)

    async def main() -> None:
        import trio

        coord = Coordinator(cfg, store=store)
        running.append(coord)
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(coord.serve)
            # Once listening: a probe that cannot start says only why.
            log.info("run database: %s", store.path)
            log.info("%s", _send_mode_line(send_mode))
            if ready_file is not None:
                ready_file.write_text(json.dumps({"host": bound[0], "port": bound[1]}))

    running: list[Any] = []  # the coordinator, once made

    async def wind_down(name: str) -> None:
        n = running[0].stop_runs(f"the probe was stopped ({name})") if running else 0
        if not n:
            log.info("stopping (%s)", name)
            return
        log.info(
            "stopping (%s): ending %d run%s in progress, %s what was settled (%s again "
            "stops at once)",
            name,
            n,
            "" if n == 1 else "s",
            "whose requester gets" if n == 1 else "whose requesters get",
            name,
        )
        await running[0].runs_answered()

    try:
        run_service(main, wind_down=wind_down)
    finally:
        store.close()


@mapped
def agent(
    coordinator: CoordinatorOpt,
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
        typer.Option(
            "--listen",
            help="Local address to listen on, and to register from (default: all addresses;"
            " the coordinator registers the address the agent connects from).",
        ),
    ] = None,
    log_level: LogLevelOpt = "info",
    log_json: LogJsonOpt = False,
) -> None:
    """Client side: listen on UDP port(s), register with the coordinator, report receipts."""
    import socket

    from agent.service import AgentConfig, run_agent
    from udpreach.core.framing import parse_key_text
    from udpreach.core.portspec import parse_ports
    from udpreach.logs import setup_logging
    from udpreach.secret import load_secret

    setup_logging(check_log_level(log_level), log_json)
    host, cport = parse_endpoint(coordinator, "--coordinator")
    if listen is not None:
        import ipaddress

        try:  # an address of this host, never a name to look up (no DNS query for it)
            ipaddress.ip_address(listen)
        except ValueError:
            raise ConfigError(
                f"--listen {listen!r}: give an IP address of this host (not a name)"
            ) from None
    try:
        ports = parse_ports(port, allow_zero=True)
    except PortSpecError as exc:
        raise PortSpecError(f"--port: {exc}") from None
    if len(ports) > 1024:
        raise ConfigError("an agent listens on at most 1024 ports")
    secret = load_secret(secret_file)
    identity = parse_key_text(secret)  # an agent key names its agent
    if name is not None and not name.strip():
        raise ConfigError("--name is empty (leave it out for the host name)")
    agent_name = name or (identity.name if identity else socket.gethostname().split(".")[0])
    if not AGENT_NAME_RE.fullmatch(agent_name):
        raise ConfigError(
            f"--name {agent_name!r}: use letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, at most 64 characters"
        )
    cfg = AgentConfig(
        host=host,
        port=cport,
        secret=secret,
        ports=ports,
        name=agent_name,
        listen=listen,
    )

    async def main() -> None:
        await run_agent(cfg)

    run_service(main, logger=logging.getLogger("udpreach.agent"))
