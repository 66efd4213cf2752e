"""Logging: structlog configured once. Human-readable lines through rich's console (above the
live progress display on a terminal), or JSON lines on request."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import structlog
from rich.console import Console
from rich.text import Text

from flux_migrate.core.dsn import redact

# Writes to whatever sys.stderr is at the time of each write (rich looks it up per call).
_CONSOLE = Console(stderr=True, soft_wrap=True, highlight=False)


def console() -> Console:
    """The one rich console on stderr: log lines and the progress display share it, so that
    log lines print above the display instead of between its redraws."""
    return _CONSOLE


class ConsoleLogger:
    """A structlog logger that prints each rendered event through the shared rich console."""

    def msg(self, message: str) -> None:
        out = console()
        out.print(Text.from_ansi(message) if out.is_terminal else Text(message))

    debug = info = warning = warn = error = critical = exception = fatal = failure = msg


def _console_logger(*_: Any) -> ConsoleLogger:
    return ConsoleLogger()


def _redact_values(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = redact(value)
    return event_dict


def _drop_run_id(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict.pop("run_id", None)
    return event_dict


def _drop_zero_counts(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """For people: a count of 0, or a resume point at the very start, says nothing (JSON
    keeps every key)."""
    for key, value in list(event_dict.items()):
        if type(value) is int and (value == 0 or (key.startswith("after_") and value < 0)):
            del event_dict[key]
    return event_dict


def add_log_arguments(p: argparse.ArgumentParser) -> None:
    """The output options every command takes: --log-format, -v and -q."""
    p.add_argument(
        "--log-format",
        choices=("console", "json"),
        help="console (default): readable lines, info and above; json: every event, debug too",
    )
    loud = p.add_mutually_exclusive_group()
    loud.add_argument(
        "-v", "--verbose", action="store_true", help="also log each batch (debug events)"
    )
    loud.add_argument("-q", "--quiet", action="store_true", help="log errors only")


def level_for(log_format: str, *, verbose: bool = False, quiet: bool = False) -> int:
    """The lowest level logged: errors with ``quiet``; else every event in JSON or with
    ``verbose``; else info (one line per table and per run, warnings)."""
    if quiet:
        return logging.ERROR
    if verbose or log_format == "json":
        return logging.DEBUG
    return logging.INFO


def configure_for(args: argparse.Namespace) -> str:
    """Configure logging from a command's parsed --log-format, -v, -q and --no-progress (each
    optional)."""
    return configure(
        getattr(args, "log_format", None),
        verbose=getattr(args, "verbose", False),
        quiet=getattr(args, "quiet", False),
        display=not getattr(args, "no_progress", True),
    )


# What the live display shows as it happens (a table's start, rows and end; the summary then
# has the counts): on a terminal with the display, not repeated as log lines.
SHOWN_BY_DISPLAY = frozenset({"table_started", "table_completed", "table_synced"})


def _shown_by_display(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    if event_dict.get("event") in SHOWN_BY_DISPLAY and event_dict.get("level") == "info":
        raise structlog.DropEvent
    return event_dict


def configure(
    log_format: str | None = None,
    *,
    verbose: bool = False,
    quiet: bool = False,
    display: bool = False,
) -> str:
    """Configure structlog for the process; returns the format chosen ("console" or "json").

    Console (the default, on a terminal or not) shows info and above (the progress display
    shows batches), with colours only on a terminal; JSON is one object per line and keeps
    every event. ``verbose`` adds the debug events, ``quiet`` keeps only errors. Everything
    goes to stderr; stdout carries the summary.
    """
    fmt = "json" if log_format == "json" else "console"
    on_terminal = fmt == "console" and console().is_terminal
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        # On a terminal, where people read as it runs: the time of day, no run id.
        structlog.processors.TimeStamper(fmt="%H:%M:%S" if on_terminal else "iso", utc=True),
        _redact_values,
    ]
    if on_terminal:
        processors.append(_drop_run_id)
        if display and not verbose:  # the live display shows these; -v keeps every line
            processors.append(_shown_by_display)
    factory: Any
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer())
        factory = structlog.PrintLoggerFactory(sys.stderr)
    else:
        colors = on_terminal and console().color_system is not None
        processors.append(_drop_zero_counts)
        # Compact, to fit 80 columns: no padding, keys in the order the event gives them.
        processors.append(
            structlog.dev.ConsoleRenderer(
                colors=colors, pad_event_to=0, pad_level=False, sort_keys=False
            )
        )
        factory = _console_logger
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            level_for(fmt, verbose=verbose, quiet=quiet)
        ),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    return fmt
