"""The console reports are printed on: rich's, on stdout.

On a terminal it is rich's own. Anywhere else (a file, a pipe) each line is written without
the spaces rich pads table rows and wrapped paragraphs with: a saved report diffs cleanly
and ``grep 'open$'`` works.
"""

from __future__ import annotations

import sys
from typing import IO, Any


class TrimmedLines:
    """A text stream that drops trailing spaces from every line it passes on.

    Text is passed on line by line as it completes; ``flush`` passes on the unfinished rest
    as it is (nothing is held back at exit).
    """

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._rest = ""

    def write(self, text: str) -> int:
        lines = (self._rest + text).split("\n")
        self._rest = lines.pop()
        if lines:
            self._out.write("\n".join(line.rstrip(" ") for line in lines) + "\n")
        return len(text)

    def flush(self) -> None:
        if self._rest:
            self._out.write(self._rest)
            self._rest = ""
        self._out.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._out.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._out, "encoding", None) or "utf-8"


def report_console(*, stderr: bool = False) -> Any:
    """rich's console on stdout (or stderr)."""
    from rich.console import Console

    out = sys.stderr if stderr else sys.stdout
    if not out.isatty():
        return Console(file=TrimmedLines(out), highlight=False)  # type: ignore[arg-type]
    return Console(stderr=stderr, highlight=False)
