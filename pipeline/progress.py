"""Progress on a terminal: one line per table with rows done of total, rows/s and ETA."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    def start(self, table: str, total: int) -> None: ...
    def advance(self, table: str, rows: int) -> None: ...
    def finish(self, table: str) -> None: ...


class NoProgress:
    def start(self, table: str, total: int) -> None:
        pass

    def advance(self, table: str, rows: int) -> None:
        pass

    def finish(self, table: str) -> None:
        pass


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class BarProgress:
    """A redrawn single-line bar per table on a terminal (stderr)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.table = ""
        self.total = 0
        self.done = 0
        self.started = 0.0
        self._last_draw = 0.0

    def start(self, table: str, total: int) -> None:
        self.table, self.total, self.done = table, total, 0
        self.started = time.monotonic()
        self._draw(force=True)

    def advance(self, table: str, rows: int) -> None:
        self.done += rows
        self._draw()

    def finish(self, table: str) -> None:
        self._draw(force=True)
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        elapsed = max(now - self.started, 1e-9)
        frac = self.done / self.total if self.total else 1.0
        filled = int(self.width * min(frac, 1.0))
        rate = self.done / elapsed
        eta = (
            _eta((self.total - self.done) / rate) if rate > 0 and self.done < self.total else "0:00"
        )
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(
            f"\r{self.table:<9} [{bar}] {self.done:>10,}/{self.total:<10,}"
            f" {rate:>9,.0f} rows/s  ETA {eta}"
        )
        self.stream.flush()
