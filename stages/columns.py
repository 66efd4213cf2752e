"""Column-wise conversion of a batch whose values are all plain: the hot path of transform.

A batch is converted one column at a time: where a whole column passes one check made at C
speed (all text, ASCII keys of a valid length, no NUL, timestamps in the one UTC shape
isoformat() writes), its values are converted without a per-value call; any other column is
mapped through the same per-value converter the row path uses. The result is exactly what
the row path gives, or None as soon as one value would be rejected: the caller then converts
the batch row by row, which names each rejected row and its reason.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, tzinfo
from operator import attrgetter
from typing import Any

import orjson

from flux_migrate.core.schema import KEY_MAX_LENGTH, Column, Kind, Table
from flux_migrate.stages.convert import Raw, Rejected, object_keys
from flux_migrate.stages.values import any_column_converter

ColumnConverter = Callable[[Sequence[Raw]], Sequence[Any] | None]

# The timestamps the per-value fast path takes without parsing beyond fromisoformat:
# YYYY-MM-DDTHH:MM:SS, no fraction or 6 digits, then +00:00 or Z (one per line).
_UTC_SHAPE = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?(?:\+00:00|Z)"
_UTC_LINES = re.compile(rb"(?:" + _UTC_SHAPE + rb"\n)*" + _UTC_SHAPE)


def _joined(values: Sequence[Raw], sep: bytes = b"") -> bytes | None:
    """``values`` joined by ``sep`` when there are some and all are bytes (SQLite's text and
    blobs as extract reads them), else None: a NULL or a number makes the join raise, in C,
    with no type test per value (a set of the values' types cost 0.5 µs a message row)."""
    if not values:
        return None
    try:
        return sep.join(values)  # type: ignore[arg-type]
    except TypeError:
        return None


def ascii_texts(values: Sequence[Raw]) -> list[str] | None:
    """Values that are all ASCII bytes without NUL, decoded (what every text converter and
    transform.key_of make of such bytes); else None."""
    joined = _joined(values)
    if joined is None or not joined.isascii() or b"\x00" in joined:
        return None
    return list(map(bytes.decode, values))  # type: ignore[arg-type]


def _keys(values: Sequence[Raw]) -> Sequence[Any] | None:
    """ASCII keys of 1..KEY_MAX_LENGTH bytes without NUL, decoded; else None."""
    texts = ascii_texts(values)
    if texts is None:
        return None
    sizes = set(map(len, texts))
    return texts if min(sizes) >= 1 and max(sizes) <= KEY_MAX_LENGTH else None


def _texts_as_bytes(values: Sequence[Raw]) -> Sequence[Any] | None:
    """Text without NUL, passed on as its bytes (PostgreSQL validates UTF-8); else None."""
    joined = _joined(values)
    return None if joined is None or b"\x00" in joined else values


_ZONE = attrgetter("tzinfo")


def _utc_instants(values: Sequence[Raw]) -> Sequence[Any] | None:
    """Timestamps all in the UTC shape above, as aware datetimes; else None."""
    lines = _joined(values, b"\n")
    if lines is None or lines.count(b"\n") != len(values) - 1:
        return None
    if _UTC_LINES.fullmatch(lines) is None:
        return None
    try:
        found = list(map(datetime.fromisoformat, map(bytes.decode, values)))  # type: ignore[arg-type]
    except ValueError:  # the right shape, an impossible date or time
        return None
    if set(map(id, map(_ZONE, found))) != {id(UTC)}:  # what the per-value path returns as is
        return None
    return found


# What makes a JSON object column go value by value (the per-value converter decides): a NUL
# escape; an integer beyond 64 bits (orjson would read a float) or a number in exponent form
# (rewritten positionally), found as "0"*19, "0e0" or "0e+0" once every digit reads 0, E reads
# e and - reads +; a quote followed by whitespace (the key count below needs none).
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789E-", b"0000000000e+")
_ONE_BY_ONE = (b"\\u0000", b'" ', b'"\t', b'"\n', b'"\r')
_ONE_BY_ONE_NUMBERS = (b"0" * 19, b"0e0", b"0e+0")


def _json_objects(values: Sequence[Raw]) -> Sequence[Any] | None:
    """JSON object text in which every object keeps every key it writes, as its text; else
    None. Each key written ends in '":' (no whitespace before the colon, checked), and other
    '":' only raise the count, so a column's count of '":' is at least the keys its objects
    hold together, and equal only where no object lost a repeated key."""
    joined = _joined(values, b"\x00")  # NUL: inside no pattern above, nor a '{' or '":'
    if joined is None or b"" in values or any(p in joined for p in _ONE_BY_ONE):
        return None
    numbers = joined.translate(_DIGITS_AS_ZERO)
    if any(p in numbers for p in _ONE_BY_ONE_NUMBERS):
        return None
    try:
        texts = list(map(bytes.decode, values))  # type: ignore[arg-type]
        parsed = list(map(orjson.loads, values))  # type: ignore[arg-type]
    except (UnicodeDecodeError, orjson.JSONDecodeError):
        return None
    if set(map(type, parsed)) != {dict}:
        return None
    flat = joined.count(b"{") == len(values)  # one '{' each: no object holds another
    try:
        keys = sum(map(len, parsed)) if flat else sum(map(object_keys, parsed))
    except RecursionError:
        return None
    return texts if keys == joined.count(b'":') else None


def _mapped(convert: Callable[[Raw], Any]) -> ColumnConverter:
    def column(values: Sequence[Raw]) -> Sequence[Any] | None:
        try:
            return list(map(convert, values))
        except Rejected:
            return None

    return column


def _fast_check(column: Column, *, text_as_bytes: bool) -> ColumnConverter | None:
    """The C-speed check of a column's kind, if it has one."""
    if column.kind is Kind.KEY:
        return _keys
    if column.kind in (Kind.TEXT, Kind.NULLABLE_TEXT) and text_as_bytes:
        return _texts_as_bytes
    if column.kind is Kind.TIMESTAMP:
        return _utc_instants
    if column.kind is Kind.JSON:
        return _json_objects
    return None


def _column_converter(
    column: Column, *, naive_timezone: tzinfo, strip_nul: bool, text_as_bytes: bool
) -> ColumnConverter:
    """The column-wise converter of one column: a C-speed check where the kind has one, the
    per-value converter mapped otherwise (and behind each check, for the values it refuses)."""
    per_value = any_column_converter(
        column, naive_timezone=naive_timezone, strip_nul=strip_nul, text_as_bytes=text_as_bytes
    )
    mapped = _mapped(per_value)
    check = _fast_check(column, text_as_bytes=text_as_bytes)
    if check is None:
        return mapped

    def column_values(values: Sequence[Raw]) -> Sequence[Any] | None:
        found = check(values)
        return mapped(values) if found is None else found

    return column_values


@functools.lru_cache(maxsize=64)
def batch_converter(
    table: Table,
    *,
    naive_timezone: tzinfo = UTC,
    strip_nul: bool = False,
    text_as_bytes: bool = False,
) -> Callable[[list[tuple[Raw, ...]]], list[Sequence[Any]] | None]:
    """Rows read by extract (rowid first, then the table's columns, then anything more) as
    COPY-ready values, converted column by column and returned column by column (one
    sequence per table column); None when any value would be rejected. Zipped, the same
    tuples the row path (values.row_converter) gives, value for value."""
    converters = [
        _column_converter(
            c, naive_timezone=naive_timezone, strip_nul=strip_nul, text_as_bytes=text_as_bytes
        )
        for c in table.columns
    ]

    def convert(raw_rows: list[tuple[Raw, ...]]) -> list[Sequence[Any]] | None:
        if not raw_rows:
            return [[] for _ in converters]
        columns = list(zip(*raw_rows, strict=True))
        out = []
        for i, column_values in enumerate(converters):
            found = column_values(columns[i + 1])
            if found is None:
                return None
            out.append(found)
        return out

    return convert
