"""The PostgreSQL backend: asyncpg pool, native timestamptz and jsonb, the pipeline's schema.

Every statement takes its values as parameters ($1, $2); table names come from
:class:`core.schema.TargetNames` through ``quote_ident``. The operations are module-level
functions over one connection so that :mod:`pipeline.check` can run the very same statements
inside a transaction it rolls back.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import asyncpg
import orjson

from core.catalog import MIGRATION_LOCK_KEY, existing_constraint_names, table_exists
from core.dsn import dsn_location
from core.errors import TargetError, describe_connect_error
from core.schema import TABLES, TargetNames, constraints, target_ddl
from memory.base import (
    DEFAULT_HISTORY_LIMIT,
    DEFAULT_SESSIONS_LIMIT,
    MemoryBase,
    ReadSql,
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

APPLICATION_NAME = "flux-migrate memory"
JSONB_VERSION = b"\x01"


# ------------------------------------------------------------------ connections


def _encode_jsonb(value: Any) -> bytes:
    if not isinstance(value, dict):
        # A str would silently become a JSON string instead of an object.
        raise TypeError(f"jsonb metadata must be a dict, not {type(value).__name__}")
    return JSONB_VERSION + orjson.dumps(value)


def _decode_jsonb(data: bytes) -> Any:
    try:
        return orjson.loads(data[1:])
    except orjson.JSONDecodeError:
        return json.loads(data[1:])  # numbers orjson refuses (beyond 64 bits)


async def init_connection(conn: asyncpg.Connection) -> None:
    """Make jsonb travel as dicts both ways (binary format, so COPY works too)."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        format="binary",
    )


async def open_pool(
    dsn: str, *, min_size: int, max_size: int, timeout: float = 10.0
) -> asyncpg.Pool:
    """A pool with the jsonb codec on every connection; MigrateError (no password) on failure.

    Blocks until ``min_size`` connections are open, or up to ``timeout`` seconds per attempt.
    """
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=init_connection,
            server_settings={"application_name": APPLICATION_NAME},
            timeout=timeout,
        )
    except Exception as exc:  # noqa: BLE001 - one sentence, no password
        raise describe_connect_error(exc, dsn_location(dsn)) from None


# The advisory lock pipeline.runner.migrate holds on a schema while it loads it.
_MIGRATION_LOCK_SQL = f"SELECT pg_try_advisory_xact_lock({MIGRATION_LOCK_KEY})"


async def missing_objects(conn: asyncpg.Connection, names: TargetNames) -> list[str]:
    """Names of the target's tables, keys and index that do not exist yet."""
    missing = [
        names.qualified(t.name) for t in TABLES if not await table_exists(conn, names, t.name)
    ]
    have = await existing_constraint_names(conn, names.schema)
    missing += [c.name for c in constraints(names) if c.name not in have]
    return missing


async def ensure_schema(conn: asyncpg.Connection, names: TargetNames) -> bool:
    """Create the target schema, tables, keys and index that are absent; True if it created any.

    Runs the statements of :func:`core.schema.target_ddl`, skipping each key that already
    exists by name. Raises TargetError, creating nothing, while a migration is loading the schema.
    """
    if not await missing_objects(conn, names):
        return False
    by_sql = {c.sql: c.name for c in constraints(names)}
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('flux_migrate.ddl'))")
        if not await conn.fetchval(_MIGRATION_LOCK_SQL, names.schema):
            raise TargetError(
                f"A flux-migrate run is loading schema {names.schema}; wait for it to finish"
                " before using the PostgreSQL memory."
            )
        have = await existing_constraint_names(conn, names.schema)
        for statement in target_ddl(names):
            if by_sql.get(statement) in have:
                continue
            await conn.execute(statement)
    return True


# ------------------------------------------------------------------ statements and operations


@dataclass(frozen=True)
class Sql:
    """Every statement of the backend, for one set of target names."""

    read: ReadSql
    insert_session: str
    add_message: str
    update_title: str
    delete_session: str
    clear_messages: str
    clear_sessions: str

    @classmethod
    def for_names(cls, names: TargetNames) -> Sql:
        sessions = names.qualified("sessions")
        messages = names.qualified("messages")
        return cls(
            read=read_sql(sessions, messages, param=lambda n: f"${n}", by_id='id COLLATE "C"'),
            insert_session=(
                f"INSERT INTO {sessions} (id, title, created_at, updated_at, metadata)"
                " VALUES ($1, $2, $3, $3, $4)"
            ),
            # One statement: the session row is locked by the UPDATE, so a concurrent delete
            # cannot orphan the message, and GREATEST keeps updated_at at the latest stamp
            # whatever order concurrent writers commit in.
            add_message=(
                f"WITH touched AS (UPDATE {sessions} SET updated_at = GREATEST(updated_at, $5)"
                " WHERE id = $2 RETURNING id)"
                f" INSERT INTO {messages} (id, session_id, role, content, metadata, created_at)"
                " SELECT $1::text, touched.id, $3::text, $4::text, $6::jsonb, $5::timestamptz"
                " FROM touched RETURNING id"
            ),
            update_title=(
                f"UPDATE {sessions} SET title = $2, updated_at = GREATEST(updated_at, $3)"
                " WHERE id = $1"
            ),
            delete_session=f"DELETE FROM {sessions} WHERE id = $1",
            clear_messages=f"DELETE FROM {messages}",
            clear_sessions=f"DELETE FROM {sessions}",
        )


def _as_is(value: Any, column: str) -> Any:
    return value


_DECODERS: dict[str, Any] = {"timestamp": _as_is, "metadata": _as_is}


def _affected(status: str) -> int:
    """Rows affected, from a command tag such as ``UPDATE 1``."""
    return int(status.rsplit(" ", 1)[-1])


async def create_session(
    conn: asyncpg.Connection, sql: Sql, title: str, metadata: dict[str, Any] | None
) -> str:
    check_text(title, "title")
    _, value = prepare_metadata(metadata)
    session_id = new_id()
    await conn.execute(sql.insert_session, session_id, title, now(), value)
    return session_id


async def add_message(
    conn: asyncpg.Connection,
    sql: Sql,
    session_id: str,
    role: str,
    content: str,
    metadata: dict[str, Any] | None,
) -> str:
    check_text(role, "role")
    check_text(content, "content")
    _, value = prepare_metadata(metadata)
    message_id = new_id()
    stamp: datetime = now()
    if (
        await conn.fetchval(sql.add_message, message_id, session_id, role, content, stamp, value)
        is None
    ):
        raise SessionNotFoundError(session_id)
    return message_id


async def get_history(
    conn: asyncpg.Connection, sql: Sql, session_id: str, limit: int
) -> list[dict[str, Any]]:
    rows = await conn.fetch(sql.read.history, session_id, limit)
    return [message_dict(r, **_DECODERS) for r in rows]


async def get_sessions(
    conn: asyncpg.Connection, sql: Sql, limit: int, offset: int
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        sql.read.sessions_page, check_count(limit, "limit"), check_count(offset, "offset")
    )
    return [session_dict(r, **_DECODERS) for r in rows]


async def get_session(conn: asyncpg.Connection, sql: Sql, session_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(sql.read.session, session_id)
    return session_dict(row, **_DECODERS) if row is not None else None


async def update_session_title(
    conn: asyncpg.Connection, sql: Sql, session_id: str, title: str
) -> None:
    check_text(title, "title")
    if _affected(await conn.execute(sql.update_title, session_id, title, now())) == 0:
        raise SessionNotFoundError(session_id)


async def delete_session(conn: asyncpg.Connection, sql: Sql, session_id: str) -> bool:
    return _affected(await conn.execute(sql.delete_session, session_id)) > 0


# ------------------------------------------------------------------ the backend


class PostgresMemory(MemoryBase):
    """The app's memory in PostgreSQL through an asyncpg pool opened on first use.

    Creates the target tables, keys and index when absent (``create_tables=False`` refuses
    instead). Connection failures raise :class:`core.errors.MigrateError` subclasses with a
    sentence that names host, port and database, never the password.
    """

    def __init__(
        self,
        dsn: str,
        schema: str = "public",
        min_size: int = 2,
        max_size: int = 10,
        default_history_limit: int = DEFAULT_HISTORY_LIMIT,
        *,
        names: TargetNames | None = None,
        create_tables: bool = True,
    ) -> None:
        super().__init__(default_history_limit=default_history_limit)
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError(
                "pool sizes need 0 <= min_size <= max_size and max_size >= 1,"
                f" not {min_size}..{max_size}"
            )
        self.dsn = dsn
        self.names = names or TargetNames(schema=schema)
        self.min_size = min_size
        self.max_size = max_size
        self.create_tables = create_tables
        self.location = dsn_location(dsn)
        self.sql = Sql.for_names(self.names)
        self._pool: asyncpg.Pool | None = None
        self._open_lock = anyio.Lock()

    @property
    def pool(self) -> asyncpg.Pool | None:
        """The pool once opened (for its size), else None."""
        return self._pool

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def open(self) -> None:
        await self._get_pool()

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._open_lock:
            if self._pool is None:
                self._pool = await self._create_pool()
        return self._pool

    async def _create_pool(self) -> asyncpg.Pool:
        pool = await open_pool(self.dsn, min_size=self.min_size, max_size=self.max_size)
        try:
            async with pool.acquire() as conn:
                if self.create_tables:
                    await ensure_schema(conn, self.names)
                elif missing := await missing_objects(conn, self.names):
                    raise TargetError(
                        f"PostgreSQL at {self.location} lacks {', '.join(missing)};"
                        " migrate first or let the memory create its tables."
                    )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await pool.close()
            raise
        return pool

    async def close(self) -> None:
        """Close the pool, waiting up to 10 s for connections in use (the next call reopens)."""
        async with self._open_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            with anyio.move_on_after(10, shield=True):
                await pool.close()
            pool.terminate()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        pool = await self._get_pool()
        async with pool.acquire() as conn:
            yield conn

    # -------------------------------------------------------------- the API

    async def create_session(self, title: str = "", metadata: dict[str, Any] | None = None) -> str:
        async with self._conn() as conn:
            return await create_session(conn, self.sql, title, metadata)

    async def add_message(
        self, session_id: str, role: str, content: str, metadata: dict[str, Any] | None = None
    ) -> str:
        async with self._conn() as conn:
            return await add_message(conn, self.sql, session_id, role, content, metadata)

    async def get_history(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        limit = self.history_limit(limit)
        async with self._conn() as conn:
            return await get_history(conn, self.sql, session_id, limit)

    async def get_sessions(
        self, limit: int = DEFAULT_SESSIONS_LIMIT, offset: int = 0
    ) -> list[dict[str, Any]]:
        async with self._conn() as conn:
            return await get_sessions(conn, self.sql, limit, offset)

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        async with self._conn() as conn:
            return await get_session(conn, self.sql, session_id)

    async def update_session_title(self, session_id: str, title: str) -> None:
        async with self._conn() as conn:
            await update_session_title(conn, self.sql, session_id, title)

    async def delete_session(self, session_id: str) -> bool:
        async with self._conn() as conn:
            return await delete_session(conn, self.sql, session_id)

    async def count_sessions(self) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval(self.sql.read.count))

    async def clear_all(self) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute(self.sql.clear_messages)
            await conn.execute(self.sql.clear_sessions)
