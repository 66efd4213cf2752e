"""The app's original migration approach: read everything, then executemany INSERT in batches
of 100 into tables with their keys and index in place. A contender, not part of the product."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from flux_migrate.core.schema import (
    MESSAGES,
    SESSIONS,
    Column,
    Kind,
    Table,
    TargetNames,
    target_ddl,
)


def _ts(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _json(text: str | None) -> str:
    return json.dumps(json.loads(text or "{}"))


def _convert(column: Column) -> Callable[[Any], Any]:
    if column.kind is Kind.TIMESTAMP:
        return _ts
    if column.kind is Kind.JSON:
        return _json
    return lambda value: value


def _columns(src: sqlite3.Connection, table: Table) -> tuple[Column, ...]:
    """The table's columns, and a newer app's (``sessions.user_id``) when the source has them."""
    present = {r[1] for r in src.execute(f'PRAGMA table_info("{table.name}")')}
    return table.columns + tuple(c for c in table.target_only if c.name in present)


async def main(sqlite_path: str, dsn: str) -> None:
    src = sqlite3.connect(sqlite_path)
    work = []
    for table in (SESSIONS, MESSAGES):
        columns = _columns(src, table)
        names = ", ".join(f'"{c.name}"' for c in columns)
        converters = [_convert(c) for c in columns]
        rows = [
            tuple(f(v) for f, v in zip(converters, row, strict=True))
            for row in src.execute(f'SELECT {names} FROM "{table.name}"')
        ]
        marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
        work.append((f'INSERT INTO "{table.name}" ({names}) VALUES ({marks})', rows))
    src.close()
    conn = await asyncpg.connect(dsn)
    for sql in target_ddl(TargetNames()):
        await conn.execute(sql)
    for sql, rows in work:
        for start in range(0, len(rows), 100):
            await conn.executemany(sql, rows[start : start + 100])
    await conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
