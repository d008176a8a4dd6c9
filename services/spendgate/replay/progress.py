"""Replay's progress on stderr."""

from __future__ import annotations

import time
from typing import IO, Any


class Progress:
    """A rich bar with events/s and ETA on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, stream: IO[str], total: int, *, quiet: bool = False, every_s: float = 2.0) -> None:
        self.stream, self.total, self.quiet, self.every_s = stream, total, quiet, every_s
        self.done = 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._bar: Any = None
        self._task: Any = None
        if not quiet and stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as Bar,
            )

            self._bar = Bar(
                TextColumn("replay"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>9,.0f} events/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                console=Console(file=stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("replay", total=max(total, 1), rate=0.0)

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def advance(self, n: int) -> None:
        self.done += n
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=self.rate)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self._line()

    def _line(self) -> None:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"replay: {self.done}/{self.total} records ({pct:.1f}%), {rate:,.0f} events/s, ETA {eta:.0f}s",
            file=self.stream,
            flush=True,
        )

    def finish(self) -> float:
        elapsed = time.monotonic() - self.started
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=self.rate)
            self._bar.stop()
        return elapsed
