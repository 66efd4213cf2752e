"""The canonical text of a row that `verify --quick` hashes, built the same way on both sides.

A row's canonical form is its compared values joined by NUL (which no compared value holds):
keys and text as UTF-8, a nullable value as ``T`` + text or ``N`` for NULL, an instant as
Python's ``isoformat()`` of it in UTC (``2024-01-01T00:00:00.5+00:00`` with 0 or 6 fraction
digits), an integer in decimal. The table's checksum is a sum over the rows' hashes
(verify_hash): order-independent, and computed in C on both sides (PostgreSQL: one aggregate;
SQLite: the hash over rows whose canonical values SQLite's own SQL yields). Metadata (JSON)
and the kinds below that SQL cannot render exactly are left to the full `verify`; a row SQL
cannot render (a value of another storage class, another instant shape, NUL in text) is
rendered by verification's own reference reader (pipeline/reference.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, tzinfo
from typing import Any

from flux_migrate.core.schema import Column, Kind, Table, quote_ident
from flux_migrate.pipeline import reference as ref
from flux_migrate.pipeline import verify_hash

TEXT_KINDS = (Kind.KEY, Kind.TEXT, Kind.NULLABLE_TEXT)
# The kinds a table may have for the quick's canonical form (JSON of the app's tables aside).
CANON_KINDS = (*TEXT_KINDS, Kind.TIMESTAMP, Kind.INSTANT, Kind.INTEGER)

# Instants already in the canonical shape (ASCII digits, no 24:00, no all-zero fraction): the
# readers pass them through, checked in Python at C speed (one regex over a page's column;
# as GLOBs in SQLite it cost the readers 0.7 µs a row). A loaded instant has a valid date and
# time, so its digits are PostgreSQL's. Another script's digits ("٢٠٢٤", which the reference
# reader reads as 2024, the load quarantines) fail the shape: the reference renders such a row.
_ISO_BYTES = rb"\d{4}-\d\d-\d\dT(?:[01]\d|2[0-3]):\d\d:\d\d(?:\+00:00|\.(?!000000)\d{6}\+00:00)"
# PostgreSQL's rendering of the same (the connection uses TimeZone UTC, see SESSION_SETTINGS):
# one to_char, 6 fraction digits, none when they are all zero. 0.4 s per million rows where
# to_char twice and date_part took 0.55-0.96 s; PostgreSQL's own ``::text`` costs less, but
# SQLite rebuilding this text in its shape cost 0.8 s, on the readers, which set the pace.
_PG_ISO = "replace(to_char({c}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), '.000000+', '+')"


def compared(table: Table) -> tuple[Column, ...]:
    """The columns the canonical form compares, in its order: every one but the app's
    metadata, text last. PostgreSQL copies what it has joined at each join: the app's long
    content joined last is copied once, not three times (the quick's aggregate over 1M
    messages: 1.70 s against 2.08 s)."""
    kept = [c for c in table.columns if c.kind is not Kind.JSON]
    return tuple(sorted(kept, key=lambda c: c.kind in (Kind.TEXT, Kind.NULLABLE_TEXT)))


def key_column(table: Table) -> str:
    """The column the quick names rows by (skipped, quarantined, held before): a one-column
    primary key, else the first column (the app's tables: id)."""
    return table.primary_key[0] if len(table.primary_key) == 1 else table.column_names[0]


def keyed_by_text(table: Table) -> bool:
    """Whether the quick can set a quarantined row's previous version aside by its key's text
    (a one-column key of text or integers), or need not (verify sets previous versions aside
    only under a one-column key)."""
    if len(table.primary_key) != 1:
        return True
    kinds = {c.name: c.kind for c in table.columns}
    return kinds.get(table.primary_key[0]) in (*TEXT_KINDS, Kind.INTEGER)


def fast(table: Table) -> bool:
    """Whether the quick's canonical form covers the table (else it keeps the full path)."""
    if table.generic and table.without_rowid:
        return False
    return all(c.kind in CANON_KINDS and c.epoch is None for c in compared(table))


def _plain(col: Column) -> bool:
    """Whether the canonical value is the value itself (NULL impossible or another row)."""
    return not col.nullable or col.kind is Kind.KEY or col.null_as is not None


def source_field_sql(col: Column) -> str:
    """SQLite's expression for one canonical value; NULL (or a number) when SQL cannot render
    it exactly: the reference reader then renders the row. An instant's text is not checked
    here: the caller checks its shape with instant_checks."""
    c = quote_ident(col.name)
    if col.kind in TEXT_KINDS:
        return _text_sql(col, c)
    if col.kind is Kind.INTEGER:
        value = f"CASE WHEN typeof({c}) = 'integer' THEN CAST({c} AS TEXT) END"
    else:
        value = f"CASE WHEN typeof({c}) = 'text' THEN {c} END"
    if _plain(col):
        return value
    return f"CASE WHEN {c} IS NULL THEN 'N' ELSE 'T' || {value} END"


def _text_sql(col: Column, c: str) -> str:
    """Text as stored: a number comes back as a number, which the reader refuses to join (the
    reference renders the row); text and blobs as their bytes, which the reference's UTF-8
    decode gives back (or, not UTF-8, no target value has). A key must not be empty."""
    if not _plain(col):
        kinds = "('text', 'integer')"  # a float or blob turned text by SQLite would differ
        return f"CASE WHEN {c} IS NULL THEN 'N' WHEN typeof({c}) IN {kinds} THEN 'T' || {c} END"
    return f"CASE WHEN length({c}) THEN {c} END" if col.kind is Kind.KEY else c


def source_select(table: Table, *, with_key: bool) -> str:
    """Row id, (the raw key,) then each canonical value, over a row id range (?, ?); the
    instants' shape is left to instant_checks."""
    fields = ", ".join(source_field_sql(c) for c in compared(table))
    key = f"{quote_ident(key_column(table))}, " if with_key else ""
    rowid = table.rowid_sql()
    return (
        f"SELECT {rowid}, {key}{fields} FROM {quote_ident(table.name)}"
        f" WHERE {rowid} BETWEEN ? AND ?"
    )


@dataclass(frozen=True)
class InstantCheck:
    """The canonical shape of one instant column's values, where source_select puts them in a
    row: ``one`` for a value, ``lines`` for a page's values joined by newlines (a nullable
    column's value is N, or T and the instant)."""

    at: int
    one: re.Pattern[bytes]
    lines: re.Pattern[bytes]


def instant_checks(table: Table, *, first: int) -> tuple[InstantCheck, ...]:
    """The checks of the instant columns in a row of source_select whose canonical values
    start at index ``first``: a value passes when it is text in the canonical shape
    (_ISO_BYTES), nothing before or after it."""
    checks = []
    for i, col in enumerate(compared(table)):
        if col.kind not in ref.INSTANT_KINDS:
            continue
        line = _ISO_BYTES if _plain(col) else rb"N|T" + _ISO_BYTES
        lines = rb"(?:(?:" + line + rb")\n)*(?:" + line + rb")"
        checks.append(InstantCheck(first + i, re.compile(line), re.compile(lines)))
    return tuple(checks)


def raw_select(table: Table) -> str:
    """One source row's raw values by row id, for the reference reader."""
    cols = ", ".join(quote_ident(c) for c in table.column_names)
    return f"SELECT {cols} FROM {quote_ident(table.name)} WHERE {table.rowid_sql()} = ?"


def iso_instant(pg_text: str) -> str:
    """The canonical form of an instant the reference printed as PostgreSQL does (UTC)."""
    day, rest = pg_text[:10], pg_text[11:-3]
    clock, _, fraction = rest.partition(".")
    return f"{day}T{clock}" + (f".{fraction.ljust(6, '0')}" if fraction else "") + "+00:00"


def reference_canon(
    table: Table, *, zone: tzinfo = UTC, strip_nul: bool = False
) -> Callable[[tuple[Any, ...]], bytes]:
    """The canonical form of a raw source row (all columns) through the reference reader
    (raises reference.Unreadable)."""
    read = ref.source_row_reader(table, zone=zone, strip_nul=strip_nul)
    cols = compared(table)
    at = [table.column_names.index(c.name) for c in cols]

    def canon(raw: tuple[Any, ...]) -> bytes:
        values = read(raw)
        return b"\x00".join(_field(c, values[i]) for c, i in zip(cols, at, strict=True))

    return canon


def _field(col: Column, value: Any) -> bytes:
    if value is None:
        return b"N"
    text = iso_instant(value) if col.kind in ref.INSTANT_KINDS else str(value)
    out = text.encode("utf-8")
    return out if _plain(col) else b"T" + out


def target_field_sql(col: Column) -> str:
    """PostgreSQL's bytes of one canonical value (textsend: UTF-8, the client encoding)."""
    c = quote_ident(col.name)
    if col.kind in TEXT_KINDS:
        value = f"textsend({c}::text)"
    elif col.kind is Kind.INTEGER:
        value = f"textsend(trim_scale({c}::numeric)::text)"
    else:
        value = f"textsend({_PG_ISO.format(c=c)})"
    if _plain(col):
        return value
    return f"coalesce('\\x54'::bytea || {value}, '\\x4e'::bytea)"


def target_checksum_sql(table: Table, qualified: str, kind: str, *, only_keys: bool = False) -> str:
    """Count and checksum parts (verify_hash) of the target table; rows whose key is in $1
    left out, and with ``only_keys`` only the rows whose key is in $2."""
    joined = " || '\\x00'::bytea || ".join(target_field_sql(c) for c in compared(table))
    key = quote_ident(key_column(table))
    where = f" WHERE NOT ({key}::text = ANY($1::text[]))"
    if only_keys:
        where += f" AND {key}::text = ANY($2::text[])"
    return verify_hash.target_sql(kind, joined, qualified, where)
