"""Load a JSONL table: one transaction per batch holds the new columns, the rows, the rejects
and the checkpoint advance (the load stage's commit_in_order, with byte offsets for rowids).

Appended lines are COPied; during a reconcile pass (the file was rewritten) rows are upserted
by ``id`` through a staging table, and an id met twice in the file is quarantined as
``duplicate_key`` (the first arrival loads, as on append).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
import structlog

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.errors import RuntimeFailure
from flux_migrate.core.jsonl_bookkeeping import mark_seen, ours, record_write, seen_before
from flux_migrate.core.jsonl_schema import add_column_sql
from flux_migrate.core.schema import qualified, quote_ident
from flux_migrate.stages.batch import Batch, Reject
from flux_migrate.stages.convert import raw_value_to_json
from flux_migrate.stages.load import BatchResult, commit_in_order, refusal, split_on_refusal

log = structlog.get_logger("flux_migrate")


@dataclass(frozen=True)
class JsonlLoadContext:
    """Where a JSONL table's batches go; while a reconcile pass is pending (``reconcile_until``
    set) every batch belongs to it, lines appended since the rewrite included: rows are upserted
    by id and every id met is recorded, so the pass never takes a record the file holds for
    gone."""

    schema: str
    table: str
    run_id: str
    reconcile_until: int | None = None
    stop: Callable[[], bool] = lambda: False

    def reconciling(self, batch: Batch) -> bool:
        return self.reconcile_until is not None


def jsonl_quarantine_records(ctx: JsonlLoadContext, rejects: list[Reject]) -> list[tuple[Any, ...]]:
    """Quarantine rows of rejected lines: the key when known, the offset as rowid, and the raw
    line bytes (``{"line": text}``, or ``{"line": {"base64": ...}}`` when not UTF-8)."""
    return [
        (
            ctx.run_id,
            ctx.schema,
            ctx.table,
            r.key,
            r.rowid,
            r.reason,
            r.detail,
            r.stage,
            orjson.dumps({"line": raw_value_to_json(r.raw[0])}).decode("utf-8"),
        )
        for r in rejects
    ]


Written = tuple[int, int, list[str]]  # inserted, updated, ids left alone as conflicts
CHANGED_IN_BOTH = "changed_in_both"  # the file holds another version of a row changed in PG
INSERTED_IN_BOTH = "inserted_in_both"  # an appended id someone else inserted in PostgreSQL
Apply = Callable[[asyncpg.Connection, list[tuple[Any, ...]]], Awaitable[Written]]


def _copy_into(ctx: JsonlLoadContext, columns: tuple[str, ...]) -> Apply:
    async def copy(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> Written:
        if not columns:  # no key has held a value yet: rows without columns (COPY needs one)
            target = qualified(ctx.schema, ctx.table)
            await conn.execute(
                f"INSERT INTO {target} SELECT FROM generate_series(1, $1)", len(rows)
            )
        else:
            await conn.copy_records_to_table(
                ctx.table, records=rows, columns=columns, schema_name=ctx.schema
            )
        await record_write(conn, ctx.schema, ctx.table)
        return len(rows), 0, []

    return copy


def _upsert_into(ctx: JsonlLoadContext, columns: tuple[str, ...], stage: str) -> Apply:
    """Upsert by id through the staging table; a row someone else wrote or changed in
    PostgreSQL is never overwritten: when the file's record differs from it, its id is
    returned as a conflict."""
    target = qualified(ctx.schema, ctx.table)
    cols = ", ".join(quote_ident(c) for c in columns)
    others = [c for c in columns if c != "id"]
    mine = f"t.xmin IN {ours()}"
    if others:
        sets = ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in others)
        old = ", ".join(f"t.{quote_ident(c)}" for c in others)
        new = ", ".join(f"EXCLUDED.{quote_ident(c)}" for c in others)
        action = f"DO UPDATE SET {sets} WHERE ROW({old}) IS DISTINCT FROM ROW({new}) AND {mine}"
        staged = ", ".join(f"s.{quote_ident(c)}" for c in others)
        differs = f"ROW({old}) IS DISTINCT FROM ROW({staged})"
    else:
        action, differs = "DO NOTHING", "false"
    conflicts_sql = (
        f"SELECT s.id FROM {quote_ident(stage)} s JOIN {target} t ON t.id = s.id"
        f" WHERE NOT ({mine}) AND {differs}"
    )
    sql = (
        f"WITH moved AS (DELETE FROM {quote_ident(stage)} RETURNING {cols})"
        f" INSERT INTO {target} AS t ({cols}) SELECT {cols} FROM moved"
        f" ON CONFLICT (id) {action} RETURNING (xmax = 0) AS inserted"
    )

    async def upsert(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> Written:
        await conn.copy_records_to_table(stage, records=rows, columns=columns)
        conflicts = [r["id"] for r in await conn.fetch(conflicts_sql, ctx.schema, ctx.table)]
        written = await conn.fetch(sql, ctx.schema, ctx.table)
        await record_write(conn, ctx.schema, ctx.table)
        inserted = sum(1 for r in written if r["inserted"])
        return inserted, len(written) - inserted, conflicts

    return upsert


async def _isolate(
    conn: asyncpg.Connection,
    apply: Apply,
    rows: list[tuple[Any, ...]],
    raw: list[tuple[Any, ...]],
    ids: list[str | None],
) -> tuple[list[Reject], list[Written]]:
    """Run ``apply`` on ``rows`` splitting on refusal; a refused line is quarantined with its
    bytes, offset and id."""

    def refuse(exc: BaseException, i: int) -> Reject:
        reason, message = refusal(exc)
        detail = f"PostgreSQL refused the line: {message}"
        return Reject(raw[i][0], ids[i], (raw[i][1],), reason, detail, "load")

    async def part(conn: asyncpg.Connection, at: slice) -> Written:
        return await apply(conn, rows[at])

    return await split_on_refusal(conn, len(rows), part, refuse)


async def commit_jsonl_batch(
    conn: asyncpg.Connection, ctx: JsonlLoadContext, batch: Batch
) -> BatchResult:
    """One transaction (load.commit_in_order): add new columns, write the rows (COPY, or
    upsert in a reconcile pass), quarantine rejects; the checkpoint advances to the batch's
    offset."""

    async def write(conn: asyncpg.Connection, batch: Batch) -> BatchResult:
        for column in batch.added_columns:
            await conn.execute(add_column_sql(ctx.schema, ctx.table, column))
        w = await _write_rows(conn, ctx, batch)
        if w.rejects:
            await ckpt.write_quarantine(conn, jsonl_quarantine_records(ctx, w.rejects))
        return BatchResult(
            batch,
            w.loaded,
            w.rejects,
            skipped=len(w.conflicts),
            added=batch.added_columns,
            inserted=w.inserted,
            updated=w.updated,
            unchanged=w.loaded - w.inserted - w.updated if ctx.reconciling(batch) else 0,
            conflicts=w.conflicts,
        )

    return await commit_in_order(conn, ctx.schema, ctx.table, ctx.run_id, batch, write)


@dataclass
class _Writes:
    loaded: int = 0
    inserted: int = 0
    updated: int = 0
    rejects: list[Reject] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (id, kind)


async def _write_rows(conn: asyncpg.Connection, ctx: JsonlLoadContext, batch: Batch) -> _Writes:
    """Write a batch's rows: COPY on append; in a reconcile pass an upsert by id that skips
    ids loaded before (duplicates), leaves rows changed by someone else (conflicts, recorded)
    and records every id met."""
    schema, table = ctx.schema, ctx.table
    rows, raw = batch.rows, batch.raw
    if batch.record_ids is None or len(batch.record_ids) != len(rows):
        # a JSONL batch is converted by convert_jsonl_batch, which keeps each row's id: without
        # them a reconcile would record no id as seen and could not drop or skip a thing
        raise RuntimeFailure(
            f"A batch of {table} arrived without its records' ids; please report this."
        )
    ids: list[str | None] = list(batch.record_ids)
    out = _Writes(rejects=list(batch.rejects))
    reconciling = ctx.reconciling(batch)
    if reconciling and rows:
        rows, raw, ids, duplicates = await _drop_duplicates(conn, ctx, rows, raw, ids)
        out.rejects += duplicates
    refused: list[Reject] = []
    if rows:
        if reconciling:
            stage = f"flux_stage_jsonl_{batch.seq}"
            await conn.execute(
                f"CREATE TEMP TABLE {quote_ident(stage)}"
                f" (LIKE {qualified(schema, table)}) ON COMMIT DROP"
            )
            apply = _upsert_into(ctx, batch.columns, stage)
        else:
            apply = _copy_into(ctx, batch.columns)
        refused, results = await _isolate(conn, apply, rows, raw, ids)
        out.inserted = sum(r[0] for r in results)
        out.updated = sum(r[1] for r in results) if reconciling else 0
        out.conflicts = [(key, CHANGED_IN_BOTH) for r in results for key in r[2]]
        if not reconciling and refused:
            refused, theirs = await _inserted_by_others(conn, ctx, refused)
            out.conflicts += [(key, INSERTED_IN_BOTH) for key in theirs]
    out.rejects += refused
    out.loaded = len(rows) - len(refused) - len(out.conflicts)
    if reconciling:
        left = {r.rowid for r in refused}
        kept = {key for key, _ in out.conflicts}
        loaded_ids = [
            key
            for key, source in zip(ids, raw, strict=True)
            if key is not None and source[0] not in left and key not in kept
        ]
        await mark_seen(conn, schema, table, loaded_ids)
        met = [r.key for r in out.rejects if r.key is not None] + list(kept)
        await mark_seen(conn, schema, table, met, loaded=False)
    await ckpt.record_conflicts(conn, schema, table, out.conflicts, ctx.run_id)
    return out


async def _inserted_by_others(
    conn: asyncpg.Connection, ctx: JsonlLoadContext, refused: list[Reject]
) -> tuple[list[Reject], list[str]]:
    """Appended lines PostgreSQL refused as duplicates of a row someone else wrote there: not
    quarantined but conflicts (the row is left as it is); the other refusals stay."""
    dup = [r.key for r in refused if r.reason == "duplicate_key" and r.key is not None]
    if not dup:
        return refused, []
    found = await conn.fetch(
        f"SELECT t.id FROM {qualified(ctx.schema, ctx.table)} t"
        f" WHERE t.id = ANY($3::text[]) AND t.xmin NOT IN {ours()}",
        ctx.schema,
        ctx.table,
        dup,
    )
    theirs = {r["id"] for r in found}
    keep = [r for r in refused if not (r.reason == "duplicate_key" and r.key in theirs)]
    return keep, [r.key for r in refused if r.key is not None and r not in keep]


async def _drop_duplicates(
    conn: asyncpg.Connection,
    ctx: JsonlLoadContext,
    rows: list[tuple[Any, ...]],
    raw: list[tuple[Any, ...]],
    ids: list[str | None],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[str | None], list[Reject]]:
    """Set aside the rows whose id the reconcile pass loaded before (earlier in this batch or
    in an earlier one)."""
    first: dict[str, int] = {}
    for i, key in enumerate(ids):
        if key is not None and key not in first:
            first[key] = i
    before = await seen_before(conn, ctx.schema, ctx.table, list(first))
    keep: list[int] = []
    duplicates: list[Reject] = []
    for i, key in enumerate(ids):
        if key is not None and (key in before or first[key] != i):
            duplicates.append(
                Reject(
                    raw[i][0],
                    key,
                    (raw[i][1],),
                    "duplicate_key",
                    "the id appears on an earlier line of the file, which was loaded",
                    "load",
                )
            )
        else:
            keep.append(i)
    return [rows[i] for i in keep], [raw[i] for i in keep], [ids[i] for i in keep], duplicates
