"""The PostgreSQL backend: asyncpg pools, native timestamptz and jsonb, the pipeline's schema.

Every wait is bounded (:class:`memory.base.Timeouts`): connecting, waiting for a free
connection, each statement (client side, and PostgreSQL's ``statement_timeout``). A server that
does not answer within its bound costs that bound and raises :class:`MemoryUnavailableError`;
the connection is dropped, never reused.

With a read DSN (a streaming standby of the same cluster, checked by ``pg_is_in_recovery()``
and the system identifier when its pool opens), a read goes to the standby only when the
standby is provably fresh: its WAL receiver streams (when this role may see it), and its
``pg_last_wal_replay_lsn()`` has reached both this object's last write (the primary's
``pg_current_wal_insert_lsn()`` after the commit, which covers asynchronous commits) and a
position of the primary sampled within ``max_replica_lag`` seconds (``read_consistency=
"strong"``: sampled after the read began, so every write acknowledged to anyone before the
read is seen). Else the read goes to the primary. A standby that fails or does not answer
within the replica timeout is skipped for a few seconds: it costs latency, never an error.

Every statement takes its values as parameters ($1, $2); table names come from
:class:`core.schema.TargetNames` through ``quote_ident``. The operations are module-level
functions over one connection so that ``pipeline.check`` can run the very same statements
inside a transaction it rolls back.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import asyncpg
import orjson

from flux_migrate.core.catalog import MIGRATION_LOCK_KEY, existing_constraint_names, table_exists
from flux_migrate.core.dsn import dsn_location
from flux_migrate.core.errors import (
    ErrorClass,
    MigrateError,
    TargetError,
    classify,
    is_lost_connection,
    sqlstate,
    translate,
)
from flux_migrate.core.schema import (
    MESSAGES,
    SESSIONS,
    TABLES,
    Column,
    Table,
    TargetNames,
    add_column_sql,
    constraints,
    drop_retired_user_index_sql,
    fitted_name,
    target_ddl,
)
from flux_migrate.memory.base import (
    DEFAULT_HISTORY_LIMIT,
    DEFAULT_SESSIONS_LIMIT,
    MemoryBase,
    MemoryClosedError,
    MemoryUnavailableError,
    PoolTimeoutError,
    ReadSql,
    SessionNotFoundError,
    Timeouts,
    WaitStats,
    check_count,
    check_id,
    check_pool_bounds,
    check_text,
    elapsed_ms,
    iso,
    loads_metadata,
    matches_nothing,
    new_id,
    now,
    prepare_metadata,
    read_sql,
    sqlite_limit,
    sqlite_offset,
)
from flux_migrate.stages.convert import positional_floats

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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a connection without asyncpg's reset query (a round trip per call): the memory
    sets no session state, holds no session locks and uses only managed transactions."""


async def open_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    timeout: float = 10.0,
    command_timeout: float | None = None,
    statement_timeout: float | None = None,
) -> asyncpg.Pool:
    """A pool with the jsonb codec on every connection; MigrateError (no password) on failure.

    Blocks until ``min_size`` connections are open, at most ``timeout`` seconds in all (each
    new connection later has the same bound). ``command_timeout`` bounds every statement on
    the client, ``statement_timeout`` sets PostgreSQL's own.
    """
    try:
        return await create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            command_timeout=command_timeout,
            statement_timeout=statement_timeout,
        )
    except Exception as exc:  # noqa: BLE001 - one sentence, no password
        raise translate(exc, dsn_location(dsn), connecting=True) from None


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    timeout: float,
    command_timeout: float | None = None,
    statement_timeout: float | None = None,
) -> asyncpg.Pool:
    """:func:`open_pool` raising the driver's own exceptions (TimeoutError after ``timeout``);
    a pool that failed to open leaves no connection behind."""
    settings = {"application_name": APPLICATION_NAME}
    if statement_timeout is not None:
        settings["statement_timeout"] = str(max(1, round(statement_timeout * 1000)))
    pool = asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init_connection,
        server_settings=settings,
        timeout=timeout,
        command_timeout=command_timeout,
        reset=_keep_session,
    )
    with anyio.fail_after(timeout):  # asyncpg's own bound is per connection attempt
        await pool
    return pool


def abandon_pool(pool: asyncpg.Pool) -> None:
    """Close the sockets of a pool whose event loop has ended (``asyncio.run`` returned):
    asyncpg's own terminate needs that loop. Uses asyncpg's private attributes, guarded, so
    that at worst a socket is left to the garbage collector."""
    for holder in getattr(pool, "_holders", ()):
        conn = getattr(holder, "_con", None)
        transport = getattr(conn, "_transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        raw = getattr(sock, "_sock", sock)
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.close()
    with contextlib.suppress(AttributeError):
        pool._closed = True


# The advisory lock pipeline.runner.migrate holds on a schema while it loads it.
_MIGRATION_LOCK_SQL = f"SELECT pg_try_advisory_xact_lock({MIGRATION_LOCK_KEY})"


def _old_user_index(names: TargetNames) -> str:
    """The index of earlier releases on (user_id, updated_at), which refuses long user_ids."""
    return fitted_name(f"idx_{names.table(SESSIONS.name)}", "_user")


async def _missing_columns(
    conn: asyncpg.Connection, names: TargetNames
) -> list[tuple[Table, Column]]:
    """The target-only and generated columns absent from tables that exist."""
    rows = await conn.fetch(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = $1",
        names.schema,
    )
    have = {(r[0], r[1]) for r in rows}
    tables = {r[0] for r in rows}
    return [
        (t, c)
        for t in TABLES
        for c in t.target_only + t.generated
        if names.table(t.name) in tables and (names.table(t.name), c.name) not in have
    ]


async def missing_objects(conn: asyncpg.Connection, names: TargetNames) -> list[str]:
    """Names of the target's tables, columns, keys and indexes that do not exist yet (and the
    index of earlier releases that must go)."""
    missing = [
        names.qualified(t.name) for t in TABLES if not await table_exists(conn, names, t.name)
    ]
    missing += [
        f"{names.qualified(t.name)}.{c.name}" for t, c in await _missing_columns(conn, names)
    ]
    have = await existing_constraint_names(conn, names.schema)
    missing += [c.name for c in constraints(names) if c.name not in have]
    if _old_user_index(names) in have:
        missing.append(f"(drop) {_old_user_index(names)}")
    return missing


async def ensure_schema(conn: asyncpg.Connection, names: TargetNames) -> bool:
    """Create the target schema, tables, columns, keys and indexes that are absent; True if it
    created any.

    Runs the statements of :func:`core.schema.target_ddl`, skipping each key that already
    exists by name, adds the generated columns (``messages.seq``) to tables made before them,
    and drops the ``(user_id, updated_at)`` index of earlier releases. Raises TargetError,
    creating nothing, while a migration is loading the schema.
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
        for table, column in await _missing_columns(conn, names):
            await conn.execute(add_column_sql(table, column, names))
        await conn.execute(drop_retired_user_index_sql(names))
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
            read=read_sql(
                sessions,
                messages,
                param=lambda n: f"${n}",
                by_id='id COLLATE "C"',
                arrival="seq",
                # md5 first: the index holds md5(user_id) (a user_id has no length limit).
                user_match="md5(s.user_id) = md5($3) AND s.user_id = $3",
            ),
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


def _stamp(value: Any) -> str:
    """A timestamptz as the API's ISO text: asyncpg's aware UTC datetimes directly."""
    if type(value) is datetime and value.tzinfo is UTC:
        return value.isoformat()
    decoded = _timestamp(value, "")
    return iso(decoded) if isinstance(decoded, datetime) else str(decoded)


# Positions in the read statements' rows (schema column order, see memory.base.select_list).
_M = {c: i for i, c in enumerate(MESSAGES.column_names)}
_S = {c: i for i, c in enumerate(SESSIONS.column_names)}
_COUNT_AT = len(SESSIONS.column_names)


def _message(row: asyncpg.Record) -> dict[str, Any]:
    """A message row as the app's dict (the hot path of get_history: no per-column dispatch)."""
    metadata = row[_M["metadata"]]
    return {
        "id": row[_M["id"]],
        "role": row[_M["role"]],
        "content": row[_M["content"]],
        "metadata": metadata if isinstance(metadata, dict) else {},
        "created_at": _stamp(row[_M["created_at"]]),
    }


def _session(row: asyncpg.Record, *, with_count: bool = False) -> dict[str, Any]:
    """A session row (then its message count) as the app's dict."""
    metadata = row[_S["metadata"]]
    out = {
        "id": row[_S["id"]],
        "title": row[_S["title"]],
        "created_at": _stamp(row[_S["created_at"]]),
        "updated_at": _stamp(row[_S["updated_at"]]),
        "metadata": metadata if isinstance(metadata, dict) else {},
    }
    if with_count:
        out["message_count"] = int(row[_COUNT_AT])
    return out


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
    text = positional_floats(prepare_metadata(metadata))
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
    text = positional_floats(prepare_metadata(metadata))
    message_id = new_id()
    stamp: datetime = now()
    if matches_nothing(session_id):
        raise SessionNotFoundError(session_id)
    if (
        await conn.fetchval(sql.add_message, message_id, session_id, role, content, stamp, text)
        is None
    ):
        raise SessionNotFoundError(session_id)
    return message_id


async def get_history(
    conn: asyncpg.Connection, sql: Sql, session_id: str, limit: int
) -> list[dict[str, Any]]:
    if matches_nothing(check_id(session_id)):
        return []
    rows = await conn.fetch(sql.read.history, session_id, check_count(limit, "limit"))
    return [_message(r) for r in rows]


async def get_sessions(
    conn: asyncpg.Connection, sql: Sql, limit: int, offset: int, user_id: str = ""
) -> list[dict[str, Any]]:
    params: tuple[Any, ...] = (sqlite_limit(limit), sqlite_offset(offset))
    if isinstance(user_id, str) and matches_nothing(user_id):
        return []
    check_text(user_id, "user_id")
    statement = sql.read.sessions_page
    if user_id:
        statement, params = sql.read.user_sessions_page, (*params, user_id)
    rows = await conn.fetch(statement, *params)
    return [_session(r, with_count=True) for r in rows]


async def get_session(conn: asyncpg.Connection, sql: Sql, session_id: str) -> dict[str, Any] | None:
    if matches_nothing(check_id(session_id)):
        return None
    row = await conn.fetchrow(sql.read.session, session_id)
    return _session(row) if row is not None else None


async def update_session_title(
    conn: asyncpg.Connection, sql: Sql, session_id: str, title: str
) -> bool:
    """Rename; True if the session existed (the API returns None either way)."""
    check_id(session_id)
    check_text(title, "title")
    if matches_nothing(session_id):
        return False
    return _affected(await conn.execute(sql.update_title, session_id, title, now())) > 0


async def delete_session(conn: asyncpg.Connection, sql: Sql, session_id: str) -> bool:
    """Delete a session and (by cascade) its messages; True if there was one."""
    if matches_nothing(check_id(session_id)):
        return False
    return _affected(await conn.execute(sql.delete_session, session_id)) > 0


# ------------------------------------------------------------------ pools: primary and standby

REPLICA_RETRY_SECONDS = 5.0  # how long a failed or unfit standby is skipped before a new try
END_CALLS_SECONDS = 2.0  # close(): the most spent ending calls still running after the drain
REPLICA_REFUSED_SECONDS = 60.0  # a read DSN found not to be our standby: asked again after this
STANDBY_SAMPLE_SECONDS = 1.0  # how often the standby's replay position and receiver are asked
RECHECK_BEHIND_SECONDS = 0.02  # a standby found behind what a read needs is asked again after this

# On the standby: whether it is one, how far it replayed, and its WAL receiver (no row: none is
# running; a NULL status: running, but this role may not see its state).
_STANDBY_SQL = (
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(),"
    " (SELECT status FROM pg_stat_wal_receiver LIMIT 1),"
    " EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE pid IS NOT NULL)"
)
# The WAL position a read must see: the insert position covers commits not yet flushed
# (synchronous_commit = off), which pg_current_wal_lsn() does not.
_PRIMARY_POSITION_SQL = "SELECT pg_current_wal_insert_lsn()"
_CLUSTER_SQL = "SELECT pg_is_in_recovery(), (SELECT system_identifier FROM pg_control_system())"
_OUTAGE_SQLSTATES = ("57014", "57P01", "57P02", "57P03", "53300")


def _lsn(value: Any) -> int:
    return int(value) if value is not None else 0


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the server did not answer in time or the connection broke."""
    return (
        isinstance(exc, TimeoutError)
        or is_lost_connection(exc)
        or sqlstate(exc).startswith("08")
        or sqlstate(exc) in _OUTAGE_SQLSTATES
    )


def memory_error(
    exc: BaseException, where: str, bound: str, *, connecting: bool = False, sent: bool = False
) -> BaseException:
    """The memory's one translation of a driver exception: an outage becomes
    MemoryUnavailableError (a sentence naming the server and the bound, no CLI advice), a
    refused login TargetError; anything else (a server error about the data) stays itself."""
    if isinstance(exc, MemoryUnavailableError | MemoryClosedError | SessionNotFoundError):
        return exc
    if is_outage(exc):
        what = "cannot be reached" if connecting else "did not answer"
        maybe = "; the write may or may not have committed" if sent else "; nothing was written"
        return MemoryUnavailableError(
            f"PostgreSQL at {where} {what} within {bound} ({type(exc).__name__}){maybe}",
            maybe_written=sent,
        )
    if connecting:
        return translate(exc, where, connecting=True)
    return exc


class ReplicaRefused(Exception):
    """The read DSN is not a standby of the primary's cluster: it is never used."""

    def __init__(self, message: str, role: str) -> None:
        super().__init__(message)
        self.message = message
        self.role = role  # what the server is: "primary" or "standby" (of another cluster)


_NOT_SERVED = object()
READ_CONSISTENCIES = ("bounded", "strong")


def _sentence(exc: BaseException) -> str:
    """What health() says about a failure: the error's own sentence, or its class name."""
    message = getattr(exc, "message", None)
    return message if isinstance(message, str) else type(exc).__name__


@dataclass
class Node:
    """One server the memory talks to: its pool (opened on first use) and its figures."""

    role: str  # "primary" or "replica" (what we use it for; health() asks the server)
    dsn: str
    min_size: int
    max_size: int
    connect_timeout: float
    command_timeout: float
    pool: asyncpg.Pool | None = None
    waits: WaitStats = field(default_factory=WaitStats)
    reads: int = 0
    fallbacks: int = 0
    down_until: float = 0.0
    last_error: str | None = None
    replay_lsn: int = 0  # the highest replay LSN seen on this standby
    replay_checked_at: float = 0.0  # when that was asked (monotonic, before the query)
    receiving: bool = True  # its WAL receiver was streaming (or not visible) when last asked
    open_lock: anyio.Lock = field(default_factory=anyio.Lock)
    opening: anyio.CancelScope | None = None  # the pool being opened, for close() to cancel
    in_use: set[asyncpg.Connection] = field(default_factory=set)  # held by calls right now

    def pool_figures(self) -> dict[str, Any]:
        """size, idle, min, max, in_use and the acquire waits (count, failed, p50, p99)."""
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

    def forget_loop(self) -> None:
        """Drop what belongs to an event loop that has ended: the pool (its sockets closed)
        and the lock."""
        pool, self.pool = self.pool, None
        if pool is not None:
            abandon_pool(pool)
        self.in_use.clear()
        self.open_lock = anyio.Lock()
        self.opening = None


async def _end_server_side(node: Node, budget: float) -> None:
    """End the server backends of calls still running after the drain timeout, and wait (up
    to ``budget`` s) until they are gone: a call blocked on a lock must be rolled back, never
    commit after the client gave up on it (closing the socket alone leaves it waiting, then
    committing). Best effort: a server that cannot be reached has ended them anyway."""
    pids = [c.get_server_pid() for c in node.in_use if not c.is_closed()]
    if not pids or budget <= 0:
        return
    with anyio.move_on_after(budget, shield=True):
        try:
            admin = await asyncpg.connect(node.dsn, timeout=budget)
        except Exception:  # noqa: BLE001 - unreachable: its backends are gone with it
            return
        try:
            wait_ms = max(1, int(budget * 1000) - 100)
            await admin.execute(
                "SELECT pg_terminate_backend(pid, $2) FROM unnest($1::int[]) pid", pids, wait_ms
            )
        except Exception:  # noqa: BLE001 - best effort; the sockets are closed next
            pass
        finally:
            admin.terminate()


class PostgresMemory(MemoryBase):
    """The app's memory in PostgreSQL through an asyncpg pool opened on first use.

    Creates the target tables, keys and index when absent (``create_tables=False`` refuses
    instead). Every wait is bounded (:class:`memory.base.Timeouts`); an outage raises
    :class:`MemoryUnavailableError`, a refused login :class:`core.errors.TargetError`, both
    with a sentence that names host, port and database, never the password. ``read_dsn`` names
    a streaming standby for reads (see the module docstring for the routing rule). The memory
    follows the running event loop: used from a new loop (a new ``asyncio.run``), it drops the
    old loop's pool and opens a new one.
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
        acquire_timeout: float | None = None,
        max_replica_lag: float = 5.0,
        connect_timeout: float | None = None,
        timeouts: Timeouts | None = None,
        read_consistency: str = "bounded",
    ) -> None:
        super().__init__(default_history_limit=default_history_limit)
        check_pool_bounds(min_size, max_size)
        given = timeouts or Timeouts()
        if acquire_timeout is not None:
            given = replace(given, acquire=acquire_timeout)
        if connect_timeout is not None:
            given = replace(given, connect=connect_timeout)
        self.timeouts = given.check()
        if read_consistency not in READ_CONSISTENCIES:
            raise ValueError(
                f"read_consistency must be bounded or strong, not {read_consistency!r}"
            )
        self.read_consistency = read_consistency
        self.dsn = dsn
        self.names = names or TargetNames(schema=schema)
        self.min_size = min_size
        self.max_size = max_size
        self.create_tables = create_tables
        self.max_replica_lag = max_replica_lag
        self.location = dsn_location(dsn)
        self.sql = Sql.for_names(self.names)
        t = self.timeouts
        self.primary = Node("primary", dsn, min_size, max_size, t.connect, t.command)
        self.replica = (
            Node("replica", read_dsn, min_size, max_size, t.replica, t.replica)
            if read_dsn
            else None
        )
        self.last_write_lsn = 0  # the insert position after this object's latest write
        self.write_position_unknown = False  # a write committed whose position is unknown
        # The primary's insert position, sampled (monotonic time asked, LSN) over the last
        # max_replica_lag seconds: a standby that replayed a sample's LSN holds every commit
        # acknowledged before that time.
        self.samples: deque[tuple[float, int]] = deque()
        self.system_identifier: int | None = None  # the primary's, once asked
        self._schema_ready = False

    @property
    def acquire_timeout(self) -> float:
        return self.timeouts.acquire

    @property
    def pool(self) -> asyncpg.Pool | None:
        """The primary's pool once opened (for its size), else None."""
        return self.primary.pool

    @property
    def is_open(self) -> bool:
        return self.primary.pool is not None

    def _nodes(self) -> list[Node]:
        return [self.primary] if self.replica is None else [self.primary, self.replica]

    def _forget_loop(self) -> None:
        for node in self._nodes():
            node.forget_loop()
        self._schema_ready = False

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """Admission of one API call in the running loop."""
        self._follow_loop()
        async with self.lifecycle.admit():
            yield

    async def open(self) -> None:
        async with self._call():
            await self._get_pool(self.primary)

    async def _get_pool(self, node: Node, *, prepare: bool = True) -> asyncpg.Pool:
        """``node``'s pool, opened on first use (at most its connect timeout); on the primary,
        with ``prepare``, the tables are created (or checked) once before the first call; on a
        standby, it is checked to be a standby of the primary's cluster."""
        if node.pool is not None and (
            self._schema_ready or not prepare or node is not self.primary
        ):
            return node.pool
        async with node.open_lock:
            if node.pool is None:
                self.lifecycle.refuse_if_closing()  # a call during close() never reopens
                pool = await self._open_node(node)
                if node is self.replica:
                    try:
                        async with pool.acquire(timeout=self.timeouts.replica) as conn:
                            await self._check_cluster(node, conn)
                    except BaseException:
                        pool.terminate()
                        raise
                node.pool = pool
            if prepare and node is self.primary and not self._schema_ready:
                try:
                    await self._prepare_schema(node.pool)
                except BaseException:
                    pool, node.pool = node.pool, None
                    with anyio.CancelScope(shield=True):
                        pool.terminate()
                    raise
                self._schema_ready = True
        return node.pool

    async def _open_node(self, node: Node) -> asyncpg.Pool:
        minimum = node.min_size if node is self.primary else min(node.min_size, 1)
        where = dsn_location(node.dsn)
        pool: asyncpg.Pool | None = None
        with anyio.CancelScope() as scope:
            node.opening = scope
            try:
                pool = await create_pool(
                    node.dsn,
                    min_size=minimum,
                    max_size=node.max_size,
                    timeout=node.connect_timeout,
                    command_timeout=node.command_timeout,
                    statement_timeout=min(self.timeouts.statement, node.command_timeout),
                )
            except Exception as exc:  # noqa: BLE001 - one sentence, no password
                bound = f"the connect timeout ({node.connect_timeout:g} s)"
                raise memory_error(exc, where, bound, connecting=True) from None
            finally:
                node.opening = None
        if pool is None or scope.cancelled_caught:
            raise MemoryClosedError("the memory closed while connecting; nothing was written")
        return pool

    async def _prepare_schema(self, pool: asyncpg.Pool) -> None:
        async with self._acquire(self.primary, prepare=False) as conn:
            if self.create_tables:
                await ensure_schema(conn, self.names)
            elif missing := await missing_objects(conn, self.names):
                raise TargetError(
                    f"PostgreSQL at {self.location} lacks {', '.join(missing)};"
                    " migrate first or let the memory create its tables."
                )
            if self.replica is not None:  # a first position, for the first reads to use
                asked = time.monotonic()
                self.samples.append((asked, _lsn(await conn.fetchval(_PRIMARY_POSITION_SQL))))

    async def close(self, timeout: float = 10.0) -> None:
        """Drain, then close: stop admitting calls, cancel pools being opened, wait up to
        ``timeout`` s for running calls, then end what is left (at most END_CALLS_SECONDS
        more, to make sure their server backends are gone). The next call after it reopens.

        Calls made during the close, and callers still waiting for a connection, get
        MemoryClosedError and write nothing.
        """
        self._follow_loop()
        self.lifecycle.closing = True
        started = time.monotonic()

        def left() -> float:
            return max(0.0, timeout - (time.monotonic() - started))

        try:
            for node in self._nodes():
                if node.opening is not None:
                    node.opening.cancel()
            drained = await self.lifecycle.drain(timeout)
            for node in self._nodes():
                if not drained:  # at most END_CALLS_SECONDS more
                    await _end_server_side(node, END_CALLS_SECONDS)
                with anyio.move_on_after(left(), shield=True):
                    async with node.open_lock:
                        pass
                pool, node.pool = node.pool, None
                self._schema_ready = False
                if pool is None:
                    continue
                with anyio.move_on_after(left(), shield=True):
                    await pool.close()
                pool.terminate()
        finally:
            self.lifecycle.closing = False

    @asynccontextmanager
    async def _acquire(
        self, node: Node, *, prepare: bool = True, timeout: float | None = None
    ) -> AsyncIterator[asyncpg.Connection]:
        """A connection of ``node``'s pool; PoolTimeoutError after the acquire timeout.

        A connection whose statement failed by an outage or was cancelled is terminated, not
        returned: it may be in the middle of an operation.
        """
        pool = await self._get_pool(node, prepare=prepare)
        bound = self.timeouts.acquire if timeout is None else timeout
        if node is self.replica:
            bound = min(bound, self.timeouts.replica)
        started = time.perf_counter()
        try:
            conn = await pool.acquire(timeout=bound)
        except TimeoutError:
            node.waits.record_failure(time.perf_counter() - started)
            raise PoolTimeoutError(
                f"no connection to PostgreSQL at {dsn_location(node.dsn)} became free within"
                f" {bound:g} s (pool max {node.max_size}); nothing was written"
            ) from None
        except Exception as exc:  # noqa: BLE001 - a new connection failed to open
            node.waits.record_failure(time.perf_counter() - started)
            raise memory_error(
                exc, dsn_location(node.dsn), f"{bound:g} s", connecting=True
            ) from None
        node.waits.record(time.perf_counter() - started)
        node.in_use.add(conn)
        try:
            self.lifecycle.refuse_if_closing()
            yield conn
        except BaseException as exc:
            if is_outage(exc) or not isinstance(exc, Exception):
                conn.terminate()
            raise
        finally:
            node.in_use.discard(conn)
            # Bounded; a release that fails or is cancelled terminates the connection.
            await pool.release(conn, timeout=self.timeouts.command)

    async def _write(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run a write on the primary; note its WAL position when a standby serves reads."""
        async with self._call():
            sent = False
            try:
                async with self._acquire(self.primary) as conn:
                    sent = True
                    result = await operation(conn)
                    if self.replica is not None:
                        await self._note_write_position(conn)
                    return result
            except Exception as exc:  # noqa: BLE001 - the one translation, below
                bound = f"{self.timeouts.command:g} s"
                raise memory_error(exc, self.location, bound, sent=sent) from None

    async def _note_write_position(self, conn: asyncpg.Connection) -> None:
        """Remember the WAL insert position after a committed write; if that cannot be read,
        send reads to the primary until a later write's position is known (the write stands)."""
        try:
            lsn = _lsn(await conn.fetchval(_PRIMARY_POSITION_SQL))
        except Exception:  # noqa: BLE001 - the write committed: never report it as failed
            self.write_position_unknown = True
            return
        self.last_write_lsn = max(self.last_write_lsn, lsn)
        self.write_position_unknown = False

    async def _read(self, operation: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run a read on the standby when it is provably fresh (see the module docstring),
        else on the primary."""
        async with self._call():
            replica = self.replica
            if replica is not None:
                result = await self._read_on_standby(replica, operation)
                if result is not _NOT_SERVED:
                    return result  # type: ignore[return-value]
                replica.fallbacks += 1
            try:
                async with self._acquire(self.primary) as conn:
                    return await operation(conn)
            except Exception as exc:  # noqa: BLE001 - the one translation, below
                raise memory_error(exc, self.location, f"{self.timeouts.command:g} s") from None

    async def _read_on_standby(
        self, node: Node, operation: Callable[[asyncpg.Connection], Awaitable[T]]
    ) -> T | object:
        """The read's result from the standby, or _NOT_SERVED when the standby is down, unfit
        or not provably fresh (each costs at most the replica timeout)."""
        if not self._worth_asking(node):
            return _NOT_SERVED
        try:
            needed = await self._needed_position()
            if needed is None:
                return _NOT_SERVED
            with anyio.fail_after(self.timeouts.replica * 2):
                async with self._acquire(node) as conn:
                    if not await self._standby_is_fresh(node, conn, needed):
                        return _NOT_SERVED
                    result = await operation(conn)
            node.reads += 1
            return result
        except MemoryClosedError:
            raise
        except Exception as exc:  # noqa: BLE001 - a standby failure costs latency
            self._replica_failed(node, exc)
            return _NOT_SERVED

    def _worth_asking(self, node: Node) -> bool:
        """False while the standby is skipped, or was behind moments ago (then the read goes
        straight to the primary, sparing a round trip to the standby)."""
        at = time.monotonic()
        if at < node.down_until or self.write_position_unknown:
            return False
        behind = node.replay_lsn < self.last_write_lsn or not node.receiving
        return not (behind and at - node.replay_checked_at < RECHECK_BEHIND_SECONDS)

    async def _needed_position(self) -> int | None:
        """The WAL position the standby must have replayed for this read: this object's last
        write, and a primary position sampled within ``max_replica_lag`` (bounded: the oldest
        such sample) or after the read began (strong). None when the primary cannot say."""
        began = time.monotonic()
        window = began - self.max_replica_lag
        while self.samples and self.samples[0][0] < window:
            self.samples.popleft()
        newest = self.samples[-1][0] if self.samples else -math.inf
        if self.read_consistency == "strong" or began - newest > self.max_replica_lag / 10:
            try:
                async with self._acquire(self.primary) as conn:
                    asked = time.monotonic()
                    lsn = _lsn(await conn.fetchval(_PRIMARY_POSITION_SQL))
            except MemoryClosedError:
                raise
            except Exception:  # noqa: BLE001 - the read itself then goes to the primary
                return None
            if not self.samples or asked > self.samples[-1][0]:
                self.samples.append((asked, lsn))
            if self.read_consistency == "strong":
                return max(lsn, self.last_write_lsn)
        return max(self.samples[0][1], self.last_write_lsn)

    def staleness(self, replay_lsn: int) -> float | None:
        """At most how many seconds of commits a standby at ``replay_lsn`` may miss: the age of
        the newest primary sample it has replayed (None: it replayed none of the last
        ``max_replica_lag`` seconds)."""
        covered = [at for at, lsn in self.samples if lsn <= replay_lsn]
        return round(time.monotonic() - covered[-1], 3) if covered else None

    async def _standby_is_fresh(self, node: Node, conn: asyncpg.Connection, needed: int) -> bool:
        """Whether the standby replayed ``needed`` and its WAL receiver streams (asked again
        when the cached answer falls short or is older than a second)."""
        stale = time.monotonic() - node.replay_checked_at >= STANDBY_SAMPLE_SECONDS
        if node.replay_lsn >= needed and node.receiving and not stale:
            return True
        asked = time.monotonic()
        standby, replay, status, running = await conn.fetchrow(_STANDBY_SQL)
        if not standby:
            raise ReplicaRefused("POSTGRES_READ_DSN points at a primary, not a standby", "primary")
        node.replay_lsn = max(node.replay_lsn, _lsn(replay))
        node.replay_checked_at = asked
        node.receiving = bool(running) and status in (None, "streaming")
        return node.receiving and node.replay_lsn >= needed

    def _replica_failed(self, node: Node, exc: BaseException) -> None:
        node.last_error = (
            exc.message
            if isinstance(exc, MigrateError | MemoryUnavailableError | ReplicaRefused)
            else type(exc).__name__
        )
        if isinstance(exc, ReplicaRefused | MigrateError | MemoryUnavailableError) or (
            is_outage(exc) or classify(exc) in (ErrorClass.TRANSIENT, ErrorClass.FATAL)
        ):
            retry = (
                REPLICA_REFUSED_SECONDS
                if isinstance(exc, ReplicaRefused)
                else REPLICA_RETRY_SECONDS
            )
            node.down_until = time.monotonic() + retry
            pool, node.pool = node.pool, None
            if pool is not None:
                pool.terminate()  # its connections may be dead; a new pool on the next try

    async def _check_cluster(self, node: Node, conn: asyncpg.Connection) -> None:
        """ReplicaRefused unless ``conn`` is a standby of the primary's cluster."""
        standby, ident = await conn.fetchrow(_CLUSTER_SQL)
        if not standby:
            raise ReplicaRefused(
                f"POSTGRES_READ_DSN ({dsn_location(node.dsn)}) is a primary, not a standby;"
                " reads go to the primary",
                "primary",
            )
        if self.system_identifier is None:
            async with self._acquire(self.primary, prepare=False) as primary:
                self.system_identifier = int((await primary.fetchrow(_CLUSTER_SQL))[1])
        if int(ident) != self.system_identifier:
            raise ReplicaRefused(
                f"POSTGRES_READ_DSN ({dsn_location(node.dsn)}) is a standby of another cluster"
                " (its system identifier differs from the primary's); reads go to the primary",
                "standby",
            )

    async def _fresh_within(self, node: Node, conn: asyncpg.Connection, seconds: float) -> bool:
        """Whether the standby is fresh, asking again for up to ``seconds`` (a first look has
        only a primary position of now, which even a healthy standby reaches a moment later)."""
        deadline = time.monotonic() + seconds
        while True:
            needed = await self._needed_position()
            if needed is not None and await self._standby_is_fresh(node, conn, needed):
                return True
            if time.monotonic() >= deadline or needed is None:
                return False
            await anyio.sleep(0.05)

    # -------------------------------------------------------------- health

    async def health(self) -> dict[str, Any]:
        """The primary's figures (and the standby's under ``replica``); never raises, and
        waits at most the health timeout for a connection (connect timeout to open a pool).

        ``ok`` is whether the primary answered; a saturated pool is ``ok: False`` with
        ``saturated: True``. A standby that does not answer, is not a standby of the primary,
        or is not fresh shows that in its own section, and reads fall back to the primary.
        """
        self._follow_loop()
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
            with anyio.fail_after(
                node.connect_timeout + self.timeouts.health + node.command_timeout
            ):
                async with self._acquire(node, prepare=False, timeout=self.timeouts.health) as conn:
                    await self._probe(node, conn, out)
        except PoolTimeoutError as exc:
            out["saturated"] = len(node.in_use) >= node.max_size
            out["error"] = (
                exc.message
                if out["saturated"]
                else f"PostgreSQL at {dsn_location(node.dsn)} did not answer within"
                f" {self.timeouts.health:g} s (no connection opened)"
            )
        except ReplicaRefused as exc:
            out.update(role=exc.role, fresh=False, error=exc.message)
        except Exception as exc:  # noqa: BLE001 - health reports, never raises
            bound = f"{node.command_timeout:g} s"
            out["error"] = _sentence(memory_error(exc, dsn_location(node.dsn), bound))
        out["pool"] = node.pool_figures()
        return out

    async def _probe(self, node: Node, conn: asyncpg.Connection, out: dict[str, Any]) -> None:
        started = time.perf_counter()
        await conn.fetchval("SELECT 1")
        out["latency_ms"] = elapsed_ms(started)
        version, standby = await conn.fetchrow(
            "SELECT current_setting('server_version'), pg_is_in_recovery()"
        )
        out.update(ok=True, server_version=version, role="standby" if standby else "primary")
        if node is not self.replica:
            return
        if standby:
            standby, replay, status, running = await conn.fetchrow(_STANDBY_SQL)
            out["replay_lsn"] = _lsn(replay)
            out["receiver"] = status if running else "stopped"
        try:
            await self._check_cluster(node, conn)
            out["fresh"] = await self._fresh_within(node, conn, self.timeouts.health)
            out["replay_lag_s"] = self.staleness(node.replay_lsn)
            if not out["fresh"]:
                receiver = "" if node.receiving else " (its WAL receiver is not streaming)"
                out.update(
                    ok=False,
                    error=f"the standby is behind the primary by more than"
                    f" {self.max_replica_lag:g} s{receiver}; reads go to the primary",
                )
        except ReplicaRefused as exc:
            out.update(ok=False, fresh=False, error=exc.message)

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
        check_text(role, "role")
        check_text(content, "content")
        prepare_metadata(metadata)
        if matches_nothing(session_id):
            raise SessionNotFoundError(session_id)
        return await self._write(
            lambda c: add_message(c, self.sql, session_id, role, content, metadata)
        )

    async def get_history(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        check_id(session_id)
        count = self.history_limit(limit)
        if matches_nothing(session_id):
            return []
        return await self._read(lambda c: get_history(c, self.sql, session_id, count))

    async def get_sessions(
        self, limit: int = DEFAULT_SESSIONS_LIMIT, offset: int = 0, user_id: str = ""
    ) -> list[dict[str, Any]]:
        sqlite_limit(limit)
        sqlite_offset(offset)
        if isinstance(user_id, str) and matches_nothing(user_id):
            return []
        check_text(user_id, "user_id")
        return await self._read(lambda c: get_sessions(c, self.sql, limit, offset, user_id))

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        check_id(session_id)
        if matches_nothing(session_id):
            return None
        return await self._read(lambda c: get_session(c, self.sql, session_id))

    async def update_session_title(self, session_id: str, title: str) -> None:
        check_id(session_id)
        check_text(title, "title")
        if matches_nothing(session_id):
            return
        await self._write(lambda c: update_session_title(c, self.sql, session_id, title))

    async def delete_session(self, session_id: str) -> None:
        check_id(session_id)
        if matches_nothing(session_id):
            return
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
