"""The runner: preflight, then extract -> transform -> load per table, then keys and accounting.

Target preflight (lock, --restart, tables, fingerprints) lives in pipeline/preflight.py, one
table's stream in pipeline/stream.py, the deferred key build in pipeline/keys.py, the
accounting and the final durable commit in pipeline/finish.py; this module runs the tables in
order and keeps the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import asyncpg
import structlog

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.errors import RuntimeFailure, single_error
from flux_migrate.core.mapping import Mapping, to_toml
from flux_migrate.core.schema import Table
from flux_migrate.core.source import check_source, count_between, source_snapshot
from flux_migrate.core.target import Target, connect
from flux_migrate.pipeline.convert_pool import ConverterPool, pooled_batches, range_job, refill
from flux_migrate.pipeline.duplicates import build_primary_keys
from flux_migrate.pipeline.finish import check_accounting, make_durable, resume_autovacuum
from flux_migrate.pipeline.jsonl_run import check_jsonl_sources, migrate_jsonl, run_jsonl_tables
from flux_migrate.pipeline.key_repair import remove_orphans, repair_key
from flux_migrate.pipeline.keys import build_constraints
from flux_migrate.pipeline.mapping_source import (
    check_target_schema,
    recorded_mapping_of,
    resolve_mapping,
)
from flux_migrate.pipeline.orphans_ahead import OrphansAhead
from flux_migrate.pipeline.preflight import (
    check_fingerprint,
    clear_target,
    prepare_target,
    settings_fingerprint,
    take_migration_lock,
)
from flux_migrate.pipeline.progress import NoProgress, Progress
from flux_migrate.pipeline.report import RunReport, TableReport, record_completion, record_failure
from flux_migrate.pipeline.requeue import requeue
from flux_migrate.pipeline.resume_point import resume_point
from flux_migrate.pipeline.settings import Settings
from flux_migrate.pipeline.stop import StopFlag
from flux_migrate.pipeline.stream import (
    QUARANTINE_LOG_LIMIT,
    BatchLog,
    read_checkpoint,
    record_counts,
    showing,
    stream_table,
    until_streamed,
)
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.extract import count_after_key, extract, open_source
from flux_migrate.stages.extract_sql import source_uri
from flux_migrate.stages.load import BatchResult, LoadContext, commit
from flux_migrate.stages.page_hints import YoungPages, worthwhile
from flux_migrate.stages.transform import parent_key_entry, transform, transform_batch

__all__ = [
    "QUARANTINE_LOG_LIMIT",
    "StopFlag",
    "check_accounting",
    "make_durable",
    "migrate",
    "settings_fingerprint",
]

log = structlog.get_logger("flux_migrate")


@dataclass(frozen=True, kw_only=True)
class Run:
    """What every table of one run shares: the open source and target, the settings, the
    checkpoints and source bounds read at the start, and where progress and counts go."""

    src: aiosqlite.Connection
    target: Target
    settings: Settings
    run_id: str
    checkpoints: dict[str, ckpt.Checkpoint]
    # The highest source rowid of each table when the run started; for a WITHOUT ROWID table
    # the position its checkpoint reaches once the rows after its key are read.
    bounds: dict[str, int]
    report: RunReport
    progress: Progress
    stop: StopFlag
    pool: ConverterPool | None = None  # converter processes (--workers above 1)
    ahead: OrphansAhead | None = None  # with them, the orphan sets of tables not read yet
    early_hints: bool = False  # the server gains from hint bits set early (stages/page_hints)

    @property
    def schema(self) -> str:
        return self.settings.names.schema


async def migrate(
    settings: Settings,
    *,
    progress: Progress | None = None,
    run_id: str | None = None,
    stop: StopFlag | None = None,
    restart: bool = False,
    report: RunReport | None = None,
    show_mapping: Callable[[Mapping, bool], None] | None = None,
) -> RunReport:
    """Run one migration to completion, or raise MigrateError with a sentence for the user.

    Safe to interrupt at any point: every committed batch carries its checkpoint, so rerunning
    continues after the last committed batch. With ``stop`` set (by a signal handler) it stops
    at the next batch boundary and raises Interrupted. ``report`` (if given) is filled in as
    the run goes, so a caller can print what was done even when the run fails.
    """
    report = report or RunReport(run_id=run_id or uuid.uuid4().hex[:12])
    if settings.sqlite_path is None and settings.jsonl:
        await migrate_jsonl(
            settings, settings.jsonl, report=report, progress=progress, stop=stop, restart=restart
        )
        return report
    settings.require_source()  # configuration errors first, before anything is opened
    check_jsonl_sources(settings)
    target = Target(settings.require_dsn(), retry_seconds=settings.retry_seconds)
    structlog.contextvars.bind_contextvars(run_id=report.run_id)
    try:
        await _migrate(
            settings,
            target,
            report=report,
            progress=progress or NoProgress(),
            stop=stop or StopFlag(),
            restart=restart,
            show_mapping=show_mapping,
        )
    except Exception as exc:
        error = record_failure(report, exc, target.location)
        if error is exc:
            raise
        raise error from None
    finally:
        structlog.contextvars.unbind_contextvars("run_id")
    record_completion(report)
    return report


async def _migrate(
    settings: Settings,
    target: Target,
    *,
    report: RunReport,
    progress: Progress,
    stop: StopFlag,
    restart: bool,
    show_mapping: Callable[[Mapping, bool], None] | None,
) -> None:
    """Source preflight, the lock, target preflight, the tables, then keys and accounting."""
    path = settings.require_source()
    async with open_source(path, busy_timeout=settings.busy_timeout) as src:
        configured = settings.mapping is not None
        settings = await resolve_run_mapping(settings, path, target, restart=restart)
        check_jsonl_sources(settings)  # the mapped tables are known now, nothing written yet
        if show_mapping is not None and settings.mapping is not None:
            show_mapping(settings.mapping, configured)
        await check_source(src, path, settings.tables)
        bounds, identity = await source_snapshot(src, path, settings.tables)
        async with holding_migration_lock(target.dsn, target, settings.names.schema):
            checkpoints = await _prepare(src, target, settings, identity, report, restart)
            workers = settings.workers > 1
            ahead = _orphans_ahead(settings, checkpoints, bounds) if workers else None
            run = Run(
                src=src,
                target=target,
                settings=settings,
                run_id=report.run_id,
                checkpoints=checkpoints,
                bounds=bounds,
                report=report,
                progress=progress,
                stop=stop,
                pool=ConverterPool(settings.workers) if workers else None,
                ahead=ahead,
                early_hints=await target.retrying(worthwhile, what="reading server settings"),
            )
            try:
                last = await _run_tables(run)
            finally:
                if run.pool is not None:
                    run.pool.close()
                if run.ahead is not None:
                    run.ahead.close()
            await _finish(run, last)
            await _run_jsonl(run)


def _orphans_ahead(
    settings: Settings, checkpoints: dict[str, ckpt.Checkpoint], bounds: dict[str, int]
) -> OrphansAhead:
    """The orphan sets of the tables no run has read yet, found while the tables before them
    load (pipeline/orphans_ahead.py)."""
    ahead = OrphansAhead(source_uri(settings.require_source()), settings.busy_timeout)
    for table in settings.tables:
        if checkpoints[table.name].extracted == 0:
            ahead.start(table, bounds[table.name])
    return ahead


async def resolve_run_mapping(
    settings: Settings, path: Path, target: Target | None = None, *, restart: bool = False
) -> Settings:
    """Settings with the run's mapping: the configured one, else the one the last run of
    the target schema used (read on ``target``; not with ``restart``) while it places the
    source, else the discovered one; checked against the source (SourceError names what is
    not placed)."""
    recorded = None
    if settings.mapping is None and target is not None and not restart:
        schema = settings.names.schema
        try:
            recorded = await target.retrying(
                lambda c: recorded_mapping_of(c, schema), what="reading the recorded mapping"
            )
        finally:
            await target.close()  # reopened when needed: nothing is left open on a refusal
    mapping, _ = await anyio.to_thread.run_sync(
        resolve_mapping, path, settings.mapping, settings.busy_timeout, recorded
    )
    check_target_schema(mapping, settings.names, path)
    return settings.with_(mapping=mapping)


@contextlib.asynccontextmanager
async def holding_migration_lock(dsn: str, target: Target, schema: str) -> AsyncIterator[None]:
    """Hold the schema's migration lock on a connection of its own for the run; at the end
    (shielded) close the target and make every commit of the run durable."""
    lock = await connect(dsn)
    try:
        await take_migration_lock(lock, schema)
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await target.close()
            await make_durable(lock, target.dsn, schema)
            if not lock.is_closed():
                lock.terminate()


async def _prepare(
    src: aiosqlite.Connection,
    target: Target,
    settings: Settings,
    identity: dict[str, Any],
    report: RunReport,
    restart: bool,
) -> dict[str, ckpt.Checkpoint]:
    """--restart if asked, then the target's tables and checkpoints, checked against this
    source and these settings; return the checkpoints."""
    if restart:
        await target.retrying(lambda c: clear_target(c, settings), what="clearing the target")
    fingerprint = json.dumps({"source": identity, "settings": settings_fingerprint(settings)})
    checkpoints = await target.retrying(
        lambda c: prepare_target(c, settings, report.run_id, fingerprint),
        what="preparing the target",
    )
    await check_fingerprint(src, target, settings, identity, checkpoints)
    if settings.mapping is not None:
        toml = to_toml(settings.mapping)
        await target.retrying(
            lambda c: ckpt.record_mapping(c, settings.names.schema, toml),
            what="recording the mapping",
        )
    return checkpoints


async def _run_tables(run: Run) -> Streamed | None:
    """Each table in load order (parents first), stopping between tables when asked; each
    streamed table concluded (witness count, status) before the next starts, except the last:
    returned, for _finish to conclude while the keys are built."""
    log.info(
        "run_started",
        target=run.schema,
        batch_size=run.settings.batch_size,
        tables=len(run.settings.tables),
    )
    streamed = None
    for table in run.settings.tables:
        if streamed is not None:
            await _conclude(run, streamed, await _count_present(run, streamed))
        run.stop.check()
        streamed = await _run_table(run, table)
    return streamed


async def _finish(run: Run, last: Streamed | None) -> None:
    """Build the deferred keys while the last table's witness count runs on the source (0.3 s
    of a 1M-message table, which would otherwise wait for it), conclude that table, check that
    every row is accounted for, give the tables their autovacuum back, count what stays
    quarantined."""
    present: list[int | None | Exception] = []
    try:
        async with anyio.create_task_group() as tg:
            if last is not None:
                tg.start_soon(_witness, run, last, present)
            final = await _build_keys(run)
    except BaseExceptionGroup as group:
        raise single_error(group) from None
    if last is not None:
        await _conclude(run, last, present[0])
    await run.target.retrying(
        lambda c: check_accounting(c, run.settings, run.report), what="checking the accounting"
    )
    await run.target.retrying(
        lambda c: resume_autovacuum(c, run.settings.names, final), what="resuming autovacuum"
    )
    _record_totals(run, final)


async def _build_keys(run: Run) -> dict[str, ckpt.Checkpoint]:
    """The deferred primary keys, then the rest of the keys and indexes; the checkpoints read
    between the two."""
    await build_primary_keys(run.src, run.target, run.settings, run.run_id, run.report)
    final = await run.target.retrying(
        lambda c: ckpt.read_checkpoints(c, run.schema), what="reading checkpoints"
    )
    if any(c.constraints_pending for c in final.values()):
        repair = functools.partial(
            repair_key, run.src, run.target, run.settings, run.run_id, run.report
        )
        orphans = functools.partial(
            remove_orphans, run.src, run.target, run.settings, run.run_id, run.report
        )
        run.report.constraints_seconds += await build_constraints(
            run.target, run.settings.names, run.stop, run.settings.tables, repair, orphans
        )
        log.info("constraints_built", seconds=round(run.report.constraints_seconds, 2))
    return final


async def _run_jsonl(run: Run) -> None:
    """The run's JSONL files (issue 12), after the SQLite tables, under the same lock; then
    the open quarantine counted again over every table."""
    if not run.settings.jsonl:
        return
    await run_jsonl_tables(
        run.target, run.settings, run.settings.jsonl, run.run_id, run.report, run.progress,
        run.stop,
    )  # fmt: skip
    final = await run.target.retrying(
        lambda c: ckpt.read_checkpoints(c, run.schema), what="reading checkpoints"
    )
    _record_totals(run, final)


def _record_totals(run: Run, final: dict[str, ckpt.Checkpoint]) -> None:
    """The rows quarantined by any run and not loaded since, and what every run together
    loaded per table (a resumed run's summary shows it)."""
    run.report.quarantined_open = sum(c.quarantined for c in final.values())
    for name, c in final.items():
        if name in run.report.tables:
            run.report.tables[name].total_loaded = c.loaded


# ---------------------------------------------------------------- one table


async def _run_table(run: Run, table: Table) -> Streamed | None:
    """Retry the table's quarantined rows, then stream its new rows after the checkpoint up to
    the run's bound, and record what the checkpoint says this run did."""
    treport = run.report.tables[table.name] = TableReport()
    checkpoint = run.checkpoints[table.name]
    missing = await _missing_parents(run, table)
    overridden = await run.target.retrying(
        functools.partial(ckpt.has_overrides, target_schema=run.schema, source_table=table.name),
        what="reading the row digests",
    )
    ctx = _load_context(run, table, checkpoint, missing, overridden)
    if checkpoint.quarantined:
        treport.requeued = await _requeue(run, table, checkpoint, ctx, missing, overridden)
        if treport.requeued:  # rows loaded now are parents the new rows may name
            missing = await _missing_parents(run, table)
            ctx = _load_context(run, table, checkpoint, missing, overridden)
    start = await read_checkpoint(run.target, run.schema, table.name)
    if table.without_rowid:  # keyset on the key: no rowid to be reused, see _key_bound
        after, total = await _key_bound(run, start)
    else:
        after = await run.target.retrying(
            lambda c: resume_point(run.src, c, run.settings.names, checkpoint, table),
            what="finding where to resume",
        )
        total = await count_between(run.src, table, after, run.bounds[table.name], by_index=True)
    if total == 0:
        treport.up_to_date = True
        log.info("table_up_to_date", table=table.name, last_rowid=after)
        await _set_finished(run, table)
        return None
    log.info("table_started", table=table.name, rows=total, after_rowid=after)
    # A small table, or one read in key order, is converted here: processes cost more.
    pooled = total >= 2 * run.settings.batch_size and not table.without_rowid
    try:
        await _stream_table(run, ctx, after, total, missing, run.pool if pooled else None)
    except BaseException:
        await _count_best_effort(run, table, start)
        raise
    await _count_from_checkpoint(run, table, start)
    run.stop.check()  # stopped between batches: the rest is read by the rerun
    return Streamed(table, after)


@dataclass(frozen=True)
class Streamed:
    """A table streamed to the run's bound from rowid ``after``: its witness count and its
    status wait (_conclude)."""

    table: Table
    after: int


async def _count_present(run: Run, streamed: Streamed) -> int | None:
    """SQLite's own count(*) of the rows in the streamed range now (None for a WITHOUT ROWID
    table: read in key order, it has no rowid range)."""
    if streamed.table.without_rowid:
        return None
    return await count_between(
        run.src, streamed.table, streamed.after, run.bounds[streamed.table.name]
    )


async def _witness(run: Run, streamed: Streamed, out: list[int | None | Exception]) -> None:
    """_count_present into ``out``, or its failure: raised by _conclude, after the keys
    being built beside it, never cancelling them."""
    try:
        out.append(await _count_present(run, streamed))
    except Exception as exc:  # noqa: BLE001 - raised by _conclude
        out.append(exc)


async def _conclude(run: Run, streamed: Streamed, present: int | None | Exception) -> None:
    """The run read at least as many rows as SQLite's own count(*) of the rows in its range
    holds now (rows the app deleted meanwhile make the count smaller, never larger): a row
    the reader skipped fails the run instead of passing unnoticed. Then the table is
    finished."""
    table = streamed.table
    if isinstance(present, Exception):
        raise present
    t = run.report.tables[table.name]
    if present is not None and t.extracted < present:
        raise RuntimeFailure(
            f"Accounting failed for {table.name}: SQLite counts {present} rows with rowid in"
            f" ({streamed.after}, {run.bounds[table.name]}] but the run read {t.extracted};"
            " please report this."
        )
    await _set_finished(run, table)
    log.info(
        "table_completed",
        table=table.name,
        extracted=t.extracted,
        loaded=t.loaded,
        quarantined=t.quarantined,
        skipped=t.skipped,
        seconds=round(t.seconds, 2),
    )


async def _requeue(
    run: Run,
    table: Table,
    checkpoint: ckpt.Checkpoint,
    ctx: LoadContext,
    missing: set[str],
    overridden: bool,
) -> int:
    """Retry the table's quarantined rows; in a table that references itself, again while a
    pass loads some (a row fixed in the source frees its quarantined children, then theirs)."""
    loaded, _gone = await requeue(
        run.src, run.target, table, settings=run.settings, ctx=ctx, missing_parents=missing
    )
    total = loaded
    while loaded and any(fk.parent == table.name for fk in table.foreign_keys):
        missing = await _missing_parents(run, table)
        ctx = _load_context(run, table, checkpoint, missing, overridden)
        loaded, _gone = await requeue(
            run.src, run.target, table, settings=run.settings, ctx=ctx, missing_parents=missing
        )
        total += loaded
    return total


async def _key_bound(run: Run, c: ckpt.Checkpoint) -> tuple[int, int]:
    """Where a WITHOUT ROWID table resumes (its checkpoint's position, the rows read so far)
    and how many rows follow the checkpoint's key; the table's bound is their sum."""
    table = next(t for t in run.settings.tables if t.name == c.source_table)
    total = await count_after_key(run.src, table, c.last_key)
    run.bounds[table.name] = c.last_rowid + total
    return c.last_rowid, total


async def _missing_parents(run: Run, table: Table) -> set[str]:
    return await quarantined_parents(run.target, run.schema, table, run.settings.tables)


async def quarantined_parents(
    target: Target, schema: str, table: Table, tables: Sequence[Table]
) -> set[str]:
    """For a child table: the parent keys that are quarantined (their children are too); for
    a generic table, per foreign key that references its parent's primary key (named by
    parent_key_entry)."""
    if table.parent is not None:
        parent = table.parent
        return await target.retrying(
            lambda c: ckpt.unresolved_keys(c, schema, parent), what="reading the quarantine"
        )
    missing: set[str] = set()
    loaded = {t.name: t for t in tables}
    for n, fk in enumerate(table.foreign_keys):
        parent_table = loaded.get(fk.parent)
        if parent_table is None or fk.parent_columns != parent_table.primary_key:
            continue
        keys = await target.retrying(
            functools.partial(ckpt.unresolved_keys, target_schema=schema, source_table=fk.parent),
            what="reading the quarantine",
        )
        missing.update(parent_key_entry(n, k) for k in keys)
    return missing


def _load_context(
    run: Run, table: Table, checkpoint: ckpt.Checkpoint, missing: set[str], overridden: bool
) -> LoadContext:
    """Where and how the table's batches load: with --on-conflict only into tables that held
    rows before, and a strict re-conversion for batches PostgreSQL refuses."""
    settings = run.settings
    return LoadContext(
        table=table,
        names=settings.names,
        run_id=run.run_id,
        on_conflict=settings.on_conflict if checkpoint.preexisting_rows else "error",
        stop=run.stop,
        single_transaction=settings.single_transaction,
        overridden=overridden,
        strict=functools.partial(
            transform_batch,
            table=table,
            naive_timezone=settings.naive_timezone,
            strip_nul=settings.strip_nul,
            missing_parents=missing,
        ),
    )


async def _stream_table(
    run: Run,
    ctx: LoadContext,
    after: int,
    total: int,
    missing: set[str],
    pool: ConverterPool | None,
) -> None:
    """Stream the table from ``after``; when the server lost commits (the checkpoint is behind
    a batch), stream again from where the checkpoint stands."""
    table = ctx.table.name
    treport = run.report.tables[table]
    with showing(run.progress, table, total, treport, started=time.monotonic()):
        after_key = None
        if ctx.table.without_rowid:
            after_key = (await read_checkpoint(run.target, run.schema, table)).last_key

        async def stream() -> None:
            await _stream_from(run, ctx, after, after_key, missing, pool)

        async def rewind(rowid: int) -> None:
            nonlocal after, after_key
            log.warning("checkpoint_rewound", table=table, to_rowid=rowid)
            after = rowid
            if ctx.table.without_rowid:  # the key the checkpoint went back to
                c = await read_checkpoint(run.target, run.schema, table)
                after, _ = await _key_bound(run, c)
                after_key = c.last_key

        await until_streamed(stream, rewind)


async def _stream_from(
    run: Run,
    ctx: LoadContext,
    after: int,
    after_key: str | None,
    missing: set[str],
    pool: ConverterPool | None,
) -> None:
    """Stream the table from rowid ``after`` (a WITHOUT ROWID table: from the position
    ``after`` at key ``after_key``) to the run's bound; SQLite reading overlaps the COPY. With
    ``pool`` the batches are read and converted in its worker processes, else in this one.

    Returns early, after a committed batch, when the stop flag is set. Raises
    CheckpointRewound when the server lost commits (the caller streams again from there).
    """
    settings, table = run.settings, ctx.table
    upto = run.bounds[table.name]
    chain: AsyncIterator[Batch]
    if pool is None:
        chain = transform(
            extract(
                run.src,
                table,
                after_rowid=after,
                upto_rowid=upto,
                batch_size=settings.batch_size,
                after_key=after_key,
            ),
            table,
            naive_timezone=settings.naive_timezone,
            strip_nul=settings.strip_nul,
            missing_parents=missing,
            text_as_bytes=True,
        )
    else:
        job = range_job(settings, table, missing, payload=ctx.on_conflict == "error")
        chain = pooled_batches(
            pool,
            run.src,
            job,
            after=after,
            upto=upto,
            batch_size=settings.batch_size,
            ahead=run.ahead,
        )
        ctx = dataclasses.replace(ctx, refill=functools.partial(refill, job))
    young = _young_pages(run, ctx)
    ctx = dataclasses.replace(ctx, young_pages=young)
    await stream_table(
        chain,
        functools.partial(_commit, ctx),
        run.target,
        BatchLog(ctx.run_id, table.name, run.progress, position="rowid"),
        # With converter processes the batches they hold are the read-ahead: one here.
        buffer_batches=settings.buffer_batches if pool is None else 1,
        stop=ctx.stop,
        single_transaction=ctx.single_transaction,
        after_commit=None if young is None else young.after_commit,
    )


def _young_pages(run: Run, ctx: LoadContext) -> YoungPages | None:
    """The table's young pages (stages/page_hints) where reading them saves the key build a
    write of the table to the WAL: a table this run made, its keys built after the load."""
    pending = run.checkpoints[ctx.table.name].constraints_pending
    if not run.early_hints or not pending or ctx.single_transaction:
        return None
    return YoungPages(run.settings.names.qualified(ctx.table.name))


async def _commit(ctx: LoadContext, conn: asyncpg.Connection, batch: Batch) -> BatchResult:
    return await commit(conn, ctx, batch)


async def _count_from_checkpoint(run: Run, table: Table, start: ckpt.Checkpoint) -> None:
    end = await read_checkpoint(run.target, run.schema, table.name)
    record_counts(run.report.tables[table.name], start, end)


async def _count_best_effort(run: Run, table: Table, start: ckpt.Checkpoint) -> None:
    """The counts of a table whose run is failing or cancelled, for the summary printed after:
    one short attempt on a fresh connection, shielded; the counts stay as they are without."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(3):
        await run.target.drop()
        with contextlib.suppress(Exception):  # the run's own error is what gets raised
            conn = await run.target.conn()
            found = await ckpt.read_checkpoints(conn, run.schema)
            record_counts(run.report.tables[table.name], start, found[table.name])


async def _set_finished(run: Run, table: Table) -> None:
    await run.target.retrying(
        lambda c: ckpt.set_status(c, run.schema, table.name, "finished", run.run_id),
        what="recording status",
    )
