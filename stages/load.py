"""Load: COPY each batch into PostgreSQL in one transaction with its rejects and checkpoint."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from pipeline.checkpoints import ADVANCE_SQL, LOCK_SQL
from pipeline.errors import ErrorClass, RuntimeFailure, classify
from pipeline.schema import BOOKKEEPING_SCHEMA, QUARANTINE_COLUMNS, Table, TargetNames
from pipeline.target import Target
from stages.batch import Batch, Reject
from stages.convert import raw_to_json
from stages.transform import key_of


@dataclass(frozen=True)
class LoadContext:
    table: Table
    names: TargetNames
    run_id: str


@dataclass(frozen=True)
class BatchResult:
    """What one committed batch did; ``already`` means an earlier attempt had committed it."""

    batch: Batch
    loaded: int
    quarantined: list[Reject]
    skipped: int = 0
    already: bool = False


def quarantine_records(ctx: LoadContext, rejects: list[Reject]) -> list[tuple[Any, ...]]:
    columns = ctx.table.column_names
    return [
        (
            ctx.run_id,
            ctx.names.schema,
            ctx.table.name,
            r.key,
            r.rowid,
            r.reason,
            r.detail,
            r.stage,
            orjson.dumps(raw_to_json(r.raw, columns)).decode("utf-8"),
        )
        for r in rejects
    ]


async def _copy(conn: asyncpg.Connection, ctx: LoadContext, rows: list[tuple[Any, ...]]) -> None:
    await conn.copy_records_to_table(
        ctx.names.table(ctx.table.name),
        records=rows,
        columns=ctx.table.column_names,
        schema_name=ctx.names.schema,
    )


async def _copy_isolating(
    conn: asyncpg.Connection, ctx: LoadContext, rows: list[tuple[Any, ...]], raw: list[tuple[Any, ...]]
) -> list[Reject]:
    """COPY ``rows`` inside savepoints, splitting on refusal; return the refused rows."""
    try:
        async with conn.transaction():  # a savepoint inside the batch transaction
            await _copy(conn, ctx, rows)
        return []
    except Exception as exc:
        if classify(exc) is not ErrorClass.DATA:
            raise
        if len(rows) == 1:
            ncols = len(ctx.table.column_names)
            source = raw[0]
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return [
                Reject(
                    source[0],
                    key_of(source[1]),
                    tuple(source[1 : ncols + 1]),
                    "rejected_by_server",
                    f"PostgreSQL refused the row: {message}",
                    "load",
                )
            ]
    mid = len(rows) // 2
    left = await _copy_isolating(conn, ctx, rows[:mid], raw[:mid])
    right = await _copy_isolating(conn, ctx, rows[mid:], raw[mid:])
    return left + right


async def commit_batch(conn: asyncpg.Connection, ctx: LoadContext, batch: Batch, *, isolate: bool) -> BatchResult:
    """One transaction: check the checkpoint, COPY the rows, quarantine rejects, advance."""
    schema, table = ctx.names.schema, ctx.table.name
    async with conn.transaction():
        current = await conn.fetchval(LOCK_SQL, schema, table)
        if current is None:
            raise RuntimeFailure(f"The checkpoint of table {table} disappeared during the run.")
        if current >= batch.last_rowid:
            return BatchResult(batch, 0, [], already=True)  # an earlier attempt committed it
        if current != batch.after_rowid:
            raise RuntimeFailure(
                f"The checkpoint of table {table} moved during the run; another flux-migrate"
                " run may be writing to this target. Stop it and rerun."
            )
        refused: list[Reject] = []
        if batch.rows:
            if isolate:
                refused = await _copy_isolating(conn, ctx, batch.rows, batch.raw)
            else:
                await _copy(conn, ctx, batch.rows)
        rejects = batch.rejects + refused
        if rejects:
            await conn.copy_records_to_table(
                "quarantine",
                records=quarantine_records(ctx, rejects),
                columns=QUARANTINE_COLUMNS,
                schema_name=BOOKKEEPING_SCHEMA,
            )
        loaded = len(batch.rows) - len(refused)
        await conn.execute(
            ADVANCE_SQL, schema, table, batch.last_rowid, batch.extracted, loaded, len(rejects), 0, ctx.run_id
        )
    return BatchResult(batch, loaded, rejects)


async def load(
    source: AsyncIterator[Batch],
    target: Target,
    ctx: LoadContext,
    *,
    on_batch: Callable[[BatchResult], None],
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> None:
    """Consume batches and commit each with its checkpoint; returns when the source is done.

    Transient failures retry the batch (safe: the checkpoint says whether it committed).
    On cancellation the open transaction is abandoned and rolled back by the server; every
    batch reported through ``on_batch`` is committed.
    """
    async with contextlib.aclosing(source):  # type: ignore[type-var]
        async for batch in source:

            async def attempt(conn: asyncpg.Connection, batch: Batch = batch) -> BatchResult:
                try:
                    return await commit_batch(conn, ctx, batch, isolate=False)
                except Exception as exc:
                    if classify(exc) is not ErrorClass.DATA:
                        raise
                return await commit_batch(conn, ctx, batch, isolate=True)

            result = await target.retrying(
                attempt, what=f"loading {ctx.table.name} batch {batch.seq}", on_retry=on_retry
            )
            on_batch(result)
