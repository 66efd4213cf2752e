"""Target preflight: the migration lock, --restart, the target's tables and checkpoints, and
the fingerprint that refuses a resume from another source or with other settings."""

from __future__ import annotations

import json
from typing import Any

import aiosqlite
import asyncpg
import structlog

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.catalog import MIGRATION_LOCK_KEY, relations, table_exists
from flux_migrate.core.errors import TargetError
from flux_migrate.core.jsonl_bookkeeping import clear_jsonl_tables, is_jsonl_fingerprint
from flux_migrate.core.schema import (
    SESSIONS,
    Table,
    add_column_sql,
    constraints,
    create_table_sql,
    drop_retired_user_index_sql,
    pause_autovacuum_sql,
    pg_identifier,
    quote_ident,
)
from flux_migrate.core.target import Target
from flux_migrate.pipeline.resume_point import same_source
from flux_migrate.pipeline.settings import Settings, zone_name
from flux_migrate.pipeline.target_columns import check_target_columns

log = structlog.get_logger("flux_migrate")

UNIQUE_ID_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
    " AND a.attnum = i.indkey[0] WHERE i.indrelid = $1::regclass AND i.indisunique"
    " AND i.indnkeyatts = 1 AND a.attname = 'id')"
)


def settings_fingerprint(settings: Settings) -> dict[str, Any]:
    """The settings that shape what lands in the target; a resume must use the same."""
    t = settings.names
    return {
        "target": [t.schema, t.sessions, t.messages],
        "naive_timezone": zone_name(settings.naive_timezone),
        "strip_nul": settings.strip_nul,
        "on_conflict": settings.on_conflict,
        "mapping": settings.mapping.fingerprint() if settings.mapping is not None else None,
    }


async def take_migration_lock(lock: asyncpg.Connection, schema: str) -> None:
    """Hold the session advisory lock of ``schema`` on ``lock``; TargetError when another run
    holds it."""
    if not await lock.fetchval(f"SELECT pg_try_advisory_lock({MIGRATION_LOCK_KEY})", schema):
        raise TargetError(
            f"Another flux-migrate run is writing to schema {schema} of this"
            " database; wait for it to finish."
        )


async def refuse_foreign_rows(conn: asyncpg.Connection, settings: Settings) -> None:
    """Before writing anything: refuse a table holding rows flux-migrate did not write, unless
    --on-conflict says what to do with them."""
    if settings.on_conflict != "error":
        return
    names = settings.names
    existing = await ckpt.read_checkpoints(conn, names.schema)
    for table in settings.tables:
        if table.name in existing or not await table_exists(conn, names, table.name):
            continue
        if await _has_rows(conn, settings, table):
            raise TargetError(
                f"Table {names.qualified(table.name)} already holds rows that flux-migrate"
                " did not write; empty it, set another target schema in --config, or pass"
                " --on-conflict skip (keep them) or --on-conflict update (overwrite them)."
            )


_KINDS = {
    "i": "an index", "I": "an index", "v": "a view", "m": "a materialized view",
    "S": "a sequence", "f": "a foreign table", "c": "a type", "t": "a TOAST table",
}  # fmt: skip


async def refuse_taken_names(conn: asyncpg.Connection, settings: Settings) -> None:
    """Before writing anything: refuse a target table name held by another kind of relation
    (a view, an index), and a key or index name held by a relation other than that index on
    that table (PostgreSQL would refuse it mid-run, or flux-migrate take it as built)."""
    names = settings.names
    found = await relations(conn, names.schema)
    if not found:
        return
    for table in settings.tables:
        kind = found.get(pg_identifier(names.table(table.name)))
        if kind is not None and kind[0] not in ("r", "p"):
            raise TargetError(
                f"{names.qualified(table.name)} already exists as {_KINDS.get(kind[0], kind[0])};"
                " rename or drop it, or set another target schema in --config. Nothing was"
                " written."
            )
    for c in constraints(names, settings.tables):
        kind = found.get(c.name)
        on = pg_identifier(names.table(c.table))
        if c.kind == "fk" or kind is None or (kind[0] in ("i", "I") and kind[1] == on):
            continue
        holder = f"an index on table {kind[1]}" if kind[1] else _KINDS.get(kind[0], "a table")
        raise TargetError(
            f"The name {c.name}, which flux-migrate gives a key or index of"
            f" {names.qualified(c.table)}, is taken in schema {names.schema} by {holder}; rename"
            " that, or set another target schema in --config. Nothing was written."
        )


async def _has_rows(conn: asyncpg.Connection, settings: Settings, table: Table) -> bool:
    qualified = settings.names.qualified(table.name)
    return bool(await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {qualified})"))


async def prepare_target(
    conn: asyncpg.Connection, settings: Settings, run_id: str, fingerprint: str
) -> dict[str, ckpt.Checkpoint]:
    """Create the bookkeeping, the target schema and missing tables with their checkpoints;
    return the checkpoints.

    Refuses (TargetError, nothing written) a table that holds rows this tool did not write,
    unless --on-conflict skip|update says what to do with them.
    """
    names = settings.names
    await refuse_taken_names(conn, settings)
    await refuse_foreign_rows(conn, settings)
    await ckpt.ensure_bookkeeping(conn)
    existing = await ckpt.read_checkpoints(conn, names.schema)
    async with conn.transaction():
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(names.schema)}")
        for table in settings.tables:
            if table.name in existing:
                await _require_table(conn, settings, table)
            else:
                await _start_table(conn, settings, table, run_id, fingerprint)
    return await ckpt.read_checkpoints(conn, names.schema)


async def _require_table(conn: asyncpg.Connection, settings: Settings, table: Table) -> None:
    """A table with a checkpoint must still exist, with columns that hold its values."""
    if not await table_exists(conn, settings.names, table.name):
        raise TargetError(
            f"Table {settings.names.qualified(table.name)} was dropped after flux-migrate"
            " started filling it; rerun with --restart --yes to start over."
        )
    await _add_profile_columns(conn, settings, table)
    await check_target_columns(conn, settings.names, table)


async def _add_profile_columns(conn: asyncpg.Connection, settings: Settings, table: Table) -> None:
    """An app table created by an earlier release (before ``user_id`` or ``messages.seq``)
    gains the profile's added columns, with their default, before it is checked and loaded."""
    if table.generic:
        return
    for column in table.columns + table.target_only:
        if column.default is not None and column.name == "user_id":
            await conn.execute(add_column_sql(table, column, settings.names))
    for column in table.generated:
        await conn.execute(add_column_sql(table, column, settings.names))
    if table.name == SESSIONS.name:
        await conn.execute(drop_retired_user_index_sql(settings.names))


async def _start_table(
    conn: asyncpg.Connection, settings: Settings, table: Table, run_id: str, fingerprint: str
) -> None:
    """Create the table (or accept an existing one with a unique id), and its checkpoint; build
    its keys now unless they are deferred until after the load."""
    names = settings.names
    created = not await table_exists(conn, names, table.name)
    if not created:
        await _add_profile_columns(conn, settings, table)
        await check_target_columns(conn, names, table)
    has_rows = False
    if created:
        await conn.execute(create_table_sql(table, names))
        await conn.execute(pause_autovacuum_sql(table.name, names))
    else:
        has_rows = await _has_rows(conn, settings, table)
        if has_rows and not await conn.fetchval(UNIQUE_ID_SQL, names.qualified(table.name)):
            raise TargetError(
                f"--on-conflict {settings.on_conflict} needs a primary key or unique index on"
                f" {names.qualified(table.name)}(id), which it lacks; add one or empty the table."
            )
    await ckpt.create_checkpoint(
        conn,
        target_schema=names.schema,
        source_table=table.name,
        target_table=names.table(table.name),
        created_table=created,
        preexisting_rows=has_rows,
        constraints_pending=created and settings.defer_constraints,
        fingerprint=fingerprint,
        run_id=run_id,
        last_rowid=table.start_rowid,
    )
    if created and not settings.defer_constraints:
        for c in constraints(names, settings.tables):
            if c.table == table.name:
                await conn.execute(c.sql)


async def check_fingerprint(
    src: aiosqlite.Connection,
    target: Target,
    settings: Settings,
    identity: dict[str, Any],
    checkpoints: dict[str, ckpt.Checkpoint],
) -> None:
    """Refuse to resume into a target filled from another source or with other settings."""
    for c in checkpoints.values():
        if not c.fingerprint or is_jsonl_fingerprint(c.fingerprint):
            continue  # JSONL tables are checked by their own fingerprint (pipeline/jsonl_run)
        stored = json.loads(c.fingerprint)
        theirs, ours = stored.get("settings", {}), settings_fingerprint(settings)
        # A key a target filled by an earlier version does not have is not compared.
        changed = [k for k in ours if k in theirs and theirs[k] != ours[k]]
        changed = [k for k in changed if not _legacy(k, theirs, settings)]
        if changed:
            key = changed[0]
            if key == "mapping":
                raise TargetError(
                    "This target was filled under another mapping (tables, columns, types or"
                    " keys differ from this run's); resume with the mapping it was filled with"
                    " (`flux-migrate init` writes one to pin with --config), or --restart --yes."
                )
            raise TargetError(
                f"This target was filled with {key}={theirs.get(key)!r} but this run uses"
                f" {ours[key]!r}; use the same settings to resume, or --restart --yes to start"
                " over."
            )
        source = stored.get("source", {})
        # The keys tell the file; its DDL may have grown (a column the app added, which the
        # mapping places or ignores: checked before this), so a schema change alone is no
        # other database.
        if not await same_source(src, target, settings.names, source):
            raise TargetError(
                "This target was filled from a different SQLite database (none of the first"
                " keys it loaded are in this file); point --sqlite-path at the original file,"
                " or pass --restart --yes to clear what flux-migrate wrote and start over."
            )
        return


def _legacy(key: str, theirs: dict[str, Any], settings: Settings) -> bool:
    """Whether a stored mapping fingerprint is this mapping's in the form of releases before
    the [ignore] lists were left out of it (a target filled by them resumes)."""
    mapping = settings.mapping
    return (
        key == "mapping" and mapping is not None and theirs[key] == mapping.fingerprint(legacy=True)
    )


async def _refuse_foreign_writes(
    conn: asyncpg.Connection, settings: Settings, found: dict[str, ckpt.Checkpoint]
) -> None:
    """--restart refuses to delete rows someone else wrote after flux-migrate's last write."""
    names = settings.names
    for c in found.values():
        if is_jsonl_fingerprint(c.fingerprint):
            continue
        if await table_exists(conn, names, c.source_table):
            foreign = await ckpt.rows_written_since(conn, names.qualified(c.source_table), c)
            if foreign:
                raise TargetError(
                    f"--restart would delete {foreign:,} row(s) of"
                    f" {names.qualified(c.source_table)} that flux-migrate did not write (written"
                    " after its last run, e.g. by the app); move or back them up first."
                    " Nothing was changed."
                )


async def clear_target(conn: asyncpg.Connection, settings: Settings) -> None:
    """--restart: drop the tables flux-migrate created, empty those it filled, and forget the
    schema's checkpoints, quarantine and skipped keys."""
    names = settings.names
    if not await ckpt.bookkeeping_exists(conn):
        return
    found = await ckpt.read_checkpoints(conn, names.schema)
    refused = [c for c in found.values() if c.preexisting_rows]
    if refused:
        raise TargetError(
            f"--restart cannot undo a load into {names.schema}.{refused[0].target_table}, which"
            " held rows before flux-migrate wrote to it; restore it from a backup instead."
        )
    await _refuse_foreign_writes(conn, settings, found)
    async with conn.transaction():
        for table in reversed(settings.tables):
            c = found.get(table.name)
            if c is None or not await table_exists(conn, names, table.name):
                continue
            if c.created_table:
                await conn.execute(f"DROP TABLE {names.qualified(table.name)} CASCADE")
            else:
                await conn.execute(f"DELETE FROM {names.qualified(table.name)}")
        await clear_jsonl_tables(conn, names.schema, found)
        await ckpt.clear_schema(conn, names.schema)
    log.info("target_cleared", schema=names.schema)
