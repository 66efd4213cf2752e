"""Is this PostgreSQL ready for the app's memory? Connect, time, inspect, and try every write.

It also prints the memory's own ``health()`` (role, version, latency, pool figures, acquire
waits; with a read DSN the standby's section and its replay lag) and is unhealthy when the
primary or a configured standby does not answer.

The full check runs create/read/update/delete and a jsonb round trip through the backend's own
statements inside one transaction that it rolls back: nothing is left in the database, not even
tables it had to create for the purpose.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from flux_migrate.core.dsn import dsn_location, redact
from flux_migrate.core.errors import MigrateError, RefusedConnection
from flux_migrate.core.schema import TABLES, TargetNames
from flux_migrate.core.target import connect
from flux_migrate.memory import postgres as pg
from flux_migrate.memory.factory import pool_bounds

LATENCY_SAMPLES = 5
_PROBE_METADATA: dict[str, Any] = {
    "check": True,
    "n": [1, -2, 1.5, None],
    "nested": {"text": "ü 東京 🙂", "empty": {}},
}


@dataclass
class CheckResult:
    """What :func:`check` found; ``healthy`` when it connected and found no problem."""

    location: str
    schema: str
    quick: bool
    pool_min: int
    pool_max: int
    connected: bool = False
    server_version: str | None = None
    latency_ms: float | None = None
    tables: dict[str, str] = field(default_factory=dict)  # table -> ok | absent | mismatch ...
    notes: list[str] = field(default_factory=list)
    pool_opened: int | None = None
    crud_ok: bool | None = None  # None: not run (quick, or it could not start)
    health: dict[str, Any] | None = None  # PostgresMemory.health(), when it connected
    problems: list[str] = field(default_factory=list)
    refused: bool = False  # the server answered and refused the login (password, role, db)

    @property
    def healthy(self) -> bool:
        return self.connected and not self.problems

    def lines(self) -> list[str]:
        """The result for people, one fact per line; never contains a password."""
        state = "reachable" if self.connected else "NOT reachable"
        if self.refused:
            state = "reachable, but it refused the login"
        out = [f"PostgreSQL at {self.location}: {state}"]
        if self.server_version is not None:
            out.append(f"  server version: {self.server_version}")
        if self.latency_ms is not None:
            out.append(
                f"  round-trip latency: {self.latency_ms:.2f} ms (median of {LATENCY_SAMPLES})"
            )
        for table, state in self.tables.items():
            out.append(f"  table {table}: {state}")
        if self.pool_opened is not None:
            out.append(
                f"  pool: min {self.pool_min}, max {self.pool_max}, opened {self.pool_opened}"
            )
        if self.crud_ok is not None:
            outcome = "ok, rolled back" if self.crud_ok else "FAILED, rolled back"
            out.append(f"  create/read/update/delete and jsonb round trip: {outcome}")
        if self.health is not None:
            out += health_lines(self.health)
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  problem: {redact(p)}" for p in self.problems]
        out.append("healthy" if self.healthy else "UNHEALTHY")
        return out


def health_lines(health: dict[str, Any]) -> list[str]:
    """``PostgresMemory.health()`` for people: the primary, then the standby if any."""
    out = _node_lines("memory health", health)
    if (replica := health.get("replica")) is not None:
        out += _node_lines("read replica", replica)
        out.append(
            f"    reads served: {replica['reads']:,}, fell back to the primary:"
            f" {replica['fallbacks']:,}"
        )
    return out


def _node_lines(title: str, node: dict[str, Any]) -> list[str]:
    state = "ok" if node["ok"] else f"NOT ok ({redact(str(node.get('error')))})"
    out = [f"  {title}: {state}, role {node.get('role')}"]
    if node["ok"]:
        out.append(
            f"    server version {node['server_version']}, latency {node['latency_ms']:.2f} ms"
        )
    if "replay_lag_s" in node:
        lag = node["replay_lag_s"]
        shown = "behind every recent primary position" if lag is None else f"at most {lag:.3f} s"
        out.append(f"    replay lag: {shown}, receiver {node.get('receiver')}")
    pool, waits = node["pool"], node["pool"]["acquire_wait"]
    out.append(  # the health probe's own pool, not the app's pool checked above
        f"    probe pool: size {pool['size']}, idle {pool['idle']}, in use {pool['in_use']}"
        f" (opened min {pool['min']}, max {pool['max']})"
    )
    p50 = "-" if waits["p50_ms"] is None else f"{waits['p50_ms']:.2f} ms"
    p99 = "-" if waits["p99_ms"] is None else f"{waits['p99_ms']:.2f} ms"
    out.append(f"    acquire waits: {waits['count']:,}, p50 {p50}, p99 {p99}")
    return out


async def check(
    dsn: str,
    *,
    read_dsn: str | None = None,
    schema: str = "public",
    quick: bool = False,
    pool_min: int = 2,
    pool_max: int = 10,
    names: TargetNames | None = None,
    timeout: float = 10.0,
) -> CheckResult:
    """Check the server the PostgreSQL memory would use; never raises for an unhealthy server.

    ``quick`` only connects (version and latency). Otherwise it also compares the target
    tables with ``core.schema``, opens a pool of ``pool_min``..``pool_max`` and runs the
    CRUD round trip. Raises ConfigError for impossible pool sizes. Blocks up to ``timeout``
    seconds per connection attempt.
    """
    pool_bounds(pool_min, pool_max, "pool sizes")
    names = names or TargetNames(schema=schema)
    result = CheckResult(dsn_location(dsn), names.schema, quick, pool_min, pool_max)
    try:
        conn = await connect(dsn, timeout=timeout)
    except MigrateError as exc:
        result.problems.append(exc.message)
        result.refused = isinstance(exc, RefusedConnection)
        return result
    result.connected = True
    try:
        result.server_version = str(await conn.fetchval("SHOW server_version"))
        result.latency_ms = await _latency_ms(conn)
        if not quick:
            await _check_tables(conn, names, result)
    except Exception as exc:  # noqa: BLE001 - a check reports what is wrong, never raises
        result.problems.append(f"inspecting the server failed: {_describe(exc)}")
    finally:
        await conn.close()
    if not quick and not result.problems:
        await _check_pool_and_crud(dsn, names, result, timeout)
    await _memory_health(dsn, read_dsn, names, result, timeout)
    return result


async def _memory_health(
    dsn: str, read_dsn: str | None, names: TargetNames, result: CheckResult, timeout: float
) -> None:
    """The memory's own health(), through a pool of the checked sizes; read-only."""
    memory = pg.PostgresMemory(
        dsn,
        names=names,
        min_size=min(result.pool_min, 1),
        max_size=result.pool_max,
        read_dsn=read_dsn,
        create_tables=False,
        connect_timeout=timeout,
    )
    try:
        result.health = await memory.health()
    finally:
        await memory.close(timeout=timeout)
    if not result.health["ok"]:
        result.problems.append("the memory's health check failed on the primary")
    replica = result.health.get("replica")
    if replica is not None and replica.get("role") == "primary":
        result.problems.append("POSTGRES_READ_DSN points at a server that is not a standby")
    elif replica is not None and replica.get("role") is None:
        result.problems.append("the read replica (POSTGRES_READ_DSN) does not answer")
    elif replica is not None and not replica["ok"]:
        result.problems.append(
            f"the read replica (POSTGRES_READ_DSN) is not used: {replica['error']}"
        )


def _describe(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")


async def _latency_ms(conn: asyncpg.Connection) -> float:
    samples = []
    for _ in range(LATENCY_SAMPLES):
        started = time.perf_counter()
        await conn.fetchval("SELECT 1")
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def _check_tables(conn: asyncpg.Connection, names: TargetNames, result: CheckResult) -> None:
    """Compare each target table's columns and base types with the schema module."""
    for table in TABLES:
        qualified = names.qualified(table.name)
        rows = await conn.fetch(
            "SELECT a.attname AS name, a.atttypid AS oid,"
            " format_type(a.atttypid, a.atttypmod) AS type"
            " FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0"
            " AND NOT a.attisdropped",
            qualified,
        )
        if not rows:
            result.tables[qualified] = "absent (the memory creates it on first use)"
            continue
        actual = {r["name"]: (r["oid"], r["type"]) for r in rows}
        expected = await conn.fetch(
            "SELECT t AS type, to_regtype(t)::oid AS oid FROM unnest($1::text[]) t",
            [c.pg_type for c in table.columns],
        )
        differences = []
        for column, want in zip(table.columns, expected, strict=True):
            if column.name not in actual:
                differences.append(f"column {column.name} missing")
            elif actual[column.name][0] != want["oid"]:
                differences.append(
                    f"column {column.name} is {actual[column.name][1]}, not {column.pg_type}"
                )
        if differences:
            result.tables[qualified] = "MISMATCH: " + "; ".join(differences)
            result.problems.append(f"table {qualified} does not match the app's schema")
        else:
            result.tables[qualified] = "ok"
    if all(state == "ok" for state in result.tables.values()):
        missing = await pg.missing_objects(conn, names)
        if missing:
            result.notes.append(
                f"keys or index missing ({', '.join(missing)}): the memory builds them on first use"
            )


class _Failed(Exception):
    pass


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise _Failed(what)


async def _check_pool_and_crud(
    dsn: str, names: TargetNames, result: CheckResult, timeout: float
) -> None:
    try:
        pool = await pg.open_pool(
            dsn, min_size=result.pool_min, max_size=result.pool_max, timeout=timeout
        )
    except MigrateError as exc:
        result.problems.append(f"opening a pool failed: {exc.message}")
        return
    try:
        result.pool_opened = pool.get_size()
        if result.pool_opened < result.pool_min:
            result.problems.append(
                f"the pool opened {result.pool_opened} connections,"
                f" fewer than min {result.pool_min}"
            )
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                await _crud(conn, names)
                result.crud_ok = True
            except _Failed as exc:
                result.crud_ok = False
                result.problems.append(f"CRUD round trip: {exc}")
            except Exception as exc:  # noqa: BLE001 - a refused statement is a finding
                result.crud_ok = False
                result.problems.append(f"CRUD round trip failed: {_describe(exc)}")
            finally:
                await transaction.rollback()
    finally:
        await pool.close()


async def _crud(conn: asyncpg.Connection, names: TargetNames) -> None:
    """Every write of the API and a jsonb round trip on ``conn``, in the caller's transaction."""
    await pg.ensure_schema(conn, names)
    sql = pg.Sql.for_names(names)
    session_id = await pg.create_session(conn, sql, "flux-migrate check", _PROBE_METADATA)
    session = await pg.get_session(conn, sql, session_id)
    _expect(session is not None, "a created session cannot be read back")
    assert session is not None
    _expect(
        session["metadata"] == _PROBE_METADATA, "session metadata changed in the jsonb round trip"
    )
    kind = await conn.fetchval(
        f"SELECT jsonb_typeof(metadata) FROM {names.qualified('sessions')} WHERE id = $1",
        session_id,
    )
    _expect(kind == "object", f"metadata was stored as a jsonb {kind}, not an object")
    message_id = await pg.add_message(conn, sql, session_id, "user", "ping ✓", _PROBE_METADATA)
    history = await pg.get_history(conn, sql, session_id, 10)
    _expect([m["id"] for m in history] == [message_id], "an added message is not in the history")
    _expect(
        history[0]["metadata"] == _PROBE_METADATA,
        "message metadata changed in the jsonb round trip",
    )
    await pg.update_session_title(conn, sql, session_id, "flux-migrate check, renamed")
    session = await pg.get_session(conn, sql, session_id)
    _expect(
        session is not None and session["title"] == "flux-migrate check, renamed",
        "the title update was lost",
    )
    _expect(await pg.delete_session(conn, sql, session_id), "deleting the session deleted nothing")
    _expect(await pg.get_session(conn, sql, session_id) is None, "a deleted session is still there")
    left = await conn.fetchval(
        f"SELECT count(*) FROM {names.qualified('messages')} WHERE session_id = $1", session_id
    )
    _expect(left == 0, "deleting a session left its messages behind (no cascade)")
