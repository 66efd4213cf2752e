"""Errors, and the one module that inspects driver exceptions: it maps them to fatal,
transient or data (``classify``) and to one sentence for the user (``translate``)."""

from __future__ import annotations

import asyncio
import sqlite3
from enum import Enum

import anyio
import asyncpg

from flux_migrate.core.dsn import redact

# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_QUARANTINED = 3
EXIT_CONFLICTS = 4  # sync: rows changed both in the source and in PostgreSQL, left alone
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
    """The target or the source refuses the run: authentication, a missing privilege, rows this
    tool did not write, target columns that cannot hold the values, a fingerprint from another
    source or other settings. Raised at preflight, before any row is written, except a privilege
    PostgreSQL refuses later in the run: batches committed before it stay committed and
    consistent, and a rerun resumes after them."""

    exit_code = EXIT_USAGE


class RefusedConnection(TargetError):
    """The server answered and refused the login (password, role, database, pg_hba.conf)."""


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
# not_null, foreign_key, unique (a key that arrives after the keys exist: quarantined as
# duplicate_key), check violations, and program_limit_exceeded, which at COPY is one row too
# big for a page (a wide table) or a jsonb or string too long: that row is quarantined
_DATA_SQLSTATES = {"23502", "23503", "23505", "23514", "54000"}
UNIQUE_VIOLATION = "23505"
FOREIGN_KEY_VIOLATION = "23503"
DUPLICATE_OBJECT = "42710"

# Primary SQLite result codes (an extended code keeps the primary one in its low byte).
SQLITE_BUSY = 5
SQLITE_LOCKED = 6

# A connection that failed in the middle of an operation keeps its protocol in that operation
# ("cannot switch to state N; another operation is in progress"): it is broken, not the query.
_BROKEN_CONNECTION = (
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions._base.InternalClientError,
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,
    OSError,
)


def sqlstate(exc: BaseException) -> str:
    """The SQLSTATE of a PostgreSQL error ("" for anything else)."""
    return (getattr(exc, "sqlstate", "") or "") if isinstance(exc, asyncpg.PostgresError) else ""


def sqlite_busy(exc: BaseException) -> bool:
    """Whether a SQLite error says another connection holds a lock (SQLITE_BUSY or _LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.Error)
        and code is not None
        and code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)
    )


def is_driver_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an error PostgreSQL or SQLite reported (``translate`` has a sentence)."""
    return isinstance(exc, (asyncpg.PostgresError, sqlite3.Error))


def is_lost_connection(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection to PostgreSQL broke (the network, the server gone,
    or a connection left in the middle of a failed operation)."""
    return isinstance(exc, _BROKEN_CONNECTION) or sqlstate(exc).startswith("08")


def classify(exc: BaseException) -> ErrorClass:
    """Map a driver or OS exception to fatal, transient or data, by SQLSTATE or SQLite result
    code, never by message text. TRANSIENT means: drop the connection, open a new one, retry."""
    if isinstance(exc, asyncpg.exceptions._base.DataError):
        return ErrorClass.DATA  # the driver could not encode a value
    if isinstance(exc, asyncpg.PostgresError):
        state = sqlstate(exc)
        if state in _TRANSIENT_SQLSTATES or state.startswith("08"):
            return ErrorClass.TRANSIENT
        if state.startswith("22") or state in _DATA_SQLSTATES:
            return ErrorClass.DATA
        return ErrorClass.FATAL
    if isinstance(exc, _BROKEN_CONNECTION) or sqlite_busy(exc):
        return ErrorClass.TRANSIENT
    return ErrorClass.FATAL


def is_unique_violation(exc: BaseException) -> bool:
    """Whether PostgreSQL refused a row or a key because a key value repeats (SQLSTATE 23505)."""
    return sqlstate(exc) == UNIQUE_VIOLATION


def already_exists(exc: BaseException) -> bool:
    """Whether PostgreSQL refused to create an object because it exists (SQLSTATE 42710)."""
    return sqlstate(exc) == DUPLICATE_OBJECT


def constraint_failure(exc: BaseException, name: str) -> MigrateError | None:
    """The sentence for rows that break the key or foreign key ``name`` being built (None when
    ``exc`` is something else)."""
    detail = getattr(exc, "detail", None) or exc
    if sqlstate(exc) == UNIQUE_VIOLATION:
        return RuntimeFailure(
            f"Building {name} found duplicate keys ({detail}); the target holds rows"
            " twice, which flux-migrate never writes: was it loaded by another tool too?"
        )
    if sqlstate(exc) == FOREIGN_KEY_VIOLATION:
        return RuntimeFailure(
            f"Building {name} found rows whose foreign key names no loaded parent row"
            f" ({detail}); rerun to resume, or report this if it repeats."
        )
    return None


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


def translate(exc: BaseException, where: str, *, connecting: bool = False) -> MigrateError:
    """The one sentence, with what to do, for a driver error no stage handled: a failure to
    connect to PostgreSQL at ``where`` (``connecting``), or one during the run (privileges,
    disk full, SQLite I/O). Decides by exception class and SQLSTATE."""
    if connecting:
        return _connect_error(exc, where)
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return TargetError(
            f"PostgreSQL at {where} refused a privilege ({redact(str(exc))}); {_grant_hint(exc)}"
            " (a rerun without it will not fix this)."
        )
    if isinstance(exc, asyncpg.PostgresError):
        return RuntimeFailure(
            f"PostgreSQL at {where} failed the run: {redact(str(exc))} (SQLSTATE"
            f" {sqlstate(exc) or '?'}); fix the cause and rerun to resume."
        )
    if isinstance(exc, sqlite3.Error):
        return RuntimeFailure(
            f"Reading the SQLite file failed ({exc}); fix the cause (or use a good copy) and"
            " run the command again: a run resumes where it stopped, and verify writes nothing."
        )
    return RuntimeFailure(f"The run failed: {type(exc).__name__}: {redact(str(exc))}.")


_PRIVILEGE_HINTS = (
    ("temporary tables", "the role needs TEMPORARY on the database"),
    ("for database", "the role needs CREATE on the database"),
    ("for schema", "the role needs USAGE and CREATE on that schema"),
    ("must be owner", "the role must own that object, or an administrator must change it"),
    ("for table", "the role needs SELECT, INSERT, UPDATE and DELETE on that table"),
    ("for sequence", "the role needs USAGE on that sequence"),
)


def _grant_hint(exc: BaseException) -> str:
    """What the role lacks, told from PostgreSQL's message (the operations guide's grants)."""
    text = str(exc)
    for words, hint in _PRIVILEGE_HINTS:
        if words in text:
            return hint
    return "give the role the grants of the operations guide (docs/operations.md)"


def source_error(exc: sqlite3.DatabaseError, path: object) -> MigrateError:
    """The sentence for a SQLite file that cannot be read at preflight: locked beyond the busy
    timeout (by result code: exit 1, a rerun when the app is idle works), unreadable, or not a
    database at all (exit 2)."""
    if sqlite_busy(exc):
        return RuntimeFailure(
            f"The SQLite file {path} stayed locked by another process beyond busy_timeout"
            " ([source] in --config); nothing was written: rerun the same command when the app"
            " is idle, or migrate a copy taken with sqlite3's .backup."
        )
    if isinstance(exc, sqlite3.OperationalError):
        return SourceError(f"The SQLite file {path} cannot be read ({exc}).")
    return SourceError(f"The file {path} is not a readable SQLite database ({exc}).")


def _connect_error(exc: BaseException, where: str) -> MigrateError:
    """The sentence for a failed connection attempt (see translate).

    A DSN the driver cannot parse is described without the driver's message, which quotes
    pieces of the DSN (a password with a raw ``#`` or ``/`` shows up as a port number)."""
    if isinstance(exc, ValueError | TypeError | asyncpg.ClientConfigurationError):
        return TargetError(
            f"The PostgreSQL DSN for {where} cannot be parsed; write it as"
            " postgresql://user:password@host:port/dbname and percent-encode any # / ? @ % or"
            " space in the user or password (e.g. # as %23)."
        )
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return RefusedConnection(
            f"PostgreSQL at {where} refused the password; check the DSN or PGPASSWORD."
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return RefusedConnection(
            f"The database named in the DSN does not exist at {where}; create it first."
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return RefusedConnection(f"PostgreSQL at {where} refused the user: {redact(str(exc))}.")
    if isinstance(exc, asyncpg.PostgresError):
        return RefusedConnection(
            f"PostgreSQL at {where} refused the connection: {redact(str(exc))}."
        )
    return RuntimeFailure(
        f"PostgreSQL at {where} cannot be reached ({type(exc).__name__}: {redact(str(exc))});"
        " check that it is running and the DSN is right, then rerun to resume."
    )
