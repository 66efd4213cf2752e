"""Where the ceiling's time goes: the COPY of each table, then the key and index build, with
the WAL each phase writes (for the scaling arithmetic in docs/benchmark.md).

    python -m bench.split DSN COPY_FOLDER
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import asyncpg

from flux_migrate.core.schema import TABLES, TargetNames, constraints, create_table_sql


async def _wal(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))


async def main(dsn: str, folder: str) -> None:
    names = TargetNames()
    conn = await asyncpg.connect(dsn)
    try:
        for table in TABLES:
            await conn.execute(create_table_sql(table, names))
        for table in TABLES:
            wal, started = await _wal(conn), time.monotonic()
            path = Path(folder) / f"{table.name}.copy"
            await conn.copy_to_table(table.name, source=path, format="binary")
            seconds, written = time.monotonic() - started, (await _wal(conn) - wal) / 1e6
            size = path.stat().st_size / 1e6
            print(f"copy {table.name}: {seconds:.2f} s, {size:.0f} MB in, {written:.0f} MB WAL")
        for c in constraints(names):
            wal, started = await _wal(conn), time.monotonic()
            await conn.execute(c.sql)
            print(
                f"key {c.name}: {time.monotonic() - started:.2f} s,"
                f" {(await _wal(conn) - wal) / 1e6:.0f} MB WAL"
            )
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
