"""Migrate JSONL files: each file a table, resumed by byte offset, reconciled after a rewrite.

Per file: prepare the table (profile, or columns inferred from the first lines) and its
checkpoint; compare the fingerprint of the bytes before the checkpoint with the file; on a
match stream the lines appended since, else reconcile the whole file by ``id``; then account.
``run_jsonl_tables`` runs inside a run that holds the schema's lock (the runner's);
``migrate_jsonl`` is a whole run of JSONL files only.
"""

from __future__ import annotations

import functools
import hashlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import structlog

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.errors import (
    ConfigError,
    TargetError,
)
from flux_migrate.core.jsonl_bookkeeping import (
    EMPTY_DIGEST,
    JsonlMeta,
    adopt_rows,
    begin_reconcile,
    clear_jsonl_table,
    ensure_jsonl_bookkeeping,
    finish_reconcile,
    is_jsonl_fingerprint,
    read_jsonl_columns,
)
from flux_migrate.core.jsonl_schema import (
    JSONL_PROFILE,
    KIND_OF_PG_TYPE,
    JsonlFile,
    create_jsonl_table_sql,
    profile_for,
)
from flux_migrate.core.schema import Column, Kind, Table, qualified, quote_ident
from flux_migrate.core.target import Target, connect
from flux_migrate.pipeline.finish import check_accounting, make_durable
from flux_migrate.pipeline.preflight import take_migration_lock
from flux_migrate.pipeline.progress import NoProgress, Progress
from flux_migrate.pipeline.report import RunReport, TableReport, record_completion, record_failure
from flux_migrate.pipeline.settings import Settings
from flux_migrate.pipeline.stop import StopFlag
from flux_migrate.pipeline.stream import (
    BatchLog,
    read_checkpoint,
    record_counts,
    showing,
    stream_table,
    until_streamed,
)
from flux_migrate.stages import jsonl_load
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.convert import Rejected
from flux_migrate.stages.jsonl import (
    EVIDENCE_LINES,
    count_lines,
    extract_jsonl,
    file_size,
    fingerprint_prefix,
    key_evidence,
    read_complete_lines,
    transform_jsonl,
)
from flux_migrate.stages.jsonl_load import JsonlLoadContext
from flux_migrate.stages.jsonl_values import parse_line
from flux_migrate.stages.load import BatchResult

log = structlog.get_logger("flux_migrate")


@dataclass
class JsonlOutcome:
    """What a run did to one JSONL table beyond the counts of its TableReport."""

    columns_added: list[str] = field(default_factory=list)
    rewritten: bool = False
    reconciled: bool = False
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    gone: int = 0
    gone_sample: list[str] = field(default_factory=list)
    deleted: int = 0
    kept_unsure: bool = False  # a snapshot's gone records kept (someone else's, or unsure)
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (id, kind) left alone
    waiting: tuple[int, int] | None = None  # (offset, bytes) of a last line without newline


# ---------------------------------------------------------------- the table


def table_from_catalog(
    name: str, columns: list[tuple[str, str, bool]], primary_key: tuple[str, ...]
) -> Table:
    """The JSONL Table of an existing target table, its kinds read from its column types."""
    out = []
    for col, pg_type, not_null in columns:
        base = pg_type.split("(")[0]
        kind = KIND_OF_PG_TYPE.get(base)
        if kind is None:
            raise TargetError(
                f"Column {col} of table {name} has type {pg_type}, which flux-migrate does not"
                " load JSON values into; use text, bigint, double precision, numeric, boolean,"
                " timestamptz or jsonb."
            )
        out.append(Column(col, kind, type=pg_type, not_null=not_null))
    return Table(name=name, columns=tuple(out), primary_key=primary_key, profile=JSONL_PROFILE)


def infer_table(path: Path, name: str, *, limit: int) -> Table | None:
    """The table for a file without a profile, before its first batch: ``id text`` as the
    primary key unless one of its first EVIDENCE_LINES records lacks a usable id (then no
    primary key and no column yet); None while it holds no complete line. Every other column
    is added by the batches, typed from the file's values (``key_evidence``), whatever the
    batch size."""
    offset, records = 0, 0
    keyed = True
    while offset < limit and records < EVIDENCE_LINES:
        spanned, lines = read_complete_lines(path, offset, limit=limit, max_lines=EVIDENCE_LINES)
        if not spanned:
            break
        offset += spanned
        for _, line in lines:
            try:
                record = parse_line(line)
            except Rejected:
                continue
            records += 1
            key = record.get("id")
            keyed = keyed and type(key) in (str, int) and key != ""
    if offset == 0:
        return None
    columns = (Column("id", Kind.NULLABLE_TEXT, type="text", not_null=True),) if keyed else ()
    return Table(
        name=name,
        columns=columns,
        primary_key=("id",) if keyed else (),
        profile=JSONL_PROFILE,
    )


def _rename_hint(jf: JsonlFile) -> str:
    return f'table = "NAME" under [jsonl.{jf.path.stem}] in the config file'


async def prepare_jsonl_table(
    conn: asyncpg.Connection,
    schema: str,
    jf: JsonlFile,
    run_id: str,
    *,
    limit: int,
) -> tuple[ckpt.Checkpoint, Table] | None:
    """The checkpoint and table of one JSONL file, created when absent (None while a file
    without a profile has no complete line). Refuses (TargetError) a table of that name that
    holds rows flux-migrate did not write, or a SQLite table's checkpoint of that name."""
    await ckpt.ensure_bookkeeping(conn)
    await ensure_jsonl_bookkeeping(conn)
    target = qualified(schema, jf.table)
    existing = (await ckpt.read_checkpoints(conn, schema)).get(jf.table)
    exists = bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", target))
    if existing is not None:
        if JsonlMeta.loads(existing.fingerprint) is None:
            raise TargetError(
                f"Table {target} is filled from a SQLite table of the same name; name the JSONL"
                f" table otherwise ({_rename_hint(jf)})."
            )
        if not exists:
            raise TargetError(
                f"Table {target} was dropped after flux-migrate started filling it from"
                f" {jf.path}; rerun with --restart --yes to start over."
            )
    elif not await _create_jsonl_table(conn, schema, jf, run_id, exists=exists, limit=limit):
        return None
    checkpoint = (await ckpt.read_checkpoints(conn, schema))[jf.table]
    await adopt_rows(conn, schema, jf.table)
    columns, pk = await read_jsonl_columns(conn, schema, jf.table)
    return checkpoint, table_from_catalog(jf.table, columns, pk)


async def _create_jsonl_table(
    conn: asyncpg.Connection, schema: str, jf: JsonlFile, run_id: str, *, exists: bool, limit: int
) -> bool:
    """The file's first run: its table (unless one ``exists``, empty) and its checkpoint;
    False while a file without a profile has no complete line yet."""
    target = qualified(schema, jf.table)
    table: Table | None = None
    if exists and await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {target})"):
        raise TargetError(
            f"Table {target} already holds rows that flux-migrate did not write; empty it,"
            f" or name the JSONL table otherwise ({_rename_hint(jf)})."
        )
    if not exists:
        table = profile_for(jf.path.stem, jf.table) or await anyio.to_thread.run_sync(
            lambda: infer_table(jf.path, jf.table, limit=limit)
        )
        if table is None:
            return False
    async with conn.transaction():
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        if not exists and table is not None:
            await conn.execute(create_jsonl_table_sql(schema, table))
        await ckpt.create_checkpoint(
            conn,
            target_schema=schema,
            source_table=jf.table,
            target_table=jf.table,
            created_table=not exists,
            preexisting_rows=False,
            constraints_pending=False,
            fingerprint=JsonlMeta(file=jf.path.name).dumps(),
            run_id=run_id,
        )
        await conn.execute(
            f"UPDATE {ckpt.CHECKPOINTS} SET last_key = $3"
            " WHERE target_schema = $1 AND source_table = $2 AND last_key IS NULL",
            schema,
            jf.table,
            EMPTY_DIGEST,
        )
    return True


# ---------------------------------------------------------------- one file


def _has_record_bytes(path: Path, offset: int) -> bool:
    """Whether the bytes from ``offset`` to the end hold more than whitespace."""
    with path.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(1024 * 1024):
            if chunk.strip():
                return True
    return False


def last_line_end(path: Path, size: int) -> int:
    """The offset after the last newline in the first ``size`` bytes (0 when none)."""
    with path.open("rb") as f:
        pos = size
        while pos > 0:
            start = max(0, pos - 1024 * 1024)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                return start + nl + 1
            pos = start
    return 0


@dataclass
class _FileRun:
    """One JSONL file in one run: where it goes, and where its counts and events go."""

    target: Target
    settings: Settings
    jf: JsonlFile
    run_id: str
    progress: Progress
    stop: StopFlag
    treport: TableReport
    outcome: JsonlOutcome = field(default_factory=JsonlOutcome)
    log: Any = None

    def __post_init__(self) -> None:
        self.log = log.bind(run_id=self.run_id, table=self.jf.table)

    @property
    def schema(self) -> str:
        return self.settings.names.schema

    @property
    def table(self) -> str:
        return self.jf.table

    def count(self, result: BatchResult) -> None:
        """Add a committed batch to the file's outcome and counts; say the columns it added."""
        outcome, treport = self.outcome, self.treport
        for column in result.added:
            outcome.columns_added.append(column.name)
            self.log.warning("column_added", column=column.name, type=column.pg_type)
        outcome.conflicts += result.conflicts
        outcome.inserted += result.inserted
        outcome.updated += result.updated
        outcome.unchanged += result.unchanged
        treport.loaded += result.loaded
        treport.quarantined += result.quarantined_count
        treport.extracted += result.batch.extracted


async def _resume_or_reconcile(
    f: _FileRun, table: Table, checkpoint: ckpt.Checkpoint, meta: JsonlMeta, size: int
) -> tuple[int, Any, JsonlMeta]:
    """Where to read from: the checkpoint's offset while the bytes before it are unchanged;
    else (the file was rewritten) offset 0 with a reconcile by id begun (TargetError when the
    records have no id). Returns the offset, the running digest of the bytes before it, and
    the file's bookkeeping."""
    jf = f.jf
    offset = checkpoint.last_rowid
    digest, seen = await anyio.to_thread.run_sync(fingerprint_prefix, jf.path, offset)
    if seen >= offset and digest.hexdigest() == (checkpoint.last_key or EMPTY_DIGEST):
        return offset, digest, meta
    if table.primary_key != ("id",):
        raise TargetError(
            f"The JSONL file {jf.path} was rewritten (its first {offset:,} bytes changed"
            " since the last run) and its records have no id to reconcile by; rerun with"
            " --restart --yes to load it again from the start."
        )
    until = await anyio.to_thread.run_sync(last_line_end, jf.path, size)
    meta = JsonlMeta(
        file=jf.path.name,
        reconcile_until=until,
        retained=meta.retained,
        rewrites=meta.rewrites + 1,
    )
    f.log.warning("file_rewritten", before_offset=offset, reconcile_until=until)
    await f.target.retrying(
        lambda c: begin_reconcile(c, f.schema, jf.table, meta), what="starting a reconcile"
    )
    f.outcome.rewritten = True
    return 0, hashlib.sha256(), meta


async def _finish_reconcile(f: _FileRun, meta: JsonlMeta) -> None:
    """The whole rewritten file is read: report (and for a snapshot delete) records gone."""
    jf, outcome = f.jf, f.outcome
    gone, sample, deleted = await f.target.retrying(
        lambda c: finish_reconcile(
            c, f.schema, jf.table, meta, snapshot=jf.snapshot, run_id=f.run_id
        ),
        what="finishing the reconcile",
    )
    outcome.reconciled, outcome.gone, outcome.gone_sample = True, gone, sample
    outcome.deleted = deleted
    outcome.kept_unsure = jf.snapshot and gone > deleted
    f.log.info(
        "file_reconciled",
        inserted=outcome.inserted,
        updated=outcome.updated,
        unchanged=outcome.unchanged,
        gone=gone,
        deleted=outcome.deleted,
    )


async def run_jsonl_table(
    target: Target,
    settings: Settings,
    jf: JsonlFile,
    run_id: str,
    report: RunReport,
    progress: Progress,
    stop: StopFlag,
) -> JsonlOutcome:
    """Migrate one JSONL file (the caller holds the schema's lock); fills report.tables."""
    treport = report.tables[jf.table] = TableReport()
    f = _FileRun(target, settings, jf, run_id, progress, stop, treport)
    size = file_size(jf.path)
    prepared = await target.retrying(
        lambda c: prepare_jsonl_table(c, f.schema, jf, run_id, limit=size),
        what=f"preparing table {jf.table}",
    )
    if prepared is None:
        treport.up_to_date = True
        f.log.info("table_up_to_date", reason="no complete record yet")
        return f.outcome
    checkpoint, table = prepared
    meta = JsonlMeta.loads(checkpoint.fingerprint) or JsonlMeta(file=jf.path.name)
    offset, digest, meta = await _resume_or_reconcile(f, table, checkpoint, meta, size)
    start = await read_checkpoint(target, f.schema, jf.table)
    started = time.monotonic()
    complete = await _complete_end(f, size)
    if complete > offset:
        lines = await anyio.to_thread.run_sync(count_lines, jf.path, offset, size)
        f.log.info("table_started", after_offset=offset, bytes=size - offset, lines=lines)
        with showing(progress, jf.table, lines, treport, started=started):
            await _stream_file(f, table, meta, offset, digest, size)
    else:
        treport.up_to_date = True
        f.log.info("table_up_to_date", last_offset=offset)
    stop.check()
    await _close_table(f, meta, start)
    return f.outcome


async def _complete_end(f: _FileRun, size: int) -> int:
    """Where the complete lines end: ``size`` with --final, else after the last newline; a
    record-looking last line without newline is said as waiting."""
    path = f.jf.path
    if f.settings.jsonl_final:
        complete = size
    else:
        complete = await anyio.to_thread.run_sync(last_line_end, path, size)
    if complete < size and await anyio.to_thread.run_sync(_has_record_bytes, path, complete):
        f.outcome.waiting = (complete, size - complete)
        f.log.warning("line_waiting", offset=complete, bytes=size - complete)
    return complete


async def _close_table(f: _FileRun, meta: JsonlMeta, start: ckpt.Checkpoint) -> None:
    """Finish a reconcile the run completed, then the table's counts from its checkpoint."""
    treport = f.treport
    end = await read_checkpoint(f.target, f.schema, f.table)
    if meta.reconcile_until is not None and end.last_rowid >= meta.reconcile_until:
        await _finish_reconcile(f, meta)
        treport.up_to_date = False
        end = await read_checkpoint(f.target, f.schema, f.table)
    record_counts(treport, start, end)
    if f.outcome.reconciled:  # lines the table already held unchanged were not loaded again
        same = min(f.outcome.unchanged, treport.loaded)
        treport.loaded, treport.skipped = treport.loaded - same, treport.skipped + same
    await f.target.retrying(
        lambda c: ckpt.set_status(c, f.schema, f.table, "finished", f.run_id),
        what="recording status",
    )
    f.log.info(
        "table_completed",
        extracted=treport.extracted,
        loaded=treport.loaded,
        quarantined=treport.quarantined,
        seconds=round(treport.seconds, 2),
    )


async def _stream_file(
    f: _FileRun, table: Table, meta: JsonlMeta, offset: int, digest: Any, size: int
) -> None:
    """Stream the file's complete lines from ``offset`` (``digest``: of the bytes before it)
    up to ``size``; when the server lost commits (the checkpoint is behind a batch), stream
    again from the checkpoint's offset, for the table's columns as they stand there."""
    jf, settings = f.jf, f.settings
    ctx = JsonlLoadContext(
        schema=f.schema,
        table=jf.table,
        run_id=f.run_id,
        reconcile_until=meta.reconcile_until,
        stop=f.stop,
    )

    async def stream() -> None:
        chain = transform_jsonl(
            extract_jsonl(
                jf.path,
                jf.table,
                after_offset=offset,
                digest=digest,
                limit=size,
                batch_size=settings.batch_size,
                final=settings.jsonl_final,
            ),
            table,
            naive_timezone=settings.naive_timezone,
            evidence=functools.partial(key_evidence, jf.path, limit=size),
        )
        batches = BatchLog(f.run_id, jf.table, f.progress, position="offset")
        commit = functools.partial(_commit, ctx)
        await stream_table(
            chain,
            commit,
            f.target,
            batches,
            buffer_batches=settings.buffer_batches,
            stop=f.stop,
            on_commit=f.count,
        )

    async def rewind(to: int) -> None:
        nonlocal offset, digest, table
        f.log.warning("checkpoint_rewound", to_offset=to)
        offset = to
        digest, _ = await anyio.to_thread.run_sync(fingerprint_prefix, jf.path, offset)
        columns, pk = await f.target.retrying(
            lambda c: read_jsonl_columns(c, f.schema, jf.table), what="reading columns"
        )
        table = table_from_catalog(jf.table, columns, pk)

    await until_streamed(stream, rewind)


async def _commit(ctx: JsonlLoadContext, conn: asyncpg.Connection, batch: Batch) -> BatchResult:
    return await jsonl_load.commit_jsonl_batch(conn, ctx, batch)


# ---------------------------------------------------------------- accounting and whole runs


def outcome_notes(jf: JsonlFile, o: JsonlOutcome) -> list[str]:
    """The sentences printed after the summary about one JSONL table."""
    notes = []
    if o.columns_added:
        notes.append(
            f"{jf.table}: added column(s) {', '.join(o.columns_added)} for keys the file's"
            " records gained (ALTER TABLE ADD COLUMN)."
        )
    if o.conflicts:
        named = ", ".join(f"{k} ({kind})" for k, kind in o.conflicts[:10])
        notes.append(
            f"{jf.table}: {len(o.conflicts):,} record(s) left as PostgreSQL has them, written or"
            f" changed there by someone else while the file holds another version ({named}"
            f"{', ...' if len(o.conflicts) > 10 else ''}; recorded in flux_migrate.conflicts)."
        )
    if o.rewritten:
        notes.append(
            f"{jf.table}: {jf.path.name} was rewritten since the last run (the bytes before its"
            " checkpoint changed); it is read again whole and reconciled by id."
        )
    if o.waiting is not None:
        at, length = o.waiting
        notes.append(
            f"{jf.table}: the last line of {jf.path.name} ({length:,} bytes at offset {at:,}) has"
            " no newline yet and is not loaded: the app may still be writing it. It loads once"
            " the line ends; for a file the app no longer writes, run again with --final."
        )
    if o.reconciled:
        kept = f"{o.deleted:,} deleted (snapshot)" if o.deleted else "kept in the table"
        if o.kept_unsure:
            kept += (
                f", {o.gone - o.deleted:,} kept: written or changed by someone else in"
                " PostgreSQL, or a quarantined line's id could not be read (it may be one)"
            )
        sample = f" ({', '.join(o.gone_sample)}{', ...' if o.gone > len(o.gone_sample) else ''})"
        gone = f"{o.gone:,} gone from the file, {kept}{sample}" if o.gone else "none gone"
        notes.append(
            f"{jf.table}: reconciled by id: {o.inserted:,} new, {o.updated:,} updated,"
            f" {o.unchanged:,} unchanged, {gone}."
        )
    return notes


async def run_jsonl_tables(
    target: Target,
    settings: Settings,
    files: Sequence[JsonlFile],
    run_id: str,
    report: RunReport,
    progress: Progress,
    stop: StopFlag,
) -> dict[str, JsonlOutcome]:
    """Migrate each JSONL file in turn, then check the accounting (caller holds the lock)."""
    outcomes: dict[str, JsonlOutcome] = {}
    for jf in files:
        stop.check()
        outcomes[jf.table] = await run_jsonl_table(
            target, settings, jf, run_id, report, progress, stop
        )
        report.notes += outcome_notes(jf, outcomes[jf.table])
        report.conflicts += [(jf.table, k, kind) for k, kind in outcomes[jf.table].conflicts]
    await target.retrying(
        lambda c: check_accounting(c, settings, report, [jf.table for jf in files]),
        what="checking the accounting",
    )
    return outcomes


def check_jsonl_sources(settings: Settings) -> None:
    """Before anything is written: every JSONL file exists, and none goes to a table the
    SQLite database fills in the same run (the app's two, and once the mapping is resolved
    every mapped table) nor to another file's table (SourceError / ConfigError, exit 2)."""
    app_tables = {settings.names.sessions, settings.names.messages}
    if settings.mapping is not None:
        app_tables |= {settings.names.table(t.name) for t in settings.mapping.tables}
    tables: dict[str, Path] = {}
    for jf in settings.jsonl:
        file_size(jf.path)
        if settings.sqlite_path is not None and jf.table in app_tables:
            raise ConfigError(
                f"The JSONL file {jf.path} would go to table {jf.table}, which the SQLite"
                f" database {settings.sqlite_path.name} fills; name it otherwise"
                f" ({_rename_hint(jf)}). Nothing was migrated."
            )
        other = tables.setdefault(jf.table, jf.path)
        if other != jf.path:
            raise ConfigError(
                f"The JSONL files {other} and {jf.path} would both go to table {jf.table};"
                f" name one otherwise ({_rename_hint(jf)}). Nothing was migrated."
            )


async def restart_jsonl_tables(
    conn: asyncpg.Connection, schema: str, files: Sequence[JsonlFile]
) -> None:
    """--restart of a JSONL-only run: clear the files' tables and checkpoints, nothing else."""
    if not await ckpt.bookkeeping_exists(conn):
        return
    found = await ckpt.read_checkpoints(conn, schema)
    async with conn.transaction():
        for jf in files:
            c = found.get(jf.table)
            if c is not None and is_jsonl_fingerprint(c.fingerprint):
                await clear_jsonl_table(conn, schema, jf.table, created=c.created_table)
    log.info("target_cleared", schema=schema, tables=[jf.table for jf in files])


async def migrate_jsonl(
    settings: Settings,
    files: Sequence[JsonlFile],
    *,
    run_id: str | None = None,
    report: RunReport | None = None,
    progress: Progress | None = None,
    stop: StopFlag | None = None,
    restart: bool = False,
) -> tuple[RunReport, dict[str, JsonlOutcome]]:
    """A whole run of JSONL files only: takes the schema's lock, (with ``restart``, clears the
    files' tables and checkpoints), migrates each file, accounts.

    Safe to interrupt at any point: every committed batch carries its checkpoint. With ``stop``
    set (by a signal handler) it stops at the next batch boundary and raises Interrupted.
    """
    report = report or RunReport(run_id=run_id or uuid.uuid4().hex[:12])
    progress = progress or NoProgress()
    stop = stop or StopFlag()
    dsn = settings.require_dsn()
    check_jsonl_sources(settings.with_(jsonl=tuple(files)))
    schema = settings.names.schema
    names = [jf.table for jf in files]
    if len(set(names)) != len(names):
        raise TargetError(f"Two JSONL files map to the same table ({', '.join(names)}).")
    target = Target(dsn, retry_seconds=settings.retry_seconds)
    structlog.contextvars.bind_contextvars(run_id=report.run_id)
    try:
        lock = await connect(dsn)
        try:
            await take_migration_lock(lock, schema)
            if restart:
                await target.retrying(
                    lambda c: restart_jsonl_tables(c, schema, files), what="clearing the target"
                )
            log.info("run_started", target=schema, batch_size=settings.batch_size)
            outcomes = await run_jsonl_tables(
                target, settings, files, report.run_id, report, progress, stop
            )
            final = await target.retrying(
                lambda c: ckpt.read_checkpoints(c, schema), what="reading checkpoints"
            )
            report.quarantined_open = sum(c.quarantined for c in final.values())
        finally:
            with anyio.CancelScope(shield=True):
                await target.close()
                await make_durable(lock, dsn, schema)
                if not lock.is_closed():
                    lock.terminate()
    except Exception as exc:
        error = record_failure(report, exc, target.location)
        if error is exc:
            raise
        raise error from None
    finally:
        structlog.contextvars.unbind_contextvars("run_id")
    record_completion(report)
    return report, outcomes
