"""Preflight and bookkeeping reads of the SQLite source (everything but the row stream)."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite

from core.errors import SourceError, source_error
from core.schema import TABLES, quote_ident

IDENTITY_SAMPLE = 8


def _name(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


async def check_source(conn: aiosqlite.Connection, path: Path) -> None:
    """Refuse a source that is not the app's database: not SQLite, tables or columns missing."""
    try:
        for table in TABLES:
            async with conn.execute(f"PRAGMA table_info({quote_ident(table.name)})") as cur:
                present = {_name(row[1]) for row in await cur.fetchall()}
            if not present:
                raise SourceError(
                    f"The SQLite file {path} has no table {table.name}; is it the app's database?"
                )
            missing = [c for c in table.column_names if c not in present]
            if missing:
                raise SourceError(
                    f"Table {table.name} in {path} lacks column(s) {', '.join(missing)};"
                    " it does not match the app's schema."
                )
    except sqlite3.DatabaseError as exc:
        raise source_error(exc, path) from None


async def source_snapshot(
    conn: aiosqlite.Connection, path: Path
) -> tuple[dict[str, int], dict[str, Any]]:
    """In one read transaction: the highest rowid of each table (the run's upper bound) and
    the source's identity (a hash of its schema and its first session keys)."""
    try:
        await conn.execute("BEGIN")
        try:
            bounds = {}
            for table in TABLES:
                async with conn.execute(
                    f"SELECT coalesce(max(rowid), 0) FROM {quote_ident(table.name)}"
                ) as cur:
                    row = await cur.fetchone()
                bounds[table.name] = int(row[0]) if row else 0
            async with conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE tbl_name IN ('sessions', 'messages')"
                " ORDER BY type, name"
            ) as cur:
                ddl = b"\n".join(
                    (_name(r[0]) + ":" + _name(r[1] or b"")).encode() for r in await cur.fetchall()
                )
            async with conn.execute(
                f"SELECT rowid, id FROM sessions ORDER BY rowid LIMIT {IDENTITY_SAMPLE}"
            ) as cur:
                sample = [
                    [int(r[0]), _name(r[1]) if r[1] is not None else None]
                    for r in await cur.fetchall()
                ]
        finally:
            await conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        raise source_error(exc, path) from None
    identity = {"schema": hashlib.sha256(ddl).hexdigest()[:16], "sample": sample}
    return bounds, identity


async def sample_matches(conn: aiosqlite.Connection, sample: list[list[Any]]) -> bool:
    """Whether any recorded (rowid, id) of the first sessions is still in this source."""
    if not sample:
        return True
    for rowid, key in sample:
        async with conn.execute("SELECT id FROM sessions WHERE rowid = ?", (rowid,)) as cur:
            row = await cur.fetchone()
        if row is not None and (_name(row[0]) if row[0] is not None else None) == key:
            return True
    return False


async def count_between(conn: aiosqlite.Connection, table: str, after: int, upto: int) -> int:
    async with conn.execute(
        f"SELECT count(*) FROM {quote_ident(table)} WHERE rowid > ? AND rowid <= ?", (after, upto)
    ) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0
