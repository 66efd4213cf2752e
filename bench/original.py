"""The app's original migration approach: read everything, then executemany INSERT in batches
of 100 into tables with their keys and index in place. A contender, not part of the product."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from datetime import UTC, datetime

import asyncpg

from flux_migrate.core.schema import MESSAGES, SESSIONS, TargetNames, target_ddl


def _ts(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def main(sqlite_path: str, dsn: str) -> None:
    src = sqlite3.connect(sqlite_path)
    sessions = src.execute(f"SELECT {', '.join(SESSIONS.column_names)} FROM sessions").fetchall()
    messages = src.execute(f"SELECT {', '.join(MESSAGES.column_names)} FROM messages").fetchall()
    src.close()
    conn = await asyncpg.connect(dsn)
    for sql in target_ddl(TargetNames()):
        await conn.execute(sql)
    s_rows = [
        (i, t, _ts(c), _ts(u), json.dumps(json.loads(m or "{}"))) for i, t, c, u, m in sessions
    ]
    m_rows = [
        (i, s, r, c, json.dumps(json.loads(m or "{}")), _ts(t)) for i, s, r, c, m, t in messages
    ]
    for sql, rows in (
        ("INSERT INTO sessions VALUES ($1, $2, $3, $4, $5)", s_rows),
        ("INSERT INTO messages VALUES ($1, $2, $3, $4, $5, $6)", m_rows),
    ):
        for start in range(0, len(rows), 100):
            await conn.executemany(sql, rows[start : start + 100])
    await conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
