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
from typing import Any

from flux_migrate.core.schema import KEY_MAX_LENGTH, Column, Kind, Table
from flux_migrate.stages.convert import Raw, Rejected
from flux_migrate.stages.values import any_column_converter

ColumnConverter = Callable[[Sequence[Raw]], Sequence[Any] | None]

# The timestamps the per-value fast path takes without parsing beyond fromisoformat:
# YYYY-MM-DDTHH:MM:SS, no fraction or 6 digits, then +00:00 or Z (one per line).
_UTC_SHAPE = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?(?:\+00:00|Z)"
_UTC_LINES = re.compile(rb"(?:" + _UTC_SHAPE + rb"\n)*" + _UTC_SHAPE)


def _all_bytes(values: Sequence[Raw]) -> bool:
    return set(map(type, values)) == {bytes}


def _keys(values: Sequence[Raw]) -> Sequence[Any] | None:
    """ASCII keys of 1..KEY_MAX_LENGTH bytes without NUL, decoded; else None."""
    if not _all_bytes(values):
        return None
    sizes = set(map(len, values))  # type: ignore[arg-type]
    if min(sizes) < 1 or max(sizes) > KEY_MAX_LENGTH:
        return None
    joined = b"".join(values)  # type: ignore[arg-type]
    if not joined.isascii() or b"\x00" in joined:
        return None
    return list(map(bytes.decode, values))  # type: ignore[arg-type]


def _texts_as_bytes(values: Sequence[Raw]) -> Sequence[Any] | None:
    """Text without NUL, passed on as its bytes (PostgreSQL validates UTF-8); else None."""
    if not _all_bytes(values) or b"\x00" in b"".join(values):  # type: ignore[arg-type]
        return None
    return values


def _utc_instants(values: Sequence[Raw]) -> Sequence[Any] | None:
    """Timestamps all in the UTC shape above, as aware datetimes; else None."""
    if not _all_bytes(values):
        return None
    lines = b"\n".join(values)  # type: ignore[arg-type]
    if lines.count(b"\n") != len(values) - 1 or _UTC_LINES.fullmatch(lines) is None:
        return None
    try:
        found = list(map(datetime.fromisoformat, map(bytes.decode, values)))  # type: ignore[arg-type]
    except ValueError:  # the right shape, an impossible date or time
        return None
    if set(map(_zone_id, found)) != {id(UTC)}:  # what the per-value path returns as is
        return None
    return found


def _zone_id(value: datetime) -> int:
    return id(value.tzinfo)


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
) -> Callable[[list[tuple[Raw, ...]]], list[tuple[Any, ...]] | None]:
    """Rows read by extract (rowid first, then the table's columns, then anything more) as
    COPY-ready tuples, converted column by column; None when any value would be rejected.
    The same tuples the row path (values.row_converter) gives, value for value."""
    converters = [
        _column_converter(
            c, naive_timezone=naive_timezone, strip_nul=strip_nul, text_as_bytes=text_as_bytes
        )
        for c in table.columns
    ]

    def convert(raw_rows: list[tuple[Raw, ...]]) -> list[tuple[Any, ...]] | None:
        if not raw_rows:
            return []
        columns = list(zip(*raw_rows, strict=True))
        out = []
        for i, column_values in enumerate(converters):
            found = column_values(columns[i + 1])
            if found is None:
                return None
            out.append(found)
        return list(zip(*out, strict=True))

    return convert
