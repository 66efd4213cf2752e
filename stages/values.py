"""Pure converters for the SQLite types of any table (the app's own columns are in convert.py).

SQLite types are hints: a REAL column can hold 'n/a', an INTEGER column text. Each converter
takes one raw value as extract reads it (text as UTF-8 bytes, BLOB as bytes, int, float, None)
and returns the value for COPY, or raises Rejected with a reason code; it never coerces a value
into something else silently.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any

import orjson

from flux_migrate.core.schema import Column, Kind, Table
from flux_migrate.stages.convert import (
    Raw,
    Rejected,
    column_converter,
    decode_text,
    has_duplicate_keys,
    parse_timestamp,
)

Converter = Callable[[Raw], Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A number written as plain decimal text, exactly what NUMERIC loads from text.
DECIMAL_TEXT = re.compile(rb"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_FLOAT_EXACT = 2**53


def _kind_of(raw: Raw) -> str:
    if isinstance(raw, bytes):
        return "text or blob"
    return type(raw).__name__


def _mismatch(column: str, raw: Raw, wanted: str) -> Rejected:
    return Rejected(
        "type_mismatch", f"column {column} holds a {_kind_of(raw)} value where {wanted} belongs"
    )


def integer(column: str) -> Converter:
    """INTEGER -> bigint: SQLite integers only (a REAL or text value is not an integer)."""

    def convert(raw: Raw) -> Any:
        if raw is None or (type(raw) is int):
            return raw
        raise _mismatch(column, raw, "an integer")

    return convert


def real(column: str) -> Converter:
    """REAL -> double precision: floats, and integers a double holds exactly."""

    def convert(raw: Raw) -> Any:
        if raw is None or type(raw) is float:
            return raw
        if type(raw) is int:
            if abs(raw) <= _FLOAT_EXACT or float(raw) == raw:
                return float(raw)
            raise Rejected(
                "number_out_of_range",
                f"column {column} holds the integer {raw}, which a double cannot hold exactly",
            )
        raise _mismatch(column, raw, "a number")

    return convert


def numeric(column: str) -> Converter:
    """NUMERIC/DECIMAL -> numeric: integers exactly, floats by their shortest exact repr."""

    def convert(raw: Raw) -> Any:
        if raw is None:
            return None
        if type(raw) is int:
            return Decimal(raw)
        if type(raw) is float:
            if not math.isfinite(raw):
                raise Rejected("number_out_of_range", f"column {column} holds {raw!r}")
            return Decimal(repr(raw))
        if isinstance(raw, bytes):
            # NUMERIC affinity keeps text only when it is not a number; a decimal text SQLite
            # kept (more digits than a double) is still a number: take it exactly. Only a
            # plain decimal: no spaces, no '_' (Decimal reads '1_000' as 1000), no NaN.
            if DECIMAL_TEXT.fullmatch(raw) is None:
                raise _mismatch(column, raw, "a number")
            return Decimal(raw.decode("ascii"))
        raise _mismatch(column, raw, "a number")

    return convert


_TRUE = {b"1", b"true", b"t", b"yes"}
_FALSE = {b"0", b"false", b"f", b"no"}


def boolean(column: str) -> Converter:
    """BOOLEAN -> boolean: 0/1, and the texts true/false (t/f, yes/no), in any case."""

    def convert(raw: Raw) -> Any:
        if raw is None:
            return None
        if type(raw) is int and raw in (0, 1):
            return bool(raw)
        if isinstance(raw, bytes):
            word = raw.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
        raise _mismatch(column, raw, "a boolean (0/1, true/false)")

    return convert


def blob(column: str) -> Converter:
    """BLOB -> bytea: the bytes as stored (a text value's UTF-8 bytes)."""

    def convert(raw: Raw) -> Any:
        if raw is None or isinstance(raw, bytes):
            return raw
        raise _mismatch(column, raw, "bytes")

    return convert


def text(column: str, *, strip_nul: bool = False) -> Converter:
    """TEXT -> text: valid UTF-8 without NUL; numbers an untyped column holds become their
    exact decimal text (repr for floats, which round-trips)."""

    def convert(raw: Raw) -> Any:
        if type(raw) is float:
            return repr(raw)
        return decode_text(raw, column, strip_nul=strip_nul)

    return convert


_JULIAN_1970 = Decimal("2440587.5")  # the julian day of 1970-01-01T00:00:00Z
_MICROS_PER_DAY = 86_400_000_000


def epoch_instant(value: int | float, unit: str, column: str) -> datetime:
    """Seconds or milliseconds since 1970-01-01 UTC, or julian days (``unit`` "julian": the
    exact value of the number, to the microsecond), as an aware datetime."""
    try:
        if unit == "julian":
            if not math.isfinite(value):
                raise OverflowError
            micros = round((Decimal(value) - _JULIAN_1970) * _MICROS_PER_DAY)
            return _EPOCH + timedelta(microseconds=micros)
        if type(value) is int:
            micros = value * (1000 if unit == "ms" else 1_000_000)
            return _EPOCH + timedelta(microseconds=micros)
        return _EPOCH + timedelta(seconds=value / (1000 if unit == "ms" else 1))
    except (OverflowError, ValueError):
        raise Rejected(
            "timestamp_out_of_range", f"column {column} holds {value!r}, beyond years 1-9999"
        ) from None


def timestamp(column: str, *, naive_timezone: tzinfo = UTC, epoch: str | None = None) -> Converter:
    """DATE/DATETIME/TIMESTAMP -> timestamptz: ISO-8601 text, and where the mapping says the
    column holds epoch numbers (``epoch`` = 's' or 'ms'), integers and reals in that unit."""

    def convert(raw: Raw) -> Any:
        if raw is None:
            return None
        if type(raw) in (int, float):
            if epoch is None:
                raise _mismatch(column, raw, "ISO-8601 text")
            return epoch_instant(raw, epoch, column)  # type: ignore[arg-type]
        return parse_timestamp(raw, column, naive_timezone=naive_timezone)

    return convert


def json_value(column: str) -> Converter:
    """JSON -> jsonb: any JSON text (object, array or scalar), sent as the source's own text."""

    def convert(raw: Raw) -> Any:
        if raw is None:
            return None
        source = decode_text(raw, column)
        assert source is not None
        try:
            value = orjson.loads(source)
        except orjson.JSONDecodeError:
            raise Rejected("invalid_json", f"column {column} is not valid JSON") from None
        if "\\u0000" in source:
            raise Rejected("json_nul_character", f"column {column} contains \\u0000")
        if "{" in source and has_duplicate_keys(source, value):
            raise Rejected(
                "json_duplicate_key",
                f"column {column} holds an object with a key twice; jsonb would keep one",
            )
        return source

    return convert


def not_null(convert: Converter, column: str) -> Converter:
    """Refuse NULL (the column is NOT NULL in the target)."""

    def checked(raw: Raw) -> Any:
        value = convert(raw)
        if value is None:
            raise Rejected("null_value", f"column {column} is NULL")
        return value

    return checked


def any_column_converter(
    column: Column,
    *,
    naive_timezone: tzinfo = UTC,
    strip_nul: bool = False,
    text_as_bytes: bool = False,
) -> Converter:
    """The converter for a column of any table: the app's kinds as convert.column_converter
    builds them, the generic kinds from this module (NOT NULL ones refuse NULL)."""
    name, kind = column.name, column.kind
    build: dict[Kind, Callable[[], Converter]] = {
        Kind.INTEGER: lambda: integer(name),
        Kind.REAL: lambda: real(name),
        Kind.NUMERIC: lambda: numeric(name),
        Kind.BOOLEAN: lambda: boolean(name),
        Kind.BLOB: lambda: blob(name),
        Kind.INSTANT: lambda: timestamp(name, naive_timezone=naive_timezone, epoch=column.epoch),
        Kind.JSON_VALUE: lambda: json_value(name),
    }
    if kind not in build:
        if column.kind in (Kind.TEXT, Kind.NULLABLE_TEXT) and column.not_null is not None:
            # a generic text column: its nullability is the mapping's, not the kind's
            kind = Kind.NULLABLE_TEXT if column.nullable else Kind.TEXT
            column = Column(name, kind)
        return column_converter(
            column, naive_timezone=naive_timezone, strip_nul=strip_nul, text_as_bytes=text_as_bytes
        )
    convert = build[kind]()
    return not_null(convert, name) if not column.nullable else convert


@functools.lru_cache(maxsize=64)
def row_converter(
    table: Table,
    *,
    naive_timezone: tzinfo = UTC,
    strip_nul: bool = False,
    text_as_bytes: bool = False,
    offset: int = 0,
) -> Callable[[tuple[Raw, ...]], tuple[Any, ...]]:
    """A function turning one raw source row into a COPY-ready tuple in target column order.

    The row's values for the table's columns start at position ``offset`` (1 when the rowid
    comes first). The function is unrolled per column: this runs once per source row. Built
    once per set of arguments (cached): every batch of a table shares it.
    """
    converters = {
        f"c{i}": any_column_converter(
            c, naive_timezone=naive_timezone, strip_nul=strip_nul, text_as_bytes=text_as_bytes
        )
        for i, c in enumerate(table.columns)
    }
    calls = ", ".join(f"c{i}(raw[{i + offset}])" for i in range(len(converters)))
    # Generated from column positions only (no user input): a tuple of direct calls.
    convert: Callable[[tuple[Raw, ...]], tuple[Any, ...]] = eval(
        f"lambda raw: ({calls},)", converters
    )
    return convert
