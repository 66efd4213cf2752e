"""Existing target tables: every mapped column is there with a type that holds its values."""

from __future__ import annotations

import asyncpg

from flux_migrate.core.errors import TargetError
from flux_migrate.core.schema import Table, TargetNames, holds_losslessly, pg_identifier

COLUMNS_SQL = (
    "SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,"
    " a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''"
    " AS required FROM pg_attribute a WHERE a.attrelid = $1::regclass AND a.attnum > 0"
    " AND NOT a.attisdropped ORDER BY a.attnum"
)


async def check_target_columns(conn: asyncpg.Connection, names: TargetNames, table: Table) -> None:
    """Refuse (TargetError, before this table is written) an existing table that lacks a mapped
    column, types one so it would change values (date, timestamptz(0), char(n), bytea, uuid,
    integer, text for a timestamp, ...), or requires a column the source does not have."""
    qualified = names.qualified(table.name)
    found = {r["name"]: r for r in await conn.fetch(COLUMNS_SQL, qualified)}
    for column in table.columns:
        row = found.get(pg_identifier(column.name))  # PostgreSQL keeps 63 bytes of a name
        if row is None:
            raise TargetError(
                f"Table {qualified} has no column {column.name}; add it as {column.pg_type}"
                " or choose another target schema."
            )
        if not holds_losslessly(column.kind, row["type"]):
            raise TargetError(
                f"Column {column.name} of {qualified} is {row['type']}, which cannot hold every"
                f" value unchanged; it needs {column.pg_type} (or text/varchar for text,"
                " timestamptz for instants); alter it or choose another target schema."
            )
    kept = {pg_identifier(n) for n in table.column_names}
    extra = [name for name, r in found.items() if r["required"] and name not in kept]
    if extra:
        raise TargetError(
            f"Table {qualified} requires column {extra[0]} (NOT NULL, no default), which the"
            " source does not have; give it a default or make it nullable."
        )
