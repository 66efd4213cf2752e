"""The SQLite backend: the app's own schema and on-disk format, through aiosqlite."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import structlog

from flux_migrate.core.schema import MESSAGES, SESSIONS, SQLITE_DDL, quote_ident
from flux_migrate.memory.base import (
    DEFAULT_ACQUIRE_TIMEOUT,
    DEFAULT_HISTORY_LIMIT,
    DEFAULT_SESSIONS_LIMIT,
    MemoryBase,
    PoolTimeoutError,
    SessionNotFoundError,
    WaitStats,
    check_id,
    check_text,
    elapsed_ms,
    loads_metadata,
    matches_nothing,
    message_dict,
    new_id,
    now,
    prepare_metadata,
    read_sql,
    session_dict,
    sqlite_limit,
    sqlite_offset,
)
from flux_migrate.stages.convert import Rejected, parse_timestamp

log = structlog.get_logger("flux_migrate.memory")

_SESSIONS = quote_ident(SESSIONS.name)
_MESSAGES = quote_ident(MESSAGES.name)
_READ = read_sql(
    _SESSIONS,
    _MESSAGES,
    param=lambda n: f"?{n}",
    by_id="id",
    arrival="rowid",
    user_match="s.user_id = ?3",
)


def decode_lenient(raw: bytes) -> str:
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
    if raw is None or raw == "":
        return {}
    try:
        value = loads_metadata(raw)
    except ValueError:
        log.warning("value_unreadable", column=column, reason="invalid_json")
        return {}
    if not isinstance(value, dict):
        log.warning("value_unreadable", column=column, reason="json_not_object")
        return {}
    return value


_DECODERS: dict[str, Any] = {"timestamp": _timestamp, "metadata": _metadata}


class SQLiteMemory(MemoryBase):
    """The app's memory in a SQLite file, created with the app's schema when absent.

    Rows are written exactly as the app wrote them: ISO-8601 text from
    ``datetime.now(timezone.utc).isoformat()`` and ``json.dumps(metadata or {})``. One
    connection, opened on first use; operations on it run one at a time, so a write and the
    ``updated_at`` it implies are never interleaved with another. A file made before
    ``user_id`` existed gets the column (default '') and its index on open.

    With ``read_only`` the file is opened read-only (``mode=ro``) and never changed: no table,
    column or index is added (``verify --api`` reads the source this way); writes fail.
    """

    def __init__(
        self,
        path: str | Path,
        default_history_limit: int = DEFAULT_HISTORY_LIMIT,
        *,
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
        read_only: bool = False,
    ) -> None:
        super().__init__(default_history_limit=default_history_limit)
        self.path = Path(path)
        self.read_only = read_only
        self.acquire_timeout = acquire_timeout
        self.waits = WaitStats()
        self._conn: aiosqlite.Connection | None = None
        self._lock = anyio.Lock()

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def _forget_loop(self) -> None:
        self._lock = anyio.Lock()  # the connection's thread serves any loop

    async def open(self) -> None:
        self._follow_loop()
        async with self.lifecycle.admit(), self._lock:
            await self._open_locked()

    async def _open_locked(self) -> aiosqlite.Connection:
        if self._conn is None:
            self.lifecycle.refuse_if_closing()  # a call during close() never reopens
            if self.read_only:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                conn = await aiosqlite.connect(uri, uri=True, isolation_level=None)
            else:
                conn = await aiosqlite.connect(self.path, isolation_level=None)
            try:
                conn.text_factory = decode_lenient
                await conn.execute("PRAGMA busy_timeout=5000")
                if self.read_only:
                    self._conn = conn
                    return conn
                await conn.execute("PRAGMA foreign_keys=ON")
                async with conn.execute("PRAGMA table_info(sessions)") as cur:
                    present = {r[1] for r in await cur.fetchall()}
                if present and "user_id" not in present:
                    await conn.execute("ALTER TABLE sessions ADD COLUMN user_id TEXT DEFAULT ''")
                await conn.executescript(SQLITE_DDL)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def close(self, timeout: float = 10.0) -> None:
        """Stop admitting calls, let the running one finish (up to ``timeout`` s), close.

        Callers still waiting for the connection get MemoryClosedError and write nothing; a
        call made during the close is refused the same way; the next call after it reopens.
        """
        self._follow_loop()
        self.lifecycle.closing = True
        try:
            await self.lifecycle.drain(timeout)
            with anyio.CancelScope(shield=True):
                conn, self._conn = self._conn, None
                if conn is not None:
                    await conn.close()
        finally:
            self.lifecycle.closing = False

    @asynccontextmanager
    async def _use(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, held by this operation alone until the block ends.

        Raises PoolTimeoutError when another operation holds it beyond the acquire timeout,
        MemoryClosedError when close() began meanwhile.
        """
        self._follow_loop()
        async with self.lifecycle.admit():
            started = time.perf_counter()
            try:
                with anyio.fail_after(self.acquire_timeout):
                    await self._lock.acquire()
            except TimeoutError:
                raise PoolTimeoutError(
                    f"the SQLite connection stayed busy for {self.acquire_timeout:g} s;"
                    " nothing was written"
                ) from None
            self.waits.record(time.perf_counter() - started)
            try:
                self.lifecycle.refuse_if_closing()
                yield await self._open_locked()
            finally:
                self._lock.release()

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

    async def health(self) -> dict[str, Any]:
        """``ok``, ``latency_ms``, ``role`` (primary), ``server_version`` and the connection as a
        pool of one; never raises (``ok`` False and ``error`` instead)."""
        busy = int(self._lock.locked())
        size = int(self._conn is not None)
        out: dict[str, Any] = {"ok": False, "role": "primary", "backend": "sqlite"}
        pool = {"size": size, "idle": size - busy, "min": 0, "max": 1, "in_use": busy}
        try:
            started = time.perf_counter()
            rows = await self._fetchall("SELECT sqlite_version()")
            out.update(ok=True, latency_ms=elapsed_ms(started), server_version=str(rows[0][0]))
        except Exception as exc:  # noqa: BLE001 - health reports, never raises
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["pool"] = {**pool, "acquire_wait": self.waits.summary()}
        return out

    # -------------------------------------------------------------- the API

    async def create_session(
        self, title: str = "", metadata: dict[str, Any] | None = None, user_id: str = ""
    ) -> str:
        check_text(title, "title")
        check_text(user_id, "user_id")
        text = prepare_metadata(metadata)
        session_id = new_id()
        stamp = now().isoformat()
        async with self._transaction() as conn:
            await conn.execute(
                f"INSERT INTO {_SESSIONS} (id, title, created_at, updated_at, metadata, user_id)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (session_id, title, stamp, stamp, text, user_id),
            )
        return session_id

    async def add_message(
        self, session_id: str, role: str, content: str, metadata: dict[str, Any] | None = None
    ) -> str:
        check_id(session_id)
        check_text(role, "role")
        check_text(content, "content")
        text = prepare_metadata(metadata)
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
        check_id(session_id)
        count = self.history_limit(limit)
        if matches_nothing(session_id):
            return []
        rows = await self._fetchall(_READ.history, (session_id, count))
        return [message_dict(r, **_DECODERS) for r in rows]

    async def get_sessions(
        self, limit: int = DEFAULT_SESSIONS_LIMIT, offset: int = 0, user_id: str = ""
    ) -> list[dict[str, Any]]:
        params: tuple[Any, ...] = (sqlite_limit(limit), sqlite_offset(offset))
        if not isinstance(user_id, str):
            check_text(user_id, "user_id")
        if matches_nothing(user_id):
            return []
        check_text(user_id, "user_id")
        sql = _READ.sessions_page
        if user_id:
            sql, params = _READ.user_sessions_page, (*params, user_id)
        rows = await self._fetchall(sql, params)
        return [session_dict(r, with_count=True, **_DECODERS) for r in rows]

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        check_id(session_id)
        if matches_nothing(session_id):
            return None
        rows = await self._fetchall(_READ.session, (session_id,))
        return session_dict(rows[0], **_DECODERS) if rows else None

    async def update_session_title(self, session_id: str, title: str) -> None:
        check_id(session_id)
        check_text(title, "title")
        if matches_nothing(session_id):
            return
        async with self._transaction() as conn:
            await conn.execute(
                f"UPDATE {_SESSIONS} SET title = ?, updated_at = ? WHERE id = ?",
                (title, now().isoformat(), session_id),
            )

    async def delete_session(self, session_id: str) -> None:
        check_id(session_id)
        if matches_nothing(session_id):
            return
        async with self._transaction() as conn:
            await conn.execute(f"DELETE FROM {_MESSAGES} WHERE session_id = ?", (session_id,))
            await conn.execute(f"DELETE FROM {_SESSIONS} WHERE id = ?", (session_id,))

    async def count_sessions(self) -> int:
        rows = await self._fetchall(_READ.count)
        return int(rows[0][0])

    async def clear_all(self) -> None:
        async with self._transaction() as conn:
            await conn.execute(f"DELETE FROM {_MESSAGES}")
            await conn.execute(f"DELETE FROM {_SESSIONS}")
