"""The SQL and pages of extract that need no connection: what a converter process (which
imports no asyncio, no driver) runs beside the coordinator's extract."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flux_migrate.core.schema import ForeignKey, Table, quote_ident
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.transform import row_key


def source_uri(path: Path) -> str:
    """A read-only SQLite URI for exactly ``path`` (the file is never written nor created).

    The path is percent-encoded: a raw ``#``, ``?`` or ``%xx`` in a file name would otherwise
    end the path early (opening another file) or drop ``mode=ro``. A WAL-mode source still
    gets SQLite's ``-wal`` and ``-shm`` files beside it when the directory is writable: every
    reader needs them (see docs/bad-data.md)."""
    return "file:" + quote(path.resolve().as_posix()) + "?mode=ro"


def orphan_sql(table: Table) -> str | None:
    """The orphan check of a row ``t`` (None for a table without parents): true when a parent
    row it names is absent from the source. The one definition of an orphan on the source:
    evaluated per row (select_sql) or over a whole range at once (orphan_rowids)."""
    if table.parent is not None and table.parent_column is not None:
        return (
            f"NOT EXISTS (SELECT 1 FROM {quote_ident(table.parent)} AS p"
            f" WHERE p.id = t.{quote_ident(table.parent_column)})"
        )
    if table.foreign_keys:
        return " OR ".join(_orphan_sql(fk) for fk in table.foreign_keys)
    return None


def select_sql(table: Table, *, orphan_flag: bool = True) -> str:
    """SELECT the row id (as Table.rowid_sql names it), the table's columns and, for a child
    table, a flag saying a parent row it names is absent from the source; without a WHERE
    clause (callers add theirs on ``t``). Without ``orphan_flag`` the flag is a constant 0,
    for a reader that sets it from orphan_rowids (mark_orphans).

    A WITHOUT ROWID table has no rowid: its first column is instead the storage classes of its
    key columns (``key_types_sql``), which extract replaces by the row's position."""
    cols = ", ".join(f"t.{quote_ident(c)}" for c in table.column_names)
    check = orphan_sql(table)
    flag = "" if check is None else f", {check}" if orphan_flag else ", 0"
    first = key_types_sql(table) if table.without_rowid else table.rowid_sql("t")
    return f"SELECT {first}, {cols}{flag} FROM {quote_ident(table.name)} AS t"


def mark_orphans(rows: list[tuple[Any, ...]], orphans: Sequence[int]) -> list[tuple[Any, ...]]:
    """``rows`` (read with select_sql's constant flag, in rowid order) with the flag set to 1
    on each row whose rowid is among the sorted ``orphans``; the list is changed in place."""
    if not orphans or not rows:
        return rows
    start = bisect.bisect_left(orphans, rows[0][0])
    stop = bisect.bisect_right(orphans, rows[-1][0])
    for rowid in orphans[start:stop]:
        i = bisect.bisect_left(rows, rowid, key=_rowid_of)
        if i < len(rows) and rows[i][0] == rowid:
            rows[i] = (*rows[i][:-1], 1)
    return rows


def _rowid_of(row: tuple[Any, ...]) -> Any:
    return row[0]


def key_types_sql(table: Table) -> str:
    """The storage classes of a row's key columns, comma-separated (e.g. 'integer,text')."""
    return " || ',' || ".join(f"typeof(t.{quote_ident(c)})" for c in table.primary_key)


def _orphan_sql(fk: ForeignKey) -> str:
    """True when every column of ``fk`` is set and no parent row matches (MATCH SIMPLE)."""
    present = " AND ".join(f"t.{quote_ident(c)} IS NOT NULL" for c in fk.columns)
    match = " AND ".join(
        f"p.{quote_ident(pc)} = t.{quote_ident(c)}"
        for c, pc in zip(fk.columns, fk.parent_columns, strict=True)
    )
    return f"({present} AND NOT EXISTS (SELECT 1 FROM {quote_ident(fk.parent)} AS p WHERE {match}))"


def keyset_sql(table: Table) -> str:
    """The WHERE and ORDER BY of one page of a table read by rowid (rowid after, upto, limit)."""
    rowid = table.rowid_sql("t")
    return f" WHERE {rowid} > ? AND {rowid} <= ? ORDER BY {rowid} LIMIT ?"


def page_batch(table: Table, seq: int, after: int, rows: list[tuple[Any, ...]]) -> Batch:
    """The batch of one page of rows read by rowid after ``after`` (rows in rowid order)."""
    return Batch(
        table=table.name,
        seq=seq,
        after_rowid=after,
        last_rowid=rows[-1][0],
        extracted=len(rows),
        last_key=row_key(table, rows[-1][1 : len(table.columns) + 1]),
        raw=rows,
    )
