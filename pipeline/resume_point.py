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

from core import bookkeeping as ckpt
from core.schema import TargetNames, quote_ident
from core.source import sample_matches
from core.target import Target
from stages.transform import key_of

SCAN_CHUNK = 500
log = structlog.get_logger("flux_migrate")


async def _accounted(
    conn: asyncpg.Connection, names: TargetNames, table: str, rows: Sequence[tuple[int, Any]]
) -> set[int]:
    """The rowids among ``rows`` (rowid, raw id) that an earlier run loaded, quarantined or
    skipped: loaded rows by key in the target table, the others by rowid and key."""
    keys = [key_of(raw) for _, raw in rows]
    loaded = {
        r["id"]
        for r in await conn.fetch(
            f"SELECT id::text AS id FROM {names.qualified(table)} WHERE id::text = ANY($1::text[])",
            [k for k in keys if k is not None],
        )
    }
    noted = {
        (r["source_rowid"], r["source_key"])
        for r in await conn.fetch(ckpt.NOTED_ROWS_SQL, names.schema, table, [r for r, _ in rows])
    }
    return {
        rowid
        for (rowid, _), key in zip(rows, keys, strict=True)
        if key in loaded or (rowid, key) in noted
    }


async def resume_point(
    src: aiosqlite.Connection, conn: asyncpg.Connection, names: TargetNames, c: ckpt.Checkpoint
) -> int:
    """The rowid to resume ``c``'s table after: the checkpoint itself while the row it stopped
    at still holds its key, else the highest source row at or below it that was accounted for
    (recorded in the checkpoint, so batches commit against it)."""
    table = c.source_table
    if c.last_rowid == 0 or c.last_key is None:
        return c.last_rowid
    async with src.execute(
        f"SELECT id FROM {quote_ident(table)} WHERE rowid = ?", (c.last_rowid,)
    ) as cur:
        row = await cur.fetchone()
    if row is not None and key_of(row[0]) == c.last_key:
        return c.last_rowid
    below, new_rows = c.last_rowid, 0
    found: tuple[int, str | None] = (0, None)
    while below > 0:
        async with src.execute(
            f"SELECT rowid, id FROM {quote_ident(table)} WHERE rowid <= ? ORDER BY rowid DESC"
            f" LIMIT {SCAN_CHUNK}",
            (below,),
        ) as cur:
            chunk = [(int(r[0]), r[1]) for r in await cur.fetchall()]
        if not chunk:
            break
        accounted = await _accounted(conn, names, table, chunk)
        hit = next((i for i, (rowid, _) in enumerate(chunk) if rowid in accounted), None)
        if hit is not None:
            found = (chunk[hit][0], key_of(chunk[hit][1]))
            new_rows += hit
            break
        new_rows += len(chunk)
        below = chunk[-1][0] - 1
    await ckpt.rewind(conn, names.schema, table, found[0], found[1], c.last_rowid)
    log.warning(
        "checkpoint_rewound",
        table=table,
        from_rowid=c.last_rowid,
        to_rowid=found[0],
        new_rows_below=new_rows,
        reason="rows at the checkpoint were deleted or renumbered in the source",
    )
    return found[0]


async def loaded_keys_present(
    src: aiosqlite.Connection, conn: asyncpg.Connection, names: TargetNames, table: str
) -> bool | None:
    """Whether the source still holds any of a sample of the keys loaded into ``table``
    (None when nothing was loaded yet): the source's identity once its first rows are gone."""
    sample = [
        r["id"]
        for r in await conn.fetch(
            f"SELECT id::text AS id FROM {names.qualified(table)} ORDER BY random() LIMIT 64"
        )
    ]
    if not sample:
        return None
    marks = ",".join("?" * len(sample))
    async with src.execute(
        f"SELECT 1 FROM {quote_ident(table)} WHERE id IN ({marks}) LIMIT 1", sample
    ) as cur:
        return await cur.fetchone() is not None


async def same_source(
    src: aiosqlite.Connection, target: Target, names: TargetNames, sample: list[list[Any]]
) -> bool:
    """Whether ``src`` is the file an earlier run loaded: one of its first sessions recorded
    then is still there, or (after retention deleted those) keys loaded from it still are."""
    if await sample_matches(src, sample):
        return True
    present = await target.retrying(
        lambda c: loaded_keys_present(src, c, names, "sessions"), what="comparing sources"
    )
    return bool(present)
