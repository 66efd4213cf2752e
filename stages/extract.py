"""Extract: stream a table of the app's SQLite database in keyset pages, read-only."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import aiosqlite
import anyio

from core.errors import RuntimeFailure, SourceError
from core.schema import ForeignKey, Table, quote_ident
from stages.batch import Batch
from stages.transform import row_key


def source_uri(path: Path) -> str:
    """A read-only SQLite URI for exactly ``path`` (the file is never written nor created).

    The path is percent-encoded: a raw ``#``, ``?`` or ``%xx`` in a file name would otherwise
    end the path early (opening another file) or drop ``mode=ro``. A WAL-mode source still
    gets SQLite's ``-wal`` and ``-shm`` files beside it when the directory is writable: every
    reader needs them (see docs/bad-data.md)."""
    return "file:" + quote(path.resolve().as_posix()) + "?mode=ro"


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


def select_sql(table: Table) -> str:
    """SELECT rowid, the table's columns and, for a child table, a flag saying a parent row it
    names is absent from the source; without a WHERE clause (callers add theirs on ``t``)."""
    cols = ", ".join(f"t.{quote_ident(c)}" for c in table.column_names)
    orphan = ""
    if table.parent is not None and table.parent_column is not None:
        orphan = (
            f", NOT EXISTS (SELECT 1 FROM {quote_ident(table.parent)} AS p"
            f" WHERE p.id = t.{quote_ident(table.parent_column)})"
        )
    elif table.foreign_keys:
        orphan = ", " + " OR ".join(_orphan_sql(fk) for fk in table.foreign_keys)
    return f"SELECT t.rowid, {cols}{orphan} FROM {quote_ident(table.name)} AS t"


def _orphan_sql(fk: ForeignKey) -> str:
    """True when every column of ``fk`` is set and no parent row matches (MATCH SIMPLE)."""
    present = " AND ".join(f"t.{quote_ident(c)} IS NOT NULL" for c in fk.columns)
    match = " AND ".join(
        f"p.{quote_ident(pc)} = t.{quote_ident(c)}"
        for c, pc in zip(fk.columns, fk.parent_columns, strict=True)
    )
    return f"({present} AND NOT EXISTS (SELECT 1 FROM {quote_ident(fk.parent)} AS p WHERE {match}))"


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


KEYSET = " WHERE t.rowid > ? AND t.rowid <= ? ORDER BY t.rowid LIMIT ?"


async def extract(
    conn: aiosqlite.Connection,
    table: Table,
    *,
    after_rowid: int,
    upto_rowid: int,
    batch_size: int,
) -> AsyncGenerator[Batch, None]:
    """Yield the rows with ``after_rowid < rowid <= upto_rowid`` in pages of ``batch_size``.

    Each page is one short query, fully fetched and its cursor closed before the page is
    yielded, so nothing is held open while downstream works. On cancellation or close, no
    cursor or transaction is left open.
    """
    sql = select_sql(table) + KEYSET
    seq = 0
    last = after_rowid
    while last < upto_rowid:
        try:
            rows = await fetch_rows(conn, sql, (last, upto_rowid, batch_size))
        except sqlite3.OperationalError as exc:
            raise RuntimeFailure(
                f"Reading {table.name} from SQLite failed after rowid {last} ({exc}); if the app"
                " holds a long write lock, retry when it is idle: the rerun resumes."
            ) from None
        if not rows:
            return
        seq += 1
        after, last = last, rows[-1][0]
        yield Batch(
            table=table.name,
            seq=seq,
            after_rowid=after,
            last_rowid=last,
            extracted=len(rows),
            last_key=row_key(table, rows[-1][1 : len(table.columns) + 1]),
            raw=rows,
        )
