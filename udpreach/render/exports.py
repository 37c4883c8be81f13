"""The report files a command writes: JUnit, Markdown, CSV and HTML, of a run or of a diff.

Each format has its own module (``junit``, ``markdown``, ``csv``, ``html``) that renders a
document and nothing else; ``write_reports`` writes whichever files were asked for. A
writer is imported only when its file is asked for (Jinja2, for one, is not cheap).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from udpreach.core.diff import diff_runs
from udpreach.core.errors import ConfigError
from udpreach.core.expect import ExpectEntry

# The diff's home is udpreach.core.diff; the CLI's `diff` command imports it from here.
__all__ = ["diff_runs", "write_reports"]


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
    try:
        if junit:
            from udpreach.render.junit import write_junit

            write_junit(doc, entries, junit)
        if markdown:
            from udpreach.render.markdown import write_markdown

            write_markdown(doc, markdown)
        if csv_out:
            from udpreach.render.csv import write_csv

            write_csv(doc, csv_out)
        if html:
            from udpreach.render.html import write_html

            write_html(doc, html)
    except OSError as exc:
        raise ConfigError(f"cannot write report: {exc}") from None
