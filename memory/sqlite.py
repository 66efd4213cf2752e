"""The SQLite backend: the app's own schema and on-disk format, through aiosqlite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import structlog

from core.schema import MESSAGES, SESSIONS, SQLITE_DDL, quote_ident
from memory.base import (
    DEFAULT_HISTORY_LIMIT,
    DEFAULT_SESSIONS_LIMIT,
    MemoryBase,
    SessionNotFoundError,
    check_count,
    check_text,
    message_dict,
    new_id,
    now,
    prepare_metadata,
    read_sql,
    session_dict,
)
from stages.convert import Rejected, parse_json_object, parse_timestamp

log = structlog.get_logger("flux_migrate.memory")

_SESSIONS = quote_ident(SESSIONS.name)
_MESSAGES = quote_ident(MESSAGES.name)
_READ = read_sql(_SESSIONS, _MESSAGES, param=lambda _: "?", by_id="id")


def _decode_text(raw: bytes) -> str:
    # Invalid UTF-8 would otherwise fail the whole fetch, again on every retry.
    return raw.decode("utf-8", errors="replace")


def _timestamp(raw: Any, column: str) -> datetime | str:
    """A stored ISO timestamp as a UTC datetime; text that is not one is returned as stored."""
    try:
        return parse_timestamp(raw, column)
    except Rejected as exc:
        log.warning("value_unreadable", column=column, reason=exc.reason)
        return raw  # type: ignore[no-any-return]


def _metadata(raw: Any, column: str) -> dict[str, Any]:
    """Stored JSON text as a dict: NULL or empty is {}, and so is text that is not an object."""
    try:
        return parse_json_object(raw, column)
    except Rejected as exc:
        log.warning("value_unreadable", column=column, reason=exc.reason)
        return {}


_DECODERS: dict[str, Any] = {"timestamp": _timestamp, "metadata": _metadata}


class SQLiteMemory(MemoryBase):
    """The app's memory in a SQLite file, created with the app's schema when absent.

    Rows are written exactly as the app wrote them: ISO-8601 text from
    ``datetime.now(timezone.utc).isoformat()`` and ``json.dumps(metadata or {})``. One
    connection, opened on first use; operations on it run one at a time, so a write and the
    ``updated_at`` it implies are never interleaved with another.
    """

    def __init__(
        self, path: str | Path, default_history_limit: int = DEFAULT_HISTORY_LIMIT
    ) -> None:
        super().__init__(default_history_limit=default_history_limit)
        self.path = Path(path)
        self._conn: aiosqlite.Connection | None = None
        self._lock = anyio.Lock()

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def open(self) -> None:
        async with self._lock:
            await self._open_locked()

    async def _open_locked(self) -> aiosqlite.Connection:
        if self._conn is None:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
            try:
                conn.text_factory = _decode_text
                await conn.execute("PRAGMA foreign_keys=ON")
                await conn.execute("PRAGMA busy_timeout=5000")
                await conn.executescript(SQLITE_DDL)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.close()

    @asynccontextmanager
    async def _use(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, held by this operation alone until the block ends."""
        async with self._lock:
            yield await self._open_locked()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction, committed at the end of the block or rolled back on error."""
        async with self._use() as conn:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    async def _fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        async with self._use() as conn, conn.execute(sql, params) as cur:
            return list(await cur.fetchall())

    # -------------------------------------------------------------- the API

    async def create_session(self, title: str = "", metadata: dict[str, Any] | None = None) -> str:
        check_text(title, "title")
        text, _ = prepare_metadata(metadata)
        session_id = new_id()
        stamp = now().isoformat()
        async with self._transaction() as conn:
            await conn.execute(
                f"INSERT INTO {_SESSIONS} (id, title, created_at, updated_at, metadata)"
                " VALUES (?, ?, ?, ?, ?)",
                (session_id, title, stamp, stamp, text),
            )
        return session_id

    async def add_message(
        self, session_id: str, role: str, content: str, metadata: dict[str, Any] | None = None
    ) -> str:
        check_text(role, "role")
        check_text(content, "content")
        text, _ = prepare_metadata(metadata)
        message_id = new_id()
        async with self._transaction() as conn:
            stamp = now().isoformat()  # taken inside the lock: later messages get later stamps
            cur = await conn.execute(
                f"UPDATE {_SESSIONS} SET updated_at = ? WHERE id = ?", (stamp, session_id)
            )
            if cur.rowcount == 0:
                raise SessionNotFoundError(session_id)
            await conn.execute(
                f"INSERT INTO {_MESSAGES} (id, session_id, role, content, metadata, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (message_id, session_id, role, content, text, stamp),
            )
        return message_id

    async def get_history(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        rows = await self._fetchall(_READ.history, (session_id, self.history_limit(limit)))
        return [message_dict(r, **_DECODERS) for r in rows]

    async def get_sessions(
        self, limit: int = DEFAULT_SESSIONS_LIMIT, offset: int = 0
    ) -> list[dict[str, Any]]:
        params = (check_count(limit, "limit"), check_count(offset, "offset"))
        rows = await self._fetchall(_READ.sessions_page, params)
        return [session_dict(r, **_DECODERS) for r in rows]

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        rows = await self._fetchall(_READ.session, (session_id,))
        return session_dict(rows[0], **_DECODERS) if rows else None

    async def update_session_title(self, session_id: str, title: str) -> None:
        check_text(title, "title")
        async with self._transaction() as conn:
            cur = await conn.execute(
                f"UPDATE {_SESSIONS} SET title = ?, updated_at = ? WHERE id = ?",
                (title, now().isoformat(), session_id),
            )
            if cur.rowcount == 0:
                raise SessionNotFoundError(session_id)

    async def delete_session(self, session_id: str) -> bool:
        async with self._transaction() as conn:
            cur = await conn.execute(f"DELETE FROM {_SESSIONS} WHERE id = ?", (session_id,))
            return cur.rowcount > 0

    async def count_sessions(self) -> int:
        rows = await self._fetchall(_READ.count)
        return int(rows[0][0])

    async def clear_all(self) -> None:
        async with self._transaction() as conn:
            await conn.execute(f"DELETE FROM {_MESSAGES}")
            await conn.execute(f"DELETE FROM {_SESSIONS}")
