"""The console script's entry point (``udpreach``, ``python -m udpreach``).

SIGTERM (``timeout`` in a CI job, ``kill``, a service manager) raises KeyboardInterrupt as
Ctrl-C does, from the first moment to the last: every command then ends on it the way it
ends on Ctrl-C (one line, exit 3, with ``--json`` also the error document; the demo and
the lab take their namespaces down on the way out), never silently with 143. ``run`` and
the services take both signals over while they run (see ``udpreach.net.blocking`` and
``udpreach.cli.service``).

``udpreach.cli`` takes about a tenth of a second to import (typer and the commands), and
no command's error handling exists in that time: an interrupt then is answered here, in the
same words. Only the interpreter's own start (some 20-40 ms, before any udpreach code)
remains Python's.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from types import FrameType
from typing import NoReturn

ERROR_DOCUMENT = '{"schema": "udpreach/error-v1", "error": "interrupted", "exit": 3}'


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Load the command line with interrupts handled, then hand over to it."""
    with contextlib.suppress(ValueError, OSError):  # not the main thread: nothing to guard
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        from udpreach.cli import main as cli_main
    except KeyboardInterrupt:
        interrupted(sys.argv[1:])
    try:
        cli_main()
    except KeyboardInterrupt:  # outside every command's own handling (see cli.main)
        from udpreach.cli.common import document_printed

        interrupted(sys.argv[1:], document_printed=document_printed())


def interrupted(argv: list[str], *, document_printed: bool = False) -> NoReturn:
    """End a command interrupted outside its own error handling, as that would: one line,
    exit 3, and with ``--json`` the error document (unless a document is out already)."""
    words = argv[: argv.index("--")] if "--" in argv else argv
    if "--json" in words and not document_printed:
        sys.stdout.write(ERROR_DOCUMENT + "\n")
        sys.stdout.flush()
    sys.stderr.write("udpreach: interrupted\n")
    sys.exit(3)
