"""Logging: structlog configured once; console on a terminal, JSON lines otherwise or on request."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from core.dsn import redact


def _redact_values(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = redact(value)
    return event_dict


def resolve_format(log_format: str | None) -> str:
    if log_format in ("console", "json"):
        return log_format
    return "console" if sys.stderr.isatty() else "json"


def configure(log_format: str | None = None) -> str:
    """Configure structlog for the process; returns the format chosen ("console" or "json").

    Console shows info and above (the progress bar shows batches); JSON shows one event per
    batch as well. Everything goes to stderr; stdout carries the summary.
    """
    fmt = resolve_format(log_format)
    level = logging.INFO if fmt == "console" else logging.DEBUG
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_values,
    ]
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer())
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    return fmt
