"""Give quarantined rows another chance: rows fixed in the source since are loaded by a rerun."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import aiosqlite
import asyncpg
import structlog

from flux_migrate.core import bookkeeping
from flux_migrate.core.schema import Table, quote_ident
from flux_migrate.core.target import Target
from flux_migrate.pipeline.settings import Settings
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.extract import fetch_rows, variable_limit
from flux_migrate.stages.extract_sql import select_sql
from flux_migrate.stages.load import LoadContext, copy_isolating
from flux_migrate.stages.transform import row_key, transform_batch

log = structlog.get_logger("flux_migrate")
CHUNK = 1000  # quarantined rows retried per transaction
KEYS_PER_QUERY = 100  # keys matched per query (an OR of as many terms: kept shallow)


@dataclass(frozen=True)
class Chunk:
    """Quarantined rows read again from the source: ``batch`` holds those still present,
    converted; ``by_rowid`` maps each source rowid to its quarantine row ids; ``gone_ids`` are
    the quarantine rows whose source row no longer exists."""

    batch: Batch
    by_rowid: dict[int, list[int]]
    gone_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return [qid for ids in self.by_rowid.values() for qid in ids]


async def requeue(
    src: aiosqlite.Connection,
    target: Target,
    table: Table,
    *,
    settings: Settings,
    ctx: LoadContext,
    missing_parents: set[str],
) -> tuple[int, int]:
    """Retry the table's unresolved quarantined rows; return (loaded now, gone from source).

    A row that now converts and loads is marked resolved ("loaded"); a row whose rowid no
    longer exists in the source is marked resolved ("source_row_gone") and counted as skipped.
    Rows that still fail stay quarantined as they were. One transaction per chunk.
    """
    schema = settings.names.schema
    pending = await target.retrying(
        lambda c: bookkeeping.open_quarantine(c, schema, table.name),
        what="reading the quarantine",
    )
    fixed_total = gone_total = 0
    for start in range(0, len(pending), CHUNK):
        chunk = await read_chunk(
            src, table, pending[start : start + CHUNK], settings, missing_parents
        )
        if not chunk.batch.rows and not chunk.gone_ids:
            continue  # nothing converts yet and nothing is gone: the rows stay as they are

        async def commit(conn: asyncpg.Connection, chunk: Chunk = chunk) -> tuple[int, int]:
            return await commit_chunk(conn, ctx, chunk)

        fixed, gone = await target.retrying(commit, what=f"loading fixed {table.name} rows")
        fixed_total += fixed
        gone_total += gone
    if fixed_total or gone_total:
        log.info("quarantine_resolved", table=table.name, loaded=fixed_total, gone=gone_total)
    return fixed_total, gone_total


async def read_chunk(
    src: aiosqlite.Connection,
    table: Table,
    quarantined: list[asyncpg.Record],
    settings: Settings,
    missing_parents: set[str],
) -> Chunk:
    """Read the source rows of these quarantine rows again and convert them."""
    by_rowid: dict[int, list[int]] = {}
    for r in quarantined:
        by_rowid.setdefault(r["source_rowid"], []).append(r["id"])
    if table.without_rowid:
        at = {r["source_key"]: r["source_rowid"] for r in quarantined}
        raw = await read_keys(src, table, at)
    else:
        raw = await read_rowids(src, table, list(by_rowid))
    present = {row[0] for row in raw}
    gone_ids = [qid for rowid, ids in by_rowid.items() if rowid not in present for qid in ids]
    batch = transform_batch(
        Batch(table=table.name, seq=0, after_rowid=0, last_rowid=0, extracted=len(raw), raw=raw),
        table,
        naive_timezone=settings.naive_timezone,
        strip_nul=settings.strip_nul,
        missing_parents=missing_parents,
    )
    return Chunk(batch, by_rowid, gone_ids)


async def commit_chunk(conn: asyncpg.Connection, ctx: LoadContext, chunk: Chunk) -> tuple[int, int]:
    """One transaction: load the rows that convert now, mark them and the gone ones resolved,
    move their counts in the checkpoint; return (loaded, gone).

    Only rows still unresolved count, so a retry after a lost commit reply loads nothing twice.
    """
    async with conn.transaction():
        still_open = await bookkeeping.lock_open_quarantine(conn, chunk.ids)
        open_ids = {r["id"] for r in still_open}
        open_rowids = {r["source_rowid"] for r in still_open}
        batch = chunk.batch
        keep = [i for i, src_row in enumerate(batch.raw) if src_row[0] in open_rowids]
        batch = replace(batch, raw=[batch.raw[i] for i in keep], rows=[batch.rows[i] for i in keep])
        gone_ids = [qid for qid in chunk.gone_ids if qid in open_ids]
        refused, skipped = (
            await copy_isolating(conn, ctx, batch.rows, batch.raw) if batch.rows else ([], set())
        )
        refused_rowids = {r.rowid for r in refused}
        loaded_rowids = [row[0] for row in batch.raw if row[0] not in refused_rowids]
        loaded_ids = [
            qid for rowid in loaded_rowids for qid in chunk.by_rowid[rowid] if qid in open_ids
        ]
        await bookkeeping.resolve_quarantine(conn, loaded_ids, "loaded")
        await bookkeeping.resolve_quarantine(conn, gone_ids, "source_row_gone")
        await bookkeeping.account_requeue(
            conn,
            ctx.names.schema,
            ctx.table.name,
            loaded=len(loaded_rowids),
            gone=len(gone_ids),
            skipped=len(skipped),
        )
    return len(loaded_rowids), len(gone_ids)


async def read_rowids(
    src: aiosqlite.Connection, table: Table, rowids: list[int]
) -> list[tuple[Any, ...]]:
    """The source rows with these (ascending) rowids, in rowid order; binds no more host
    parameters per query than this SQLite allows."""
    base = select_sql(table)
    size = await variable_limit(src)
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(rowids), size):
        part = rowids[start : start + size]
        marks = ", ".join("?" for _ in part)
        rowid = table.rowid_sql("t")
        sql = f"{base} WHERE {rowid} IN ({marks}) ORDER BY {rowid}"
        rows.extend(await fetch_rows(src, sql, part))
    return rows


async def read_keys(
    src: aiosqlite.Connection, table: Table, at: dict[str, int]
) -> list[tuple[Any, ...]]:
    """The rows of a WITHOUT ROWID table with these bookkeeping keys (row_key), each with the
    quarantine's position for its key in the rowid slot. Keys are matched as text, so a key
    whose bytes are not UTF-8 is not found (its quarantined row counts as gone)."""
    base = select_sql(table)
    width = len(table.primary_key)
    match = "(" + " AND ".join(f"t.{quote_ident(c)} = ?" for c in table.primary_key) + ")"
    size = max(1, min(KEYS_PER_QUERY, await variable_limit(src) // width))
    keys = list(at)
    ncols = len(table.columns)
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(keys), size):
        part = keys[start : start + size]
        args = [v for k in part for v in ([k] if width == 1 else json.loads(k))]
        sql = f"{base} WHERE {' OR '.join(match for _ in part)}"
        for row in await fetch_rows(src, sql, args):
            key = row_key(table, row[1 : ncols + 1])
            if key in at:
                rows.append((at[key], *row[1:]))
    rows.sort(key=lambda row: int(row[0]))
    return rows
