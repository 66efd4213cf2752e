"""The end of a run: the accounting check (of SQLite and JSONL tables alike), autovacuum given
back to the tables the run loaded, and the one synchronous commit that makes the run's
commits durable."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import anyio
import asyncpg

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.errors import RuntimeFailure, is_driver_error, is_lost_connection
from flux_migrate.core.jsonl_bookkeeping import JsonlMeta, foreign_rows
from flux_migrate.core.schema import (
    AUTOVACUUM_PAUSED,
    TargetNames,
    qualified,
    resume_autovacuum_sql,
)
from flux_migrate.pipeline.report import RunReport
from flux_migrate.pipeline.settings import Settings


async def make_durable(lock: asyncpg.Connection, dsn: str, schema: str) -> None:
    """One synchronous commit: flushes the WAL, so every batch committed before is durable
    (batches commit without waiting for the flush). On the lock's connection, or on a new one
    when that one was lost (a server restart during the run). Best effort and bounded."""
    with anyio.move_on_after(10):
        if not lock.is_closed() and await _touch(lock, schema):
            # Release the run's lock now: a terminated connection frees it only once the
            # server notices, and a run started right after this one would be refused meanwhile.
            with contextlib.suppress(asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
                await lock.execute("SELECT pg_advisory_unlock_all()")
            return
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except Exception as exc:
            if not (is_driver_error(exc) or is_lost_connection(exc)):
                raise
            return
        try:
            await _touch(conn, schema)
        finally:
            conn.terminate()


async def _touch(conn: asyncpg.Connection, schema: str) -> bool:
    """Whether a synchronous commit on ``conn`` succeeded."""
    try:
        await ckpt.touch_checkpoints(conn, schema)
    except Exception as exc:
        if not (is_driver_error(exc) or is_lost_connection(exc)):
            raise
        return False
    return True


async def check_accounting(
    conn: asyncpg.Connection,
    settings: Settings,
    report: RunReport,
    tables: Iterable[str] | None = None,
) -> None:
    """Every row (or line) each of ``tables`` (default: the report's) read is loaded,
    quarantined or skipped, and the table holds the rows loaded into it: a SQLite table, unless
    it held rows before, exactly its checkpoint's count; a JSONL table that count plus the
    records gone from its file that it keeps (rows someone else wrote there are said in a
    note). RuntimeFailure when not."""
    names = settings.names
    current = await ckpt.read_checkpoints(conn, names.schema)
    for name in list(report.tables) if tables is None else tables:
        t, c = report.tables.get(name), current.get(name)
        if t is None or (c is None and not t.extracted):  # e.g. a JSONL file with no line yet
            continue
        if c is None:  # written before the table's first batch, never removed by a run
            raise RuntimeFailure(
                f"The checkpoint of {name} (target schema {names.schema}) vanished from"
                " flux_migrate.checkpoints during the run; something else changed"
                " flux-migrate's bookkeeping."
            )
        if t.extracted != t.loaded + t.quarantined + t.skipped:
            raise RuntimeFailure(
                f"Accounting failed for {name}: read {t.extracted} but loaded {t.loaded},"
                f" quarantined {t.quarantined}, skipped {t.skipped}; please report this."
            )
        meta = JsonlMeta.loads(c.fingerprint)
        if meta is None:
            await _check_sqlite_table(conn, names, name, c)
        elif meta.reconcile_until is None:  # else a reconcile not finished (a torn last line)
            await _check_jsonl_table(conn, names.schema, c, meta, report)


async def _check_sqlite_table(
    conn: asyncpg.Connection, names: TargetNames, name: str, c: ckpt.Checkpoint
) -> None:
    if c.extracted != c.loaded + c.quarantined + c.skipped:
        raise RuntimeFailure(f"The checkpoint of {name} does not add up; please report this.")
    if not c.preexisting_rows:
        in_target = await conn.fetchval(f"SELECT count(*) FROM {names.qualified(name)}")
        if in_target != c.loaded:
            raise RuntimeFailure(
                f"Table {names.qualified(name)} holds {in_target} rows but flux-migrate"
                f" loaded {c.loaded}; something else wrote to it."
            )


async def _check_jsonl_table(
    conn: asyncpg.Connection, schema: str, c: ckpt.Checkpoint, meta: JsonlMeta, report: RunReport
) -> None:
    name = c.source_table
    in_target = await conn.fetchval(f"SELECT count(*) FROM {qualified(schema, name)}")
    expected = c.loaded + meta.retained
    if in_target == expected:
        return
    foreign = await foreign_rows(conn, schema, name)
    if in_target - foreign <= expected <= in_target:
        report.notes.append(
            f"{name}: {foreign:,} row(s) were written or changed by someone else in"
            " PostgreSQL; flux-migrate leaves them as they are."
        )
        return
    raise RuntimeFailure(
        f"Table {qualified(schema, name)} holds {in_target} rows but flux-migrate"
        f" loaded {c.loaded} (and keeps {meta.retained} gone from the file); rows it wrote"
        " were deleted by someone else. Reload it with --restart --yes."
    )


async def resume_autovacuum(
    conn: asyncpg.Connection, names: TargetNames, checkpoints: dict[str, ckpt.Checkpoint]
) -> None:
    """Give autovacuum back to each table flux-migrate created and paused it on
    (schema.pause_autovacuum_sql, whose words are looked for): once its rows are loaded and its
    keys built. A table someone else created, one already given back, or one whose autovacuum
    someone turned off in other words, is left as it is."""
    for c in checkpoints.values():
        if not c.created_table:
            continue
        options = await conn.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = to_regclass($1)",
            names.qualified(c.source_table),
        )
        if options and AUTOVACUUM_PAUSED in options:
            await conn.execute(resume_autovacuum_sql(c.source_table, names))
