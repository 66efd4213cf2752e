"""Errors and the one place that maps driver exceptions to fatal, transient or data errors."""

from __future__ import annotations

import asyncio
import sqlite3
from enum import Enum

import anyio
import asyncpg

from core.dsn import redact

# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_QUARANTINED = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class MigrateError(Exception):
    """An error with a one-sentence message meant for the user, and the exit code it maps to."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(MigrateError):
    """Bad settings, arguments or configuration file."""

    exit_code = EXIT_USAGE


class SourceError(MigrateError):
    """The SQLite source is missing, unreadable, or not the app's schema."""

    exit_code = EXIT_USAGE


class TargetError(MigrateError):
    """The target refuses the run before anything is written (auth, conflicts, fingerprints)."""

    exit_code = EXIT_USAGE


class RuntimeFailure(MigrateError):
    """The run started and could not finish (PostgreSQL gone too long, accounting broken)."""

    exit_code = EXIT_FAILURE


class Interrupted(MigrateError):
    """SIGINT or SIGTERM stopped the run at a batch boundary."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ErrorClass(Enum):
    FATAL = "fatal"
    TRANSIENT = "transient"
    DATA = "data"  # a value the server refused: isolate the row, quarantine it


_TRANSIENT_SQLSTATES = {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now
    "57014",  # query_canceled (statement timeout)
    "53300",  # too_many_connections
}


def classify(exc: BaseException) -> ErrorClass:
    """Map a driver or OS exception to fatal, transient or data; the only place that looks."""
    if isinstance(exc, asyncpg.exceptions._base.DataError):
        return ErrorClass.DATA  # the driver could not encode a value
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        if state in _TRANSIENT_SQLSTATES or state.startswith("08"):
            return ErrorClass.TRANSIENT
        if state.startswith("22") or state in {"23502", "23503", "23505", "23514"}:
            return ErrorClass.DATA
        return ErrorClass.FATAL
    if isinstance(
        exc,
        (
            asyncpg.exceptions.ConnectionDoesNotExistError,
            asyncpg.exceptions.InterfaceError,
            ConnectionError,
            TimeoutError,
            asyncio.TimeoutError,
            OSError,
        ),
    ):
        return ErrorClass.TRANSIENT
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return ErrorClass.TRANSIENT
    return ErrorClass.FATAL


def describe_connect_error(exc: BaseException, where: str) -> MigrateError:
    """Turn a failure to connect to PostgreSQL into one sentence with what to do.

    A DSN the driver cannot parse is described without the driver's message, which quotes
    pieces of the DSN (a password with a raw ``#`` or ``/`` shows up as a port number)."""
    if isinstance(exc, ValueError | TypeError | asyncpg.ClientConfigurationError):
        return TargetError(
            f"The PostgreSQL DSN for {where} cannot be parsed; write it as"
            " postgresql://user:password@host:port/dbname and percent-encode any # / ? @ % or"
            " space in the user or password (e.g. # as %23)."
        )
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return TargetError(
            f"PostgreSQL at {where} refused the password; check the DSN or PGPASSWORD."
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return TargetError(
            f"The database named in the DSN does not exist at {where}; create it first."
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return TargetError(f"PostgreSQL at {where} refused the user: {redact(str(exc))}.")
    if isinstance(exc, asyncpg.PostgresError):
        return TargetError(f"PostgreSQL at {where} refused the connection: {redact(str(exc))}.")
    return RuntimeFailure(
        f"PostgreSQL at {where} cannot be reached ({type(exc).__name__}: {redact(str(exc))});"
        " check that it is running and the DSN is right, then rerun to resume."
    )


def single_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real exception inside a task group's exception group (or the group itself)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    # A failing consumer closes the buffer, so the producer's BrokenResourceError is a symptom.
    causes = [
        e
        for e in leaves
        if not isinstance(e, (anyio.BrokenResourceError, anyio.ClosedResourceError))
    ]
    for exc in causes:
        if isinstance(exc, MigrateError):
            return exc
    return causes[0] if len(causes) == 1 else group


def translate(exc: BaseException, where: str) -> MigrateError:
    """One sentence for a driver error no stage handled (privileges, disk full, SQLite I/O)."""
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return TargetError(
            f"PostgreSQL at {where} refused a privilege ({redact(str(exc))}); the role needs CREATE"
            " on the database and the target schema, or an administrator must create them."
        )
    if isinstance(exc, asyncpg.PostgresError):
        return RuntimeFailure(
            f"PostgreSQL at {where} failed the run: {redact(str(exc))} (SQLSTATE"
            f" {getattr(exc, 'sqlstate', '?')}); fix the cause and rerun to resume."
        )
    if isinstance(exc, sqlite3.Error):
        return RuntimeFailure(
            f"Reading the SQLite file failed ({exc}); fix the cause and rerun to resume."
        )
    return RuntimeFailure(f"The run failed: {type(exc).__name__}: {redact(str(exc))}.")
