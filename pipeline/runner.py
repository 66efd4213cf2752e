"""The runner: preflight, then extract -> transform -> load per table, then keys and accounting."""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import asyncpg
import structlog
from anyio.abc import ObjectSendStream

from pipeline import checkpoints as ckpt
from pipeline.errors import MigrateError, RuntimeFailure, SourceError, TargetError
from pipeline.progress import NoProgress, Progress
from pipeline.schema import (
    BOOKKEEPING_SCHEMA,
    TABLES,
    Table,
    TargetNames,
    constraints,
    create_table_sql,
    quote_ident,
)
from pipeline.settings import Settings
from pipeline.target import Target, connect
from stages.batch import Batch
from stages.extract import extract, open_source
from stages.load import BatchResult, LoadContext, load
from stages.transform import transform

log = structlog.get_logger("flux_migrate")

# Log at most this many quarantined rows per table and run; the rest are counted.
QUARANTINE_LOG_LIMIT = 50


@dataclass
class TableReport:
    extracted: int = 0
    loaded: int = 0
    quarantined: int = 0
    skipped: int = 0
    seconds: float = 0.0
    up_to_date: bool = False

    @property
    def rows_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "extracted": self.extracted,
            "loaded": self.loaded,
            "quarantined": self.quarantined,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class RunReport:
    run_id: str
    status: str = "running"  # running | completed | failed | interrupted
    tables: dict[str, TableReport] = field(default_factory=dict)
    message: str = ""
    constraints_seconds: float = 0.0

    @property
    def quarantined(self) -> int:
        return sum(t.quarantined for t in self.tables.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "message": self.message,
            "tables": {name: t.as_json() for name, t in self.tables.items()},
        }


# ---------------------------------------------------------------- source preflight


async def check_source(conn: aiosqlite.Connection, path: Path) -> None:
    """Refuse a source that is not the app's database: tables or columns missing."""
    try:
        for table in TABLES:
            async with conn.execute(f"PRAGMA table_info({quote_ident(table.name)})") as cur:
                present = {row[1].decode() if isinstance(row[1], bytes) else row[1] for row in await cur.fetchall()}
            if not present:
                raise SourceError(
                    f"The SQLite file {path} has no table {table.name}; is it the app's database?"
                )
            missing = [c for c in table.column_names if c not in present]
            if missing:
                raise SourceError(
                    f"Table {table.name} in {path} lacks column(s) {', '.join(missing)};"
                    " it does not match the app's schema."
                )
    except sqlite3.DatabaseError as exc:
        raise SourceError(f"The file {path} is not a readable SQLite database ({exc}).") from None


async def source_bounds(conn: aiosqlite.Connection, path: Path) -> dict[str, int]:
    """The highest rowid of each table, read in one transaction: the run's consistent upper bound."""
    try:
        await conn.execute("BEGIN")
        try:
            bounds = {}
            for table in TABLES:
                async with conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {quote_ident(table.name)}") as cur:
                    row = await cur.fetchone()
                bounds[table.name] = int(row[0]) if row else 0
        finally:
            await conn.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise SourceError(
                f"The SQLite file {path} stayed locked by another process; retry when the app is idle."
            ) from None
        raise SourceError(f"The SQLite file {path} cannot be read ({exc}).") from None
    except sqlite3.DatabaseError as exc:
        raise SourceError(f"The file {path} is not a readable SQLite database ({exc}).") from None
    return bounds


async def count_between(conn: aiosqlite.Connection, table: str, after: int, upto: int) -> int:
    async with conn.execute(
        f"SELECT count(*) FROM {quote_ident(table)} WHERE rowid > ? AND rowid <= ?", (after, upto)
    ) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


# ---------------------------------------------------------------- target preflight


async def table_exists(conn: asyncpg.Connection, names: TargetNames, table: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", names.qualified(table)))


async def prepare_target(
    conn: asyncpg.Connection, settings: Settings, run_id: str, fingerprint: str
) -> dict[str, ckpt.Checkpoint]:
    """Create the bookkeeping, the target schema and missing tables with their checkpoints.

    Refuses (TargetError, nothing written) a table that holds rows this tool did not write.
    """
    names = settings.target
    await ckpt.ensure_bookkeeping(conn)
    existing = await ckpt.read_checkpoints(conn, names.schema)
    async with conn.transaction():
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(names.schema)}")
        for table in TABLES:
            if table.name in existing:
                if not await table_exists(conn, names, table.name):
                    raise TargetError(
                        f"Table {names.qualified(table.name)} was dropped after flux-migrate"
                        " started filling it; rerun with --restart to start over."
                    )
                continue
            created = not await table_exists(conn, names, table.name)
            if created:
                await conn.execute(create_table_sql(table, names))
            else:
                has_rows = await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {names.qualified(table.name)})")
                if has_rows and settings.on_conflict == "error":
                    raise TargetError(
                        f"Table {names.qualified(table.name)} already holds rows that flux-migrate"
                        " did not write; empty it, choose another --config target schema, or pass"
                        " --on-conflict skip|update."
                    )
            await ckpt.create_checkpoint(
                conn,
                target_schema=names.schema,
                source_table=table.name,
                target_table=names.table(table.name),
                created_table=created,
                constraints_pending=created and settings.defer_constraints,
                fingerprint=fingerprint,
                run_id=run_id,
            )
            if created and not settings.defer_constraints:
                for c in constraints(names):
                    if c.table == table.name:
                        await conn.execute(c.sql)
    return await ckpt.read_checkpoints(conn, names.schema)


async def existing_constraint_names(conn: asyncpg.Connection, schema: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT conname AS name FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
        " WHERE n.nspname = $1 UNION SELECT indexname FROM pg_indexes WHERE schemaname = $1",
        schema,
    )
    return {r["name"] for r in rows}


async def build_constraints(conn: asyncpg.Connection, names: TargetNames) -> float:
    """Build the keys and index deferred during the bulk load; each is resumable by name."""
    started = time.monotonic()
    have = await existing_constraint_names(conn, names.schema)
    for c in constraints(names):
        if c.name in have:
            continue
        log.info("constraint_build_started", constraint=c.name)
        try:
            await conn.execute(c.sql)
        except asyncpg.UniqueViolationError as exc:
            raise RuntimeFailure(
                f"Building {c.name} found duplicate keys ({exc.detail or exc}); the target holds rows"
                " twice, which flux-migrate never writes: was it loaded by another tool too?"
            ) from None
        except asyncpg.ForeignKeyViolationError as exc:
            raise RuntimeFailure(
                f"Building {c.name} found messages without a loaded session ({exc.detail or exc})."
            ) from None
    await ckpt.clear_constraints_pending(conn, names.schema)
    return time.monotonic() - started


# ---------------------------------------------------------------- the run


async def _pump(source: AsyncIterator[Batch], send: ObjectSendStream[Batch]) -> None:
    """Move batches from the extract/transform chain into the bounded buffer, then close it."""
    async with send:
        async for batch in source:
            await send.send(batch)


async def quarantined_keys(conn: asyncpg.Connection, schema: str, table: str) -> set[str]:
    rows = await conn.fetch(
        f"SELECT DISTINCT source_key FROM {BOOKKEEPING_SCHEMA}.quarantine"
        " WHERE target_schema = $1 AND source_table = $2 AND source_key IS NOT NULL",
        schema,
        table,
    )
    return {r["source_key"] for r in rows}


async def migrate_table(
    src: aiosqlite.Connection,
    target: Target,
    table: Table,
    *,
    settings: Settings,
    run_id: str,
    after: int,
    upto: int,
    report: TableReport,
    progress: Progress,
    missing_parents: set[str],
) -> None:
    """Stream one table from its checkpoint to ``upto``; SQLite reading overlaps the COPY."""
    tlog = log.bind(run_id=run_id, table=table.name)
    ctx = LoadContext(table=table, names=settings.target, run_id=run_id)
    logged = 0

    def on_batch(result: BatchResult) -> None:
        nonlocal logged
        if result.already:
            tlog.info("batch_already_committed", seq=result.batch.seq, last_rowid=result.batch.last_rowid)
        else:
            report.loaded += result.loaded
            report.quarantined += len(result.quarantined)
            report.skipped += result.skipped
        report.extracted += result.batch.extracted
        for reject in result.quarantined:
            if logged < QUARANTINE_LOG_LIMIT:
                tlog.warning(
                    "row_quarantined",
                    key=reject.key,
                    rowid=reject.rowid,
                    reason=reject.reason,
                    stage=reject.stage,
                )
            logged += 1
        tlog.debug(
            "batch_loaded",
            seq=result.batch.seq,
            rows=result.batch.extracted,
            loaded=result.loaded,
            quarantined=len(result.quarantined),
            last_rowid=result.batch.last_rowid,
        )
        progress.advance(table.name, result.batch.extracted)

    def on_retry(attempt: int, exc: BaseException, delay: float) -> None:
        tlog.warning("batch_retried", attempt=attempt, error=type(exc).__name__, wait_s=round(delay, 2))

    chain = transform(
        extract(src, table, after_rowid=after, upto_rowid=upto, batch_size=settings.batch_size),
        table,
        naive_tz=settings.naive_tz,
        strip_nul=settings.strip_nul,
        missing_parents=missing_parents,
    )
    send, receive = anyio.create_memory_object_stream[Batch](settings.buffer_batches)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_pump, chain, send)
        async with receive:
            await load(receive, target, ctx, on_batch=on_batch, on_retry=on_retry)
    if logged > QUARANTINE_LOG_LIMIT:
        tlog.warning("rows_quarantined_not_logged", count=logged - QUARANTINE_LOG_LIMIT)


def source_fingerprint(settings: Settings) -> str:
    """What shapes the output: the target names and the conversion options."""
    t = settings.target
    return f"v1|{t.schema}|{t.sessions}|{t.messages}|tz={settings.naive_timezone}|nul={settings.strip_nul}"


async def migrate(settings: Settings, *, progress: Progress | None = None, run_id: str | None = None) -> RunReport:
    """Run one migration to completion (or raise MigrateError with a sentence for the user).

    Safe to interrupt at any point: every committed batch carries its checkpoint, so rerunning
    continues after the last committed batch.
    """
    progress = progress or NoProgress()
    run_id = run_id or uuid.uuid4().hex[:12]
    report = RunReport(run_id=run_id)
    path = settings.require_source()
    dsn = settings.require_dsn()
    structlog.contextvars.bind_contextvars(run_id=run_id)
    names = settings.target
    try:
        async with open_source(path) as src:
            await check_source(src, path)
            bounds = await source_bounds(src, path)
            control = await connect(dsn)
            try:
                got_lock = await control.fetchval(
                    "SELECT pg_try_advisory_lock(hashtext('flux_migrate:' || $1))", names.schema
                )
                if not got_lock:
                    raise TargetError(
                        f"Another flux-migrate run is writing to schema {names.schema} of this"
                        " database; wait for it to finish."
                    )
                checkpoints = await prepare_target(control, settings, run_id, source_fingerprint(settings))
                log.info("run_started", target=settings.target.schema, batch_size=settings.batch_size)
                target = Target(dsn, retry_seconds=settings.retry_seconds)
                try:
                    for table in TABLES:
                        await _run_table(src, control, target, table, settings, run_id, checkpoints, bounds, report, progress)
                    if any(c.constraints_pending for c in (await ckpt.read_checkpoints(control, names.schema)).values()):
                        report.constraints_seconds = await build_constraints(control, names)
                        log.info("constraints_built", seconds=round(report.constraints_seconds, 2))
                    await check_accounting(control, settings, report)
                finally:
                    await target.close()
            finally:
                await control.close()
    except MigrateError as exc:
        report.status = "failed"
        report.message = exc.message
        log.error("run_failed", error=exc.message)
        raise
    finally:
        structlog.contextvars.unbind_contextvars("run_id")
    report.status = "completed"
    log.info(
        "run_completed",
        extracted=sum(t.extracted for t in report.tables.values()),
        loaded=sum(t.loaded for t in report.tables.values()),
        quarantined=report.quarantined,
    )
    return report


async def _run_table(
    src: aiosqlite.Connection,
    control: asyncpg.Connection,
    target: Target,
    table: Table,
    settings: Settings,
    run_id: str,
    checkpoints: dict[str, ckpt.Checkpoint],
    bounds: dict[str, int],
    report: RunReport,
    progress: Progress,
) -> None:
    names = settings.target
    treport = report.tables[table.name] = TableReport()
    after = checkpoints[table.name].last_rowid
    upto = bounds[table.name]
    total = await count_between(src, table.name, after, upto)
    if total == 0:
        treport.up_to_date = True
        log.info("table_up_to_date", table=table.name, last_rowid=after)
        await ckpt.set_status(control, names.schema, table.name, "finished", run_id)
        return
    log.info("table_started", table=table.name, rows=total, after_rowid=after)
    missing: set[str] = set()
    if table.parent is not None:
        missing = await quarantined_keys(control, names.schema, table.parent)
    started = time.monotonic()
    progress.start(table.name, total)
    try:
        await migrate_table(
            src,
            target,
            table,
            settings=settings,
            run_id=run_id,
            after=after,
            upto=upto,
            report=treport,
            progress=progress,
            missing_parents=missing,
        )
    finally:
        treport.seconds = time.monotonic() - started
        progress.finish(table.name)
    await ckpt.set_status(control, names.schema, table.name, "finished", run_id)
    log.info(
        "table_completed",
        table=table.name,
        extracted=treport.extracted,
        loaded=treport.loaded,
        quarantined=treport.quarantined,
        seconds=round(treport.seconds, 2),
    )


async def check_accounting(conn: asyncpg.Connection, settings: Settings, report: RunReport) -> None:
    """Every row read is loaded, quarantined or skipped; the target holds what was loaded."""
    names = settings.target
    current = await ckpt.read_checkpoints(conn, names.schema)
    for name, t in report.tables.items():
        if t.extracted != t.loaded + t.quarantined + t.skipped:
            raise RuntimeFailure(
                f"Accounting failed for {name}: read {t.extracted} but loaded {t.loaded},"
                f" quarantined {t.quarantined}, skipped {t.skipped}; please report this."
            )
        c = current[name]
        if c.extracted != c.loaded + c.quarantined + c.skipped:
            raise RuntimeFailure(f"The checkpoint of {name} does not add up; please report this.")
        if c.created_table and settings.on_conflict == "error":
            in_target = await conn.fetchval(f"SELECT count(*) FROM {names.qualified(name)}")
            if in_target != c.loaded:
                raise RuntimeFailure(
                    f"Table {names.qualified(name)} holds {in_target} rows but flux-migrate"
                    f" loaded {c.loaded}; something else wrote to it."
                )
