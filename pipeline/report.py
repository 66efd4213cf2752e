"""The run report: counts per table, the JSON shape of ``--report-json``, and how both print."""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import structlog
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from flux_migrate.core.errors import (
    ConfigError,
    Interrupted,
    MigrateError,
    is_driver_error,
    translate,
)


def printable(value: object) -> str:
    """``value`` as text safe for a terminal: control and other invisible characters (ESC,
    CR, newlines, bidi overrides) become escapes like ``\\x1b``, so source content cannot
    forge lines or colours."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or c in _JOINERS else c.encode("unicode_escape").decode() for c in text
    )


# Invisible but harmless: they join emoji and letters (👩‍💻) and cannot move text around.
_JOINERS = frozenset("\u200c\u200d")


def check_report_path(path: Path | None) -> None:
    """Refuse, before anything runs, a --report-json path that cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"--report-json {path} is a directory; name a file.")
    existed = path.exists()
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--report-json {path} cannot be written ({exc.strerror}); nothing was migrated."
        ) from None
    if not existed:
        path.unlink()


def print_table(
    rows: Sequence[Sequence[str]], out: TextIO | None = None, *, align: str | None = None
) -> None:
    """Print rows as a rich table, the first row its header. ``align`` has one letter per
    column, "l" (left) or "r" (right); by default the first column is left-aligned and the
    others right-aligned (numbers). Cells are plain text, never markup. On a terminal the
    table fits its width (long cells wrap); otherwise every cell prints whole, on one line."""
    out = out or sys.stdout  # looked up per call: stdout may be redirected after import
    header, *body = rows
    align = align or "l" + "r" * (len(header) - 1)
    utf = (getattr(out, "encoding", None) or "utf-8").lower().replace("-", "") == "utf8"
    rule = box.SIMPLE_HEAD if utf else box.ASCII2  # no box drawing characters without UTF-8
    table = Table(box=rule, header_style="bold", pad_edge=False, show_edge=False)
    for i, (name, a) in enumerate(zip(header, align, strict=True)):
        # Never cut a name: the first column (the table) keeps its width, others fold.
        table.add_column(
            Text(name), justify="left" if a == "l" else "right", no_wrap=i == 0, overflow="fold"
        )
    for row in body:
        table.add_row(*(Text(printable(cell)) for cell in row))
    console = Console(file=out, highlight=False)
    if console.is_terminal:
        if console.measure(table).maximum >= console.width:
            table.padding = (0, 1, 0, 0)  # columns two apart, not three, before any header wraps
        console.print(table)
        return
    plain = Console(file=io.StringIO(), width=100_000, color_system=None)
    with plain.capture() as captured:
        plain.print(table)
    out.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


@dataclass
class TableReport:
    extracted: int = 0
    loaded: int = 0
    quarantined: int = 0
    skipped: int = 0
    seconds: float = 0.0
    up_to_date: bool = False
    requeued: int = 0  # quarantined rows of earlier runs loaded now (fixed in the source)
    total_loaded: int | None = None  # loaded by every run of this table (its checkpoint)

    @property
    def rows_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "extracted": self.extracted,
            "loaded": self.loaded,
            "quarantined": self.quarantined,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class RunReport:
    run_id: str
    status: str = "running"  # running | completed | failed | interrupted
    tables: dict[str, TableReport] = field(default_factory=dict)
    message: str = ""
    constraints_seconds: float = 0.0
    quarantined_open: int = 0  # rows quarantined by any run and not loaded since
    notes: list[str] = field(default_factory=list)  # sentences printed after the summary
    # (table, key, kind): rows left as PostgreSQL has them (JSONL reconcile; sync exits 4)
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def quarantined(self) -> int:
        return sum(t.quarantined for t in self.tables.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "message": self.message,
            "quarantined_open": self.quarantined_open,
            "tables": {name: t.as_json() for name, t in self.tables.items()},
            "notes": list(self.notes),
            "conflicts": [list(c) for c in self.conflicts],
        }


_UNFINISHED = {
    "failed": "This run FAILED (the error is on stderr): the counts are what it committed.",
    "interrupted": "This run was INTERRUPTED: the counts are what it committed; rerun to resume.",
}


def print_summary(report: RunReport, out: TextIO | None = None) -> None:
    """The summary table of a run (a run that did not finish says so first; a resumed run
    adds what every run together loaded), and the time the keys took."""
    out = out or sys.stdout
    if report.status in _UNFINISHED:
        out.write(_UNFINISHED[report.status] + "\n")
    totals = any(
        t.total_loaded is not None and t.total_loaded != t.loaded for t in report.tables.values()
    )
    header = ("table", "read", "loaded", "not loaded", "seconds", "rows/s")
    rows: list[tuple[str, ...]] = [header + (("total loaded",) if totals else ())]
    for name, t in report.tables.items():
        row: tuple[str, ...] = (
            name,
            f"{t.extracted:,}",
            f"{t.loaded:,}",
            f"{t.quarantined + t.skipped:,}",
            f"{t.seconds:.1f}",
            f"{t.rows_per_second:,.0f}",
        )
        if totals:
            row += (f"{t.total_loaded:,}" if t.total_loaded is not None else "",)
        rows.append(row)
    print_table(rows, out)
    if report.constraints_seconds:
        out.write(f"keys and index built after the load in {report.constraints_seconds:.1f} s\n")
    for note in report.notes:
        out.write(printable(note) + "\n")


_log = structlog.get_logger("flux_migrate")


def record_failure(report: RunReport, exc: Exception, where: str) -> Exception:
    """Record a failed or interrupted run in the report and the log; return the error to raise
    (a driver error no stage handled becomes one sentence; anything else is a bug, as is)."""
    if isinstance(exc, MigrateError):
        error = exc
    elif is_driver_error(exc):
        error = translate(exc, where)
    else:
        return exc
    report.status = "interrupted" if isinstance(error, Interrupted) else "failed"
    report.message = error.message
    _log.error("run_failed", error=error.message, status=report.status)
    return error


def record_completion(report: RunReport) -> None:
    """Mark the run completed and log its totals."""
    report.status = "completed"
    _log.info(
        "run_completed",
        extracted=sum(t.extracted for t in report.tables.values()),
        loaded=sum(t.loaded for t in report.tables.values()),
        quarantined=report.quarantined,
    )
