"""Verify a table outside the app profile: the multiset of its rows in the source (under the
mapping, quarantined rows aside) equals the multiset in PostgreSQL, compared value by value in
the canonical form of each column's type (pipeline/reference.py: verification's own reading of
the source, not the load's converters); rows without a key are compared as wholes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from typing import Any

import aiosqlite
import asyncpg

from flux_migrate.core.catalog import table_exists
from flux_migrate.core.schema import Kind, Table, quote_ident
from flux_migrate.pipeline import reference as ref
from flux_migrate.pipeline.settings import Settings
from flux_migrate.stages.extract_sql import key_types_sql
from flux_migrate.stages.transform import row_key

PAGE = 5000


def frozen(value: Any) -> Any:
    """A canonical JSON value made hashable: objects as sorted pairs, arrays as tuples."""
    if isinstance(value, dict):
        return ("{}", tuple(sorted((k, frozen(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("[]", tuple(frozen(v) for v in value))
    if isinstance(value, bool):
        return ("bool", value)  # true is not the number 1
    return value


def _row(table: Table, values: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(
        frozen(v) if c.kind in (Kind.JSON, Kind.JSON_VALUE) else v
        for c, v in zip(table.columns, values, strict=True)
    )


def _scan_sql(table: Table) -> str:
    """Every source row (its rowid, or a WITHOUT ROWID table's key types, first), in one
    plain scan: no keyset, no bound, nothing shared with extract's paging, so a row the load
    never read (at any rowid) is still seen here."""
    cols = ", ".join(f"t.{quote_ident(c)}" for c in table.column_names)
    first = key_types_sql(table) if table.without_rowid else table.rowid_sql("t")
    return f"SELECT {first}, {cols} FROM {quote_ident(table.name)} AS t"


async def source_rows(
    src: aiosqlite.Connection,
    settings: Settings,
    table: Table,
    quarantined: set[int],
    quarantined_keys: Collection[str] = (),
) -> tuple[Counter[tuple[Any, ...]], int]:
    """The canonical source rows the target must hold (as a multiset), and how many rows are
    neither loadable nor quarantined. Quarantined rows are known by rowid, or by key in a
    WITHOUT ROWID table (``quarantined_keys``)."""
    read = ref.source_row_reader(table, zone=settings.naive_timezone, strip_nul=settings.strip_nul)
    rows: Counter[tuple[Any, ...]] = Counter()
    unaccounted = 0
    async with src.execute(_scan_sql(table)) as cursor:
        while page := await cursor.fetchmany(PAGE):
            for raw in page:
                if table.without_rowid:
                    if row_key(table, raw[1:]) in quarantined_keys:
                        continue
                elif raw[0] in quarantined:
                    continue
                try:
                    rows[_row(table, read(raw[1:]))] += 1
                except ref.Unreadable:
                    unaccounted += 1
    return rows, unaccounted


async def target_rows(
    conn: asyncpg.Connection, settings: Settings, table: Table
) -> Counter[tuple[Any, ...]]:
    """The canonical target rows (as a multiset)."""
    rows: Counter[tuple[Any, ...]] = Counter()
    if not await table_exists(conn, settings.names, table.name):
        return rows
    sql = f"SELECT {ref.target_select(table)} FROM {settings.names.qualified(table.name)}"
    async with conn.transaction(readonly=True):
        async for record in conn.cursor(sql, prefetch=PAGE):
            rows[_row(table, ref.target_row(table, record.values()))] += 1
    return rows


def describe(table: Table, row: tuple[Any, ...]) -> str:
    """A row named by its key (or its first values when it has none), for samples."""
    names = table.column_names
    if table.primary_key:
        return ", ".join(f"{c}={row[names.index(c)]!r}" for c in table.primary_key)
    return ", ".join(f"{c}={v!r}" for c, v in list(zip(names, row, strict=True))[:3])
