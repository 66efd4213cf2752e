"""The conversation memory API both backends implement, and what they share.

The API is the app's own SQLite ``ConversationMemory``, call by call (see docs/memory-api.md):

- ``create_session(title="", metadata=None, user_id="") -> str``
- ``add_message(session_id, role, content, metadata=None) -> str`` (also moves the session's
  ``updated_at``)
- ``get_history(session_id, limit=None) -> list[dict]``: the newest ``limit`` messages (None or
  0: ``max_history * 2``, negative: all, as the app's ``limit or ...`` into SQLite), oldest
  first, ties in insertion order, dicts with exactly ``id, role, content, metadata, created_at``
- ``get_sessions(limit=50, offset=0, user_id="") -> list[dict]``: ``updated_at`` newest first
  (ties by id), only that user's when ``user_id`` is non-empty; a negative limit is all, a
  negative offset 0 (SQLite's LIMIT / OFFSET); dicts with exactly ``id, title, created_at,
  updated_at, metadata, message_count``
- ``get_session(session_id) -> dict | None``: exactly ``id, title, created_at, updated_at,
  metadata``
- ``update_session_title(session_id, title) -> None`` (also moves ``updated_at``; a missing
  session: nothing happens), ``delete_session(session_id) -> None`` (a missing session: nothing
  happens), ``count_sessions() -> int``, ``clear_all() -> None``

Timestamps are ISO-8601 strings in UTC with an offset (``datetime.isoformat()``), metadata is a
dict. An id or user_id holding a NUL matches nothing (None, [] or nothing, as the app).
Deliberate differences from the app's class, identical on both backends (docs/memory-api.md):

- ``add_message`` on a missing session raises :class:`SessionNotFoundError` (the app's SQLite
  wrote an orphan row; PostgreSQL's foreign key refuses it).
- A ``session_id``, ``title``, ``role``, ``content`` or ``user_id`` that is not a ``str`` is a
  ``TypeError``; stored text with NUL or lone surrogates a ``ValueError``. Metadata must be a
  dict (or ``None``); NaN, Infinity, a NUL, a lone surrogate, integers of more than 4300 digits
  or nesting too deep for ``json.dumps`` are a ``ValueError``.
- ``limit`` / ``offset`` beyond 2**63 - 1 are a ``ValueError`` (``TypeError`` for a non-int).
- jsonb's canonical form on PostgreSQL: ``-0.0`` reads as ``0.0``, keys in jsonb's order.
- A JSON number beyond a double's range (``1e400`` in migrated text) reads as the exact int on
  both backends (PostgreSQL's jsonb keeps it exactly and cannot tell it from an int).
- A call while ``close()`` drains raises :class:`MemoryClosedError`, writing nothing; no free
  connection within the acquire timeout raises :class:`PoolTimeoutError`, a server that does
  not answer within its bound :class:`MemoryUnavailableError`.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import statistics
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Protocol, Self

import anyio
import orjson

from flux_migrate.core.schema import MESSAGES, SESSIONS, Kind, Table, quote_ident
from flux_migrate.stages.convert import Rejected, decode_text

DEFAULT_MAX_HISTORY = 5  # the app's settings.max_history (env MAX_HISTORY)
DEFAULT_HISTORY_LIMIT = DEFAULT_MAX_HISTORY * 2
DEFAULT_SESSIONS_LIMIT = 50
DEFAULT_ACQUIRE_TIMEOUT = 10.0
MAX_COUNT = 2**63 - 1  # the largest LIMIT / OFFSET both SQLite and PostgreSQL take

# The keys of the app's dicts, exactly.
MESSAGE_KEYS = ("id", "role", "content", "metadata", "created_at")
SESSION_KEYS = ("id", "title", "created_at", "updated_at", "metadata")
SESSION_LIST_KEYS = (*SESSION_KEYS, "message_count")


class SessionNotFoundError(LookupError):
    """The session does not exist; raised where the app would otherwise write an orphan."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session with id {session_id!r}")
        self.session_id = session_id


class MemoryClosedError(RuntimeError):
    """The memory is closing: the call was refused before it wrote anything."""


class MemoryUnavailableError(ConnectionError):
    """The database did not answer within its bound (connect, acquire, command) or the
    connection broke: the one error class of an outage. A read can be retried; a write raised
    after it was sent may or may not have committed (``maybe_written`` says which)."""

    def __init__(self, message: str, *, maybe_written: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.maybe_written = maybe_written


class PoolTimeoutError(MemoryUnavailableError, TimeoutError):
    """No connection became free within the acquire timeout; nothing was written."""


@dataclass(frozen=True)
class Timeouts:
    """Every wait of the PostgreSQL memory is bounded by one of these (seconds).

    ``connect``: opening a connection (the TCP connect and the login). ``acquire``: waiting
    for a free connection of the pool. ``command``: one statement, client side (then the
    connection is dropped). ``statement``: PostgreSQL's ``statement_timeout``, just below
    ``command`` so that the server ends a slow statement cleanly first. ``replica``: connect
    and command on the standby, after which reads fall back to the primary. ``health``: what
    ``health()`` waits for a free connection before it reports the pool saturated.
    """

    connect: float = 5.0
    acquire: float = DEFAULT_ACQUIRE_TIMEOUT
    command: float = 10.0
    statement: float = 9.0
    replica: float = 1.0
    health: float = 1.0

    def check(self) -> Timeouts:
        """Self, or ValueError naming the first bound that is not a positive number."""
        for name in ("connect", "acquire", "command", "statement", "replica", "health"):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not (ok and math.isfinite(value) and value > 0):
                raise ValueError(f"the {name} timeout must be a positive number, not {value!r}")
        return self


class Memory(Protocol):
    """The app's conversation memory; both backends implement exactly this."""

    async def create_session(
        self, title: str = "", metadata: dict[str, Any] | None = None, user_id: str = ""
    ) -> str: ...

    async def add_message(
        self, session_id: str, role: str, content: str, metadata: dict[str, Any] | None = None
    ) -> str: ...

    async def get_history(
        self, session_id: str, limit: int | None = None
    ) -> list[dict[str, Any]]: ...

    async def get_sessions(
        self, limit: int = DEFAULT_SESSIONS_LIMIT, offset: int = 0, user_id: str = ""
    ) -> list[dict[str, Any]]: ...

    async def get_session(self, session_id: str) -> dict[str, Any] | None: ...

    async def update_session_title(self, session_id: str, title: str) -> None: ...

    async def delete_session(self, session_id: str) -> None: ...

    async def count_sessions(self) -> int: ...

    async def clear_all(self) -> None: ...

    async def health(self) -> dict[str, Any]: ...

    async def close(self, timeout: float = 10.0) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class WaitStats:
    """How long callers waited for a connection: count and percentiles since start."""

    def __init__(self, keep: int = 10_000) -> None:
        self.count = 0
        self.failed = 0
        self._recent: deque[float] = deque(maxlen=keep)

    def record(self, seconds: float) -> None:
        self.count += 1
        self._recent.append(seconds * 1000)

    def record_failure(self, seconds: float) -> None:
        """A caller that gave up after ``seconds`` without a connection: counted in ``failed``
        and in the percentiles (its wait was real)."""
        self.count += 1
        self.failed += 1
        self._recent.append(seconds * 1000)

    def summary(self) -> dict[str, Any]:
        """``count``, ``failed``, ``p50_ms`` and ``p99_ms`` (over the last 10,000 waits, failed
        ones included; None before any)."""
        if not self._recent:
            return {"count": self.count, "failed": self.failed, "p50_ms": None, "p99_ms": None}
        values = sorted(self._recent)
        p99 = values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]
        return {
            "count": self.count,
            "failed": self.failed,
            "p50_ms": round(statistics.median(values), 3),
            "p99_ms": round(p99, 3),
        }


class Lifecycle:
    """Admission of calls, draining on close: what both backends share.

    A call enters with :meth:`admit`; ``close`` stops admitting (later calls raise
    MemoryClosedError until the close finished, then the memory may open again), waits up to
    its timeout for admitted calls to finish, then lets the backend terminate what is left.
    """

    def __init__(self) -> None:
        self.closing = False
        self.inflight = 0
        self._idle = anyio.Event()
        self._idle.set()

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self.closing:
            raise MemoryClosedError("the memory is closing; the call was refused")
        self.inflight += 1
        self._idle = anyio.Event() if self.inflight == 1 else self._idle
        try:
            yield
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    def refuse_if_closing(self) -> None:
        """Raise MemoryClosedError if close() began while this call waited for a connection."""
        if self.closing:
            raise MemoryClosedError("the memory closed while the call waited; nothing was written")

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for admitted calls; True if all finished."""
        with anyio.move_on_after(timeout, shield=True):
            await self._idle.wait()
            return True
        return False


class MemoryBase:
    """What both backends share: the history limit and the async context manager."""

    def __init__(self, *, default_history_limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        self.default_history_limit = check_count(default_history_limit, "default_history_limit")
        self.lifecycle = Lifecycle()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _follow_loop(self) -> None:
        """Bind to the running event loop; after a change of loop (a new ``asyncio.run``),
        drop what belonged to the old one (:meth:`_forget_loop`) and start afresh."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        if self._loop is not None:
            self._forget_loop()
            self.lifecycle = Lifecycle()
        self._loop = loop

    def _forget_loop(self) -> None:
        """Drop the connections, pools and locks of an event loop that is no longer used."""

    @property
    def is_open(self) -> bool:
        """Whether the connection or pool is open now."""
        raise NotImplementedError

    async def open(self) -> None:
        """Open the connection or pool now instead of on first use."""
        raise NotImplementedError

    async def close(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def history_limit(self, limit: int | None) -> int:
        """The limit to apply, as the app's ``limit or max_history * 2`` into SQLite's LIMIT:
        None or 0 is the default window, a negative limit is every message."""
        if limit is None or check_int(limit, "limit") == 0:
            return self.default_history_limit
        return sqlite_limit(limit)


# ------------------------------------------------------------------ values in


def now() -> datetime:
    """The current time, aware, in UTC, with microseconds: what the app stamps rows with."""
    return datetime.now(UTC)


def new_id() -> str:
    """A new row id: a uuid4 as text, as the app made them."""
    return str(uuid.uuid4())


def check_text(value: str, column: str) -> str:
    """Refuse text that one of the backends cannot store (NUL, lone surrogates) or a non-str."""
    if not isinstance(value, str):
        raise TypeError(f"{column} must be a str, not {type(value).__name__}")
    try:
        decode_text(value, column)
    except Rejected as exc:
        raise ValueError(exc.detail) from None
    return value


def check_id(value: str) -> str:
    """A session id must be a str on both backends (an int would match nothing on one)."""
    if not isinstance(value, str):
        raise TypeError(f"session_id must be a str, not {type(value).__name__}")
    return value


def matches_nothing(value: str) -> bool:
    """Whether a looked-up id or user_id cannot equal any stored one (it holds a NUL, which no
    stored value has): the app answers None, [] or nothing for it, so the call does too."""
    return "\x00" in value


def check_int(value: int, name: str) -> int:
    """``value`` if it is an int (not a bool), else TypeError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def check_count(value: int, name: str) -> int:
    """An int from 0 to 2**63 - 1 (what LIMIT and OFFSET take on both backends)."""
    check_int(value, name)
    if not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{name} must be from 0 to 2**63 - 1, not {value}")
    return value


def sqlite_limit(value: int, name: str = "limit") -> int:
    """A LIMIT as the app's SQLite takes it: a negative one means no limit; beyond 2**63 - 1
    is refused (ValueError), a non-int is a TypeError."""
    check_int(value, name)
    return MAX_COUNT if value < 0 else check_count(value, name)


def sqlite_offset(value: int) -> int:
    """An OFFSET as the app's SQLite takes it: a negative one counts as 0."""
    check_int(value, "offset")
    return 0 if value < 0 else check_count(value, "offset")


def check_pool_bounds(pool_min: int, pool_max: int, what: str = "pool sizes") -> None:
    """The one check of pool bounds: ValueError unless 0 <= min <= max and max >= 1."""
    for value in (pool_min, pool_max):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{what} must be whole numbers, not {value!r}")
    if not 0 <= pool_min <= pool_max or pool_max < 1:
        raise ValueError(f"{what} need 0 <= min <= max and max >= 1, not {pool_min}..{pool_max}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"metadata holds {name}, which JSON and PostgreSQL cannot store")


def prepare_metadata(metadata: dict[str, Any] | None) -> str:
    """Validate metadata; return ``json.dumps(metadata or {})``, the text the app stored.

    Both backends store exactly this text (PostgreSQL parses it into jsonb), so both accept
    the same values: non-str keys become str, ints of any size up to 4300 digits, any nesting
    ``json.dumps`` can write.
    """
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        # A str would be stored as a JSON string, not an object: refuse it on both backends.
        raise TypeError(f"metadata must be a dict or None, not {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, allow_nan=False)
    except RecursionError:
        raise ValueError("metadata is nested too deeply to store") from None
    except ValueError as exc:  # NaN / Infinity, or an int beyond 4300 digits
        raise ValueError(f"metadata cannot be stored: {exc}") from None
    except TypeError as exc:
        raise TypeError(f"metadata cannot be stored as JSON: {exc}") from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise ValueError("metadata contains a NUL character, which PostgreSQL cannot store")
    if "\\ud" in text:  # a surrogate escape: fine in a pair (non-BMP), refused alone
        try:
            json.dumps(metadata, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "metadata contains a lone surrogate, which PostgreSQL cannot store"
            ) from None
    return text


# A real \u0000 escape: after an even number of backslashes (``\\u0000`` is a backslash and
# the letters u0000, which both backends store).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


# ------------------------------------------------------------------ values out


def iso(value: datetime) -> str:
    """The ISO-8601 text the API returns for a timestamp: UTC, with offset."""
    return value.astimezone(UTC).isoformat()


def _exact_int(text: str) -> int:
    return int(text) if len(text) <= 4000 else int(Decimal(text))


def _exact_float(text: str) -> float | int:
    value = float(text)
    if math.isinf(value):  # beyond a double: as PostgreSQL keeps it, the exact (integral) value
        return int(Decimal(text))
    return value


_NEEDS_STDLIB = re.compile(rb"\d{19}|[eE][+-]?\d{3}")


def loads_metadata(data: str | bytes) -> Any:
    """Parse stored metadata JSON the same way on both backends.

    orjson where it is exact; else the stdlib, with numbers beyond a double or 4300 digits read
    as exact ints. Raises ValueError for text that is not JSON (RecursionError included).
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if _NEEDS_STDLIB.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # nesting beyond orjson's 255 levels, or not JSON
    try:
        return json.loads(
            raw,
            parse_int=_exact_int,
            parse_float=_exact_float,
            parse_constant=_reject_constant,
        )
    except RecursionError:
        raise ValueError("metadata is nested too deeply to read") from None


def select_list(table: Table, alias: str = "") -> str:
    """The table's columns in schema order, for a SELECT on either backend."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + quote_ident(c) for c in table.column_names)


SESSION_SELECT = select_list(SESSIONS, "s")
MESSAGE_SELECT = select_list(MESSAGES, "m")


TimestampDecoder = Callable[[Any, str], "datetime | str"]
MetadataDecoder = Callable[[Any, str], "dict[str, Any]"]


def row_dict(
    table: Table,
    row: Sequence[Any],
    keys: tuple[str, ...],
    *,
    timestamp: TimestampDecoder,
    metadata: MetadataDecoder,
) -> dict[str, Any]:
    """Turn a row in schema column order (plus trailing columns) into the app's dict of ``keys``.

    ``timestamp`` and ``metadata`` decode a stored value; a timestamp decoded to a datetime is
    rendered with :func:`iso`, a str is passed through as stored.
    """
    values: dict[str, Any] = {}
    for column, value in zip(table.columns, row, strict=False):  # a count may follow
        if column.name not in keys:
            continue
        if column.kind is Kind.TIMESTAMP:
            decoded = timestamp(value, column.name)
            values[column.name] = iso(decoded) if isinstance(decoded, datetime) else decoded
        elif column.kind is Kind.JSON:
            values[column.name] = metadata(value, column.name)
        else:
            values[column.name] = value
    if "message_count" in keys:
        values["message_count"] = int(row[len(table.columns)])
    return {k: values[k] for k in keys}


def session_dict(
    row: Sequence[Any],
    *,
    timestamp: TimestampDecoder,
    metadata: MetadataDecoder,
    with_count: bool = False,
) -> dict[str, Any]:
    """A session row (schema columns, then the message count) as the app's dict."""
    keys = SESSION_LIST_KEYS if with_count else SESSION_KEYS
    return row_dict(SESSIONS, row, keys, timestamp=timestamp, metadata=metadata)


def message_dict(
    row: Sequence[Any], *, timestamp: TimestampDecoder, metadata: MetadataDecoder
) -> dict[str, Any]:
    """A message row (schema columns) as the app's dict."""
    return row_dict(MESSAGES, row, MESSAGE_KEYS, timestamp=timestamp, metadata=metadata)


# ------------------------------------------------------------------ reads, shared by both backends


@dataclass(frozen=True)
class ReadSql:
    """The read statements, identical on both backends but for placeholders and table names."""

    history: str  # (session_id, limit) -> messages, oldest first
    sessions_page: str  # (limit, offset) -> sessions with their message count
    user_sessions_page: str  # (limit, offset, user_id) -> that user's sessions, with counts
    session: str  # (session_id,) -> one session
    count: str  # () -> number of sessions


def read_sql(
    sessions: str,
    messages: str,
    *,
    param: Callable[[int], str],
    by_id: str,
    arrival: str,
    user_match: str,
) -> ReadSql:
    """Build the read statements for quoted table names, a placeholder style and orders.

    ``by_id`` orders ids by their bytes (``id`` in SQLite, ``id COLLATE "C"`` in PostgreSQL):
    sessions with the same ``updated_at`` come in that order. ``arrival`` is the message column
    that grows with insertion (SQLite's ``rowid``, PostgreSQL's ``seq``): messages with the same
    ``created_at`` come in insertion order, as the app returns them. ``user_match`` is the
    condition on ``s`` selecting the sessions of the user_id in parameter 3.
    """
    message_count = f"(SELECT count(*) FROM {messages} c WHERE c.session_id = s.id)"
    page = f" ORDER BY s.updated_at DESC, s.{by_id} LIMIT {param(1)} OFFSET {param(2)}"
    listed = f"SELECT {SESSION_SELECT}, {message_count} AS message_count FROM {sessions} s"
    return ReadSql(
        history=(
            f"SELECT * FROM (SELECT {MESSAGE_SELECT}, m.{arrival} AS arrival FROM {messages} m"
            f" WHERE m.session_id = {param(1)}"
            f" ORDER BY m.created_at DESC, m.{arrival} DESC LIMIT {param(2)}) h"
            " ORDER BY h.created_at, h.arrival"
        ),
        sessions_page=listed + page,
        user_sessions_page=f"{listed} WHERE {user_match}{page}",
        session=f"SELECT {SESSION_SELECT} FROM {sessions} s WHERE s.id = {param(1)}",
        count=f"SELECT count(*) FROM {sessions}",
    )


def elapsed_ms(started: float) -> float:
    """Milliseconds since a ``time.perf_counter()`` reading."""
    return round((time.perf_counter() - started) * 1000, 3)
