"""Progress on a terminal: one live rich display with a line per table (rows done of total,
rows/s, ETA, quarantined so far); log lines print above it."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

from flux_migrate.pipeline.logs import console


class Progress(Protocol):
    def start(self, table: str, total: int) -> None: ...
    def advance(self, table: str, rows: int, quarantined: int = 0) -> None: ...
    def finish(self, table: str) -> None: ...


class NoProgress:
    """No display (not a terminal, ``--no-progress``, or JSON logs)."""

    def start(self, table: str, total: int) -> None:
        pass

    def advance(self, table: str, rows: int, quarantined: int = 0) -> None:
        pass

    def finish(self, table: str) -> None:
        pass

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass


def compact(n: float) -> str:
    """A count in at most 6 characters: 9,999, 123.4k, 9.50M (the summary has exact ones)."""
    if n < 10_000:
        return f"{n:,.0f}"
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.2f}M" if n < 100_000_000 else f"{n / 1_000_000:,.0f}M"


class _Rows(ProgressColumn):
    """Rows done of total, compact so that a line fits 80 columns."""

    def render(self, task: Task) -> Text:
        total = compact(task.total) if task.total is not None else "?"
        return Text(f"{compact(task.completed)}/{total}", style="progress.download")


class _Rate(ProgressColumn):
    """Rows per second over the table's run so far."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed
        rate = task.completed / elapsed if elapsed else 0.0
        return Text(f"{compact(rate)} rows/s", style="progress.data.speed")


class _Quarantined(ProgressColumn):
    """Rows quarantined so far in this run; highlighted once there are any."""

    def render(self, task: Task) -> Text:
        count = int(task.fields.get("quarantined", 0))
        return Text(f"{count:,} quarantined", style="yellow" if count else "dim")


class LiveProgress:
    """One live display on the shared stderr console, a line per table; use it as a context
    manager around the run (the display stops, leaving its last state, on exit)."""

    def __init__(self, out: Console | None = None) -> None:
        self._bars = RichProgress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(bar_width=10),
            _Rows(),
            _Rate(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            _Quarantined(),
            console=out or console(),
            refresh_per_second=8,
        )
        self._tasks: dict[str, TaskID] = {}
        self._quarantined: dict[str, int] = {}

    def __enter__(self) -> LiveProgress:
        self._bars.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._bars.stop()

    def start(self, table: str, total: int) -> None:
        self._quarantined[table] = 0
        self._tasks[table] = self._bars.add_task(table, total=total, quarantined=0)

    def advance(self, table: str, rows: int, quarantined: int = 0) -> None:
        self._quarantined[table] += quarantined
        self._bars.update(self._tasks[table], advance=rows, quarantined=self._quarantined[table])

    def finish(self, table: str) -> None:
        self._bars.stop_task(self._tasks[table])
        self._bars.refresh()


def progress_display(enabled: bool) -> LiveProgress | NoProgress:
    """The live display when ``enabled`` and stderr is a terminal, else nothing."""
    if enabled and console().is_terminal:
        return LiveProgress()
    return NoProgress()
