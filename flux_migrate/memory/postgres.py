"""The PostgreSQL backend: asyncpg pools, native timestamptz and jsonb, the pipeline's schema.

With a read DSN (a streaming standby), reads go to a second pool there unless this memory
object wrote something the standby has not replayed yet: after each write the backend notes
``pg_current_wal_lsn()``, and a read goes to the standby only once its
``pg_last_wal_replay_lsn()`` reached that point (else to the primary). A standby that is down,
errs, or lags more than ``max_replica_lag`` seconds is skipped for a few seconds: reads fall
back to the primary, costing latency, never an error.

Every statement takes its values as parameters ($1, $2); table names come from
:class:`core.schema.TargetNames` through ``quote_ident``. The operations are module-level
functions over one connection so that ``pipeline.check`` can run the very same statements
inside a transaction it rolls back.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import asyncpg
import orjson

from flux_migrate.core.catalog import MIGRATION_LOCK_KEY, existing_constraint_names, table_exists
from flux_migrate.core.dsn import dsn_location
from flux_migrate.core.errors import ErrorClass, MigrateError, TargetError, classify, translate
from flux_migrate.core.schema import TABLES, TargetNames, constraints, target_ddl
from flux_migrate.memory.base import (
    DEFAULT_ACQUIRE_TIMEOUT,
    DEFAULT_HISTORY_LIMIT,
    DEFAULT_SESSIONS_LIMIT,
    MemoryBase,
    MemoryClosedError,
    PoolTimeoutError,
    ReadSql,
    SessionNotFoundError,
    WaitStats,
    check_count,
    check_id,
    check_pool_bounds,
    check_text,
    elapsed_ms,
    loads_metadata,
    message_dict,
    new_id,
    now,
    prepare_metadata,
    read_sql,
    session_dict,
)

T = TypeVar("T")

APPLICATION_NAME = "flux-migrate memory"
JSONB_VERSION = b"\x01"


# ------------------------------------------------------------------ connections


def _encode_jsonb(value: Any) -> bytes:
    if not isinstance(value, dict):
        # A str would silently become a JSON string instead of an object.
        raise TypeError(f"jsonb metadata must be a dict, not {type(value).__name__}")
    try:
        return JSONB_VERSION + orjson.dumps(value)
    except TypeError:  # ints beyond 64 bits, nesting beyond 255 levels
        return JSONB_VERSION + json.dumps(value, allow_nan=False).encode("utf-8")


def _decode_jsonb(data: bytes) -> Any:
    return loads_metadata(data[1:])


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
        raise translate(exc, dsn_location(dsn), connecting=True) from None


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
            # Metadata travels as the json.dumps text, parsed by the server: the same values
            # as on SQLite (ints of any size, deep nesting), no client-side re-encoding.
            insert_session=(
                f"INSERT INTO {sessions} (id, title, created_at, updated_at, metadata, user_id)"
                " VALUES ($1, $2, $3, $3, $4::text::jsonb, $5)"
            ),
            # One statement: the session row is locked by the UPDATE, so a concurrent delete
            # cannot orphan the message, and GREATEST keeps updated_at at the latest stamp
            # whatever order concurrent writers commit in.
            add_message=(
                f"WITH touched AS (UPDATE {sessions} SET updated_at = GREATEST(updated_at, $5)"
                " WHERE id = $2 RETURNING id)"
                f" INSERT INTO {messages} (id, session_id, role, content, metadata, created_at)"
                " SELECT $1::text, touched.id, $3::text, $4::text, $6::text::jsonb,"
                " $5::timestamptz FROM touched RETURNING id"
            ),
            update_title=(
                f"UPDATE {sessions} SET title = $2, updated_at = GREATEST(updated_at, $3)"
                " WHERE id = $1"
            ),
            delete_session=f"DELETE FROM {sessions} WHERE id = $1",
            clear_messages=f"DELETE FROM {messages}",
            clear_sessions=f"DELETE FROM {sessions}",
        )


# asyncpg reads -infinity / infinity as naive datetime.min / datetime.max (which it also writes
# as the infinities): read them as the instants they stand for, in UTC.
_EDGES = {
    datetime.min: datetime.min.replace(tzinfo=UTC),
    datetime.max: datetime.max.replace(tzinfo=UTC),
}


def _timestamp(value: Any, column: str) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return _EDGES.get(value, value.replace(tzinfo=UTC))
    return value


def _metadata(value: Any, column: str) -> Any:
    return value if isinstance(value, dict) else {}


_DECODERS: dict[str, Any] = {"timestamp": _timestamp, "metadata": _metadata}


def _affected(status: str) -> int:
    """Rows affected, from a command tag such as ``UPDATE 1``."""
    return int(status.rsplit(" ", 1)[-1])


async def create_session(
    conn: asyncpg.Connection,
    sql: Sql,
    title: str,
    metadata: dict[str, Any] | None,
    user_id: str = "",
) -> str:
    check_text(title, "title")
    check_text(user_id, "user_id")
    text = prepare_metadata(metadata)
    session_id = new_id()
    await conn.execute(sql.insert_session, session_id, title, now(), text, user_id)
    return session_id


async def add_message(
    conn: asyncpg.Connection,
    sql: Sql,
    session_id: str,
    role: str,
    content: str,
    metadata: dict[str, Any] | None,
) -> str:
    check_id(session_id)
    check_text(role, "role")
    check_text(content, "content")
    text = prepare_metadata(metadata)
    message_id = new_id()
    stamp: datetime = now()
    if (
        await conn.fetchval(sql.add_message, message_id, session_id, role, content, stamp, text)
        is None
    ):
        raise SessionNotFoundError(session_id)
    return message_id


async def get_history(
    conn: asyncpg.Connection, sql: Sql, session_id: str, limit: int
) -> list[dict[str, Any]]:
    rows = await conn.fetch(sql.read.history, check_id(session_id), check_count(limit, "limit"))
    return [message_dict(r, **_DECODERS) for r in rows]


async def get_sessions(
    conn: asyncpg.Connection, sql: Sql, limit: int, offset: int, user_id: str = ""
) -> list[dict[str, Any]]:
    params: tuple[Any, ...] = (check_count(limit, "limit"), check_count(offset, "offset"))
    check_text(user_id, "user_id")
    statement = sql.read.sessions_page
    if user_id:
        statement, params = sql.read.user_sessions_page, (*params, user_id)
    rows = await conn.fetch(statement, *params)
    return [session_dict(r, with_count=True, **_DECODERS) for r in rows]


async def get_session(conn: asyncpg.Connection, sql: Sql, session_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(sql.read.session, check_id(session_id))
    return session_dict(row, **_DECODERS) if row is not None else None


async def update_session_title(
    conn: asyncpg.Connection, sql: Sql, session_id: str, title: str
) -> bool:
    """Rename; True if the session existed (the API returns None either way)."""
    check_id(session_id)
    check_text(title, "title")
    return _affected(await conn.execute(sql.update_title, session_id, title, now())) > 0


async def delete_session(conn: asyncpg.Connection, sql: Sql, session_id: str) -> bool:
    """Delete a session and (by cascade) its messages; True if there was one."""
    return _affected(await conn.execute(sql.delete_session, check_id(session_id))) > 0


# ------------------------------------------------------------------ pools: primary and standby

REPLICA_RETRY_SECONDS = 5.0  # how long a failed standby is skipped before it is tried again
LAG_SAMPLE_SECONDS = 1.0  # how often the standby's replay lag is measured for routing
RECHECK_BEHIND_SECONDS = 0.02  # a standby found behind our writes is asked again after this

_LAG_SQL = (
    "SELECT pg_last_wal_replay_lsn(),"
    " CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0"
    " ELSE COALESCE(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0) END"
)


@dataclass
class Node:
    """One server the memory talks to: its pool (opened on first use) and its figures."""

    role: str  # "primary" or "replica" (what we use it for; health() asks the server)
    dsn: str
    min_size: int
    max_size: int
    connect_timeout: float
    pool: asyncpg.Pool | None = None
    waits: WaitStats = field(default_factory=WaitStats)
    reads: int = 0
    fallbacks: int = 0
    down_until: float = 0.0
    last_error: str | None = None
    replay_lsn: int = 0  # the highest replay LSN seen on this standby
    lag_seconds: float | None = None
    lag_checked_at: float = 0.0
    open_lock: anyio.Lock = field(default_factory=anyio.Lock)
    in_use: set[asyncpg.Connection] = field(default_factory=set)  # held by calls right now

    def pool_figures(self) -> dict[str, Any]:
        """size, idle, min, max, in_use and the acquire waits (count, p50, p99)."""
        pool = self.pool
        size = pool.get_size() if pool is not None else 0
        idle = pool.get_idle_size() if pool is not None else 0
        return {
            "size": size,
            "idle": idle,
            "min": self.min_size,
            "max": self.max_size,
            "in_use": size - idle,
            "acquire_wait": self.waits.summary(),
        }


async def _end_server_side(node: Node) -> None:
    """End the server backends of calls still running after the drain timeout, and wait (up
    to 2 s) until they are gone: a call blocked on a lock must be rolled back, never commit
    after the client gave up on it (closing the socket alone leaves it waiting, then
    committing). Best effort: a server that cannot be reached has ended them anyway."""
    pids = [c.get_server_pid() for c in node.in_use if not c.is_closed()]
    if not pids:
        return
    with anyio.move_on_after(3, shield=True):
        try:
            admin = await asyncpg.connect(node.dsn, timeout=2)
        except Exception:  # noqa: BLE001 - unreachable: its backends are gone with it
            return
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid, 2000) FROM unnest($1::int[]) pid", pids
            )
        except Exception:  # noqa: BLE001 - best effort; the sockets are closed next
            pass
        finally:
            admin.terminate()


class PostgresMemory(MemoryBase):
    """The app's memory in PostgreSQL through an asyncpg pool opened on first use.

    Creates the target tables, keys and index when absent (``create_tables=False`` refuses
    instead). Connection failures raise :class:`core.errors.MigrateError` subclasses with a
    sentence that names host, port and database, never the password. ``read_dsn`` names a
    streaming standby for reads (see the module docstring for the routing rule).
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
        read_dsn: str | None = None,
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
        max_replica_lag: float = 5.0,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__(default_history_limit=default_history_limit)
        check_pool_bounds(min_size, max_size)
        self.dsn = dsn
        self.names = names or TargetNames(schema=schema)
        self.min_size = min_size
        self.max_size = max_size
        self.create_tables = create_tables
        self.acquire_timeout = acquire_timeout
        self.max_replica_lag = max_replica_lag
        self.location = dsn_location(dsn)
        self.sql = Sql.for_names(self.names)
        self.primary = Node("primary", dsn, min_size, max_size, connect_timeout)
        self.replica = (
            Node("replica", read_dsn, min_size, max_size, min(connect_timeout, 2.0))
            if read_dsn
            else None
        )
        self.last_write_lsn = 0  # pg_current_wal_lsn() after this object's latest write
        self.write_position_unknown = False  # a write committed whose position is unknown
        self._schema_ready = False

    @property
    def pool(self) -> asyncpg.Pool | None:
        """The primary's pool once opened (for its size), else None."""
        return self.primary.pool

    @property
    def is_open(self) -> bool:
        return self.primary.pool is not None

    async def open(self) -> None:
        async with self.lifecycle.admit():
            await self._get_pool(self.primary)

    async def _get_pool(self, node: Node, *, prepare: bool = True) -> asyncpg.Pool:
        """``node``'s pool, opened on first use; on the primary, with ``prepare``, the tables
        are created (or checked, without ``create_tables``) once before the first call."""
        if node.pool is not None and (
            self._schema_ready or not prepare or node is not self.primary
        ):
            return node.pool
        async with node.open_lock:
            if node.pool is None:
                self.lifecycle.refuse_if_closing()  # a call during close() never reopens
                minimum = node.min_size if node is self.primary else min(node.min_size, 1)
                node.pool = await open_pool(
                    node.dsn, min_size=minimum, max_size=node.max_size, timeout=node.connect_timeout
                )
            if prepare and node is self.primary and not self._schema_ready:
                try:
                    await self._prepare_schema(node.pool)
                except BaseException:
                    pool, node.pool = node.pool, None
                    with anyio.CancelScope(shield=True):
                        await pool.close()
                    raise
                self._schema_ready = True
        return node.pool

    async def _prepare_schema(self, pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn:
            if self.create_tables:
                await ensure_schema(conn, self.names)
            elif missing := await missing_objects(conn, self.names):
                raise TargetError(
                    f"PostgreSQL at {self.location} lacks {', '.join(missing)};"
                    " migrate first or let the memory create its tables."
                )

    async def close(self, timeout: float = 10.0) -> None:
        """Drain, then close: stop admitting calls, wait up to ``timeout`` s for running ones,
        then terminate what is left (the next call after the close reopens).

        Calls made during the close, and callers still waiting for a connection, get
        MemoryClosedError and write nothing.
        """
        self.lifecycle.closing = True
        try:
            started = time.monotonic()
            drained = await self.lifecycle.drain(timeout)
            for node in (self.primary, self.replica):
                if node is None:
                    continue
                if not drained:
                    await _end_server_side(node)
                async with node.open_lock:
                    pool, node.pool = node.pool, None
                    self._schema_ready = False
                if pool is None:
                    continue
                left = max(0.0, timeout - (time.monotonic() - started))
                with anyio.move_on_after(left, shield=True):
                    await pool.close()
                pool.terminate()
        finally:
            self.lifecycle.closing = False

    @asynccontextmanager
    async def _acquire(
        self, node: Node, *, prepare: bool = True
    ) -> AsyncIterator[asyncpg.Connection]:
        """A connection of ``node``'s pool; PoolTimeoutError after the acquire timeout."""
        pool = await self._get_pool(node, prepare=prepare)
        started = time.perf_counter()
        try:
            conn = await pool.acquire(timeout=self.acquire_timeout)
        except TimeoutError:
            raise PoolTimeoutError(
                f"no connection to PostgreSQL at {dsn_location(node.dsn)} became free within"
                f" {self.acquire_timeout:g} s (pool max {node.max_size}); nothing was written"
            ) from None
        node.waits.record(time.perf_counter() - started)
        node.in_use.add(conn)
        try:
            self.lifecycle.refuse_if_closing()
            yield conn
        finally:
            node.in_use.discard(conn)
            await pool.release(conn)

    async def _write(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run a write on the primary; note its WAL position when a standby serves reads."""
        async with self.lifecycle.admit(), self._acquire(self.primary) as conn:
            result = await operation(conn)
            if self.replica is not None:
                await self._note_write_position(conn)
            return result

    async def _note_write_position(self, conn: asyncpg.Connection) -> None:
        """Remember the WAL position after a committed write; if that cannot be read, send
        reads to the primary until a later write's position is known (the write stands)."""
        try:
            lsn = int(await conn.fetchval("SELECT pg_current_wal_lsn()"))
        except Exception:  # noqa: BLE001 - the write committed: never report it as failed
            self.write_position_unknown = True
            return
        self.last_write_lsn = max(self.last_write_lsn, lsn)
        self.write_position_unknown = False

    async def _read(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run a read on the standby when it has every write of this object, else the primary."""
        async with self.lifecycle.admit():
            replica = self.replica
            if replica is not None:
                if self._worth_asking(replica):
                    try:
                        async with self._acquire(replica) as conn:
                            if await self._replica_is_current(replica, conn):
                                result = await operation(conn)
                                replica.reads += 1
                                return result
                    except MemoryClosedError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - a standby failure costs latency
                        self._replica_failed(replica, exc)
                replica.fallbacks += 1
            async with self._acquire(self.primary) as conn:
                return await operation(conn)

    def _worth_asking(self, node: Node) -> bool:
        """False while the standby is skipped, or was behind this object's writes moments ago
        (then the read goes straight to the primary, sparing a round trip to the standby)."""
        at = time.monotonic()
        if at < node.down_until:
            return False
        behind = self.write_position_unknown or node.replay_lsn < self.last_write_lsn
        return not (behind and at - node.lag_checked_at < RECHECK_BEHIND_SECONDS)

    async def _replica_is_current(self, node: Node, conn: asyncpg.Connection) -> bool:
        """Whether the standby replayed this object's last write and lags little."""
        if self.write_position_unknown:
            return False
        stale_sample = time.monotonic() - node.lag_checked_at >= LAG_SAMPLE_SECONDS
        if node.replay_lsn >= self.last_write_lsn and not stale_sample:
            return node.lag_seconds is None or node.lag_seconds <= self.max_replica_lag
        replay, lag = await conn.fetchrow(_LAG_SQL)
        node.replay_lsn = max(node.replay_lsn, int(replay or 0))
        node.lag_seconds = float(lag)
        node.lag_checked_at = time.monotonic()
        return node.replay_lsn >= self.last_write_lsn and node.lag_seconds <= self.max_replica_lag

    def _replica_failed(self, node: Node, exc: BaseException) -> None:
        node.last_error = exc.message if isinstance(exc, MigrateError) else type(exc).__name__
        if isinstance(exc, (MigrateError, PoolTimeoutError)) or classify(exc) in (
            ErrorClass.TRANSIENT,
            ErrorClass.FATAL,
        ):
            node.down_until = time.monotonic() + REPLICA_RETRY_SECONDS
            pool, node.pool = node.pool, None
            if pool is not None:
                pool.terminate()  # its connections may be dead; a new pool on the next try

    # -------------------------------------------------------------- health

    async def health(self) -> dict[str, Any]:
        """The primary's figures (and the standby's under ``replica``); never raises.

        ``ok`` is whether the primary answered; a standby that does not answer shows
        ``ok: False`` in its own section and reads fall back to the primary.
        """
        out = await self._node_health(self.primary)
        if self.replica is not None:
            out["replica"] = await self._node_health(self.replica)
            out["replica"].update(
                reads=self.replica.reads,
                fallbacks=self.replica.fallbacks,
                last_error=self.replica.last_error,
            )
        return out

    async def _node_health(self, node: Node) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": False, "role": None, "location": dsn_location(node.dsn)}
        try:
            async with self._acquire(node, prepare=False) as conn:
                started = time.perf_counter()
                await conn.fetchval("SELECT 1")
                out["latency_ms"] = elapsed_ms(started)
                version, standby = await conn.fetchrow(
                    "SELECT current_setting('server_version'), pg_is_in_recovery()"
                )
                out.update(
                    ok=True, server_version=version, role="standby" if standby else "primary"
                )
                if standby:
                    replay, lag = await conn.fetchrow(_LAG_SQL)
                    out["replay_lag_s"] = round(float(lag), 3)
                    out["replay_lsn"] = int(replay or 0)
        except Exception as exc:  # noqa: BLE001 - health reports, never raises
            out["error"] = exc.message if isinstance(exc, MigrateError) else type(exc).__name__
        out["pool"] = node.pool_figures()
        return out

    # -------------------------------------------------------------- the API

    async def create_session(
        self, title: str = "", metadata: dict[str, Any] | None = None, user_id: str = ""
    ) -> str:
        check_text(title, "title")
        check_text(user_id, "user_id")
        prepare_metadata(metadata)  # refuse bad values before taking a connection
        return await self._write(lambda c: create_session(c, self.sql, title, metadata, user_id))

    async def add_message(
        self, session_id: str, role: str, content: str, metadata: dict[str, Any] | None = None
    ) -> str:
        check_id(session_id)
        return await self._write(
            lambda c: add_message(c, self.sql, session_id, role, content, metadata)
        )

    async def get_history(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        check_id(session_id)
        count = self.history_limit(limit)
        return await self._read(lambda c: get_history(c, self.sql, session_id, count))

    async def get_sessions(
        self, limit: int = DEFAULT_SESSIONS_LIMIT, offset: int = 0, user_id: str = ""
    ) -> list[dict[str, Any]]:
        check_count(limit, "limit")
        check_count(offset, "offset")
        check_text(user_id, "user_id")
        return await self._read(lambda c: get_sessions(c, self.sql, limit, offset, user_id))

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        check_id(session_id)
        return await self._read(lambda c: get_session(c, self.sql, session_id))

    async def update_session_title(self, session_id: str, title: str) -> None:
        check_id(session_id)
        check_text(title, "title")
        await self._write(lambda c: update_session_title(c, self.sql, session_id, title))

    async def delete_session(self, session_id: str) -> None:
        check_id(session_id)
        await self._write(lambda c: delete_session(c, self.sql, session_id))

    async def count_sessions(self) -> int:
        async def count(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval(self.sql.read.count))

        return await self._read(count)

    async def clear_all(self) -> None:
        async def clear(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute(self.sql.clear_messages)
                await conn.execute(self.sql.clear_sessions)

        await self._write(clear)
