"""Give quarantined rows another chance: rows fixed in the source since are loaded by a rerun."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import aiosqlite
import asyncpg
import structlog

from core.bookkeeping import CHECKPOINTS
from core.schema import BOOKKEEPING_SCHEMA, Table
from core.target import Target
from pipeline.settings import Settings
from stages.batch import Batch
from stages.extract import select_sql, variable_limit
from stages.load import LoadContext, copy_isolating
from stages.transform import transform_batch

log = structlog.get_logger("flux_migrate")
CHUNK = 1000


async def open_quarantine(
    conn: asyncpg.Connection, schema: str, table: str
) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            f"SELECT id, source_rowid FROM {BOOKKEEPING_SCHEMA}.quarantine WHERE target_schema = $1"
            " AND source_table = $2 AND resolved_at IS NULL ORDER BY source_rowid",
            schema,
            table,
        )
    )


async def unresolved_keys(conn: asyncpg.Connection, schema: str, table: str) -> set[str]:
    """Keys of a table's rows that are quarantined and not since loaded."""
    rows = await conn.fetch(
        f"SELECT DISTINCT source_key FROM {BOOKKEEPING_SCHEMA}.quarantine WHERE target_schema = $1"
        " AND source_table = $2 AND source_key IS NOT NULL AND resolved_at IS NULL",
        schema,
        table,
    )
    return {r["source_key"] for r in rows}


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
        sql = f"{base} WHERE t.rowid IN ({marks}) ORDER BY t.rowid"
        async with src.execute(sql, part) as cur:
            rows.extend(await cur.fetchall())
    return rows


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
    schema = settings.target.schema
    pending = await target.retrying(
        lambda c: open_quarantine(c, schema, table.name), what="reading the quarantine"
    )
    fixed_total = gone_total = 0
    for start in range(0, len(pending), CHUNK):
        chunk = pending[start : start + CHUNK]
        by_rowid: dict[int, list[int]] = {}
        for r in chunk:
            by_rowid.setdefault(r["source_rowid"], []).append(r["id"])
        raw = await read_rowids(src, table, list(by_rowid))
        present = {row[0] for row in raw}
        gone_ids = [qid for rowid, ids in by_rowid.items() if rowid not in present for qid in ids]
        batch = transform_batch(
            Batch(
                table=table.name, seq=0, after_rowid=0, last_rowid=0, extracted=len(raw), raw=raw
            ),
            table,
            naive_tz=settings.naive_tz,
            strip_nul=settings.strip_nul,
            missing_parents=missing_parents,
        )
        if not batch.rows and not gone_ids:
            continue

        async def commit(
            conn: asyncpg.Connection,
            batch: Batch = batch,
            gone_ids: list[int] = gone_ids,
            by_rowid: dict[int, list[int]] = by_rowid,
        ) -> tuple[int, int]:
            async with conn.transaction():
                # Only rows still unresolved: a retry after a lost commit reply loads nothing twice.
                open_rows = await conn.fetch(
                    f"SELECT id, source_rowid FROM {BOOKKEEPING_SCHEMA}.quarantine"
                    " WHERE id = ANY($1::bigint[]) AND resolved_at IS NULL FOR UPDATE",
                    [qid for ids in by_rowid.values() for qid in ids],
                )
                open_ids = {r["id"] for r in open_rows}
                open_rowids = {r["source_rowid"] for r in open_rows}
                keep = [i for i, src_row in enumerate(batch.raw) if src_row[0] in open_rowids]
                batch = replace(
                    batch, raw=[batch.raw[i] for i in keep], rows=[batch.rows[i] for i in keep]
                )
                gone_ids = [qid for qid in gone_ids if qid in open_ids]
                refused, skipped = (
                    await copy_isolating(conn, ctx, batch.rows, batch.raw)
                    if batch.rows
                    else ([], set())
                )
                refused_rowids = {r.rowid for r in refused}
                loaded_rowids = [
                    src_row[0] for src_row in batch.raw if src_row[0] not in refused_rowids
                ]
                loaded_ids = [
                    qid for rowid in loaded_rowids for qid in by_rowid[rowid] if qid in open_ids
                ]
                await conn.execute(
                    f"UPDATE {BOOKKEEPING_SCHEMA}.quarantine SET resolved_at = now(),"
                    " resolution = $2 WHERE id = ANY($1::bigint[])",
                    loaded_ids,
                    "loaded",
                )
                await conn.execute(
                    f"UPDATE {BOOKKEEPING_SCHEMA}.quarantine SET resolved_at = now(),"
                    " resolution = $2 WHERE id = ANY($1::bigint[])",
                    gone_ids,
                    "source_row_gone",
                )
                fixed = len(loaded_rowids)
                await conn.execute(
                    f"UPDATE {CHECKPOINTS} SET loaded = loaded + $3 - $5, quarantined = quarantined - $3 - $4,"
                    " skipped = skipped + $4 + $5, updated_at = now()"
                    " WHERE target_schema = $1 AND source_table = $2",
                    schema,
                    table.name,
                    fixed,
                    len(gone_ids),
                    len(skipped),
                )
                return fixed, len(gone_ids)

        fixed, gone = await target.retrying(commit, what=f"loading fixed {table.name} rows")
        fixed_total += fixed
        gone_total += gone
    if fixed_total or gone_total:
        log.info("quarantine_resolved", table=table.name, loaded=fixed_total, gone=gone_total)
    return fixed_total, gone_total
