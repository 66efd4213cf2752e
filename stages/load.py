"""Load: COPY each batch into PostgreSQL in one transaction with its rejects and checkpoint."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import orjson

from flux_migrate.core import bookkeeping
from flux_migrate.core.digest import digests, key_position
from flux_migrate.core.errors import ErrorClass, RuntimeFailure, classify
from flux_migrate.core.schema import Column, Table, TargetNames, quote_ident
from flux_migrate.stages.batch import Batch, Reject
from flux_migrate.stages.convert import raw_to_json
from flux_migrate.stages.page_hints import YoungPages
from flux_migrate.stages.transform import digest_ids, key_of, key_sql, row_key

_COLUMN_IN_CONTEXT = re.compile(r"column (\w+)")


class CheckpointRewound(Exception):
    """The checkpoint is behind the batch: the server lost its latest commits (a crash while
    commits were not yet flushed). The table must be streamed again from ``rowid``."""

    def __init__(self, rowid: int) -> None:
        super().__init__(f"checkpoint rewound to rowid {rowid}")
        self.rowid = rowid


@dataclass(frozen=True)
class LoadContext:
    """Where a table's batches go. ``on_conflict`` is "error" (plain COPY into the table),
    "skip" or "update" (COPY into a staging table, then INSERT ... ON CONFLICT on the key)."""

    table: Table
    names: TargetNames
    run_id: str
    on_conflict: str = "error"
    stop: Callable[[], bool] = lambda: False
    # Re-converts a batch strictly (text decoded and validated in Python) when PostgreSQL
    # refused the optimistic one, so bad rows get their transform reason, not a server error.
    strict: Callable[[Batch], Batch] | None = None
    # Reads again the source rows of a batch that arrived without them (``ids`` set: converted
    # in a worker process), for ``strict``: the rare batch PostgreSQL refused.
    refill: Callable[[Batch], Awaitable[Batch]] | None = None
    single_transaction: bool = False
    overridden: bool = False  # sync left digest_rows entries for the table (see write_digests)
    young_pages: YoungPages | None = None  # where some batches commit synchronously

    @property
    def stage_table(self) -> str:
        return f"flux_stage_{self.table.name}"


@dataclass(frozen=True)
class BatchResult:
    """What one committed batch did, whatever its source; ``already`` means an earlier attempt
    had committed it. A JSONL batch also says the columns it added, the rows its upsert
    inserted, updated or found unchanged (a reconcile pass), and the ids it left as someone
    else wrote them in PostgreSQL (``conflicts``, counted as skipped)."""

    batch: Batch
    loaded: int
    quarantined: list[Reject]
    skipped: int = 0
    already: bool = False
    already_quarantined: int = 0  # counted by the attempt that committed it (rejects not kept)
    added: tuple[Column, ...] = ()
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (id, kind) left alone

    @property
    def quarantined_count(self) -> int:
        return len(self.quarantined) + self.already_quarantined


def quarantine_records(
    ctx: LoadContext, rejects: list[Reject], *, ascii_only: bool = False
) -> list[tuple[Any, ...]]:
    """Rejected rows as quarantine records (raw values as JSON), in QUARANTINE_COLUMNS order.

    With ``ascii_only`` (a target database not in UTF-8, which may not hold every character),
    non-ASCII text among the raw values is kept as its base64 bytes (requeue reads both forms
    back alike), and the key and detail escape non-ASCII characters."""
    columns = ctx.table.column_names

    def text(value: str | None) -> str | None:
        if value is None or not ascii_only:
            return value
        return value.encode("ascii", "backslashreplace").decode("ascii")

    def raw(values: tuple[Any, ...]) -> str:
        found = raw_to_json(values, columns)
        if ascii_only:
            found = {c: _ascii_raw(v) for c, v in found.items()}
        return orjson.dumps(found).decode("utf-8")

    return [
        (
            ctx.run_id,
            ctx.names.schema,
            ctx.table.name,
            text(r.key),
            r.rowid,
            r.reason,
            text(r.detail),
            r.stage,
            raw(r.raw),
        )
        for r in rejects
    ]


async def write_digests(
    conn: asyncpg.Connection,
    ctx: LoadContext,
    raw: list[tuple[Any, ...]],
    skipped: set[str] | None = None,
    values: list[int] | None = None,
    ids: tuple[list[int], list[str]] | None = None,
) -> None:
    """Record the digests of the source rows ``raw`` just written to the target (all but the
    ``skipped`` keys) as one pack; none for a table without a one-column key. ``values`` are
    the rows' digests when transform computed them already, ``ids`` the rows' digest_ids when
    ``raw`` was not kept (then ``values`` are required)."""
    table = ctx.table
    if key_position(table.column_names, table.primary_key) is None:
        return
    rowids, keys = ids if ids is not None else digest_ids(table, raw)
    if not rowids:
        return
    if values is None:
        values = digests(raw, len(table.column_names))
    if skipped or rowids != sorted(rowids):  # a pack holds its rows in rowid order
        kept = sorted(
            (i for i, k in enumerate(keys) if not skipped or k not in skipped),
            key=rowids.__getitem__,
        )
        keys, rowids, values = (
            [keys[i] for i in kept],
            [rowids[i] for i in kept],
            [values[i] for i in kept],
        )
    await bookkeeping.write_digest_pack(
        conn, ctx.names.schema, table.name, rowids, keys, values, supersede=ctx.overridden
    )


def _ascii_raw(value: Any) -> Any:
    if isinstance(value, str) and not value.isascii():
        return {"base64": base64.b64encode(value.encode("utf-8")).decode("ascii")}
    return value


def server_is_utf8(conn: asyncpg.Connection) -> bool:
    """Whether the target database's encoding holds every character (UTF8)."""
    return str(getattr(conn.get_settings(), "server_encoding", "UTF8")).upper() == "UTF8"


# A payload goes to the server in messages of this size: PostgreSQL converts one while the
# next is on its way (it reads a whole message before it starts on it).
PAYLOAD_CHUNK = 1 << 20


async def _chunks(payload: bytes) -> AsyncIterator[memoryview]:
    view = memoryview(payload)
    for at in range(0, len(view), PAYLOAD_CHUNK):
        yield view[at : at + PAYLOAD_CHUNK]


async def _copy(
    conn: asyncpg.Connection,
    ctx: LoadContext,
    rows: list[tuple[Any, ...]],
    raw: list[tuple[Any, ...]],
    values: list[int] | None = None,
    ids: tuple[list[int], list[str]] | None = None,
    payload: bytes | None = None,
) -> set[str]:
    """Write ``rows`` (or the same rows as one binary COPY ``payload``) and the digests of
    their source rows ``raw`` (same positions; ``values`` when computed already, ``ids`` when
    ``raw`` was not kept), in the current (sub)transaction; return the keys left alone
    because they already existed (skip mode)."""
    if payload is not None and ctx.on_conflict != "error":
        raise RuntimeFailure("internal error: a COPY payload reached an upsert; please report it")
    if ctx.on_conflict == "error":
        if payload is None:
            await conn.copy_records_to_table(
                ctx.names.table(ctx.table.name),
                records=rows,
                columns=ctx.table.column_names,
                schema_name=ctx.names.schema,
            )
        else:
            await conn.copy_to_table(
                ctx.names.table(ctx.table.name),
                source=_chunks(payload),
                columns=ctx.table.column_names,
                schema_name=ctx.names.schema,
                format="binary",
            )
        await write_digests(conn, ctx, raw, values=values, ids=ids)
        return set()
    stage = quote_ident(ctx.stage_table)
    target = ctx.names.qualified(ctx.table.name)
    cols = ", ".join(quote_ident(c) for c in ctx.table.column_names)
    keys = ", ".join(quote_ident(c) for c in ctx.table.primary_key)
    await conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {target} INCLUDING DEFAULTS)"
        " ON COMMIT DELETE ROWS"
    )
    await conn.copy_records_to_table(ctx.stage_table, records=rows, columns=ctx.table.column_names)
    if ctx.on_conflict == "skip":
        action = "DO NOTHING"
    else:
        action = "DO UPDATE SET " + ", ".join(
            f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}"
            for c in ctx.table.column_names
            if c not in ctx.table.primary_key
        )
    written = await conn.fetch(
        f"WITH moved AS (DELETE FROM {stage} RETURNING {cols})"
        f" INSERT INTO {target} ({cols}) SELECT {cols} FROM moved"
        f" ON CONFLICT ({keys}) {action} RETURNING {key_sql(ctx.table)} AS k"
    )
    done = {r["k"] for r in written}
    skipped = {
        k for k in (row_key(ctx.table, row) for row in rows) if k is not None and k not in done
    }
    await write_digests(conn, ctx, raw, skipped, values, ids)
    return skipped


T = TypeVar("T")


async def split_on_refusal(
    conn: asyncpg.Connection,
    count: int,
    apply: Callable[[asyncpg.Connection, slice], Awaitable[T]],
    refuse: Callable[[BaseException, int], Reject],
) -> tuple[list[Reject], list[T]]:
    """Run ``apply`` on the rows ``0..count`` in a savepoint; when PostgreSQL refuses a value,
    on each half again, down to single rows, which ``refuse`` turns into rejects. Returns the
    rejects and the results of the parts that went through, in row order."""
    return await _split(conn, 0, count, apply, refuse)


async def _split(
    conn: asyncpg.Connection,
    lo: int,
    hi: int,
    apply: Callable[[asyncpg.Connection, slice], Awaitable[T]],
    refuse: Callable[[BaseException, int], Reject],
) -> tuple[list[Reject], list[T]]:
    # A module function, not a closure calling itself: such a closure is a reference cycle
    # that would keep each batch's rows alive until the garbage collector runs.
    try:
        async with conn.transaction():  # a savepoint inside the batch transaction
            return [], [await apply(conn, slice(lo, hi))]
    except Exception as exc:
        if classify(exc) is not ErrorClass.DATA:
            raise
        if hi - lo == 1:
            return [refuse(exc, lo)], []
    mid = lo + (hi - lo) // 2
    left, left_done = await _split(conn, lo, mid, apply, refuse)
    right, right_done = await _split(conn, mid, hi, apply, refuse)
    return left + right, left_done + right_done


def refusal(exc: BaseException) -> tuple[str, str]:
    """The reason code of a row PostgreSQL refused, and the first line of its message."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    duplicate = getattr(exc, "sqlstate", None) == "23505"  # the key is loaded already
    return ("duplicate_key" if duplicate else "rejected_by_server"), message


async def copy_isolating(
    conn: asyncpg.Connection,
    ctx: LoadContext,
    rows: list[tuple[Any, ...]],
    raw: list[tuple[Any, ...]],
) -> tuple[list[Reject], set[str]]:
    """COPY ``rows`` inside savepoints, splitting on refusal; return the refused rows (and the
    keys skipped as existing)."""
    ncols = len(ctx.table.column_names)

    def refuse(exc: BaseException, i: int) -> Reject:
        values = tuple(raw[i][1 : ncols + 1])
        reason, message = refusal(exc)
        column = _COLUMN_IN_CONTEXT.search(getattr(exc, "context", None) or "")
        where = f"column {column.group(1)}" if column else "the row"
        detail = f"PostgreSQL refused {where}: {message}"
        return Reject(raw[i][0], row_key(ctx.table, values), values, reason, detail, "load")

    async def copy(conn: asyncpg.Connection, part: slice) -> set[str]:
        return await _copy(conn, ctx, rows[part], raw[part])

    rejects, skipped = await split_on_refusal(conn, len(rows), copy, refuse)
    return rejects, set().union(*skipped)


async def commit_batch(
    conn: asyncpg.Connection, ctx: LoadContext, batch: Batch, *, isolate: bool
) -> BatchResult:
    """One transaction (commit_in_order): COPY the rows, record skipped keys and rejects.

    With ``isolate`` the batch is first re-converted strictly and rows PostgreSQL refuses are
    split off into the quarantine; without it, a refused row fails the whole batch.
    """

    async def write(conn: asyncpg.Connection, batch: Batch) -> BatchResult:
        if isolate and ctx.strict is not None:
            batch = ctx.strict(batch)
        refused, skipped = await _write_rows(conn, ctx, batch, isolate=isolate)
        rejects = batch.rejects + refused
        await _write_bookkeeping(conn, ctx, batch, rejects, skipped)
        loaded = batch.row_count - len(refused) - len(skipped)
        return BatchResult(batch, loaded, rejects, skipped=len(skipped))

    flush = ctx.young_pages is not None and ctx.young_pages.flushes(batch.seq)
    return await commit_in_order(
        conn, ctx.names.schema, ctx.table.name, ctx.run_id, batch, write, flush=flush
    )


async def commit_in_order(
    conn: asyncpg.Connection,
    schema: str,
    table: str,
    run_id: str,
    batch: Batch,
    write: Callable[[asyncpg.Connection, Batch], Awaitable[BatchResult]],
    *,
    flush: bool = False,
) -> BatchResult:
    """A batch of either source, in one transaction: check the checkpoint against the batch's
    position (an earlier attempt's result when that attempt committed it), ``write`` the rows
    and their rejects, then move the checkpoint past the batch with the counts it returns.
    With ``flush`` the commit waits for the WAL to reach the disk (stages/page_hints)."""
    async with conn.transaction():
        if flush:
            await conn.execute("SET LOCAL synchronous_commit = on")
        committed = await check_position(conn, schema, table, batch)
        if committed is not None:
            return committed
        done = await write(conn, batch)
        await bookkeeping.advance_checkpoint(
            conn,
            schema,
            table,
            last_rowid=done.batch.last_rowid,
            last_key=key_of(done.batch.last_key),
            extracted=done.batch.extracted,
            loaded=done.loaded,
            quarantined=len(done.quarantined),
            skipped=done.skipped,
            run_id=run_id,
        )
    return done


async def check_position(
    conn: asyncpg.Connection, schema: str, table: str, batch: Batch
) -> BatchResult | None:
    """Lock the table's checkpoint and check it against the batch's source position, a rowid
    or a JSONL file's byte offset (its check value, the row's key or the digest of the bytes
    before it, goes with it in ``last_key``): the batch's result when an earlier attempt
    committed it (its reply was lost), None when the checkpoint stands right before the batch.

    Raises CheckpointRewound when the checkpoint is behind the batch, RuntimeFailure when it is
    gone or elsewhere (another run writing)."""
    state = await bookkeeping.lock_checkpoint(conn, schema, table)
    if state is None:
        raise RuntimeFailure(f"The checkpoint of table {table} disappeared during the run.")
    current = state["last_rowid"]
    if current == batch.last_rowid:
        done = json.loads(state["last_batch"])
        return BatchResult(
            batch,
            int(done.get("loaded", 0)),
            [],
            skipped=int(done.get("skipped", 0)),
            already=True,
            already_quarantined=int(done.get("quarantined", 0)),
        )
    if current < batch.after_rowid:
        raise CheckpointRewound(current)
    if current != batch.after_rowid:
        raise RuntimeFailure(
            f"The checkpoint of table {table} moved during the run; another flux-migrate"
            " run may be writing to this target. Stop it and rerun."
        )
    return None


async def _write_rows(
    conn: asyncpg.Connection, ctx: LoadContext, batch: Batch, *, isolate: bool
) -> tuple[list[Reject], set[str]]:
    """COPY the batch's rows; return the rows refused (only with ``isolate``) and the keys
    skipped as existing."""
    if not batch.row_count:
        return [], set()
    if isolate:
        if batch.payload is not None:  # the strict re-conversion gives rows, never a payload
            raise RuntimeFailure(
                "internal error: a COPY payload cannot be split row by row; please report it"
            )
        return await copy_isolating(conn, ctx, batch.rows, batch.raw)
    return [], await _copy(
        conn, ctx, batch.rows, batch.raw, batch.digests, batch.ids, batch.payload
    )


async def _write_bookkeeping(
    conn: asyncpg.Connection,
    ctx: LoadContext,
    batch: Batch,
    rejects: list[Reject],
    skipped: set[str],
) -> None:
    """Record the skipped keys and the rejects."""
    schema, table = ctx.names.schema, ctx.table.name
    if skipped:
        rowids = batch.ids[0] if batch.ids is not None else [r[0] for r in batch.raw]
        await bookkeeping.write_skipped(
            conn,
            [
                (ctx.run_id, schema, table, row[0], rowid)
                for row, rowid in zip(batch.rows, rowids, strict=True)
                if row[0] in skipped
            ],
        )
    if rejects:
        records = quarantine_records(ctx, rejects, ascii_only=not server_is_utf8(conn))
        await bookkeeping.write_quarantine(conn, records)


async def commit(conn: asyncpg.Connection, ctx: LoadContext, batch: Batch) -> BatchResult:
    """Commit one batch with its checkpoint; when PostgreSQL refuses a value, again with the
    batch re-converted strictly and the refused rows isolated into the quarantine."""
    try:
        return await commit_batch(conn, ctx, batch, isolate=False)
    except Exception as exc:
        if classify(exc) is not ErrorClass.DATA:
            raise
    if batch.ids is not None and ctx.refill is not None:
        batch = await ctx.refill(batch)
    return await commit_batch(conn, ctx, batch, isolate=True)
