"""Progress of a `replay-duplicates` run on stderr: sent, acknowledged, applied.

On a terminal, three rich progress bars (deliveries sent and acknowledged out
of those planned; distinct events applied out of those generated). Anywhere
else (a CI log, a file) one plain line every `every_s` seconds and one at the
end, so a long run does not flood the log with redraws.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from rich import progress as bars
from rich.console import Console
from rich.text import Text

_NAMES = ("sent", "acknowledged", "applied")


class _Rate(bars.ProgressColumn):
    def render(self, task: bars.Task) -> Text:
        speed = task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s", style="progress.data.speed")


class Progress:
    """`with Progress(deliveries=D, events=E) as p: p.update(sent, acked, applied)`.

    `update` takes running totals, not increments; call it as often as you like.
    """

    def __init__(
        self,
        deliveries: int,
        events: int,
        *,
        file: TextIO | None = None,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._file = file if file is not None else sys.stderr
        self._totals = (deliveries, deliveries, events)
        self._counts = (0, 0, 0)
        self._every_s = every_s
        self._clock = clock
        self._started = self._printed = 0.0
        console = Console(file=self._file)
        self._bars: bars.Progress | None = None
        self._tasks: list[bars.TaskID] = []
        if console.is_terminal:
            self._bars = bars.Progress(
                bars.TextColumn("{task.description:>12}"),
                bars.BarColumn(),
                bars.MofNCompleteColumn(),
                _Rate(),
                bars.TimeElapsedColumn(),
                console=console,
            )

    def __enter__(self) -> Progress:
        self._started = self._printed = self._clock()
        if self._bars is not None:
            self._bars.start()
            pairs = zip(_NAMES, self._totals, strict=True)
            self._tasks = [self._bars.add_task(name, total=total) for name, total in pairs]
        return self

    def update(self, sent: int, acked: int, applied: int) -> None:
        self._counts = (sent, acked, applied)
        if self._bars is not None:
            for task, count in zip(self._tasks, self._counts, strict=True):
                self._bars.update(task, completed=count)
            return
        now = self._clock()
        if now - self._printed >= self._every_s:
            self._printed = now
            self._print_line(now)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bars is not None:
            self._bars.stop()
        elif self._counts != (0, 0, 0):
            self._print_line(self._clock())

    def _print_line(self, now: float) -> None:
        parts = [
            f"{name} {count:,}/{total:,}"
            for name, count, total in zip(_NAMES, self._counts, self._totals, strict=True)
        ]
        print("  ".join(parts) + f"  {now - self._started:,.1f} s", file=self._file, flush=True)
