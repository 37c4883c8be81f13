"""The report files a command writes: JUnit, Markdown, CSV and HTML, of a run or of a diff.

Each format has its own module (``junit``, ``markdown``, ``csv``, ``html``) that renders a
document and nothing else; ``write_reports`` writes whichever files were asked for. A
writer is imported only when its file is asked for (Jinja2, for one, is not cheap). A file
given as ``-`` is standard output (one at most, and not with ``--json``): the command then
prints its terminal report on standard error (``to_stdout``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from udpreach.core.diff import diff_runs
from udpreach.core.errors import ConfigError
from udpreach.core.expect import ExpectEntry

# The diff's home is udpreach.core.diff; the CLI's `diff` command imports it from here.
__all__ = ["check_report_paths", "diff_runs", "to_stdout", "write_reports"]

STDOUT = "-"  # a report file given as this is standard output


def to_stdout(as_json: bool, *paths: Path | None) -> bool:
    """Whether one of the report files is standard output (``-``).

    Raises:
        ConfigError: two of them are, or one is and ``--json`` writes standard output too.
    """
    there = [p for p in paths if p is not None and str(p) == STDOUT]
    if len(there) > 1:
        raise ConfigError("only one report can be written to standard output (-)")
    if there and as_json:
        raise ConfigError("--json writes standard output: give the report a file name, not -")
    return bool(there)


def _write(writer: Callable[[Path], None], path: Path) -> None:
    """``writer(path)``, or for ``-`` into a file of its own and then to standard output.
    A file this made and could not finish (a full disk) is removed, not left empty."""
    if str(path) != STDOUT:
        try:
            existed = path.exists()
        except OSError:
            existed = True  # not ours to judge: leave whatever is there
        try:
            writer(path)
        except BaseException:
            if not existed:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        return
    with tempfile.TemporaryDirectory(prefix="udpreach-") as tmp:
        out = Path(tmp) / "report"
        writer(out)
        text = out.read_text(encoding="utf-8")
    sys.stdout.write(text)
    sys.stdout.flush()


def write_reports(
    doc: dict[str, Any],
    entries: Sequence[ExpectEntry] | None,
    junit: Path | None = None,
    markdown: Path | None = None,
    csv_out: Path | None = None,
    html: Path | None = None,
) -> None:
    """Write whichever report files were asked for (a run or a diff document).

    Raises:
        ConfigError: a file cannot be written.
    """
    flag = ""
    try:
        if junit:
            from udpreach.render.junit import write_junit

            flag = f"--junit {junit}"
            _write(lambda p: write_junit(doc, entries, p), junit)
        if markdown:
            from udpreach.render.markdown import write_markdown

            flag = f"--markdown {markdown}"
            _write(lambda p: write_markdown(doc, p), markdown)
        if csv_out:
            from udpreach.render.csv import write_csv

            flag = f"--csv {csv_out}"
            _write(lambda p: write_csv(doc, p), csv_out)
        if html:
            from udpreach.render.html import write_html

            flag = f"--html {html}"
            _write(lambda p: write_html(doc, p), html)
    except OSError as exc:
        raise ConfigError(f"cannot write {flag}: {exc.strerror or exc}") from None


def check_report_paths(
    junit: Path | None = None,
    markdown: Path | None = None,
    csv_out: Path | None = None,
    html: Path | None = None,
) -> None:
    """Refuse report files that cannot be written, before a run sends anything (a sweep
    would otherwise end with its file refused).

    Raises:
        ConfigError: the first such file, and why.
    """
    for flag, path in (("--junit", junit), ("--markdown", markdown), ("--csv", csv_out),
                       ("--html", html)):  # fmt: skip
        if path is None or str(path) == STDOUT:
            continue
        problem = _unwritable(path)
        if problem:
            raise ConfigError(f"cannot write {flag} {path}: {problem}")


def _unwritable(path: Path) -> str | None:
    try:
        if path.is_dir():
            return "it is a folder"
        folder = path.parent
        if not folder.is_dir():
            return f"there is no folder {folder}"
        if path.exists():
            return None if os.access(path, os.W_OK) else "permission denied"
    except OSError as exc:  # a name too long, a folder that cannot be searched
        return str(exc.strerror or exc)
    return None if os.access(folder, os.W_OK | os.X_OK) else f"permission denied in {folder}"
