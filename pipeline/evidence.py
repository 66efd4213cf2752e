"""What every value of a column is, counted over the WHOLE column before anything is loaded
(the evidence core.mapping decides types on; see docs/mapping.md, "Types").

SQLite counts in C, in one scan per table: each column's storage classes, and how many of its
texts pass a cheap prefilter for an ISO-8601 date, JSON (``json_valid``) and a decimal number.
Only a column whose every text passes a prefilter is then read value by value and checked
exactly: the load's converter must accept the value, and verification's own reading
(pipeline/reference.py) must find the same meaning (the same instant to the microsecond, JSON
without a duplicate key, a plain decimal). So a promotion is decided on every value, never on
a sample, and a value that would be rounded, merged or refused keeps the column as stored.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from flux_migrate.core.discover import SourceTable
from flux_migrate.core.mapping import Evidence, needs_evidence
from flux_migrate.core.schema import quote_ident
from flux_migrate.pipeline import reference as ref
from flux_migrate.stages.convert import Rejected, has_duplicate_keys, parse_timestamp
from flux_migrate.stages.values import DECIMAL_TEXT

COLUMNS_PER_QUERY = 150  # 7 aggregates each: under SQLite's 2,000 result columns
_ISO_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*"
_PLAIN_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9][T ][0-2][0-9]:[0-5][0-9]:[0-5][0-9]*"
_NOT_DECIMAL_GLOB = "*[^0-9eE.+-]*"
_FRACTION = re.compile(rb"[T ]\d\d:\d\d:\d\d[.,](\d+)")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Instants written the way most stores write them (UTC, whole seconds or 1-6 fraction digits),
# which the load and verification read alike by construction; other shapes are compared.
_PLAIN = re.compile(rb"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|\+00:00)?")
_LONG_INTEGER = re.compile(r"\d{19}")


def _plain_instant(c: str) -> str:
    """SQL: the text in ``c`` is a real UTC date-time in the shape most stores write
    (YYYY-MM-DD[T ]HH:MM:SS, up to 6 fraction digits, then nothing, Z or +00:00), which the
    load and verification read alike by construction: checked in C, never in Python."""
    f = f"replace(replace(substr({c}, 20), '+00:00', ''), 'Z', '')"
    return (
        f"({c} GLOB '{_PLAIN_GLOB}'"
        f" AND substr({c}, 1, 4) > '0000' AND substr({c}, 12, 2) < '24'"
        f" AND date(substr({c}, 1, 10)) = substr({c}, 1, 10)"
        f" AND ({f} = '' OR (length({f}) BETWEEN 2 AND 7 AND {f} GLOB '.[0-9]*'"
        f" AND NOT substr({f}, 2) GLOB '*[^0-9]*'))"
        f" AND substr({c}, 20) IN ({f}, {f} || 'Z', {f} || '+00:00'))"
    )


def _aggregates(column: str, json_valid: bool) -> str:
    c = quote_ident(column)
    text = f"typeof({c}) = 'text'"
    json = f"{text} AND json_valid({c})" if json_valid else text
    return (
        f"count({c}), sum(typeof({c}) = 'integer'), sum(typeof({c}) = 'real'), sum({text}),"
        f" sum(typeof({c}) = 'blob'), sum({text} AND {c} GLOB '{_ISO_GLOB}'), sum({json}),"
        f" sum({text} AND {c} <> '' AND NOT {c} GLOB '{_NOT_DECIMAL_GLOB}')"
    )


AGGREGATES = 8


def _counts(conn: sqlite3.Connection, table: str, columns: list[str]) -> list[list[int]]:
    """Per column: non-NULL, integer, real, text, blob, ISO-like, JSON-like, decimal-like."""
    out: list[list[int]] = []
    for start in range(0, len(columns), COLUMNS_PER_QUERY):
        part = columns[start : start + COLUMNS_PER_QUERY]
        for json_valid in (True, False):  # an SQLite without JSON functions: no prefilter
            sql = ", ".join(_aggregates(c, json_valid) for c in part)
            try:
                row = conn.execute(f"SELECT {sql} FROM {quote_ident(table)}").fetchone()
                break
            except sqlite3.OperationalError:
                if not json_valid:
                    raise
        values = [int(v or 0) for v in row]
        out += [values[i * AGGREGATES : (i + 1) * AGGREGATES] for i in range(len(part))]
    return out


def table_evidence(conn: sqlite3.Connection, table: SourceTable) -> dict[str, Evidence]:
    """The evidence of every column of ``table`` whose type its values decide (one scan,
    plus an exact read of the texts of columns a promotion is possible for; plain UTC
    instants are checked in SQLite)."""
    pk = table.primary_key
    names = [
        c.name
        for c in table.columns
        if needs_evidence(c, in_primary_key=c.name in pk, strict=table.strict)
    ]
    found: dict[str, Evidence] = {}
    if not names:
        return found
    for name, (n, ints, reals, texts, blobs, iso, js, dec) in zip(
        names, _counts(conn, table.name, names), strict=True
    ):
        ev = Evidence(n, ints, reals, texts, blobs)
        if texts and texts in (iso, js, dec):
            only_iso = iso == texts and js < texts and dec < texts
            read = [0]
            rest = _texts(conn, table.name, name, skip_plain=only_iso, read=read)
            ev = _exact(ev, rest, iso == texts, js == texts, dec == texts)
            plain = texts - read[0]  # the texts SQLite found plain UTC instants
            if only_iso and ev.instants == read[0]:
                ev = replace(ev, instants=texts, timed_instants=ev.timed_instants + plain)
        found[name] = ev
    return found


def _texts(
    conn: sqlite3.Connection, table: str, column: str, *, skip_plain: bool, read: list[int]
) -> Iterator[bytes]:
    """The column's texts as bytes (with ``skip_plain``, those not plain UTC instants);
    ``read[0]`` counts the texts yielded."""
    c = quote_ident(column)
    where = f"typeof({c}) = 'text'" + (f" AND NOT {_plain_instant(c)}" if skip_plain else "")
    cursor = conn.execute(f"SELECT CAST({c} AS BLOB) FROM {quote_ident(table)} WHERE {where}")
    try:
        while rows := cursor.fetchmany(1000):
            for (raw,) in rows:
                read[0] += 1
                yield bytes(raw)
    finally:
        cursor.close()


def _exact(ev: Evidence, texts: Iterator[bytes], iso: bool, js: bool, dec: bool) -> Evidence:
    """``ev`` with the exact counts of ``texts``; stops reading once nothing can be unanimous."""
    instants = timed = values = containers = decimals = 0
    for raw in texts:
        if iso and (kind := lossless_instant(raw)) is not None:
            instants += 1
            timed += kind
        else:
            iso = False
        if js and (container := lossless_json(raw)) is not None:
            values += 1
            containers += container
        else:
            js = False
        if dec and DECIMAL_TEXT.fullmatch(raw) is not None:
            decimals += 1
        else:
            dec = False
        if not (iso or js or dec):
            break
    return Evidence(
        ev.count, ev.integers, ev.reals, ev.texts, ev.blobs, instants, timed, values,
        containers, decimals,
    )  # fmt: skip


def lossless_instant(raw: bytes) -> bool | None:
    """None unless the load reads ``raw`` as an instant and verification reads the same one
    to the microsecond, with no fraction digit lost; else whether it has a time of day."""
    found = _FRACTION.search(raw)
    if found is not None and found[1][6:].strip(b"0"):
        return None  # a 7th significant fraction digit: timestamptz would round it away
    try:
        value = parse_timestamp(raw, "column")
        if _PLAIN.fullmatch(raw) is None:  # the shapes both read alike by construction aside
            micros = ref.instant_micros(raw)
            if (value - _EPOCH) // timedelta(microseconds=1) != micros:
                return None
    except (Rejected, ref.Unreadable):
        return None
    return len(raw) > 10


def lossless_json(raw: bytes) -> bool | None:
    """None unless ``raw`` is JSON that jsonb keeps whole (valid for the load's parser and
    verification's, no duplicate key, no \\u0000); else whether it is an object or array."""
    try:
        text = raw.decode("utf-8")
        value: Any = orjson.loads(text)
        if _LONG_INTEGER.search(text) is not None:  # orjson reads these as floats
            value = ref.json_value(text)
    except (UnicodeDecodeError, orjson.JSONDecodeError, ref.Unreadable):
        return None
    if "\\u0000" in text or ("{" in text and has_duplicate_keys(text, value)):
        return None
    return isinstance(value, dict | list)
