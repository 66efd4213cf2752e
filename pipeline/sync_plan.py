"""Find what changed in the source since flux-migrate last wrote a table: a merge of the source
(in rowid order, each row digested) with the row digests kept in the bookkeeping schema.

The source and the digests are read in windows of rowids, one short query each (nothing is held
open between windows). Within a window a source row and a digest with the same rowid and the
same digest are the same row, unchanged (the digest covers the key). Any other row is set aside
and matched by key once the whole table is read: a key on both sides with another digest is an
update, one with the same digest moved rowid (a VACUUM), a key only in the source is an insert,
a key only in the digests a delete. So correctness never depends on rowids staying put; they
only make the common case (nothing moved) one comparison per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiosqlite
import anyio
import asyncpg

from core import bookkeeping
from core.digest import digests, key_position
from core.schema import Table, quote_ident
from core.target import Target
from stages.extract import fetch_rows
from stages.transform import key_of

WINDOW = 20_000  # source rows per window of the merge


@dataclass
class TablePlan:
    """What sync will do to one table: source rowids to insert or update, keys to delete, and
    digests whose rowid moved (bookkeeping only)."""

    table: Table
    scanned: int = 0
    inserts: list[int] = field(default_factory=list)
    updates: list[int] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    moves: list[tuple[str, int, int]] = field(default_factory=list)  # key, new rowid, digest
    last_rowid: int = 0
    last_key: str | None = None

    @property
    def changes(self) -> int:
        return len(self.inserts) + len(self.updates) + len(self.deletes)


def source_sql(table: Table) -> str:
    """The source rows of a rowid window, rowid first then the table's columns."""
    cols = ", ".join(quote_ident(c) for c in table.column_names)
    return (
        f"SELECT rowid, {cols} FROM {quote_ident(table.name)}"
        " WHERE rowid > ? ORDER BY rowid LIMIT ?"
    )


async def _stored_window(
    target: Target, schema: str, table: str, after: int, upto: int | None
) -> list[asyncpg.Record]:
    """The digests with ``after < source_rowid <= upto`` (no upper bound when None)."""

    async def fetch(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return await bookkeeping.digests_between(conn, schema, table, after, upto)

    return await target.retrying(fetch, what=f"reading the digests of {table}")


async def plan_table(
    src: aiosqlite.Connection, target: Target, schema: str, table: Table, *, window: int = WINDOW
) -> TablePlan:
    """Merge the table's source rows with its stored digests; return what changed.

    Blocks for one read of the whole source table and of its digests; holds no transaction
    open between windows. Cancellation leaves nothing behind (it only reads).
    """
    at = key_position(table.column_names, table.primary_key)
    assert at is not None, table.name
    ncols = len(table.column_names)
    sql = source_sql(table)
    plan = TablePlan(table)
    src_odd: dict[str, tuple[int, int]] = {}  # key -> (rowid, digest), not matched by rowid
    stored_odd: dict[str, tuple[int, int]] = {}
    after = 0
    while True:
        rows = await fetch_rows(src, sql, (after, window))
        upto = rows[-1][0] if len(rows) == window else None
        stored = await _stored_window(target, schema, table.name, after, upto)
        values = await anyio.to_thread.run_sync(digests, rows, ncols)
        _merge_window(rows, values, stored, at, plan, src_odd, stored_odd)
        plan.scanned += len(rows)
        if rows:
            plan.last_rowid = rows[-1][0]
            plan.last_key = key_of(rows[-1][at + 1])
        if upto is None:
            break
        after = upto
    _resolve_by_key(plan, src_odd, stored_odd)
    return plan


def _merge_window(
    rows: list[tuple[Any, ...]],
    values: list[int],
    stored: list[asyncpg.Record],
    at: int,
    plan: TablePlan,
    src_odd: dict[str, tuple[int, int]],
    stored_odd: dict[str, tuple[int, int]],
) -> None:
    """Compare one window: same rowid and digest is unchanged, same rowid and key with another
    digest is an update; everything else is set aside to be matched by key."""
    i = j = 0
    n, m = len(rows), len(stored)
    updates = plan.updates
    while i < n or j < m:
        if j >= m or (i < n and rows[i][0] < stored[j][0]):
            row = rows[i]
            src_odd[key_of(row[at + 1]) or ""] = (row[0], values[i])
            i += 1
        elif i >= n or rows[i][0] > stored[j][0]:
            rec = stored[j]
            stored_odd[rec[1]] = (rec[0], rec[2])
            j += 1
        else:
            row, rec = rows[i], stored[j]
            if values[i] != rec[2]:
                key = key_of(row[at + 1]) or ""
                if key == rec[1]:
                    updates.append(row[0])
                else:
                    src_odd[key] = (row[0], values[i])
                    stored_odd[rec[1]] = (rec[0], rec[2])
            i += 1
            j += 1


def _resolve_by_key(
    plan: TablePlan, src_odd: dict[str, tuple[int, int]], stored_odd: dict[str, tuple[int, int]]
) -> None:
    """Match the rows set aside by key: moved, updated, inserted or deleted."""
    for key, (rowid, digest) in src_odd.items():
        old = stored_odd.pop(key, None)
        if old is None:
            plan.inserts.append(rowid)
        elif old[1] == digest:
            plan.moves.append((key, rowid, digest))
        else:
            plan.updates.append(rowid)
    plan.deletes.extend(stored_odd)
    plan.inserts.sort()
    plan.updates.sort()
