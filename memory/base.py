"""The conversation memory API both backends implement, and what they share.

Results are plain dicts shaped by the one schema in :mod:`core.schema`: a session has
``id``, ``title``, ``created_at``, ``updated_at``, ``metadata`` and ``message_count``; a message
has ``id``, ``session_id``, ``role``, ``content``, ``metadata`` and ``created_at``. Timestamps are
ISO-8601 strings in UTC with an offset (``datetime.isoformat()``), metadata is a dict.

Behaviour the issue left open, decided here and identical on both backends:

- ``add_message`` and ``update_session_title`` on a missing session raise
  :class:`SessionNotFoundError`; ``delete_session`` of a missing session is a no-op that returns
  ``False`` (``True`` when it deleted one); ``get_session`` returns ``None``; ``get_history``
  returns ``[]``.
- ``update_session_title`` also moves the session's ``updated_at`` forward.
- ``updated_at`` never moves backwards: concurrent writers leave it at the latest timestamp.
- Ties are broken by id (byte order): sessions ``updated_at DESC, id``; messages
  ``created_at, id``.
- Text with NUL characters or lone surrogates is refused with ``ValueError`` (PostgreSQL cannot
  store NUL); metadata must be a dict (or ``None`` for ``{}``): anything else, a ``str`` above all,
  is refused with ``TypeError``; metadata holding NaN, Infinity or ``\\u0000`` with ``ValueError``.
- A negative ``limit`` or ``offset`` is refused with ``ValueError``; ``limit=0`` returns ``[]``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, Self

from core.schema import MESSAGES, SESSIONS, Kind, Table, quote_ident
from stages.convert import Rejected, decode_text, parse_json_object

DEFAULT_HISTORY_LIMIT = 20
DEFAULT_SESSIONS_LIMIT = 50


class SessionNotFoundError(LookupError):
    """The session does not exist; raised where the app would otherwise write an orphan."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session with id {session_id!r}")
        self.session_id = session_id


class Memory(Protocol):
    """The app's conversation memory; both backends implement exactly this."""

    async def create_session(
        self, title: str = "", metadata: dict[str, Any] | None = None
    ) -> str: ...

    async def add_message(
        self, session_id: str, role: str, content: str, metadata: dict[str, Any] | None = None
    ) -> str: ...

    async def get_history(
        self, session_id: str, limit: int | None = None
    ) -> list[dict[str, Any]]: ...

    async def get_sessions(
        self, limit: int = DEFAULT_SESSIONS_LIMIT, offset: int = 0
    ) -> list[dict[str, Any]]: ...

    async def get_session(self, session_id: str) -> dict[str, Any] | None: ...

    async def update_session_title(self, session_id: str, title: str) -> None: ...

    async def delete_session(self, session_id: str) -> bool: ...

    async def count_sessions(self) -> int: ...

    async def clear_all(self) -> None: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class MemoryBase:
    """What both backends share: the history limit and the async context manager."""

    def __init__(self, *, default_history_limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        if default_history_limit < 0:
            raise ValueError("default_history_limit must be 0 or more")
        self.default_history_limit = default_history_limit

    @property
    def is_open(self) -> bool:
        """Whether the connection or pool is open now."""
        raise NotImplementedError

    async def open(self) -> None:
        """Open the connection or pool now instead of on first use."""
        raise NotImplementedError

    async def close(self) -> None:
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
        """The limit to apply: the default when None; a negative one is refused."""
        if limit is None:
            return self.default_history_limit
        return check_count(limit, "limit")


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


def check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, not {value}")
    return value


def prepare_metadata(metadata: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Validate metadata; return the JSON text the app stored in SQLite and the dict it reads back.

    The text is ``json.dumps(metadata or {})`` exactly as the app wrote it; the dict is that text
    parsed again, so both backends store the same value (non-str keys become str on both).
    """
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        # A str would be stored as a JSON string, not an object: refuse it on both backends.
        raise TypeError(f"metadata must be a dict or None, not {type(metadata).__name__}")
    text = json.dumps(metadata)
    try:
        value = parse_json_object(text)
    except Rejected as exc:
        raise ValueError(exc.detail) from None
    return text, value


# ------------------------------------------------------------------ values out


def iso(value: datetime) -> str:
    """The ISO-8601 text the API returns for a timestamp: UTC, with offset."""
    return value.astimezone(UTC).isoformat()


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
    *,
    timestamp: TimestampDecoder,
    metadata: MetadataDecoder,
) -> dict[str, Any]:
    """Turn a row in schema column order (plus extra trailing columns) into the API's dict.

    ``timestamp`` and ``metadata`` decode a stored value; a timestamp decoded to a datetime is
    rendered with :func:`iso`, a str is passed through as stored.
    """
    out: dict[str, Any] = {}
    for column, value in zip(table.columns, row):
        if column.kind is Kind.TIMESTAMP:
            decoded = timestamp(value, column.name)
            out[column.name] = iso(decoded) if isinstance(decoded, datetime) else decoded
        elif column.kind is Kind.JSON:
            out[column.name] = metadata(value, column.name)
        else:
            out[column.name] = value
    return out


def session_dict(
    row: Sequence[Any], *, timestamp: TimestampDecoder, metadata: MetadataDecoder
) -> dict[str, Any]:
    """A session row (schema columns, then the message count) as the API's dict."""
    out = row_dict(SESSIONS, row, timestamp=timestamp, metadata=metadata)
    out["message_count"] = int(row[len(SESSIONS.columns)])
    return out


def message_dict(
    row: Sequence[Any], *, timestamp: TimestampDecoder, metadata: MetadataDecoder
) -> dict[str, Any]:
    """A message row (schema columns) as the API's dict."""
    return row_dict(MESSAGES, row, timestamp=timestamp, metadata=metadata)


# ------------------------------------------------------------------ reads, shared by both backends


@dataclass(frozen=True)
class ReadSql:
    """The read statements, identical on both backends but for placeholders and table names."""

    history: str  # (session_id, limit) -> messages, oldest first
    sessions_page: str  # (limit, offset) -> sessions with their message count
    session: str  # (session_id,) -> one session with its message count
    count: str  # () -> number of sessions


def read_sql(sessions: str, messages: str, *, param: Callable[[int], str], by_id: str) -> ReadSql:
    """Build the read statements for quoted table names, a placeholder style and an id order.

    ``by_id`` is the expression that orders ids by their bytes (``id`` in SQLite, ``id COLLATE
    "C"`` in PostgreSQL), so that ties break the same way on both backends.
    """
    message_count = f"(SELECT count(*) FROM {messages} c WHERE c.session_id = s.id)"
    return ReadSql(
        history=(
            f"SELECT * FROM (SELECT {MESSAGE_SELECT} FROM {messages} m"
            f" WHERE m.session_id = {param(1)}"
            f" ORDER BY m.created_at DESC, m.{by_id} DESC LIMIT {param(2)}) h"
            f" ORDER BY h.created_at, h.{by_id}"
        ),
        sessions_page=(
            f"SELECT {SESSION_SELECT}, {message_count} AS message_count FROM {sessions} s"
            f" ORDER BY s.updated_at DESC, s.{by_id} LIMIT {param(1)} OFFSET {param(2)}"
        ),
        session=(
            f"SELECT {SESSION_SELECT}, {message_count} AS message_count FROM {sessions} s"
            f" WHERE s.id = {param(1)}"
        ),
        count=f"SELECT count(*) FROM {sessions}",
    )
