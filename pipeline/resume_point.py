"""Where a rerun resumes a table when the app deleted rows since the last run.

SQLite gives a new row ``max(rowid) + 1``: once the app deletes the newest rows of a table
(without AUTOINCREMENT), its next inserts reuse rowids at or below the checkpoint, where a rerun
would never look. ``VACUUM`` renumbers rowids the same way, keeping their order. The rule: resume
after the highest source row that an earlier run accounted for (loaded, quarantined or
skipped); every row above it is new. Ordinary deletes (retention) below it change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiosqlite
import asyncpg
import structlog

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.errors import TargetError
from flux_migrate.core.schema import Table, TargetNames, quote_ident
from flux_migrate.core.source import sample_matches
from flux_migrate.core.target import Target
from flux_migrate.stages.transform import key_sql, row_key

SCAN_CHUNK = 500
log = structlog.get_logger("flux_migrate")


def _key_columns(table: Table) -> str:
    return ", ".join(quote_ident(c) for c in table.primary_key)


def _key_only(table: Table) -> Table:
    """``table`` reduced to its key columns in key order (what _key_columns selects)."""
    columns = tuple(table.column(c) for c in table.primary_key)
    return Table(table.name, columns, primary_key=table.primary_key, profile="generic")


async def _accounted(
    conn: asyncpg.Connection,
    names: TargetNames,
    table: Table,
    rows: Sequence[tuple[int, tuple[Any, ...]]],
) -> set[int]:
    """The rowids among ``rows`` (rowid, raw key values) that an earlier run loaded,
    quarantined or skipped: loaded rows by key in the target table, the others by rowid and
    key."""
    keyed = _key_only(table)
    keys = [row_key(keyed, values) for _, values in rows]
    loaded = {
        r["k"]
        for r in await conn.fetch(
            f"SELECT {key_sql(table)} AS k FROM {names.qualified(table.name)}"
            f" WHERE {key_sql(table)} = ANY($1::text[])",
            [k for k in keys if k is not None],
        )
    }
    noted = {
        (r["source_rowid"], r["source_key"])
        for r in await conn.fetch(
            ckpt.NOTED_ROWS_SQL, names.schema, table.name, [r for r, _ in rows]
        )
    }
    return {
        rowid
        for (rowid, _), key in zip(rows, keys, strict=True)
        if key in loaded or (rowid, key) in noted
    }


async def resume_point(
    src: aiosqlite.Connection,
    conn: asyncpg.Connection,
    names: TargetNames,
    c: ckpt.Checkpoint,
    table: Table,
) -> int:
    """The rowid to resume ``c``'s table after: the checkpoint itself while the row it stopped
    at still holds its key, else the highest source row at or below it that was accounted for
    (recorded in the checkpoint, so batches commit against it). A table without a primary key
    cannot tell its rows apart: a changed checkpoint row is refused (TargetError)."""
    name, rowid = table.name, table.rowid_sql()
    if c.last_rowid == table.start_rowid or c.last_key is None and table.primary_key:
        return c.last_rowid
    if not table.primary_key:
        async with src.execute(
            f"SELECT 1 FROM {quote_ident(name)} WHERE {rowid} = ?", (c.last_rowid,)
        ) as cur:
            if await cur.fetchone() is not None:
                return c.last_rowid
        raise TargetError(
            f"Table {name} of the SQLite file has no primary key and its rows at the"
            f" checkpoint (rowid {c.last_rowid}) were deleted since the last run, so new rows"
            " may reuse their rowids; run --restart --yes to migrate it again."
        )
    cols = _key_columns(table)
    async with src.execute(
        f"SELECT {cols} FROM {quote_ident(name)} WHERE {rowid} = ?", (c.last_rowid,)
    ) as cur:
        row = await cur.fetchone()
    keyed = _key_only(table)
    if row is not None and row_key(keyed, tuple(row)) == c.last_key:
        return c.last_rowid
    below, new_rows = c.last_rowid, 0
    found: tuple[int, str | None] = (table.start_rowid, None)
    while below > table.start_rowid:
        async with src.execute(
            f"SELECT {rowid}, {cols} FROM {quote_ident(name)} WHERE {rowid} <= ?"
            f" ORDER BY {rowid} DESC LIMIT {SCAN_CHUNK}",
            (below,),
        ) as cur:
            chunk = [(int(r[0]), tuple(r[1:])) for r in await cur.fetchall()]
        if not chunk:
            break
        accounted = await _accounted(conn, names, table, chunk)
        hit = next((i for i, (rowid, _) in enumerate(chunk) if rowid in accounted), None)
        if hit is not None:
            found = (chunk[hit][0], row_key(keyed, chunk[hit][1]))
            new_rows += hit
            break
        new_rows += len(chunk)
        below = chunk[-1][0] - 1
    await ckpt.rewind(conn, names.schema, name, found[0], found[1], c.last_rowid)
    log.warning(
        "checkpoint_rewound",
        table=name,
        from_rowid=c.last_rowid,
        to_rowid=found[0],
        new_rows_below=new_rows,
        reason="rows at the checkpoint were deleted or renumbered in the source",
    )
    return found[0]


async def loaded_keys_present(
    src: aiosqlite.Connection,
    conn: asyncpg.Connection,
    names: TargetNames,
    table: str,
    key_column: str,
) -> bool | None:
    """Whether the source still holds any of a sample of the keys loaded into ``table``
    (None when nothing was loaded yet): the source's identity once its first rows are gone."""
    key = quote_ident(key_column)
    sample = [
        r["k"]
        for r in await conn.fetch(
            f"SELECT {key}::text AS k FROM {names.qualified(table)} ORDER BY random() LIMIT 64"
        )
    ]
    if not sample:
        return None
    marks = ",".join("?" * len(sample))
    async with src.execute(
        f"SELECT 1 FROM {quote_ident(table)} WHERE {key} IN ({marks}) LIMIT 1", sample
    ) as cur:
        return await cur.fetchone() is not None


async def same_source(
    src: aiosqlite.Connection, target: Target, names: TargetNames, source: dict[str, Any]
) -> bool:
    """Whether ``src`` is the file an earlier run loaded (``source``: the identity recorded
    then): one of its first keys recorded then is still there, or (after retention deleted
    those) keys loaded from it still are."""
    table, key = source.get("table", ["sessions", "id"])
    if await sample_matches(src, source.get("sample", []), table, key):
        return True
    present = await target.retrying(
        lambda c: loaded_keys_present(src, c, names, table, key), what="comparing sources"
    )
    return bool(present)
