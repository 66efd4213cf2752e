"""Extract: stream a table of the app's SQLite database in keyset pages, read-only."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from array import array
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import aiosqlite
import anyio

from flux_migrate.core.errors import RuntimeFailure, SourceError
from flux_migrate.core.schema import Table, quote_ident
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.extract_sql import (
    keyset_sql,
    mark_orphans,
    orphan_sql,
    page_batch,
    select_sql,
    source_uri,
)


def require_source_file(path: Path) -> None:
    """SourceError unless ``path`` names an existing file (a directory is named as one)."""
    if path.is_dir():
        raise SourceError(f"{path} is a directory, not a SQLite file; check --sqlite-path.")
    if not path.is_file():
        raise SourceError(f"The SQLite file {path} does not exist; check --sqlite-path.")


@contextlib.asynccontextmanager
async def open_source(
    path: Path, *, busy_timeout: float = 10.0, limits: Mapping[int, int] | None = None
) -> AsyncGenerator[aiosqlite.Connection, None]:
    """Open the source read-only; text comes back as bytes, so bad UTF-8 is data, not an error
    (and reading skips a decode that COPY would only undo). ``limits`` lowers SQLite limits
    (``sqlite3.SQLITE_LIMIT_*`` -> value), e.g. to behave like an older SQLite.

    Raises SourceError when the file is missing or is not a SQLite database.
    """
    require_source_file(path)
    try:
        conn = await aiosqlite.connect(source_uri(path), uri=True, timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise SourceError(f"The SQLite file {path} cannot be opened ({exc}).") from None
    try:
        conn.text_factory = bytes
        for category, value in (limits or {}).items():
            await conn._execute(conn._conn.setlimit, category, value)  # type: ignore[no-untyped-call]
        yield conn
    finally:
        # Shielded: a cancelled close would leave SQLite's thread finishing its query after
        # the event loop is gone ("Event loop is closed" on a second Ctrl-C). Bounded by the
        # busy timeout a query can wait, plus a margin.
        with anyio.move_on_after(busy_timeout + 5, shield=True):
            await conn.close()


# Orphan rowids a table's read holds at most (8 bytes each in an array); a range with more is
# read with the per-row check instead.
ORPHAN_SET_LIMIT = 1_000_000


async def orphan_rowids(
    conn: aiosqlite.Connection,
    table: Table,
    after: int,
    upto: int,
) -> array[int] | None:
    """The sorted rowids in (``after``, ``upto``] of the rows orphan_sql finds orphaned, by one
    anti-join (empty for a table without parents). None for a WITHOUT ROWID table or when
    there are more than ORPHAN_SET_LIMIT: then each page is read with the per-row check."""
    sql = orphan_rowids_sql(table)
    if sql is None:
        return _without_query(table)
    return orphan_set(await fetch_rows(conn, sql, (after, upto, ORPHAN_SET_LIMIT + 1)))


def orphan_rowids_now(
    conn: sqlite3.Connection, table: Table, after: int, upto: int
) -> array[int] | None:
    """orphan_rowids on a plain sqlite3 connection (a thread's own: pipeline/orphans_ahead)."""
    sql = orphan_rowids_sql(table)
    if sql is None:
        return _without_query(table)
    return orphan_set(conn.execute(sql, (after, upto, ORPHAN_SET_LIMIT + 1)).fetchall())


def _without_query(table: Table) -> array[int] | None:
    """No orphan for a table without parents; None (the per-row check) for a WITHOUT ROWID
    table with parents."""
    return array("q") if orphan_sql(table) is None else None


def orphan_rowids_sql(table: Table) -> str | None:
    """The anti-join of orphan_rowids over a range (?, ?], at most ? rows (None: the table has
    no parents, or no rowid). The range is walked in whatever order SQLite finds cheapest
    (the ``+`` keeps the rowid bounds from forcing rowid order: an index on the child column
    makes the parent lookups follow each other); orphan_set sorts the rowids."""
    check = orphan_sql(table)
    if check is None or table.without_rowid:
        return None
    rowid = table.rowid_sql("t")
    return (
        f"SELECT {rowid} FROM {quote_ident(table.name)} AS t"
        f" WHERE +{rowid} > ? AND +{rowid} <= ? AND ({check}) LIMIT ?"
    )


def orphan_set(rows: Sequence[Sequence[Any]]) -> array[int] | None:
    """The sorted rowids the anti-join found; None when they are more than ORPHAN_SET_LIMIT."""
    if len(rows) > ORPHAN_SET_LIMIT:
        return None
    return array("q", sorted(r[0] for r in rows))


# ---------------------------------------------------------------- WITHOUT ROWID keysets


def key_order_sql(table: Table) -> str:
    """ORDER BY the primary key, in SQLite's order of its index."""
    return " ORDER BY " + ", ".join(f"t.{quote_ident(c)}" for c in table.primary_key)


def encode_key(types: bytes | str, values: Sequence[Any]) -> str:
    """A row's primary key as JSON that keeps each value's storage class, so that a keyset can
    start after it again exactly (text as its bytes, which need not be UTF-8)."""
    names = types.decode() if isinstance(types, bytes) else types
    parts: list[list[Any]] = []
    for kind, value in zip(names.split(","), values, strict=True):
        if kind in ("text", "blob"):
            parts.append([kind, bytes(value).hex()])
        else:
            parts.append([kind, value])
    return json.dumps(parts)


def key_after_sql(table: Table, encoded: str | None) -> tuple[str, list[Any]]:
    """The WHERE clause (and its parameters) of the rows after the key ``encoded`` in key
    order; no clause for None. Text is compared as text and blobs as blobs, as stored."""
    if encoded is None:
        return "", []
    marks, args = [], []
    for kind, value in json.loads(encoded):
        if kind == "text":
            marks.append("CAST(? AS TEXT)")
            args.append(bytes.fromhex(value))
        elif kind == "blob":
            marks.append("?")
            args.append(bytes.fromhex(value))
        else:
            marks.append("?")
            args.append(value)
    cols = ", ".join(f"t.{quote_ident(c)}" for c in table.primary_key)
    return f" WHERE ({cols}) > ({', '.join(marks)})", args


async def count_after_key(conn: aiosqlite.Connection, table: Table, encoded: str | None) -> int:
    """How many rows of a WITHOUT ROWID table come after the key ``encoded`` (all for None)."""
    where, args = key_after_sql(table, encoded)
    rows = await fetch_rows(
        conn, f"SELECT count(*) FROM {quote_ident(table.name)} AS t{where}", args
    )
    return int(rows[0][0])


async def key_pages(
    conn: aiosqlite.Connection, table: Table, sql: str, *, after_key: str | None, page: int
) -> AsyncGenerator[tuple[list[tuple[Any, ...]], str], None]:
    """Pages of ``sql`` (a select_sql of a WITHOUT ROWID table) in key order after
    ``after_key``, each with the encoded key of its last row; one short query per page."""
    order = key_order_sql(table) + " LIMIT ?"
    while True:
        where, args = key_after_sql(table, after_key)
        rows = await fetch_rows(conn, sql + where + order, [*args, page])
        if not rows:
            return
        last = rows[-1]
        after_key = encode_key(last[0], [last[1 + i] for i in table.key_positions])
        yield rows, after_key


async def variable_limit(conn: aiosqlite.Connection) -> int:
    """How many host parameters one statement may bind (999 before SQLite 3.32, 32766 after)."""
    category = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER
    limit: int = await conn._execute(conn._conn.getlimit, category)  # type: ignore[no-untyped-call]
    return limit


async def fetch_rows(
    conn: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()
) -> list[tuple[Any, ...]]:
    """Every row of one query, its cursor closed before returning (rows are plain tuples:
    no row factory is set on the source)."""
    async with conn.execute(sql, args) as cursor:
        return cast("list[tuple[Any, ...]]", list(await cursor.fetchall()))


async def extract(
    conn: aiosqlite.Connection,
    table: Table,
    *,
    after_rowid: int,
    upto_rowid: int,
    batch_size: int,
    after_key: str | None = None,
) -> AsyncGenerator[Batch, None]:
    """Yield the rows with ``after_rowid < rowid <= upto_rowid`` in pages of ``batch_size``.

    A WITHOUT ROWID table is read in key order after ``after_key`` (the checkpoint's encoded
    key) instead; its rowids are positions, the rows read so far, up to ``upto_rowid``.
    A child table's orphans (orphan_sql) are found once, before the first page, by one
    anti-join over the whole range (orphan_rowids); each page then only marks them. Each page
    is one short query, fully fetched and its cursor closed before the page is yielded, so
    nothing is held open while downstream works. On cancellation or close, no cursor or
    transaction is left open.
    """
    if table.without_rowid:
        pages = _key_batches(conn, table, after_rowid, upto_rowid, batch_size, after_key)
        async with contextlib.aclosing(pages):
            async for batch in pages:
                yield batch
        return
    try:
        orphans = await orphan_rowids(conn, table, after_rowid, upto_rowid)
    except sqlite3.OperationalError as exc:
        raise read_failure(table, after_rowid, exc) from None
    sql = select_sql(table, orphan_flag=orphans is None) + keyset_sql(table)
    seq = 0
    last = after_rowid
    while last < upto_rowid:
        try:
            rows = await fetch_rows(conn, sql, (last, upto_rowid, batch_size))
        except sqlite3.OperationalError as exc:
            raise read_failure(table, last, exc) from None
        if not rows:
            return
        seq += 1
        batch = page_batch(table, seq, last, mark_orphans(rows, orphans or ()))
        last = batch.last_rowid
        yield batch


def read_failure(table: Table, after: int, exc: sqlite3.OperationalError) -> RuntimeFailure:
    """The sentence for a page of ``table`` SQLite failed to read after rowid ``after``."""
    return RuntimeFailure(
        f"Reading {table.name} from SQLite failed after rowid {after} ({exc}); if the app"
        " holds a long write lock, retry when it is idle: the rerun resumes."
    )


async def _key_batches(
    conn: aiosqlite.Connection,
    table: Table,
    after: int,
    upto: int,
    batch_size: int,
    after_key: str | None,
) -> AsyncGenerator[Batch, None]:
    """The batches of a WITHOUT ROWID table in key order: each row's rowid slot holds its
    position (rows read before it plus one), the batch's ``last_key`` the encoded key."""
    pages = key_pages(conn, table, select_sql(table), after_key=after_key, page=batch_size)
    seq, last = 0, after
    async with contextlib.aclosing(pages):
        while last < upto:
            try:
                found = await anext(pages, None)
            except sqlite3.OperationalError as exc:
                raise RuntimeFailure(
                    f"Reading {table.name} from SQLite failed after row {last} ({exc}); if the"
                    " app holds a long write lock, retry when it is idle: the rerun resumes."
                ) from None
            if found is None:
                return
            rows = found[0][: upto - last]  # rows past the bound wait for the next run
            key = encode_key(rows[-1][0], [rows[-1][1 + i] for i in table.key_positions])
            seq += 1
            start = last
            rows = [(start + i, *row[1:]) for i, row in enumerate(rows, start=1)]
            last = start + len(rows)
            yield Batch(
                table=table.name,
                seq=seq,
                after_rowid=start,
                last_rowid=last,
                extracted=len(rows),
                last_key=key,
                raw=rows,
            )
