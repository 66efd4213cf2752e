"""Verification's own reading of source values, independent of the load's converters.

``verify`` must not judge the load with the code that did the load: a converter that changes
a value (truncates a time, turns year 9999 into infinity, re-encodes JSON through a float)
would change the expected value the same way. This module reads the source's raw values (as
extract returns them: text as UTF-8 bytes) into a canonical form by a separate, deliberately
plain path, and reads PostgreSQL's values into the same form:

- text and keys: the UTF-8 decode of the raw bytes (NUL removed when ``strip_nul`` is set);
- instants: PostgreSQL's own text output in UTC (``2024-01-01 00:00:00.5+00``), computed from
  the source text by a small ISO-8601 parser of its own (fractions rounded to microseconds the
  way PostgreSQL rounds them, naive times in the configured zone); the target column is read
  as ``::text``, so ``infinity`` never equals a finite instant;
- JSON: ``json.loads`` with Decimal numbers (the app's metadata: NULL or empty is ``{}``);
- numbers, booleans and bytes: their exact values.

A value the reference cannot read raises :class:`Unreadable`: such a row should have been
quarantined.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any

from flux_migrate.core.schema import Column, Kind, Table, quote_ident

Reader = Callable[[Any], Any]

INSTANT_KINDS = (Kind.TIMESTAMP, Kind.INSTANT)
_MICROS_PER_DAY = 86_400_000_000
_ORDINAL_1970 = date(1970, 1, 1).toordinal()
_MIN_MICROS = (date(1, 1, 1).toordinal() - _ORDINAL_1970) * _MICROS_PER_DAY
_MAX_MICROS = (date(9999, 12, 31).toordinal() - _ORDINAL_1970 + 1) * _MICROS_PER_DAY


class Unreadable(Exception):
    """A source value verification cannot read (the row should have been quarantined)."""


# date, then optionally [T or space]HH:MM[:SS[.fraction]], then optionally Z or
# +-HH[[:]MM] or +-HH:MM:SS (an offset with seconds, like +05:30:15, as PostgreSQL reads it)
_ISO = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)"
    r"(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d+))?)?)?"
    r"(Z|[+-]\d\d(?::?\d\d|:\d\d:\d\d)?)?\Z"
)


# The shape most stores write (UTC, 0 or 6 fraction digits): PostgreSQL's text is a rewrite of
# it. An impossible date in this shape gives a text no PostgreSQL value prints, so it can only
# match nothing, as it should.
_UTC_SHAPE = re.compile(
    rb"(\d{4}-\d\d-\d\d)T((?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d)(?:\.(\d{6}))?(?:Z|\+00:00)\Z"
)


def instant_text(raw: Any, zone: tzinfo = UTC) -> str:
    """PostgreSQL's UTC text of the instant ISO-8601 source text names (raises Unreadable)."""
    if type(raw) is bytes and (found := _UTC_SHAPE.match(raw)) is not None:
        fraction = (found[3] or b"").rstrip(b"0")
        text = found[1] + b" " + found[2] + (b"." + fraction if fraction else b"") + b"+00"
        return text.decode("ascii")
    return pg_instant_text(instant_micros(raw, zone))


def _text(raw: Any, strip_nul: bool) -> str:
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Unreadable("not valid UTF-8") from None
    elif isinstance(raw, str):
        text = raw
    elif isinstance(raw, float):
        text = repr(raw)
    elif isinstance(raw, int):
        text = str(raw)
    else:
        raise Unreadable("NULL")
    if "\x00" in text:
        if not strip_nul:
            raise Unreadable("contains NUL")
        text = text.replace("\x00", "")
    return text


def _zone_offset_micros(local: datetime, zone: tzinfo) -> int:
    offset = local.replace(tzinfo=zone).utcoffset()
    if offset is None:
        return 0
    return offset // timedelta(microseconds=1)


def instant_micros(raw: Any, zone: tzinfo = UTC) -> int:
    """Microseconds since 1970-01-01 UTC of ISO-8601 source text; naive text is in ``zone``."""
    if not isinstance(raw, bytes | str):
        raise Unreadable("not ISO-8601 text")
    text = _text(raw, False)
    found = _ISO.match(text)
    if found is None:
        raise Unreadable("not ISO-8601 text")
    year, month, day, hour, minute, second, fraction, offset = found.groups()
    try:
        ordinal = date(int(year), int(month), int(day)).toordinal()
    except ValueError:
        raise Unreadable("not a calendar date") from None
    h, m, s = int(hour or 0), int(minute or 0), int(second or 0)
    if m > 59 or s > 59 or h > 24 or (h == 24 and (m or s or fraction)):
        raise Unreadable("not a time of day")  # 24:00:00 is midnight ending the day
    # PostgreSQL: rint(strtod("0.<digits>") * 1e6), a double, ties to even (round() too).
    micros = round(float("0." + fraction) * 1_000_000) if fraction else 0
    local = (ordinal - _ORDINAL_1970) * _MICROS_PER_DAY + ((h * 60 + m) * 60 + s) * 1_000_000
    local += micros
    if offset is None:
        wall = datetime.fromordinal(ordinal) + timedelta(hours=h, minutes=m, seconds=s)
        shift = _zone_offset_micros(wall, zone)
    elif offset == "Z":
        shift = 0
    else:
        digits = offset[1:].replace(":", "")
        seconds = (int(digits[:2]) * 60 + int(digits[2:4] or 0)) * 60 + int(digits[4:] or 0)
        shift = seconds * 1_000_000
        shift = -shift if offset[0] == "-" else shift
    utc = local - shift
    if not _MIN_MICROS <= utc < _MAX_MICROS:
        raise Unreadable("outside years 1-9999 in UTC")
    return utc


def pg_instant_text(micros: int) -> str:
    """The text PostgreSQL prints for a timestamptz at ``micros`` (TimeZone UTC, DateStyle ISO)."""
    days, rest = divmod(micros, _MICROS_PER_DAY)
    day = date.fromordinal(days + _ORDINAL_1970)
    seconds, fraction = divmod(rest, 1_000_000)
    minutes, s = divmod(seconds, 60)
    h, m = divmod(minutes, 60)
    out = f"{day.year:04d}-{day.month:02d}-{day.day:02d} {h:02d}:{m:02d}:{s:02d}"
    if fraction:
        out += f".{fraction:06d}".rstrip("0")
    return out + "+00"


def _epoch_micros(raw: int | float, unit: str) -> int:
    if unit == "julian":  # days since noon of 4714-11-24 BC (proleptic Gregorian), UTC
        if isinstance(raw, float) and raw != raw or raw in (float("inf"), float("-inf")):
            raise Unreadable("not a finite number")
        micros = round((Decimal(raw) - Decimal(2440587) - Decimal("0.5")) * _MICROS_PER_DAY)
        if not _MIN_MICROS <= micros < _MAX_MICROS:
            raise Unreadable("outside years 1-9999 in UTC")
        return micros
    scale = 1000 if unit == "ms" else 1_000_000
    if isinstance(raw, int):
        return raw * scale
    return round(Decimal(raw) * scale)  # the double's exact value, to the microsecond


def unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (jsonb would keep only the last): the
    ``object_pairs_hook`` of verify's JSON readings (SQLite values and JSONL lines alike)."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("duplicate key")
    return found


def _json(text: str) -> Any:
    try:
        return json.loads(
            text,
            parse_float=Decimal,
            parse_int=Decimal,
            parse_constant=refuse_constant,
            object_pairs_hook=unique_object,
        )
    except RecursionError:
        raise Unreadable("JSON nested too deeply") from None
    except ValueError:
        raise Unreadable("not valid JSON") from None


def refuse_constant(name: str) -> Any:
    """The ``parse_constant`` of verify's JSON readings: NaN and Infinity are not JSON."""
    raise ValueError(name)


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def json_value(text: str, strip_nul: bool = False) -> Any:
    """JSON text as Python values with exact Decimal numbers; NUL in strings refused (or
    removed with ``strip_nul``)."""
    value = _json(text)
    if "\\u0000" in text:
        if strip_nul:
            return _without_nul(value)
        if _has_nul(value):
            raise Unreadable("JSON holds \\u0000")
    return value


def source_reader(column: Column, *, zone: tzinfo = UTC, strip_nul: bool = False) -> Reader:
    """The canonical form of one raw source value of ``column`` (raises Unreadable)."""
    kind, nullable = column.kind, column.nullable and column.kind is not Kind.KEY

    def read(raw: Any) -> Any:
        if raw is None:
            if kind is Kind.JSON:
                return {}
            if column.null_as is not None:  # the app reads NULL and this value alike
                return column.null_as
            if nullable:
                return None
            raise Unreadable("NULL in a required column")
        if kind is Kind.KEY:
            text = _text(raw, strip_nul)
            if not text:
                raise Unreadable("empty key")
            return text
        if kind in (Kind.TEXT, Kind.NULLABLE_TEXT):
            return _text(raw, strip_nul)
        if kind in INSTANT_KINDS:
            if isinstance(raw, int | float) and column.epoch is not None:
                return pg_instant_text(_epoch_micros(raw, column.epoch))
            return instant_text(raw, zone)
        if kind is Kind.JSON:
            if raw in (b"", ""):
                return {}
            value = json_value(_text(raw, False), strip_nul)
            if not isinstance(value, dict):
                raise Unreadable("metadata is not a JSON object")
            return value
        if kind is Kind.JSON_VALUE:
            return json_value(_text(raw, False))
        return _scalar(kind, raw)

    return read


_TRUE, _FALSE = {"1", "true", "t", "yes"}, {"0", "false", "f", "no"}
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def _scalar(kind: Kind, raw: Any) -> Any:
    """INTEGER, REAL, NUMERIC, BOOLEAN and BLOB values, exactly as the source holds them."""
    if kind is Kind.INTEGER and type(raw) is int:
        return raw
    if kind is Kind.REAL and type(raw) is float:
        return raw
    if kind is Kind.REAL and type(raw) is int:
        if abs(raw) < 2**1023 and float(raw) == raw:
            return float(raw)
        raise Unreadable("an integer a double cannot hold exactly")
    if kind is Kind.NUMERIC:
        text = repr(raw) if type(raw) is float else _text(raw, False)
        if _PLAIN_NUMBER.fullmatch(text) is None:
            raise Unreadable("not a plain decimal number")  # ' 7 ', '1_000', 'NaN', 'inf'
        try:
            return Decimal(text)
        except InvalidOperation:
            raise Unreadable("not a number") from None
    if kind is Kind.BOOLEAN:
        if type(raw) is int and raw in (0, 1):
            return bool(raw)
        if isinstance(raw, bytes):
            word = raw.decode("utf-8", "replace").strip().lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
    if kind is Kind.BLOB and isinstance(raw, bytes):
        return raw
    raise Unreadable(f"a {type(raw).__name__} value does not fit {kind.value}")


def source_row_reader(
    table: Table, *, zone: tzinfo = UTC, strip_nul: bool = False
) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """The canonical form of one raw source row in target column order (raises Unreadable)."""
    readers = [source_reader(c, zone=zone, strip_nul=strip_nul) for c in table.columns]

    def read(values: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(r(v) for r, v in zip(readers, values, strict=True))

    return read


def target_select(table: Table) -> str:
    """The select list reading a target row in the canonical form's raw shape (instants and
    JSON as PostgreSQL's text; the connection must use TimeZone UTC and DateStyle ISO)."""
    parts = []
    for col in table.columns:
        name = quote_ident(col.name)
        if col.kind in INSTANT_KINDS or col.kind in (Kind.JSON, Kind.JSON_VALUE):
            parts.append(f"{name}::text AS {name}")
        else:
            parts.append(name)
    return ", ".join(parts)


SESSION_SETTINGS = (
    "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3;"
    " SET standard_conforming_strings = on"  # its SQL writes '\\x00' for a byte
)


def target_value(kind: Kind, value: Any) -> Any:
    """The canonical form of one value read through :func:`target_select`."""
    if value is None:
        return None
    if kind in (Kind.JSON, Kind.JSON_VALUE):
        return json.loads(value, parse_float=Decimal, parse_int=Decimal)
    return value


def target_row(table: Table, values: Any) -> tuple[Any, ...]:
    """The canonical form of one target row read through :func:`target_select`."""
    return tuple(target_value(c.kind, v) for c, v in zip(table.columns, values, strict=True))
