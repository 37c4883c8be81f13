"""The command line: thin commands, one call into the library, one render.

The commands live by subject: ``service`` (probe, agent), ``run`` (run, agents, demo),
``history`` (history, show, diff, expect), ``lab`` and ``secret``; what they share (options,
endpoint parsing, the one error mapper) is in ``common``. Results go to stdout; progress,
warnings and errors to stderr. Every error is one line with the contract's exit code (0
done, 1 deviations, 2 bad usage or configuration, 3 could not complete), with ``--json`` also
as an error document on stdout; no traceback reaches the user.

Importing this package loads typer only: ``udpreach --help`` and shell completion stay fast.
"""

import sys
from typing import Annotated

import typer

from udpreach import __version__
from udpreach.cli import history, run, service
from udpreach.cli.common import click_errors, fail, one_line, pipe_safe_stdout
from udpreach.cli.keys import key_app
from udpreach.cli.lab import lab_app
from udpreach.cli.secret import secret_app

app = typer.Typer(
    name="udpreach",
    help="Measure which UDP source-port ranges and destination ports get through a path "
    "(mail push-notification reachability: agent, probe, coordinator).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    # Plain (click) help: typer's rich help formatter costs ~80 ms of imports per call.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        print(f"udpreach {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_show_version, is_eager=True
        ),
    ] = False,
) -> None:
    """Measure which UDP source-port ranges and destination ports get through a path
    (mail push-notification reachability: agent, probe, coordinator)."""


# The short help is what the command list shows: one line that fits 80 columns whole.
app.command(short_help="Server side: the coordinator and the UDP probe, until stopped.")(
    service.probe
)
app.command(short_help="Client side: listen on UDP port(s), register with the probe.")(
    service.agent
)
app.command(short_help="Test the path from the probe to an agent; print the matrix.")(run.run)
app.command()(run.agents)
app.command()(run.demo)
history.register(app)
app.add_typer(secret_app)
app.add_typer(key_app)
app.add_typer(lab_app)


TYPER_INTERRUPTED = 130  # what typer returns for a KeyboardInterrupt it caught


def _wants_json(argv: list[str]) -> bool:
    words = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in words


def main() -> None:
    """Console-script entry point (through ``udpreach._entry``)."""
    pipe_safe_stdout()
    try:
        code = _main(sys.argv[1:])
    except typer.Exit as exc:
        code = exc.exit_code
    if code == TYPER_INTERRUPTED:
        # Ctrl-C in typer's own parsing, or in a command's last words after the commands'
        # error mapper: typer makes it a silent 130 (no udpreach command exits 130). The
        # entry point (``udpreach._entry``) says it in one line, as one that came while
        # typer built the command line and got through here.
        raise KeyboardInterrupt
    sys.exit(code)


def _main(argv: list[str]) -> int:
    """Run the app; click's own usage errors become one line (exit 2), like every other
    error, and with ``--json`` the error document too."""
    try:
        code = app(prog_name="udpreach", standalone_mode=False)
    except click_errors.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `udpreach`: the help, exit 2
            exc.show()
            return 2
        where = exc.ctx.command_path if exc.ctx is not None else "udpreach"
        message = one_line(exc.format_message()).rstrip(".")
        fail(f"{message} (see '{where} -h')", exc.exit_code, as_json=_wants_json(argv))
    except click_errors.ClickException as exc:
        fail(exc.format_message(), exc.exit_code, as_json=_wants_json(argv))
    except typer.Abort:
        fail("interrupted", 3, as_json=_wants_json(argv))
    return code if isinstance(code, int) else 0
