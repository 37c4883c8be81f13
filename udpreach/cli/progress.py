"""The live progress of a run on stderr, made to fit whatever terminal it is on.

Three ways to show it, chosen by what stderr is:

- an interactive terminal: one line redrawn in place, never wider than the terminal (the
  pieces that do not fit are left out, least useful first; the bar takes what is left), and
  gone when the run ends;
- a terminal that cannot redraw (``TERM=dumb``): a plain line when a round starts, and at
  most one every ``PLAIN_EVERY`` seconds in between;
- anything else (a pipe, a file, CI): nothing, and rich is not even imported.

Notices (Ctrl-C was seen, ...) print above the live line, or as plain lines.
"""

from __future__ import annotations

import math
import sys
import time
from types import TracebackType
from typing import Any

PLAIN_EVERY = 10.0
WAITING_AFTER = 1.0  # seconds without a progress message before ``waiting`` is said


def _count(value: Any) -> int:
    """A progress counter as an int (0 for anything a coordinator should not have sent)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _elapsed(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# What the engine does after its rounds, named for the progress line (``Sweep.progress``).
_STAGES = {
    "recheck": "recheck",
    "icmp": "icmp tests",
    "pilot": "pilot",
    "outage": "stopped: looking again",
}


class RunProgress:
    """What the coordinator last said about the run, and how long it has taken."""

    def __init__(self, waiting: str = "") -> None:
        self.started = time.monotonic()
        # What to say before the run starts, once that takes a while (``run --wait``: the
        # coordinator waits for the agent to register or to be free).
        self.waiting = waiting
        self.heard = False  # a progress message came
        self.round = 0
        self.stage = ""
        self.cells = 0
        self.settled = 0
        self.sent = 0
        self.open = 0
        self.rate = 0
        self.icmp_until: float | None = None  # when the ICMP budget ends (our clock)

    def update(self, p: dict[str, Any]) -> None:
        self.heard = True
        self.round = _count(p.get("round"))
        stage = p.get("stage")
        self.stage = stage if isinstance(stage, str) and stage in _STAGES else ""
        self.cells = _count(p.get("cells"))
        self.settled = min(_count(p.get("settled")), self.cells) if self.cells else 0
        self.sent = _count(p.get("sent"))
        self.open = _count(p.get("open"))
        self.rate = _count(p.get("rate"))
        left = p.get("icmp_left")
        self.icmp_until = None
        if self.stage == "icmp" and isinstance(left, int) and not isinstance(left, bool):
            self.icmp_until = time.monotonic() + left

    def pieces(self, now: float) -> tuple[str, str, str, list[str]]:
        """(head, counts, elapsed, optional extras in the order they are given up)."""
        head = _STAGES.get(self.stage) or (f"round {self.round}" if self.round else "starting")
        if not self.heard and self.waiting and now - self.started >= WAITING_AFTER:
            head = self.waiting
        if self.icmp_until is not None:  # the count stands still there: say how long yet
            head += f" ({max(0, math.ceil(self.icmp_until - now))}s left)"
        counts = f"{self.settled:,}/{self.cells:,}" if self.cells else ""
        extras = [f"{self.open:,} open", f"{self.sent:,} sent", f"{self.rate:,}/s"]
        return head, counts, _elapsed(now - self.started), extras

    def plain(self, now: float) -> str:
        head, counts, elapsed, extras = self.pieces(now)
        text = f"{head}: {counts} cells settled, " if counts else f"{head}: "
        return text + ", ".join(extras) + f" ({elapsed})"


def fit_line(state: RunProgress, width: int, now: float, unicode: bool = True) -> list[Any]:
    """The live line as (text, style) segments, at most ``width - 1`` cells wide (the last
    column is left free: some terminals wrap when it is written)."""
    room = max(1, width - 1)
    head, counts, elapsed, extras = state.pieces(now)
    settled = f"{counts} cells settled" if counts else ""
    bar_min = 6
    # Most useful first: head, elapsed, counts, the bar, then open / sent / rate.
    for keep, label, bar in (
        (3, settled, True),
        (2, settled, True),
        (1, settled, True),
        (0, settled, True),
        (0, counts, True),
        (0, counts, False),
        (0, "", False),
    ):
        parts = [head, label, *extras[:keep], elapsed]
        parts = [p for p in parts if p]
        fixed = sum(len(p) for p in parts) + (len(parts) - 1)
        need = fixed + (bar_min + 1 if bar else 0)
        if need <= room:
            break
    else:
        return [(_elapsed(now - state.started)[:room], "")]
    segs: list[Any] = [(head, "bold"), (" ", "")]
    if bar:
        n = min(40, room - fixed - 1)
        done = round(n * state.settled / state.cells) if state.cells else 0
        full, empty = ("━", "─") if unicode else ("#", "-")
        segs += [(full * done, "green"), (empty * (n - done), "grey50"), (" ", "")]
    rest = parts[1:]
    for i, p in enumerate(rest):
        style = "yellow" if i == len(rest) - 1 else ""
        segs.append((p, style))
        if i < len(rest) - 1:
            segs.append((" ", ""))
    return segs


class _Line:
    """A renderable that lays the line out for the width rich gives it, at each refresh."""

    def __init__(self, state: RunProgress) -> None:
        self.state = state

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.text import Text

        unicode = (console.encoding or "").lower().startswith("utf")
        text = Text(no_wrap=True, overflow="crop")
        for chunk, style in fit_line(self.state, options.max_width, time.monotonic(), unicode):
            text.append(chunk, style=style or None)
        yield text


class ProgressDisplay:
    """Context manager: the run's live progress on stderr; ``update`` takes the
    coordinator's progress messages, ``notice`` prints a line."""

    def __init__(self, waiting: str = "") -> None:
        self.state = RunProgress(waiting)
        self._mode = "quiet"
        self._live: Any = None
        self._console: Any = None
        self._last_plain = float("-inf")
        self._last_round: tuple[int, str] = (-1, "")
        if sys.stderr.isatty():
            from udpreach.cli.common import err_console

            self._console = err_console()
            self._mode = "live" if self._console.is_interactive else "plain"

    def __enter__(self) -> ProgressDisplay:
        if self._mode == "live":
            from rich.live import Live

            self._live = Live(
                _Line(self.state),
                console=self._console,
                transient=True,
                refresh_per_second=4,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def update(self, p: dict[str, Any]) -> None:
        self.state.update(p)
        if self._mode == "plain":
            now = time.monotonic()
            key = (self.state.round, self.state.stage)
            if key != self._last_round or now - self._last_plain >= PLAIN_EVERY:
                self._last_round = key
                self._last_plain = now
                self._console.print(self.state.plain(now), markup=False, highlight=False)
        elif self._live is not None:
            self._live.refresh()

    def notice(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, markup=False, highlight=False)
