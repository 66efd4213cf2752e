"""Verify a table outside the app profile: the multiset of its rows in the source (under the
mapping, quarantined rows aside) equals the multiset in PostgreSQL, compared value by value in
the canonical form of each column's type (pipeline/reference.py: verification's own reading of
the source, not the load's converters); rows without a key are compared as wholes."""

from __future__ import annotations

import base64
import json
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


def raw_identity(values: Iterable[Any]) -> tuple[Any, ...]:
    """A source row's raw values as the quarantine keeps them apart: text and blobs as their
    bytes, numbers tagged with their storage class (1 is not 1.0), NULL."""
    return tuple(_tagged(v) for v in values)


def _tagged(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        return ("b", value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return ("b", value)
    if isinstance(value, float):
        return ("f", repr(value))
    return ("i", value)


def stored_identity(table: Table, raw_json: str) -> tuple[Any, ...] | None:
    """The raw_identity of a quarantined row from the raw values the quarantine holds (JSON:
    integers as numbers, reals as {"float": repr}, text as a string or, when it is not UTF-8,
    holds NUL or the server is not UTF8, as {"base64": its bytes}); None when a column of the
    mapping is not among them (that row then excuses no source row)."""
    found = json.loads(raw_json)
    if not isinstance(found, dict) or any(c not in found for c in table.column_names):
        return None
    out: list[Any] = []
    for name in table.column_names:
        value = found[name]
        if isinstance(value, dict):
            if "float" in value:
                out.append(("f", repr(float(value["float"]))))
            else:
                out.append(("b", base64.b64decode(value.get("base64", ""))))
        elif isinstance(value, str):
            out.append(("b", value.encode("utf-8")))
        elif value is None or (isinstance(value, int) and not isinstance(value, bool)):
            out.append(None if value is None else ("i", value))
        else:
            return None
    return tuple(out)


async def source_rows(
    src: aiosqlite.Connection,
    settings: Settings,
    table: Table,
    quarantined: set[int],
    quarantined_rows: Collection[tuple[Any, ...]] = (),
) -> tuple[Counter[tuple[Any, ...]], int]:
    """The canonical source rows the target must hold (as a multiset), and how many rows are
    neither loadable nor quarantined. Quarantined rows are known by rowid, or in a WITHOUT
    ROWID table by their raw values (``quarantined_rows``, see stored_identity): not by key,
    which another row, loaded, can share once converted (an integer 1 and a text '1')."""
    read = ref.source_row_reader(table, zone=settings.naive_timezone, strip_nul=settings.strip_nul)
    rows: Counter[tuple[Any, ...]] = Counter()
    unaccounted = 0
    async with src.execute(_scan_sql(table)) as cursor:
        while page := await cursor.fetchmany(PAGE):
            for raw in page:
                if table.without_rowid:
                    if quarantined_rows and raw_identity(raw[1:]) in quarantined_rows:
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
