"""SQLite files of other shapes than the app's memory, and an independent comparison of their
rows with what PostgreSQL holds (written without the pipeline's converters)."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

# Every affinity, composite keys, an FK chain and a cycle, quoted, non-ASCII
# and reserved identifiers, epoch timestamps, BLOBs of every byte, an empty table, no key.
VARIED_DDL = """
CREATE TABLE "we""ird table" ("select" INTEGER PRIMARY KEY AUTOINCREMENT,
    "naïve col" REAL NOT NULL DEFAULT 1.5, "from" BLOB, untyped, flag BOOLEAN DEFAULT 0,
    amount NUMERIC, born DATE, seen_ms TIMESTAMP, doc JSON, note VARCHAR(20));
CREATE TABLE orgs (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE teams (org_id INTEGER NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    code TEXT NOT NULL, title TEXT, PRIMARY KEY (org_id, code)) WITHOUT ROWID;
CREATE TABLE members (id INTEGER PRIMARY KEY, org_id INTEGER, code TEXT, "user" TEXT,
    FOREIGN KEY (org_id, code) REFERENCES teams(org_id, code));
CREATE INDEX members_user ON members("user") WHERE "user" IS NOT NULL;
CREATE TABLE a (id INTEGER PRIMARY KEY, b_id INT REFERENCES b(id));
CREATE TABLE b (id INTEGER PRIMARY KEY, a_id INT REFERENCES a(id));
CREATE TABLE empty (id TEXT PRIMARY KEY, v INT);
CREATE TABLE log (at TEXT, level TEXT, msg TEXT);
CREATE TABLE "ünï ""q"" tbl" ("a""b" TEXT PRIMARY KEY, "order" INTEGER, "ключ" TEXT);
CREATE VIEW v_members AS SELECT * FROM members;
"""

# The tables of VARIED_DDL (the view aside).
VARIED_TABLES = (
    'we"ird table', "orgs", "teams", "members", "a", "b", "empty", "log", 'ünï "q" tbl',
)  # fmt: skip


def varied_db(path: Path, *, bad: bool = True) -> Path:
    """The varied database; with ``bad``, two dynamically typed values that fit no column."""
    db = sqlite3.connect(path)
    db.executescript(VARIED_DDL)
    weird = 'INSERT INTO "we""ird table" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)'
    db.execute(weird, (None, 0.14285714285714285, bytes(range(256)), "t", 1, 12, "2024-02-29",
                       1_700_000_000_123, '{"a": [1, 2.50]}', "x" * 20))  # fmt: skip
    db.execute(weird, (None, -1e308, b"", 42, 0, 3.25, "1999-12-31 23:59:59", None, "[]", None))
    db.execute(weird, (None, 2.0, None, None, None, None, None, 1_600_000_000_000, None, "é"))
    if bad:
        db.execute(weird, (None, "n/a", None, None, None, None, None, None, None, None))
        db.execute(weird, (None, 1.0, None, None, 7, None, None, None, None, None))
    db.executemany("INSERT INTO orgs VALUES (?, ?)", [(1, "acme"), (2, "globex")])
    db.executemany(
        "INSERT INTO teams VALUES (?, ?, ?)", [(1, "red", "Red"), (1, "blue", None), (2, "x", "X")]
    )
    db.executemany(
        "INSERT INTO members VALUES (?, ?, ?, ?)",
        [(i, 1 + i % 2, "red" if i % 2 == 0 else "x", f"u{i}" if i % 3 else None)
         for i in range(1, 41)],
    )  # fmt: skip
    db.executemany("INSERT INTO a VALUES (?, ?)", [(1, 1), (2, None)])
    db.executemany("INSERT INTO b VALUES (?, ?)", [(1, 2), (2, 1)])
    db.executemany(
        "INSERT INTO log VALUES (?, ?, ?)",
        [(f"2024-05-0{d}T10:00:00+02:00", "info", f"line {d}") for d in range(1, 8)] * 3,
    )
    db.executemany(
        'INSERT INTO "ünï ""q"" tbl" VALUES (?, ?, ?)',
        [("k 1", 1, "знач"), ('k"2', None, None), ("ключ", 3, "")],
    )
    db.commit()
    db.close()
    return path


def _canonical(value: Any, pg_type: str) -> Any:
    """One value in the canonical form of a PostgreSQL type, from either side."""
    if value is None:
        return None
    if pg_type in ("bigint", "double precision", "numeric"):
        if isinstance(value, bytes):
            return Decimal(value.decode())
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if pg_type == "boolean":
        if value not in (0, 1):
            raise ValueError(value)
        return bool(value)
    if pg_type == "bytea":
        return bytes(value)
    if pg_type == "timestamp with time zone":
        if isinstance(value, datetime):
            return value.astimezone(UTC)
        if isinstance(value, int | float):
            unit = 1000 if abs(value) >= 100_000_000_000 else 1
            return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=value / unit)
        text = value.decode() if isinstance(value, bytes) else str(value)
        parsed = datetime.fromisoformat(text)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    if pg_type == "jsonb":
        text = value.decode() if isinstance(value, bytes) else value
        return json.loads(text, parse_float=Decimal, parse_int=Decimal)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return repr(value) if isinstance(value, float) else str(value)


def source_table(path: Path, table: str) -> list[tuple[Any, ...]]:
    """The source rows of ``table`` in storage order, raw (text as bytes)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.text_factory = bytes
    try:
        cols = [r[1] for r in db.execute("SELECT * FROM pragma_table_info(?)", (table,))]
        quoted = ", ".join('"' + c.decode().replace('"', '""') + '"' for c in cols)
        name = '"' + table.replace('"', '""') + '"'
        return db.execute(f"SELECT {quoted} FROM {name}").fetchall()
    finally:
        db.close()


async def compare_table(
    path: Path, dsn: str, table: str, *, skip: int = 0, schema: str = "public"
) -> tuple[int, int]:
    """(rows equal, rows in PostgreSQL) for one table: every source row must be in PostgreSQL
    under the canonical form of the target column types, except ``skip`` quarantined ones."""
    conn = await asyncpg.connect(dsn)
    try:
        types = await conn.fetch(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS t FROM pg_attribute a"
            " WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped"
            " ORDER BY a.attnum",
            f'"{schema}"."{table.replace(chr(34), chr(34) * 2)}"',
        )
        pg_types = [r["t"] for r in types]
        quoted = '"' + table.replace('"', '""') + '"'
        target_rows = await conn.fetch(f'SELECT * FROM "{schema}".{quoted}')
    finally:
        await conn.close()
    want, unfit = [], 0
    for row in source_table(path, table):
        try:
            want.append(tuple(_canonical(v, t) for v, t in zip(row, pg_types, strict=True)))
        except (ValueError, ArithmeticError):
            unfit += 1  # a value that fits no column: must be one of the quarantined rows
    have = [tuple(_canonical(v, t) for v, t in zip(r.values(), pg_types, strict=True))
            for r in target_rows]  # fmt: skip
    assert skip == unfit, (table, unfit)
    assert len(want) == len(have), (table, len(want), len(have))
    have_set = [repr(r) for r in have]
    equal = sum(1 for r in want if repr(r) in have_set)
    assert len(want) == equal, (table, [r for r in want if repr(r) not in have_set])
    return equal, len(have)


def chain_db(path: Path, *, without_rowid: bool = False) -> Path:
    """Three tables in a foreign-key chain (parent 200 rows, child 800, grandchild 1600); with
    ``without_rowid`` the grandchild, keyed by (child_id, tag), is a WITHOUT ROWID table."""
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE parent (id INTEGER PRIMARY KEY, name TEXT NOT NULL, born DATE);"
        "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER NOT NULL"
        " REFERENCES parent(id), score REAL, doc JSON);"
        "CREATE TABLE grandchild (child_id INTEGER NOT NULL REFERENCES child(id),"
        " tag TEXT NOT NULL, payload BLOB, PRIMARY KEY (child_id, tag))"
        + (" WITHOUT ROWID;" if without_rowid else ";")
    )
    db.executemany(
        "INSERT INTO parent VALUES (?, ?, ?)",
        [(i, f"p{i}", f"2000-01-{1 + i % 28:02d}") for i in range(1, 201)],
    )
    db.executemany(
        "INSERT INTO child VALUES (?, ?, ?, ?)",
        [(i, 1 + i % 200, i / 7, f'{{"i": {i}}}') for i in range(1, 801)],
    )
    # Inserted in an order unlike the key order, so rowid order and key order differ.
    db.executemany(
        "INSERT INTO grandchild VALUES (?, ?, ?)",
        [(c, tag, bytes([c % 256, len(tag)])) for tag in ("b", "a") for c in range(800, 0, -1)],
    )
    db.commit()
    db.close()
    return path
