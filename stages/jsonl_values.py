"""JSONL values, pure: a line parsed into a record, the kind a key's values call for, and the
converters from a JSON value to the COPY value of a column (or Rejected with a reason code).

Numbers keep the file's digits where the column can hold them: a record whose numbers a
binary float cannot carry exactly into its column (jsonb, numeric, a double that underflows)
is parsed again with decimals (:func:`parse_exact`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from datetime import UTC, tzinfo
from decimal import Decimal
from typing import Any

import orjson

from flux_migrate.core.jsonl_schema import JSONL_PG_TYPES
from flux_migrate.core.schema import NAME_MAX_BYTES, Column, Kind
from flux_migrate.stages.convert import (
    Rejected,
    decode_text,
    has_duplicate_keys,
    no_key_lost,
    parse_timestamp,
)

_INT64 = 2**63
_FLOAT_EXACT = 2**53
# PostgreSQL's system columns: a key of one of these names cannot be a column.
SYSTEM_COLUMNS = frozenset({"tableoid", "xmin", "cmin", "xmax", "cmax", "ctid"})
_LONG_INTEGER = re.compile(rb"\d{19}")
# \u0000 in JSON text, unless its backslash is itself escaped (an even run of backslashes before).
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

# ---------------------------------------------------------------- parsing a line


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_utf8", f"the line is not valid UTF-8 at byte {exc.start}") from None


def _loads_exact(text: str, *, exact: bool) -> Any:
    try:
        if exact:
            return json.loads(text, parse_constant=_reject_constant, parse_float=Decimal)
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise Rejected("json_too_deep", "the line is nested too deeply to parse") from None
    except ValueError:
        raise Rejected("invalid_json_line", "the line is not valid JSON") from None


def parse_line(line: bytes) -> dict[str, Any]:
    """One JSONL line as a record, or Rejected: not UTF-8, not JSON, not an object, or a key
    that cannot be a column name."""
    value: Any
    try:
        if _LONG_INTEGER.search(line) is not None:  # orjson turns big integers into floats
            raise orjson.JSONDecodeError("long integer", "", 0)
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        value = _loads_exact(_decode(line), exact=False)
    return _record(line, value)


def parse_exact(line: bytes) -> dict[str, Any]:
    """The line as :func:`parse_line` reads it, but every non-integer number a Decimal with the
    file's digits."""
    return _record(line, _loads_exact(_decode(line), exact=True))


def _record(line: bytes, value: Any) -> dict[str, Any]:
    """``value``, parsed from ``line``, when it is a usable record (an object whose keys can be
    columns, none twice); an object rejected whole keeps its id (RejectedLine) where it has
    one."""
    try:
        return _unique_keys(line, _checked(value))
    except Rejected as exc:
        if not isinstance(value, dict):
            raise
        record = _record_id(line.decode("utf-8"))
        raise RejectedLine(exc.reason, exc.detail, record=record) from None


def _unique_keys(line: bytes, value: dict[str, Any]) -> dict[str, Any]:
    """``value``, parsed from ``line``, unless an object of the line holds a key twice: the
    parser kept only the last, and so would jsonb (Rejected json_duplicate_key, as for a
    SQLite JSON column). Counting key ends clears almost every line without decoding it."""
    if no_key_lost(line, value) or not has_duplicate_keys(line.decode("utf-8"), value):
        return value
    raise Rejected(
        "json_duplicate_key",
        "an object in the line holds a key twice; the table (and jsonb) would keep only one",
    )


class RejectedLine(Rejected):
    """A line rejected whole whose record's id is known (``record``: {"id": value}, else None):
    the quarantine keeps the id, and a reconcile knows the record is still in the file."""

    def __init__(self, reason: str, detail: str, *, record: dict[str, Any] | None) -> None:
        super().__init__(reason, detail)
        self.record = record


def _pairs(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return pairs


def _record_id(text: str) -> dict[str, Any] | None:
    """The line's id, when its object names ``id`` exactly once (a repeated id has none)."""
    try:
        top = json.loads(text, object_pairs_hook=_pairs)
    except (ValueError, RecursionError):
        return None
    ids = [v for k, v in top if k == "id"] if isinstance(top, list) else []
    return {"id": ids[0]} if len(ids) == 1 and not isinstance(ids[0], list) else None


def _checked(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Rejected("not_an_object", f"the line is a JSON {_json_type(value)}, not an object")
    for key in value:
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise Rejected("invalid_utf8", "a key holds a lone surrogate") from None
        if size == 0 or size > NAME_MAX_BYTES or "\x00" in key:
            raise Rejected(
                "unusable_key_name",
                f"the key {key[:70]!r} cannot be a column name (empty, NUL, over 63 bytes)",
            )
        if key in SYSTEM_COLUMNS:
            raise Rejected(
                "unusable_key_name",
                f"the key {key!r} is the name of a PostgreSQL system column; rename it in the file",
            )
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float | Decimal):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def has_float(value: Any) -> bool:
    """Whether a parsed JSON value holds a non-integer number anywhere."""
    if type(value) is float:
        return True
    if isinstance(value, dict):
        return any(has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(has_float(v) for v in value)
    return False


def needs_exact(kind: Kind, value: Any) -> bool:
    """Whether a value parsed with binary floats may have lost digits its column keeps (jsonb,
    numeric) or hide an underflow (a double that reads 0.0)."""
    if kind is Kind.JSON_VALUE or kind is Kind.NUMERIC:
        return has_float(value)
    return kind is Kind.REAL and type(value) is float and value == 0.0


# ---------------------------------------------------------------- typing the values

_INSTANT_SHAPE = re.compile(
    r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(?::\d\d(?:[.,]\d+)?)?(?:Z|[+-]\d\d(?::?\d\d)?)?\Z"
)


def _is_instant(value: str) -> bool:
    if _INSTANT_SHAPE.match(value) is None:
        return False
    try:
        parse_timestamp(value, "value")
    except Rejected:
        return False
    return True


def infer_kind(values: Iterable[Any]) -> Kind:
    """The kind for a key from its non-null values: booleans, integers (bigint), numbers
    (double), ISO timestamps (timestamptz, naive = UTC), text; nested or mixed values jsonb."""
    present = [v for v in values if v is not None]
    types = {type(v) for v in present}
    if not present or types == {str}:
        if present and all(_is_instant(v) for v in present):
            return Kind.INSTANT
        return Kind.NULLABLE_TEXT
    if types == {bool}:
        return Kind.BOOLEAN
    if types == {int}:
        return Kind.INTEGER if all(-_INT64 <= v < _INT64 for v in present) else Kind.NUMERIC
    if types <= {int, float}:
        return Kind.REAL
    return Kind.JSON_VALUE


def inferred_column(name: str, values: Iterable[Any]) -> Column:
    """The column for a key: ``id`` is always text; any other key typed from its values."""
    if name == "id":
        return Column(name, Kind.NULLABLE_TEXT, type="text", note="ids are always text")
    kind = infer_kind(values)
    note = "typed from its values in the lines starting where it is first non-null"
    return Column(name, kind, type=JSONL_PG_TYPES[kind], note=note)


# ---------------------------------------------------------------- converters

Converter = Callable[[Any], Any]


def _mismatch(column: str, value: Any, wanted: str) -> Rejected:
    return Rejected(
        "type_mismatch", f"column {column} holds a JSON {_json_type(value)} where {wanted} belongs"
    )


def _to_text(name: str, _tz: tzinfo) -> Converter:
    def convert(value: Any) -> Any:
        if value is None or type(value) is str:
            return decode_text(value, name)
        if name == "id" and type(value) is int:  # ids are text: 7 and "7" are the same id
            return str(value)
        raise _mismatch(name, value, "text")

    return convert


def _to_integer(name: str, _tz: tzinfo) -> Converter:
    def convert(value: Any) -> Any:
        if value is None:
            return None
        if type(value) is not int:
            raise _mismatch(name, value, "an integer")
        if not -_INT64 <= value < _INT64:
            raise Rejected("number_out_of_range", f"column {name} holds {value}, beyond bigint")
        return value

    return convert


def _to_real(name: str, _tz: tzinfo) -> Converter:
    def convert(value: Any) -> Any:
        if value is None:
            return None
        kind = type(value)
        if kind is int and abs(value) > _FLOAT_EXACT and float(value) != value:
            raise Rejected("number_out_of_range", f"column {name} holds {value}, beyond a double")
        if kind is not int and kind is not float and kind is not Decimal:
            raise _mismatch(name, value, "a number")
        number = float(value)
        if not math.isfinite(number) or (number == 0.0 and value != 0):
            raise Rejected("number_out_of_range", f"column {name} holds {value}, beyond a double")
        return number

    return convert


def _to_numeric(name: str, _tz: tzinfo) -> Converter:
    def convert(value: Any) -> Any:
        if value is None:
            return None
        if type(value) is int or type(value) is Decimal:
            return Decimal(value)
        if type(value) is float and math.isfinite(value):
            return Decimal(repr(value))
        raise _mismatch(name, value, "a number")

    return convert


def _to_boolean(name: str, _tz: tzinfo) -> Converter:
    def convert(value: Any) -> Any:
        if value is None or type(value) is bool:
            return value
        raise _mismatch(name, value, "a boolean")

    return convert


def _to_instant(name: str, tz: tzinfo) -> Converter:
    def convert(value: Any) -> Any:
        if value is None:
            return None
        if type(value) is not str:
            raise _mismatch(name, value, "an ISO-8601 timestamp")
        return parse_timestamp(value, name, naive_timezone=tz)

    return convert


def _to_jsonb(name: str, _tz: tzinfo) -> Converter:
    def convert(value: Any) -> Any:
        return None if value is None else json_text(value, name)

    return convert


_CONVERTERS: dict[Kind, Callable[[str, tzinfo], Converter]] = {
    Kind.TEXT: _to_text,
    Kind.NULLABLE_TEXT: _to_text,
    Kind.KEY: _to_text,
    Kind.INTEGER: _to_integer,
    Kind.REAL: _to_real,
    Kind.NUMERIC: _to_numeric,
    Kind.BOOLEAN: _to_boolean,
    Kind.INSTANT: _to_instant,
    Kind.JSON_VALUE: _to_jsonb,
}


def json_converter(column: Column, *, naive_timezone: tzinfo = UTC) -> Converter:
    """The converter from a parsed JSON value to the COPY value of ``column`` (None stays None,
    except in a NOT NULL column); raises Rejected, never coerces."""
    name = column.name
    convert = _CONVERTERS[column.kind](name, naive_timezone)
    if column.nullable:
        return convert

    def required(value: Any) -> Any:
        if value is None or value == "":
            raise Rejected(
                "missing_key" if name == "id" else "null_value", f"column {name} is null or empty"
            )
        return convert(value)

    return required


def _fragment(value: Any) -> Any:
    if isinstance(value, Decimal) and value.is_finite():
        return orjson.Fragment(str(value))
    raise TypeError


def json_text(value: Any, column: str) -> str:
    """A JSON value as text for jsonb, numbers with their digits (Decimal as parsed, integers of
    any size); refuses what jsonb refuses (\\u0000, NaN, lone surrogates)."""
    try:
        text = orjson.dumps(value, default=_fragment).decode("utf-8")
    except TypeError:  # integers beyond 64 bits, lone surrogates
        text = _dumps_slow(value, column)
    if _JSON_NUL.search(text) is not None:
        raise Rejected("json_nul_character", f"column {column} contains \\u0000")
    return text


def _dumps_slow(value: Any, column: str) -> str:
    parts: list[str] = []
    try:
        _encode(value, parts)
        text = "".join(parts)
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected("invalid_utf8", f"column {column} holds a lone surrogate") from None
    except ValueError:
        raise Rejected("number_out_of_range", f"column {column} holds NaN or Infinity") from None
    return text


def _encode(value: Any, out: list[str]) -> None:
    """JSON text of a parsed value, numbers written from their exact value (json.dumps cannot
    write a Decimal as a number)."""
    if isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            out.append(("," if i else "") + json.dumps(key, ensure_ascii=False) + ":")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            out.append("," if i else "")
            _encode(item, out)
        out.append("]")
    elif isinstance(value, Decimal) or type(value) is float:
        if not math.isfinite(value):
            raise ValueError(value)
        out.append(str(value) if isinstance(value, Decimal) else repr(value))
    else:  # str, int, bool, None
        out.append(json.dumps(value, ensure_ascii=False))
