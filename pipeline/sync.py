"""`flux-migrate sync`: make the target equal to the source again after a run, while the app
keeps writing to SQLite; then cut over (docs/cut-over.md).

Per table (parents first): plan by merging the source with the row digests kept from the load
(pipeline/sync_plan.py), then apply in checkpointed batches (pipeline/sync_apply.py): inserts
and updates parents first, deletes children first. Rows someone else changed in PostgreSQL are
never overwritten, and a row someone else inserted there is never deleted.
"""

from __future__ import annotations

import difflib
import functools
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiosqlite
import anyio
import asyncpg
import structlog
from asyncpg.transaction import Transaction

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.digest import key_position
from flux_migrate.core.errors import (
    ConfigError,
    ErrorClass,
    RuntimeFailure,
    TargetError,
    classify,
    is_driver_error,
    translate,
)
from flux_migrate.core.schema import Kind, Table
from flux_migrate.core.source import check_source, source_snapshot
from flux_migrate.core.target import Target
from flux_migrate.pipeline.preflight import check_fingerprint
from flux_migrate.pipeline.progress import NoProgress, Progress
from flux_migrate.pipeline.runner import (
    holding_migration_lock,
    quarantined_parents,
    resolve_run_mapping,
)
from flux_migrate.pipeline.settings import Settings
from flux_migrate.pipeline.stop import StopFlag
from flux_migrate.pipeline.sync_apply import CHILD_ROWS_KEPT, Applier, TableSync
from flux_migrate.pipeline.sync_cycles import delete_together
from flux_migrate.pipeline.sync_plan import RangesAhead, TablePlan, plan_table
from flux_migrate.pipeline.sync_scan import ScanPool
from flux_migrate.stages.extract import fetch_rows, open_source

log = structlog.get_logger("flux_migrate")

T = TypeVar("T")
ROUNDS = 2  # plans and applies per sync while rows are left waiting (a live app)

# The key kinds sync can match between SQLite, its bookkeeping (text) and PostgreSQL exactly.
SYNC_KEY_KINDS = frozenset({Kind.KEY, Kind.TEXT, Kind.NULLABLE_TEXT, Kind.INTEGER})


@dataclass
class SyncReport:
    """What one sync did (or, with ``dry_run``, would do), per table."""

    run_id: str
    dry_run: bool = False
    tables: dict[str, TableSync] = field(default_factory=dict)
    plans: dict[str, TablePlan] = field(default_factory=dict)
    quarantined_open: int = 0  # source rows quarantined (by any run or sync), not loaded
    not_synced: list[str] = field(default_factory=list)  # skip_tables of the config

    @property
    def conflicts(self) -> list[tuple[str, str, str]]:
        return [(name, k, kind) for name, t in self.tables.items() for k, kind in t.conflicts]

    @property
    def idle(self) -> bool:
        return all(p.changes == 0 and not p.moves for p in self.plans.values())


async def sync(
    settings: Settings,
    *,
    dry_run: bool = False,
    stop: StopFlag | None = None,
    tables: Sequence[Table] | None = None,
    run_id: str | None = None,
    progress: Progress | None = None,
) -> SyncReport:
    """Bring the target up to date with the source; raise MigrateError with a sentence.

    ``tables`` in load order (parents first; default: the settings' mapping, as `run` loads),
    each keyed by its one-column primary key. Safe to
    kill at any point: each batch commits with its digests, and a rerun plans again from them.
    """
    report = SyncReport(run_id=run_id or uuid.uuid4().hex[:12], dry_run=dry_run)
    stop = stop or StopFlag()
    path = settings.require_source()
    target = Target(settings.require_dsn(), retry_seconds=settings.retry_seconds)
    if tables is None:  # the tables `run` loads, under the mapping it recorded
        settings = await resolve_run_mapping(settings, path, target)
    tables = tuple(tables if tables is not None else settings.tables)
    structlog.contextvars.bind_contextvars(run_id=report.run_id)
    try:
        async with open_source(path, busy_timeout=settings.busy_timeout) as src:
            await check_source(src, path, tables)
            _bounds, identity = await source_snapshot(src, path, tables)
            synced = _without_skipped(tables, settings, report)
            async with holding_migration_lock(target.dsn, target, settings.names.schema):
                await _preflight(src, target, settings, identity, synced)
                log.info("sync_started", target=settings.names.schema, dry_run=dry_run)
                writer = RolledBack(target) if dry_run else target
                try:
                    await _rounds(src, writer, settings, report, synced, stop, path, progress)
                    final = await writer.retrying(
                        lambda c: ckpt.read_checkpoints(c, settings.names.schema),
                        what="reading checkpoints",
                    )
                finally:
                    if isinstance(writer, RolledBack):
                        await writer.roll_back()
                report.quarantined_open = sum(final[t.name].quarantined for t in synced)
    except Exception as exc:
        if not is_driver_error(exc):
            raise
        raise translate(exc, target.location) from None  # one sentence, never a traceback
    finally:
        structlog.contextvars.unbind_contextvars("run_id")
    log.info(
        "sync_completed",
        changed=sum(t.changed for t in report.tables.values()),
        conflicts=len(report.conflicts),
        idle=report.idle,
    )
    return report


def _without_skipped(
    tables: Sequence[Table], settings: Settings, report: SyncReport
) -> tuple[Table, ...]:
    """The tables sync follows: all but those the config's skip_tables names (recorded in the
    report, and printed); a name that is no table is refused (ConfigError), never ignored."""
    names = [t.name for t in tables]
    for name in settings.sync_skip:
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(
                f"skip_tables names {name!r}{hint}, which is no table of"
                f" {settings.sqlite_path}; fix the name in the config file. Nothing was done."
            )
    report.not_synced += [f"{settings.names.schema}.{n}" for n in settings.sync_skip]
    return tuple(t for t in tables if t.name not in settings.sync_skip)


async def _rounds(
    src: aiosqlite.Connection,
    target: Target,
    settings: Settings,
    report: SyncReport,
    tables: Sequence[Table],
    stop: StopFlag,
    path: Path,
    progress: Progress | None,
) -> None:
    """Plan and apply every table; while rows were left waiting (the app wrote them, or their
    parents, while this sync ran), plan and apply again, up to ROUNDS times. Rows still waiting
    when the source did not change meanwhile (the app is stopped: a final sync) are no
    transient state: they are named as PARENT_MISSING conflicts, never passed over silently."""
    version = await _data_version(src)
    for n in range(ROUNDS):
        this = report if n == 0 else SyncReport(report.run_id, dry_run=report.dry_run)
        started_at = await _data_version(src)
        scanners = ScanPool()  # the scan's workers, started once for all the tables, not each
        ahead = RangesAhead(src, tables, scanners, path=path, busy_timeout=settings.busy_timeout)
        try:
            for table in tables:
                stop.check()
                started = time.monotonic()
                this.plans[table.name] = await plan_table(
                    src,
                    target,
                    settings.names.schema,
                    table,
                    path=path,
                    busy_timeout=settings.busy_timeout,
                    progress=progress,
                    stop=stop,
                    scanners=scanners,
                    ahead=ahead,
                )
                this.tables[table.name] = TableSync(
                    scanned=this.plans[table.name].scanned, seconds=time.monotonic() - started
                )
        finally:
            ahead.close()
            scanners.close()  # before the writes: their memory is not held while they run
        await _apply(src, target, settings, this, tables, stop, progress)
        if await _data_version(src) != started_at:
            await _wait_on_kept(target, settings.names.schema, this)
        if this is not report:
            _add_round(report, this)
        waiting = sum(t.deferred for t in report.tables.values())
        if not waiting:
            return
        log.info("sync_retrying", waiting=waiting, round=n + 1)
    if await _data_version(src) == version:
        await _name_unsynced(target, settings.names.schema, report)


def _add_round(report: SyncReport, later: SyncReport) -> None:
    """Fold a later round into the report: counts add up; conflicts and waiting rows are the
    later round's (each round finds them all again)."""
    for name, t in report.tables.items():
        more = later.tables[name]
        t.inserted += more.inserted
        t.updated += more.updated
        t.deleted += more.deleted
        t.moved += more.moved
        t.quarantined += more.quarantined
        t.resolved += more.resolved
        t.seconds += more.seconds
        t.conflicts, t.waiting = more.conflicts, more.waiting
        t.kept_waiting = more.kept_waiting


async def _wait_on_kept(target: Target, schema: str, report: SyncReport) -> None:
    """The app wrote while this round ran: the rows kept (child_rows_kept) may be referenced
    only by rows of the target the app changed meanwhile (a deleted row's key reused, say), which
    the next round or sync updates; so they wait instead of being named now (a sync over a
    source that no longer changes names them, see _name_unsynced)."""
    for name, t in report.tables.items():
        kept = [k for k, kind in t.conflicts if kind == CHILD_ROWS_KEPT]
        if not kept:
            continue
        await target.retrying(
            functools.partial(
                ckpt.forget_conflicts, target_schema=schema, source_table=name, keys=kept
            ),
            what="recording conflicts",
        )
        t.conflicts = [c for c in t.conflicts if c[1] != CHILD_ROWS_KEPT]
        t.kept_waiting = kept


async def _name_unsynced(target: Target, schema: str, report: SyncReport) -> None:
    """Record the rows still waiting as conflicts (PARENT_MISSING, or CHILD_ROWS_KEPT for a
    changed unique key rows still reference): the source did not change while this sync ran,
    so no later sync would take them either."""
    for name, t in report.tables.items():
        if not t.waiting and not t.kept_waiting:
            continue
        named = [(key, kind) for _rowid, key, kind in t.waiting]
        named += [(key, CHILD_ROWS_KEPT) for key in t.kept_waiting]
        await target.retrying(
            functools.partial(
                ckpt.record_conflicts,
                target_schema=schema,
                source_table=name,
                conflicts=named,
                run_id=report.run_id,
            ),
            what="recording conflicts",
        )
        t.conflicts += named
        t.waiting, t.kept_waiting = [], []


async def _data_version(src: aiosqlite.Connection) -> int:
    """SQLite's count of commits by other connections (changes while the app writes)."""
    rows = await fetch_rows(src, "PRAGMA data_version")
    return int(rows[0][0])


class RolledBack(Target):
    """The target of a dry run: every operation runs on one connection, in one transaction
    that is rolled back at the end (the sync's own transactions become savepoints), so a dry
    run plans, checks and classifies exactly as the real sync, and writes nothing."""

    def __init__(self, target: Target) -> None:
        super().__init__(target.dsn, retry_seconds=target.retry_seconds)
        self._target = target
        self._transaction: Transaction | None = None

    async def retrying(
        self,
        operation: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        what: str,
        on_retry: Callable[[int, BaseException, float], None] | None = None,
    ) -> T:
        """Run ``operation`` inside the dry run's transaction (no retry: what it did so far
        would be lost; a connection lost fails the dry run with a sentence)."""
        try:
            conn = await self._target.conn()
            if self._transaction is None:
                self._transaction = conn.transaction()
                await self._transaction.start()
            return await operation(conn)
        except Exception as exc:
            if classify(exc) is not ErrorClass.TRANSIENT:
                raise
            raise RuntimeFailure(
                f"PostgreSQL at {self.location} went away while {what} in a dry run"
                f" ({type(exc).__name__}); nothing was written, rerun the dry run."
            ) from None

    async def roll_back(self) -> None:
        """Undo everything the dry run did (shielded: also when it is cancelled)."""
        with anyio.CancelScope(shield=True):
            if self._transaction is not None:
                transaction, self._transaction = self._transaction, None
                try:
                    await transaction.rollback()
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await self._target.drop()  # the server rolls back a connection that goes


async def _preflight(
    src: aiosqlite.Connection,
    target: Target,
    settings: Settings,
    identity: dict[str, object],
    tables: Sequence[Table],
) -> None:
    """Sync needs a completed run of this source with these settings, with row digests."""
    schema = settings.names.schema
    checkpoints = await target.retrying(
        lambda c: ckpt.read_checkpoints(c, schema), what="reading checkpoints"
    )
    for table in tables:
        c = checkpoints.get(table.name)
        if c is None or c.constraints_pending or c.status != "finished":
            raise TargetError(
                f"Table {table.name} has no completed run in schema {schema}; run"
                " `flux-migrate run` to completion first, then sync."
            )
        if key_position(table.column_names, table.primary_key) is None:
            raise TargetError(
                f"Table {table.name} has no one-column primary key to sync by; list it in"
                " skip_tables ([sync] of --config, or [databases.<file>.sync] for a database of"
                " --data-dir) to sync the other tables, or reload it with"
                " `run --restart --yes` once the app has stopped writing."
            )
        key = table.column(table.primary_key[0])
        if key.kind not in SYNC_KEY_KINDS:
            raise TargetError(
                f"Table {table.name}'s primary key {key.name} is {key.pg_type} in PostgreSQL;"
                " sync matches keys as text or integers only, so it cannot follow this table"
                " yet; list it in skip_tables ([sync] of --config) to sync the other tables, or"
                " reload with `run --restart --yes` once the app has stopped writing."
            )
        if table.without_rowid:
            raise TargetError(
                f"Table {table.name} is a WITHOUT ROWID table, which sync cannot follow yet;"
                " list it in skip_tables ([sync] of --config) to sync the other tables, or reload"
                " with `run --restart --yes` once the app has stopped writing."
            )
    await check_fingerprint(src, target, settings, dict(identity), checkpoints)
    for table in tables:
        c = checkpoints[table.name]
        name = table.name
        has = await target.retrying(
            functools.partial(ckpt.has_digests, target_schema=schema, source_table=name),
            what="reading digests",
        )
        legacy = await target.retrying(
            functools.partial(ckpt.has_legacy_digests, target_schema=schema, source_table=name),
            what="reading digests",
        )
        if c.loaded and (legacy or not has):
            raise TargetError(
                f"Table {name} was loaded (at least in part) by a flux-migrate without the row"
                " digests this version keeps, so sync cannot tell its rows from the app's;"
                " reload it with `run --restart --yes` first."
            )


async def _apply(
    src: aiosqlite.Connection,
    target: Target,
    settings: Settings,
    report: SyncReport,
    tables: Sequence[Table],
    stop: StopFlag,
    progress: Progress | None = None,
) -> None:
    """Inserts and updates parents first, then deletes children first, in batches; each
    table's writes shown as a line ``table writes`` of the progress display."""
    schema = settings.names.schema
    shown = _Writes(progress or NoProgress(), report)
    appliers: dict[str, Applier] = {}
    for table in tables:
        # the parents' quarantine as it stands once they are synced (their children follow)
        missing = frozenset(await quarantined_parents(target, schema, table, tables))
        appliers[table.name] = Applier(
            src,
            target,
            settings,
            table,
            report.run_id,
            missing,
            children=_children(table, tables),
            parents=_parents(table, tables),
            known=report.plans[table.name].known,
        )
        await _upsert_table(appliers[table.name], report, stop, shown)
    for table in reversed(tables):
        await _delete_table(appliers[table.name], report, stop, shown)
    await delete_together([appliers[t.name] for t in tables], report.tables)


async def _upsert_table(
    applier: Applier, report: SyncReport, stop: StopFlag, shown: _Writes
) -> None:
    """One table's inserts, updates (retried while rows wait on rows of this pass), moved
    rowids and quarantined rows gone, after forgetting the conflicts it had."""
    name, size, schema = applier.table.name, applier.settings.batch_size, applier.names.schema
    plan, treport = report.plans[name], report.tables[name]
    started = time.monotonic()
    await applier.target.retrying(
        functools.partial(ckpt.clear_conflicts, target_schema=schema, source_table=name),
        what="clearing conflicts",
    )
    changed = plan.inserts + plan.updates
    changed.sort()
    for i in range(0, len(changed), size):
        stop.check()
        await applier.upsert(changed[i : i + size], treport)
        shown.advance(name, len(changed[i : i + size]))
    await _retry_waiting(applier, treport, size, stop)
    for i in range(0, len(plan.moves), size):
        await applier.move(plan.moves[i : i + size], treport)
    await applier.resolve_gone(treport)
    treport.seconds += time.monotonic() - started


async def _delete_table(
    applier: Applier, report: SyncReport, stop: StopFlag, shown: _Writes
) -> None:
    """One table's deletes (leaves first), then its checkpoint."""
    name, size, schema = applier.table.name, applier.settings.batch_size, applier.names.schema
    plan, treport = report.plans[name], report.tables[name]
    started = time.monotonic()
    deletes = await applier.leaves_first(plan.deletes)
    for i in range(0, len(deletes), size):
        stop.check()
        await applier.delete(deletes[i : i + size], treport)
        shown.advance(name, len(deletes[i : i + size]))
    await applier.target.retrying(
        functools.partial(
            ckpt.sync_checkpoint,
            target_schema=schema,
            source_table=name,
            last_rowid=plan.last_rowid,
            last_key=plan.last_key,
            run_id=report.run_id,
        ),
        what="recording the checkpoint",
    )
    shown.finish(name)
    treport.seconds += time.monotonic() - started
    log.info(
        "table_synced",
        table=name,
        inserted=treport.inserted,
        updated=treport.updated,
        deleted=treport.deleted,
        conflicts=len(treport.conflicts),
    )


class _Writes:
    """A table's writes on the progress display, as a line ``table writes`` (shown only for
    a table with changes to write)."""

    def __init__(self, progress: Progress, report: SyncReport) -> None:
        self.progress, self.report, self.started = progress, report, set[str]()

    def advance(self, table: str, rows: int) -> None:
        if table not in self.started:
            plan = self.report.plans[table]
            self.progress.start(f"{table} writes", plan.changes)
            self.started.add(table)
        self.progress.advance(f"{table} writes", rows)

    def finish(self, table: str) -> None:
        if table in self.started:
            self.progress.finish(f"{table} writes")


async def _retry_waiting(applier: Applier, report: TableSync, size: int, stop: StopFlag) -> None:
    """Rows of a table referencing itself left waiting for a parent written later in this
    pass (a later batch) are tried again, until no more of them go."""
    if not any(parent.name == applier.table.name for _c, parent, _r in applier.parents):
        return
    while report.waiting:
        before = len(report.waiting)
        rowids = sorted({rowid for rowid, _key, _kind in report.waiting})
        report.waiting = []
        for i in range(0, len(rowids), size):
            stop.check()
            await applier.upsert(rowids[i : i + size], report)
        if len(report.waiting) >= before:
            return


def _parents(
    child: Table, tables: Sequence[Table]
) -> tuple[tuple[tuple[str, ...], Table, tuple[str, ...]], ...]:
    """The (columns, parent table, parent columns) of each foreign key of ``child`` whose
    parent is synced too (the parent columns: the primary key or a unique key)."""
    by_name = {t.name: t for t in tables}
    out: list[tuple[tuple[str, ...], Table, tuple[str, ...]]] = []
    if child.parent in by_name and child.parent_column is not None:
        out.append(((child.parent_column,), by_name[child.parent], ("id",)))
    for fk in child.foreign_keys:
        parent = by_name.get(fk.parent)
        if parent is None:
            continue
        referenced = fk.parent_columns or parent.primary_key
        if len(referenced) == len(fk.columns):
            out.append((tuple(fk.columns), parent, tuple(referenced)))
    return tuple(out)


def _children(
    parent: Table, tables: Sequence[Table]
) -> tuple[tuple[Table, tuple[str, ...], tuple[str, ...]], ...]:
    """The (table, its columns, the columns of ``parent`` they reference) of each foreign key
    referencing ``parent`` (its primary key or a unique key; one column or more)."""
    return tuple(
        (t, columns, parent_columns)
        for t in tables
        for columns, p, parent_columns in _parents(t, tables)
        if p.name == parent.name
    )
