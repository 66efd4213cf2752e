"""The ceiling: data already transformed into PostgreSQL's binary COPY format, loaded with
COPY ... FROM STDIN (the client only streams the file), then the keys and index built."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncpg

from flux_migrate.core.schema import TABLES, TargetNames, constraints, create_table_sql


async def main(dsn: str, folder: str) -> None:
    names = TargetNames()
    conn = await asyncpg.connect(dsn)
    for table in TABLES:
        await conn.execute(create_table_sql(table, names))
    for table in TABLES:
        await conn.copy_to_table(
            table.name, source=Path(folder) / f"{table.name}.copy", format="binary"
        )
    for c in constraints(names):
        await conn.execute(c.sql)
    await conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
