"""The runner: preflight, then extract -> transform -> load per table, then keys and accounting."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiosqlite
import anyio
import asyncpg
import structlog
from anyio.abc import ObjectSendStream

from core import bookkeeping as ckpt
from core.catalog import MIGRATION_LOCK_KEY, existing_constraint_names, table_exists
from core.errors import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    Interrupted,
    MigrateError,
    RuntimeFailure,
    TargetError,
    single_error,
    translate,
)
from core.schema import (
    TABLES,
    Table,
    TargetNames,
    constraints,
    create_table_sql,
    quote_ident,
)
from core.source import check_source, count_between, source_snapshot
from core.target import Target, connect
from pipeline.progress import NoProgress, Progress
from pipeline.report import RunReport, TableReport
from pipeline.requeue import requeue, unresolved_keys
from pipeline.resume_point import resume_point, same_source
from pipeline.settings import Settings
from pipeline.target_columns import check_target_columns
from stages.batch import Batch
from stages.extract import extract, open_source
from stages.load import BatchResult, CheckpointRewound, LoadContext, load
from stages.transform import transform, transform_batch

log = structlog.get_logger("flux_migrate")

# Log at most this many quarantined rows per table and run; the rest are counted.
QUARANTINE_LOG_LIMIT = 50


# ---------------------------------------------------------------- target preflight


UNIQUE_ID_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
    " AND a.attnum = i.indkey[0] WHERE i.indrelid = $1::regclass AND i.indisunique"
    " AND i.indnkeyatts = 1 AND a.attname = 'id')"
)


def settings_fingerprint(settings: Settings) -> dict[str, Any]:
    """The settings that shape what lands in the target; a resume must use the same."""
    t = settings.target
    return {
        "target": [t.schema, t.sessions, t.messages],
        "naive_timezone": settings.naive_timezone,
        "strip_nul": settings.strip_nul,
        "on_conflict": settings.on_conflict,
    }


async def refuse_foreign_rows(conn: asyncpg.Connection, settings: Settings) -> None:
    """Before writing anything: refuse a table holding rows flux-migrate did not write, unless
    --on-conflict says what to do with them."""
    if settings.on_conflict != "error":
        return
    names = settings.target
    existing = await ckpt.read_checkpoints(conn, names.schema)
    for table in TABLES:
        if table.name in existing or not await table_exists(conn, names, table.name):
            continue
        if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {names.qualified(table.name)})"):
            raise TargetError(
                f"Table {names.qualified(table.name)} already holds rows that flux-migrate"
                " did not write; empty it, set another target schema in --config, or pass"
                " --on-conflict skip (keep them) or --on-conflict update (overwrite them)."
            )


async def prepare_target(
    conn: asyncpg.Connection, settings: Settings, run_id: str, fingerprint: str
) -> dict[str, ckpt.Checkpoint]:
    """Create the bookkeeping, the target schema and missing tables with their checkpoints.

    Refuses (TargetError, nothing written) a table that holds rows this tool did not write,
    unless --on-conflict skip|update says what to do with them.
    """
    names = settings.target
    await refuse_foreign_rows(conn, settings)
    await ckpt.ensure_bookkeeping(conn)
    existing = await ckpt.read_checkpoints(conn, names.schema)
    async with conn.transaction():
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(names.schema)}")
        for table in TABLES:
            if table.name in existing:
                if not await table_exists(conn, names, table.name):
                    raise TargetError(
                        f"Table {names.qualified(table.name)} was dropped after flux-migrate"
                        " started filling it; rerun with --restart --yes to start over."
                    )
                await check_target_columns(conn, names, table)
                continue
            created = not await table_exists(conn, names, table.name)
            if not created:
                await check_target_columns(conn, names, table)
            has_rows = False
            if created:
                await conn.execute(create_table_sql(table, names))
            else:
                has_rows = bool(
                    await conn.fetchval(
                        f"SELECT EXISTS (SELECT 1 FROM {names.qualified(table.name)})"
                    )
                )
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
            )
            if created and not settings.defer_constraints:
                for c in constraints(names):
                    if c.table == table.name:
                        await conn.execute(c.sql)
    return await ckpt.read_checkpoints(conn, names.schema)


async def check_fingerprint(
    src: aiosqlite.Connection,
    target: Target,
    settings: Settings,
    identity: dict[str, Any],
    checkpoints: dict[str, ckpt.Checkpoint],
) -> None:
    """Refuse to resume into a target filled from another source or with other settings."""
    for c in checkpoints.values():
        if not c.fingerprint:
            continue
        stored = json.loads(c.fingerprint)
        theirs, ours = stored.get("settings", {}), settings_fingerprint(settings)
        changed = [k for k in ours if theirs.get(k) != ours[k]]
        if changed:
            key = changed[0]
            raise TargetError(
                f"This target was filled with {key}={theirs.get(key)!r} but this run uses"
                f" {ours[key]!r}; use the same settings to resume, or --restart --yes to start over."
            )
        source = stored.get("source", {})
        if source.get("schema") != identity["schema"] or not await same_source(
            src, target, settings.target, source.get("sample", [])
        ):
            raise TargetError(
                "This target was filled from a different SQLite database (its schema or first"
                " sessions differ); point --sqlite-path at the original file, or pass --restart"
                " --yes to clear what flux-migrate wrote and start over."
            )
        return


async def clear_target(conn: asyncpg.Connection, settings: Settings) -> None:
    """--restart: drop the tables flux-migrate created, empty those it filled, forget checkpoints."""
    names = settings.target
    if not await ckpt.bookkeeping_exists(conn):
        return
    found = await ckpt.read_checkpoints(conn, names.schema)
    refused = [c for c in found.values() if c.preexisting_rows]
    if refused:
        raise TargetError(
            f"--restart cannot undo a load into {names.schema}.{refused[0].target_table}, which held"
            " rows before flux-migrate wrote to it; restore it from a backup instead."
        )
    for c in found.values():
        if await table_exists(conn, names, c.source_table):
            foreign = await ckpt.rows_written_since(conn, names.qualified(c.source_table), c)
            if foreign:
                raise TargetError(
                    f"--restart would delete {foreign:,} row(s) of"
                    f" {names.qualified(c.source_table)} that flux-migrate did not write (written"
                    " after its last run, e.g. by the app); move or back them up first."
                    " Nothing was changed."
                )
    async with conn.transaction():
        for table in reversed(TABLES):
            c = found.get(table.name)
            if c is None or not await table_exists(conn, names, table.name):
                continue
            if c.created_table:
                await conn.execute(f"DROP TABLE {names.qualified(table.name)} CASCADE")
            else:
                await conn.execute(f"DELETE FROM {names.qualified(table.name)}")
        await ckpt.clear_schema(conn, names.schema)
    log.info("target_cleared", schema=names.schema)


async def build_constraints(target: Target, names: TargetNames, stop: StopFlag) -> float:
    """Build the keys and index deferred during the bulk load; each is resumable by name."""
    started = time.monotonic()
    have = await target.retrying(
        lambda c: existing_constraint_names(c, names.schema), what="reading constraints"
    )
    for c in constraints(names):
        if c.name in have:
            continue
        stop.check()
        log.info("constraint_build_started", constraint=c.name)
        try:
            await target.retrying(lambda conn, c=c: conn.execute(c.sql), what=f"building {c.name}")
        except asyncpg.UniqueViolationError as exc:
            raise RuntimeFailure(
                f"Building {c.name} found duplicate keys ({exc.detail or exc}); the target holds rows"
                " twice, which flux-migrate never writes: was it loaded by another tool too?"
            ) from None
        except asyncpg.ForeignKeyViolationError as exc:
            raise RuntimeFailure(
                f"Building {c.name} found messages without a loaded session ({exc.detail or exc})."
            ) from None
        except asyncpg.DuplicateObjectError:
            pass  # built by an attempt whose reply was lost
    await target.retrying(
        lambda c: ckpt.clear_constraints_pending(c, names.schema), what="recording the keys"
    )
    return time.monotonic() - started


# ---------------------------------------------------------------- the run


class StopFlag:
    """Set by a signal handler; the run stops at the next batch boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def request(self, signum: int) -> None:
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        if self.signum is not None:
            name = "SIGINT" if self.signum == signal.SIGINT else "SIGTERM"
            code = EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_SIGTERM
            raise Interrupted(
                f"Stopped by {name} at a batch boundary; checkpoints are consistent,"
                " rerun the same command to resume.",
                code,
            )


async def _pump(source: AsyncIterator[Batch], send: ObjectSendStream[Batch]) -> None:
    """Move batches from the extract/transform chain into the bounded buffer, then close it."""
    async with send, contextlib.aclosing(source):  # type: ignore[type-var]
        try:
            async for batch in source:
                await send.send(batch)
        except anyio.BrokenResourceError:
            return  # the consumer stopped (at a boundary, or failing: it reports why)


async def migrate_table(
    src: aiosqlite.Connection,
    target: Target,
    ctx: LoadContext,
    *,
    settings: Settings,
    after: int,
    upto: int,
    report: TableReport,
    progress: Progress,
    missing_parents: set[str],
) -> None:
    """Stream one table from its checkpoint to ``upto``; SQLite reading overlaps the COPY.

    Returns early, after a committed batch, when the stop flag is set.
    """
    table = ctx.table
    tlog = log.bind(run_id=ctx.run_id, table=table.name)
    logged = 0

    def on_batch(result: BatchResult) -> None:
        nonlocal logged
        if result.already:
            tlog.info(
                "batch_already_committed", seq=result.batch.seq, last_rowid=result.batch.last_rowid
            )
        report.loaded += result.loaded
        report.quarantined += result.quarantined_count
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
            quarantined=result.quarantined_count,
            skipped=result.skipped,
            last_rowid=result.batch.last_rowid,
        )
        progress.advance(table.name, result.batch.extracted)

    def on_retry(attempt: int, exc: BaseException, delay: float) -> None:
        tlog.warning(
            "batch_retried", attempt=attempt, error=type(exc).__name__, wait_s=round(delay, 2)
        )

    chain = transform(
        extract(src, table, after_rowid=after, upto_rowid=upto, batch_size=settings.batch_size),
        table,
        naive_tz=settings.naive_tz,
        strip_nul=settings.strip_nul,
        missing_parents=missing_parents,
        text_as_bytes=True,
    )
    send, receive = anyio.create_memory_object_stream[Batch](settings.buffer_batches)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pump, chain, send)
            async with receive:
                await load(receive, target, ctx, on_batch=on_batch, on_retry=on_retry)
                tg.cancel_scope.cancel()  # stopped early: the reader may still be waiting to send
    except BaseExceptionGroup as group:
        raise single_error(group) from None
    if logged > QUARANTINE_LOG_LIMIT:
        tlog.warning("rows_quarantined_not_logged", count=logged - QUARANTINE_LOG_LIMIT)


async def migrate(
    settings: Settings,
    *,
    progress: Progress | None = None,
    run_id: str | None = None,
    stop: StopFlag | None = None,
    restart: bool = False,
    report: RunReport | None = None,
) -> RunReport:
    """Run one migration to completion, or raise MigrateError with a sentence for the user.

    Safe to interrupt at any point: every committed batch carries its checkpoint, so rerunning
    continues after the last committed batch. With ``stop`` set (by a signal handler) it stops
    at the next batch boundary and raises Interrupted. ``report`` (if given) is filled in as
    the run goes, so a caller can print what was done even when the run fails.
    """
    progress = progress or NoProgress()
    stop = stop or StopFlag()
    report = report or RunReport(run_id=run_id or uuid.uuid4().hex[:12])
    run_id = report.run_id
    path = settings.require_source()
    dsn = settings.require_dsn()
    structlog.contextvars.bind_contextvars(run_id=run_id)
    names = settings.target
    target = Target(dsn, retry_seconds=settings.retry_seconds)
    try:
        async with open_source(path, busy_timeout=settings.busy_timeout) as src:
            await check_source(src, path)
            bounds, identity = await source_snapshot(src, path)
            lock = await connect(dsn)
            try:
                got_lock = await lock.fetchval(
                    f"SELECT pg_try_advisory_lock({MIGRATION_LOCK_KEY})", names.schema
                )
                if not got_lock:
                    raise TargetError(
                        f"Another flux-migrate run is writing to schema {names.schema} of this"
                        " database; wait for it to finish."
                    )
                if restart:
                    await target.retrying(
                        lambda c: clear_target(c, settings), what="clearing the target"
                    )
                fingerprint = json.dumps(
                    {"source": identity, "settings": settings_fingerprint(settings)}
                )
                checkpoints = await target.retrying(
                    lambda c: prepare_target(c, settings, run_id, fingerprint),
                    what="preparing the target",
                )
                await check_fingerprint(src, target, settings, identity, checkpoints)
                log.info("run_started", target=names.schema, batch_size=settings.batch_size)
                for table in TABLES:
                    stop.check()
                    await _run_table(
                        src,
                        target,
                        table,
                        settings,
                        run_id,
                        checkpoints,
                        bounds,
                        report,
                        progress,
                        stop,
                    )
                final = await target.retrying(
                    lambda c: ckpt.read_checkpoints(c, names.schema), what="reading checkpoints"
                )
                if any(c.constraints_pending for c in final.values()):
                    report.constraints_seconds = await build_constraints(target, names, stop)
                    log.info("constraints_built", seconds=round(report.constraints_seconds, 2))
                await target.retrying(
                    lambda c: check_accounting(c, settings, report), what="checking the accounting"
                )
                report.quarantined_open = sum(c.quarantined for c in final.values())
            finally:
                with anyio.CancelScope(shield=True):
                    await target.close()
                    await make_durable(lock, names.schema)
                    lock.terminate() if not lock.is_closed() else None
    except (asyncpg.PostgresError, sqlite3.Error) as exc:
        error = translate(exc, target.location)
        report.status, report.message = "failed", error.message
        log.error("run_failed", error=error.message, status=report.status)
        raise error from None
    except MigrateError as exc:
        report.status = "interrupted" if isinstance(exc, Interrupted) else "failed"
        report.message = exc.message
        log.error("run_failed", error=exc.message, status=report.status)
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


async def _checkpoint(target: Target, schema: str, table: str) -> ckpt.Checkpoint:
    found = await target.retrying(
        lambda c: ckpt.read_checkpoints(c, schema), what="reading checkpoints"
    )
    return found[table]


async def make_durable(conn: asyncpg.Connection, schema: str) -> None:
    """One synchronous commit: flushes the WAL, so every batch committed before is durable
    (batches commit without waiting for the flush). Best effort and bounded."""
    if conn.is_closed():
        return
    with anyio.move_on_after(10):
        try:
            await conn.execute(
                f"UPDATE {ckpt.CHECKPOINTS} SET updated_at = now() WHERE target_schema = $1", schema
            )
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            pass


async def _run_table(
    src: aiosqlite.Connection,
    target: Target,
    table: Table,
    settings: Settings,
    run_id: str,
    checkpoints: dict[str, ckpt.Checkpoint],
    bounds: dict[str, int],
    report: RunReport,
    progress: Progress,
    stop: StopFlag,
) -> None:
    names = settings.target
    treport = report.tables[table.name] = TableReport()
    checkpoint = checkpoints[table.name]
    missing: set[str] = set()
    if table.parent is not None:
        missing = await target.retrying(
            lambda c: unresolved_keys(c, names.schema, str(table.parent)),
            what="reading the quarantine",
        )
    ctx = LoadContext(
        table=table,
        names=names,
        run_id=run_id,
        on_conflict=settings.on_conflict if checkpoint.preexisting_rows else "error",
        stop=stop,
        single_transaction=settings.single_transaction,
        strict=functools.partial(
            transform_batch,
            table=table,
            naive_tz=settings.naive_tz,
            strip_nul=settings.strip_nul,
            missing_parents=missing,
        ),
    )
    if checkpoint.quarantined:
        fixed, _gone = await requeue(
            src, target, table, settings=settings, ctx=ctx, missing_parents=missing
        )
        treport.requeued = fixed
    start = await _checkpoint(target, names.schema, table.name)
    after = await target.retrying(
        lambda c: resume_point(src, c, names, checkpoint), what="finding where to resume"
    )
    upto = bounds[table.name]
    total = await count_between(src, table.name, after, upto)
    if total == 0:
        treport.up_to_date = True
        log.info("table_up_to_date", table=table.name, last_rowid=after)
        await target.retrying(
            lambda c: ckpt.set_status(c, names.schema, table.name, "finished", run_id),
            what="recording status",
        )
        return
    log.info("table_started", table=table.name, rows=total, after_rowid=after)
    started = time.monotonic()
    progress.start(table.name, total)
    try:
        while True:
            try:
                await migrate_table(
                    src,
                    target,
                    ctx,
                    settings=settings,
                    after=after,
                    upto=upto,
                    report=treport,
                    progress=progress,
                    missing_parents=missing,
                )
                break
            except CheckpointRewound as rewound:
                log.warning("checkpoint_rewound", table=table.name, to_rowid=rewound.rowid)
                after = rewound.rowid
    finally:
        treport.seconds = time.monotonic() - started
        progress.finish(table.name)
    stop.check()
    # What the checkpoints say this run did: exact even when lost commits were redone.
    end = await _checkpoint(target, names.schema, table.name)
    treport.extracted = end.extracted - start.extracted
    treport.loaded = end.loaded - start.loaded
    treport.quarantined = end.quarantined - start.quarantined
    treport.skipped = end.skipped - start.skipped
    await target.retrying(
        lambda c: ckpt.set_status(c, names.schema, table.name, "finished", run_id),
        what="recording status",
    )
    log.info(
        "table_completed",
        table=table.name,
        extracted=treport.extracted,
        loaded=treport.loaded,
        quarantined=treport.quarantined,
        skipped=treport.skipped,
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
        if not c.preexisting_rows:
            in_target = await conn.fetchval(f"SELECT count(*) FROM {names.qualified(name)}")
            if in_target != c.loaded:
                raise RuntimeFailure(
                    f"Table {names.qualified(name)} holds {in_target} rows but flux-migrate"
                    f" loaded {c.loaded}; something else wrote to it."
                )
