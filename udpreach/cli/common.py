"""What every command shares: its options, endpoint parsing, and the one error mapper.

Theory of operation: a command's body raises ``UdpreachError`` (or a subclass) for anything
that goes wrong in a way a user can act on. ``@mapped`` turns that, an interrupt, and even an
unexpected exception into one line on stderr and the contract's exit code (0 done, 1
deviations, 2 bad usage or configuration, 3 could not complete); with ``--json`` the line
also goes to stdout as ``{"schema": "udpreach/error-v1", ...}`` so a pipeline always gets
JSON. ``main`` in ``udpreach.cli`` does the same for click's own usage errors. Messages are
printed as plain text: nothing in them is read as rich markup. An error caused by a value
the command took from the environment (``UDPREACH_COORDINATOR``, ``UDPREACH_SECRET_FILE``)
names the variable, since the user may have set it long ago.

Standard output is made to outlive its reader (``udpreach show RUN | head -1``): a closed
pipe changes neither what the command does nor its exit status, and prints nothing.

This module imports typer only; rich, trio and numpy load when a command needs them, so
``udpreach --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TextIO, TypeVar, cast

import typer

from udpreach.core import schema
from udpreach.core.errors import (
    AuthError,
    ConfigError,
    ConnectionLostError,
    UdpreachError,
    UnreachableError,
)

try:  # typer 0.28 vendors click; older releases depend on it
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors  # type: ignore[no-redef,import-not-found,unused-ignore]

__all__ = [
    "CoordinatorOpt",
    "JsonOpt",
    "LogJsonOpt",
    "LogLevelOpt",
    "SecretOpt",
    "check_log_level",
    "click_errors",
    "err_console",
    "fail",
    "map_error",
    "mapped",
    "note",
    "one_line",
    "out_console",
    "parse_endpoint",
    "path_option",
    "pipe_safe_stdout",
    "print_json",
]

P = ParamSpec("P")
T = TypeVar("T")

ERROR_SCHEMA = schema.ERROR
DEBUG_ENV = "UDPREACH_DEBUG"  # set to 1: unexpected errors show their traceback
COORDINATOR_ENV = "UDPREACH_COORDINATOR"
SECRET_ENV = "UDPREACH_SECRET_FILE"  # udpreach.secret.ENV_VAR (not imported: --help stays fast)


def path_option(*names: str, **kwargs: Any) -> Any:
    """``typer.Option`` for a file: its checks left to the command, which says what is
    wrong in its own words (click's "Path ... is not readable" named an environment
    variable that was not set)."""
    return typer.Option(*names, readable=False, **kwargs)


CoordinatorOpt = Annotated[
    str,
    typer.Option(
        "--coordinator",
        envvar=COORDINATOR_ENV,
        help="HOST:PORT of the coordinator.",
        show_default=False,
    ),
]
SecretOpt = Annotated[
    Path | None,
    path_option(
        "--secret-file",
        envvar=SECRET_ENV,
        help="File holding the shared secret (mode 0600).",
        show_default=False,
    ),
]
LogLevelOpt = Annotated[
    str, typer.Option("--log-level", help="debug, info, warning or error.", show_default=True)
]
LogJsonOpt = Annotated[bool, typer.Option("--log-json", help="Log JSON lines on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]


def err_console() -> Any:
    """rich's console on stderr (progress, notes, errors)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def out_console() -> Any:
    """rich's console on stdout (reports); piped, without trailing spaces."""
    from udpreach.render.console import report_console

    return report_console()


def one_line(message: str) -> str:
    """The first non-empty line of *message* (an error is always one line)."""
    for line in message.splitlines():
        if line.strip():
            return line.strip()
    return "error"


def note(message: str) -> None:
    """A plain line on stderr, never read as markup; on a terminal, wrapped at its width
    between words (an error stays one line, a note is read)."""
    console = err_console()
    console.soft_wrap = not console.is_terminal
    console.print(message, markup=False)


class _Stdout:
    """Whether this command has printed its JSON document (then an error after it goes to
    stderr only: stdout holds exactly one document)."""

    has_document = False


def document_printed() -> bool:
    """Whether stdout holds this command's document (or error document) already."""
    return _Stdout.has_document


def fail(message: str, code: int, *, as_json: bool = False) -> NoReturn:
    """Say *message* as one line on stderr (and, with --json, as the error document on
    stdout unless a document is already there), then exit with *code*."""
    line = one_line(message)
    if as_json and not _Stdout.has_document:
        sys.stdout.write(json.dumps({"schema": ERROR_SCHEMA, "error": line, "exit": code}) + "\n")
        sys.stdout.flush()
        _Stdout.has_document = True
    from rich.text import Text

    text = Text("udpreach: ", style="bold red")
    text.append(line)
    err_console().print(text)
    raise typer.Exit(code)


def map_error(exc: BaseException, *, as_json: bool = False) -> NoReturn:
    """The one error mapper: *exc* as one line and its exit code.

    ``UdpreachError`` carries its own exit code; an interrupt could not complete (3); a
    file the user may not use is configuration (2); any other exception is a bug, still
    one line and exit 3 (``UDPREACH_DEBUG=1`` re-raises it for its traceback).
    """
    if isinstance(exc, UdpreachError):
        fail(str(exc) or type(exc).__name__, exc.exit_code, as_json=as_json)
    if isinstance(exc, KeyboardInterrupt):
        fail("interrupted", 3, as_json=as_json)
    if isinstance(exc, PermissionError) and exc.filename:
        # A file or folder this user may not use (a service user with another's HOME, a
        # --db under /root): the configuration's, not a bug.
        fail(
            f"cannot use {exc.filename}: {exc.strerror or 'permission denied'}", 2, as_json=as_json
        )
    if os.environ.get(DEBUG_ENV) == "1":
        raise exc
    fail(
        f"internal error: {type(exc).__name__}: {exc} (run with {DEBUG_ENV}=1 for the details)",
        3,
        as_json=as_json,
    )


class _PipeSafeStdout:
    """Standard output that outlives its reader (``udpreach show RUN | head -1``).

    Python ignores SIGPIPE, so a write to a pipe whose reader has gone raises
    BrokenPipeError (and rich turns that into a silent ``exit 1``). The reader wanted no
    more, which is no failure of the command: the first write that finds the pipe closed
    points the descriptor at /dev/null, and the command carries on (exports, exit status)
    exactly as it would have, saying nothing on stderr.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
            self._stream.flush()  # what was buffered goes to /dev/null with the rest
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def pipe_safe_stdout() -> None:
    """Make ``sys.stdout`` survive its reader going away (see ``_PipeSafeStdout``)."""
    if not isinstance(sys.stdout, _PipeSafeStdout) and sys.stdout is not None:
        sys.stdout = cast(TextIO, _PipeSafeStdout(sys.stdout))


_PASS_THROUGH: tuple[type[BaseException], ...] = (
    typer.Exit,
    typer.Abort,
    click_errors.ClickException,
)


# Options a user may have set in the environment and forgotten, and the errors their value
# can cause: (parameter, option, variable, errors it causes, what a ConfigError about it says).
_FROM_ENV: tuple[tuple[str, str, str, tuple[type[UdpreachError], ...], str], ...] = (
    ("coordinator", "--coordinator", COORDINATOR_ENV, (UnreachableError,), "--coordinator"),
    ("secret_file", "--secret-file", SECRET_ENV, (AuthError,), "secret file"),
)


def _from_environment(param: str) -> bool:
    """Whether the running command took *param* from its environment variable."""
    try:  # typer 0.28 vendors click; older releases depend on it
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - depends on the installed typer
        from click import get_current_context  # type: ignore[no-redef,import-not-found,unused-ignore]
    ctx = get_current_context(silent=True)
    if ctx is None:
        return False
    source = ctx.get_parameter_source(param)
    return source is not None and source.name == "ENVIRONMENT"


def _naming_the_environment(exc: BaseException) -> BaseException:
    """*exc*, its message naming the environment variable its cause came from (a value
    set in the environment and forgotten is the hardest to find)."""
    if not isinstance(exc, UdpreachError):
        return exc
    text = str(exc)
    for param, flag, var, causes, marker in _FROM_ENV:
        caused = isinstance(exc, causes) or (isinstance(exc, ConfigError) and marker in text)
        if isinstance(exc, ConnectionLostError):  # it was reached: the address is not why
            caused = False
        if caused and var not in text and _from_environment(param):
            named = "" if flag in text else f"{flag} "
            exc.args = (f"{text} ({named}from {var})",)
            break
    return exc


def mapped(fn: Callable[P, T]) -> Callable[P, T]:
    """Decorate a command: every error it raises goes through ``map_error`` (``--json``
    taken from its ``as_json`` parameter)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        _Stdout.has_document = False
        try:
            return fn(*args, **kwargs)
        except _PASS_THROUGH:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            map_error(_naming_the_environment(exc), as_json=bool(kwargs.get("as_json", False)))

    return wrapper


def parse_endpoint(text: str, what: str, *, listen: bool = False) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); port 0 (any free port) only where
    ``listen``ing.

    Raises:
        ConfigError: not of that form, or the port is out of range.
    """
    host, sep, port_s = text.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
    port = int(port_s)
    lowest = 0 if listen else 1
    if not lowest <= port <= 65535:
        raise ConfigError(f"{what}: port {port} out of range ({lowest}-65535)")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if bracketed or ":" in host:  # only an IPv6 address holds colons
        import ipaddress

        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"{what} must be HOST:PORT (an IPv6 address in brackets: [::1]:7870), got {text!r}"
            ) from None
    return host, port


def check_log_level(level: str) -> str:
    from udpreach.logs import LEVELS

    if level.lower() not in LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LEVELS)}")
    return level.lower()


def print_json(obj: Any) -> None:
    """The command's JSON document on stdout (one line)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
    _Stdout.has_document = True
