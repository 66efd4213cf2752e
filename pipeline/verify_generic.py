"""Verify a table outside the app profile: the multiset of its rows in the source (under the
mapping, quarantined rows aside) equals the multiset in PostgreSQL, compared value by value in
the canonical form of each column's type (pipeline/reference.py: verification's own reading of
the source, not the load's converters); rows without a key are compared as wholes."""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import aiosqlite
import asyncpg

from flux_migrate.core.catalog import table_exists
from flux_migrate.core.schema import Kind, Table, quote_ident
from flux_migrate.pipeline import reference as ref
from flux_migrate.pipeline.settings import Settings

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


def canonical_text(row: tuple[Any, ...]) -> str:
    """A canonical row as text that is the same exactly when the rows are equal as the full
    verify compares them (Python's ``==``: 10, 10.0 and Decimal('1E+1') are one number; an
    instant is one whatever its offset): what ``verify --quick`` hashes."""
    return repr(_canonical(row))


def _canonical(value: Any) -> Any:
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float | Decimal):
        return ("num", _exact(Decimal(value)))  # Decimal of a float is exact
    offset = value.utcoffset() if isinstance(value, datetime) else None
    if offset is not None:  # microseconds since 0001-01-01 UTC: no overflow at either end
        return ("instant", (value.replace(tzinfo=None) - _YEAR_ONE + -offset) // _MICRO)
    if isinstance(value, tuple):
        return tuple(_canonical(v) for v in value)
    return value


_YEAR_ONE = datetime(1, 1, 1)
_MICRO = timedelta(microseconds=1)


def _exact(number: Decimal) -> str:
    """A number's exact value as digits and exponent, trailing zeros dropped (no rounding to
    a context's precision, as ``normalize`` would)."""
    if not number.is_finite():
        return "NaN" if number.is_nan() else ("-inf" if number < 0 else "inf")
    if number.is_zero():
        return "0"
    sign, digits, exponent = number.as_tuple()
    text = "".join(map(str, digits)).rstrip("0")
    exponent = int(exponent) + len(digits) - len(text)
    return f"{'-' if sign else ''}{text}e{exponent}"


def _row(table: Table, values: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(
        frozen(v) if c.kind in (Kind.JSON, Kind.JSON_VALUE) else v
        for c, v in zip(table.columns, values, strict=True)
    )


def _scan_sql(table: Table) -> str:
    """Every source row (its rowid first, NULL in a WITHOUT ROWID table), in one
    plain scan: no keyset, no bound, nothing shared with extract's paging, so a row the load
    never read (at any rowid) is still seen here."""
    cols = ", ".join(f"t.{quote_ident(c)}" for c in table.column_names)
    scan = f"{cols} FROM {quote_ident(table.name)} AS t"
    if not table.without_rowid:
        return f"SELECT {table.rowid_sql('t')}, {scan}"
    keys = ", ".join(f"t.{quote_ident(c)}" for c in table.primary_key)
    return f"SELECT NULL, {scan} ORDER BY {keys}"  # in key order: the load's positions


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
    quarantined_rows: Collection[tuple[int, tuple[Any, ...]]] = (),
) -> tuple[Counter[tuple[Any, ...]], int]:
    """The canonical source rows the target must hold (as a multiset), and how many rows are
    neither loadable nor quarantined. Quarantined rows are known by rowid; in a WITHOUT ROWID
    table by the position the load read them at and their raw values (``quarantined_rows``,
    see stored_identity), not by key, which a loaded row can share once converted (an
    integer 1 and a text '1')."""
    read = ref.source_row_reader(table, zone=settings.naive_timezone, strip_nul=settings.strip_nul)
    rows: Counter[tuple[Any, ...]] = Counter()
    unaccounted = 0
    aside = _Aside(quarantined_rows)

    def add(raw: Sequence[Any]) -> None:
        nonlocal unaccounted
        try:
            rows[_row(table, read(tuple(raw[1:])))] += 1
        except ref.Unreadable:
            unaccounted += 1

    async with src.execute(_scan_sql(table)) as cursor:
        while page := await cursor.fetchmany(PAGE):
            for raw in page:
                if table.without_rowid:
                    if aside.takes(raw):
                        continue
                elif raw[0] in quarantined:
                    continue
                add(raw)
    for rest in aside.left():
        add(rest)
    return rows, unaccounted


class _Aside:
    """Sets a WITHOUT ROWID table's quarantined rows aside during a scan in key order: a row
    at the position a quarantined row with its raw values was read at; the other rows with
    those values (positions move when rows are inserted before them) wait to the end, where
    the last of them make up the quarantined rows still unmatched."""

    def __init__(self, quarantined: Collection[tuple[int, tuple[Any, ...]]]) -> None:
        self.at = set(quarantined)  # a row quarantined again by a rerun counts once
        self.open = Counter(row for _, row in self.at)
        self.waiting: dict[tuple[Any, ...], list[Sequence[Any]]] = {}
        self.position = 0

    def takes(self, raw: Sequence[Any]) -> bool:
        """Whether the next row of the scan is set aside (quarantined) or kept to decide later."""
        self.position += 1
        if not self.open:
            return False
        row = raw_identity(raw[1:])
        if self.open[row] <= 0:
            return False
        if (self.position, row) in self.at:
            self.open[row] -= 1
            return True
        self.waiting.setdefault(row, []).append(raw)
        return True

    def left(self) -> list[Sequence[Any]]:
        """The waiting rows that are not quarantined after all."""
        out: list[Sequence[Any]] = []
        for row, raws in self.waiting.items():
            out += raws[: max(0, len(raws) - self.open[row])]
        return out


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
