"""Pure converters from the app's SQLite values to PostgreSQL-ready Python values.

No I/O here. Every converter either returns a value or raises :class:`Rejected` with a stable
reason code (see :data:`REASONS`) and a one-sentence detail; nothing else escapes.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any

import orjson

from flux_migrate.core.schema import KEY_MAX_LENGTH, Column, Kind

# Stable reason codes, documented in the README. Never rename one; add new ones at the end.
REASONS: dict[str, str] = {
    "invalid_utf8": "a text value is not valid UTF-8",
    "nul_character": "a text value contains a NUL character, which PostgreSQL refuses",
    "null_value": "a required value is NULL",
    "missing_key": "the primary key is NULL or empty",
    "key_too_long": f"a key is longer than {KEY_MAX_LENGTH} characters",
    "invalid_timestamp": "a timestamp is empty or not ISO-8601 text, or names an impossible date",
    "timestamp_out_of_range": "a timestamp cannot be represented once converted to UTC",
    "invalid_json": "metadata is not valid JSON (NaN and Infinity included)",
    "json_not_object": "metadata is valid JSON but not an object",
    "json_nul_character": "metadata contains \\u0000, which PostgreSQL jsonb refuses",
    "json_too_deep": "metadata is nested too deeply to parse",
    "json_duplicate_key": "a JSON object holds a key twice, and jsonb would keep only one",
    "orphan_message": "the message's session does not exist in the source or was quarantined",
    "rejected_by_server": "PostgreSQL refused the row when loading it",
    "type_mismatch": "a value's SQLite storage class or JSON type does not fit its column",
    "number_out_of_range": "a number cannot be stored exactly in its column's type",
    "duplicate_key": "the key, once converted, equals the key of an earlier source row",
    "orphan_row": "a foreign key names a parent row absent from the source or quarantined",
    "invalid_json_line": "a line of a JSONL file is not valid JSON (NaN and Infinity included)",
    "not_an_object": "a line of a JSONL file is valid JSON but not an object",
    "unusable_key_name": "a JSONL key cannot be a column name (empty, with NUL, over 63 bytes,"
    " or a PostgreSQL system column: xmin, xmax, cmin, cmax, ctid, tableoid)",
    "line_too_long": "a line of a JSONL file is longer than flux-migrate loads (see the docs)",
    "gone_from_file": "a JSONL snapshot's row deleted as gone from the rewritten file (kept here"
    " as it was, resolved)",
}


class Rejected(Exception):
    """A value that cannot be loaded: a reason code from REASONS and a one-sentence detail."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


Raw = bytes | str | int | float | None


def decode_text(raw: Raw, column: str, *, strip_nul: bool = False) -> str | None:
    """Decode a raw SQLite text value to str (None stays None); refuse bad UTF-8 and NUL."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        text = _decode_utf8(raw, column)
    elif isinstance(raw, str):
        text = raw
        if _has_surrogate(text):
            raise Rejected("invalid_utf8", f"column {column} holds a lone surrogate")
    else:
        text = str(raw)
    if "\x00" in text:
        if not strip_nul:
            raise Rejected("nul_character", f"column {column} contains a NUL character")
        text = text.replace("\x00", "")
    return text


def _decode_utf8(raw: bytes, column: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(
            "invalid_utf8", f"column {column} is not valid UTF-8 at byte {exc.start}"
        ) from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def convert_key(raw: Raw, column: str, *, strip_nul: bool = False) -> str:
    text = decode_text(raw, column, strip_nul=strip_nul)
    if text is None or text == "":
        if column == "id":
            raise Rejected("missing_key", f"column {column} is NULL or empty")
        raise Rejected("null_value", f"column {column} is NULL or empty")
    if len(text) > KEY_MAX_LENGTH:
        raise Rejected(
            "key_too_long",
            f"column {column} has {len(text)} characters, more than {KEY_MAX_LENGTH}",
        )
    return text


def convert_required_text(raw: Raw, column: str, *, strip_nul: bool = False) -> str:
    text = decode_text(raw, column, strip_nul=strip_nul)
    if text is None:
        raise Rejected("null_value", f"column {column} is NULL")
    return text


# An ISO-8601 date in extended format (YYYY-MM-DD), then optionally a time with at least hours
# and minutes; group 1 is the fraction of a second. PostgreSQL refuses an hour alone ("T05").
# What may follow the time: nothing, Z, or an offset both Python and PostgreSQL read alike
# (+HH, +HHMM, +HH:MM, +HH:MM:SS).
_OFFSET = re.compile(r"(?:Z|[+-]\d\d(?::?\d\d|:\d\d:\d\d)?)?")
_ISO_SHAPE = re.compile(r"\d{4}-\d\d-\d\d(?:\Z|[T ]\d\d:\d\d(?::\d\d(?:[.,](\d+))?)?(?!\d))")


def parse_timestamp(
    raw: Raw, column: str = "timestamp", *, naive_timezone: tzinfo = UTC
) -> datetime:
    """Parse ISO-8601 text into an aware UTC datetime; naive values are taken in
    ``naive_timezone``.

    Accepted: what both Python and PostgreSQL read as the same instant. A number (SQLite
    INTEGER or REAL, e.g. ``20240101``) and an hour without minutes are refused; more than six
    fraction digits are rounded to the microsecond the way PostgreSQL rounds them (so
    ``9999-12-31T23:59:59.9999999`` becomes year 10000 and is out of range).
    """
    if isinstance(raw, int | float):
        raise Rejected("invalid_timestamp", f"column {column} is a number, not ISO-8601 text")
    text = decode_text(raw, column)
    if text is None or text.strip() == "":
        raise Rejected("invalid_timestamp", f"column {column} is NULL or empty")
    shape = _ISO_SHAPE.match(text)
    if shape is None:
        raise Rejected("invalid_timestamp", f"column {column} is not an ISO-8601 timestamp")
    if _OFFSET.fullmatch(text, shape.end()) is None:
        # e.g. +053015 or +05:30:15.5: Python reads them, PostgreSQL does not (or otherwise)
        raise Rejected("invalid_timestamp", f"column {column} has an offset PostgreSQL cannot read")
    fraction = shape.group(1)
    extra = 0
    if fraction is not None and len(fraction) > 6:
        # PostgreSQL: rint(strtod("0.<digits>") * 1e6), ties to even; Python cuts to 6 digits.
        extra = round(float("0." + fraction) * 1_000_000)
        text = text[: shape.start(1)] + "0" + text[shape.end(1) :]
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise Rejected(
            "invalid_timestamp", f"column {column} is not an ISO-8601 timestamp"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=naive_timezone)
    try:
        return value.astimezone(UTC) + timedelta(microseconds=extra)
    except (OverflowError, ValueError):
        raise Rejected(
            "timestamp_out_of_range", f"column {column} falls outside years 1-9999 in UTC"
        ) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


_LONG_INTEGER = re.compile(r"\d{19}")


def _loads_strict(text: str, column: str) -> Any:
    """Parse JSON, refusing NaN and Infinity; orjson first, the stdlib where orjson is narrower."""
    if _LONG_INTEGER.search(text) is None:  # orjson turns integers beyond 64 bits into floats
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    # The stdlib takes valid JSON that orjson refuses (numbers beyond a double, deep nesting).
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise Rejected("json_too_deep", f"column {column} is nested too deeply to parse") from None
    except ValueError:
        raise Rejected("invalid_json", f"column {column} is not valid JSON") from None


def _contains_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _contains_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_contains_nul(v) for v in value)
    return False


# A real \u0000 escape in JSON text: preceded by an even number of backslashes (``\\u0000`` is
# an escaped backslash followed by the letters u0000, not a NUL).
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


# Every JSON string token in order (none can start inside another: outside strings JSON has no
# '"'), and whether a ':' follows it, i.e. whether it is an object key.
_STRING_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"(\s*:)?')


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _DuplicateKey
    return found


# The end of an object key: a closing quote, whitespace, a colon (any whitespace, not only
# JSON's four: a parser more lenient than JSON can then only raise the count).
_KEY_END = re.compile(r'"\s*:')
# The same in UTF-8 bytes (a JSONL line): no byte of another character is a quote, a colon or
# ASCII whitespace, so the matches are the same.
_KEY_END_BYTES = re.compile(rb'"\s*:')
_UNPARSED: Any = object()


def object_keys(value: Any) -> int:
    """How many keys the objects of a parsed JSON value hold together."""
    if isinstance(value, dict):
        inner = [v for v in value.values() if isinstance(v, dict | list)]
        return len(value) + sum(object_keys(v) for v in inner)
    if isinstance(value, list):
        return sum(object_keys(v) for v in value if isinstance(v, dict | list))
    return 0


def no_key_lost(text: str | bytes, value: Any) -> bool:
    """True when ``value``, parsed from the valid JSON ``text`` (or its UTF-8 bytes), kept
    every key the text writes. Each key's closing quote starts one _KEY_END match, and a match
    never swallows another quote; any other match (a quote inside a string, escaped or
    opening, followed by ':') only raises the count. So equal counts mean no object dropped a
    repeated key."""
    if value is _UNPARSED:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            return False
    try:
        # An object whose text has one '{' holds no other object: its keys are all.
        if isinstance(text, bytes):
            flat = type(value) is dict and text.count(b"{") == 1
            ends = _key_ends_in_bytes(text)
        else:
            flat = type(value) is dict and text.count("{") == 1
            ends = len(_KEY_END.findall(text))
        return ends == (len(value) if flat else object_keys(value))
    except RecursionError:
        return False


def _key_ends_in_bytes(line: bytes) -> int:
    """_KEY_END_BYTES's matches in valid JSON bytes; where no quote is followed by JSON's
    whitespace (the usual writing), each match is a quote and a colon, counted in C. (The
    other whitespace the pattern takes cannot follow a quote in valid JSON: raw, it is
    refused inside a string and between tokens alike.)"""
    if b'" ' in line or b'"\t' in line or b'"\r' in line or b'"\n' in line:
        return len(_KEY_END_BYTES.findall(line))
    return line.count(b'":')


def has_duplicate_keys(text: str, value: Any = _UNPARSED) -> bool:
    """Whether valid JSON text holds an object with the same key twice (jsonb keeps only the
    last). Exact. ``value`` is the text already parsed, when the caller has it. Counting keys
    clears almost every text; where the count differs, the key names are compared, and where
    one repeats or is escaped the text is parsed again, key by key."""
    if no_key_lost(text, value):
        return False
    keys = [m[1] for m in _STRING_TOKEN.finditer(text) if m[2]]
    if len(set(keys)) == len(keys) and not any("\\" in k for k in keys):
        return False
    try:
        json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey:
        return True
    except (ValueError, RecursionError):
        return False  # the caller judged validity with its own parser
    return False


def _parse_object(raw: Raw, column: str, strip_nul: bool) -> tuple[dict[str, Any], str]:
    """Parse JSON object text; return the dict and the text to load.

    With ``strip_nul``, ``\\u0000`` escapes are removed from the text itself before it is
    parsed, so every other character (numbers beyond a double, their digits) stays as written.
    """
    if raw is None or raw == b"" or raw == "":
        return {}, "{}"
    if isinstance(raw, bytes):
        text = _decode_utf8(raw, column)
    elif isinstance(raw, str):
        text = raw
    else:
        raise Rejected("json_not_object", f"column {column} is a number, not a JSON object")
    if strip_nul and "\\u0000" in text:
        text = _NUL_ESCAPE.sub(r"\1", text)
    value = _loads_strict(text, column)
    if not isinstance(value, dict):
        raise Rejected("json_not_object", f"column {column} is JSON but not an object")
    if "\\u0000" in text:
        try:
            if _contains_nul(value):
                raise Rejected("json_nul_character", f"column {column} contains \\u0000")
        except RecursionError:
            raise Rejected(
                "json_too_deep", f"column {column} is nested too deeply to parse"
            ) from None
    if has_duplicate_keys(text, value):
        raise Rejected("json_duplicate_key", f"column {column} holds an object with a key twice")
    return value, text


def parse_json_object(
    raw: Raw, column: str = "metadata", *, strip_nul: bool = False
) -> dict[str, Any]:
    """Parse metadata text into a dict: NULL or empty is {}; anything but an object is rejected."""
    return _parse_object(raw, column, strip_nul)[0]


def json_object_text(raw: Raw, column: str = "metadata", *, strip_nul: bool = False) -> str:
    """Validate metadata like :func:`parse_json_object` and return JSON text for jsonb.

    The validated source text is passed on as written (PostgreSQL normalizes jsonb itself), so
    numbers beyond a double keep every digit, except that floats in exponent form are written
    out positionally (:func:`positional_floats`) so that they read back as floats.
    """
    return positional_floats(_parse_object(raw, column, strip_nul)[1])


# A JSON string (skipped as is) or a number in exponent form (rewritten).
_STRING_OR_EXPONENT = re.compile(r'"(?:[^"\\]|\\.)*"|-?(?:0|[1-9]\d*)(?:\.\d+)?[eE][+-]?\d+')
_EXPONENT_HINT = re.compile(r"\d[eE][+-]?\d")
_MAX_POSITIONAL_EXPONENT = 400  # beyond this a double is 0 or infinite anyway


def _positional(match: re.Match[str]) -> str:
    token = match.group(0)
    if token.startswith('"'):
        return token
    value = float(token)
    if math.isinf(value):
        return token  # beyond a double: jsonb keeps the exact number (read as an int)
    exact = Decimal(token)
    if abs(exact.adjusted()) > _MAX_POSITIONAL_EXPONENT:
        exact = Decimal(repr(value))
    text = format(exact, "f")
    return text if "." in text else text + ".0"


def positional_floats(text: str) -> str:
    """JSON text with every number in exponent form written positionally with a fraction.

    PostgreSQL's jsonb prints ``1e16`` as ``10000000000000000``, which any JSON reader takes
    for an int; ``10000000000000000.0`` keeps its scale in jsonb and reads back as the same
    float. Strings and every other number are left as written.
    """
    if _EXPONENT_HINT.search(text) is None:
        return text
    return _STRING_OR_EXPONENT.sub(_positional, text)


Converter = Callable[[Raw], Any]

# The UTC shapes isoformat() writes, by length: the fast path of the timestamp converter.
_FAST_UTC_SUFFIX = {32: b"+00:00", 25: b"+00:00", 27: b"Z", 20: b"Z"}


def _text_converter(column: Column, *, strip_nul: bool, text_as_bytes: bool) -> Converter:
    """The converter of a text column (see :func:`column_converter`); a NULL loads as
    ``column.null_as`` when the column has one."""
    name, nullable, null_as = column.name, column.kind is Kind.NULLABLE_TEXT, column.null_as

    def text(raw: Raw) -> Any:
        if type(raw) is bytes and b"\x00" not in raw and (text_as_bytes or raw.isascii()):
            return raw if text_as_bytes else raw.decode("ascii")
        if raw is None and null_as is not None:
            return null_as
        if nullable:
            return decode_text(raw, name, strip_nul=strip_nul)
        return convert_required_text(raw, name, strip_nul=strip_nul)

    return text


def column_converter(
    column: Column,
    *,
    naive_timezone: tzinfo = UTC,
    strip_nul: bool = False,
    text_as_bytes: bool = False,
) -> Converter:
    """The converter for one column of the target schema.

    Each has a fast path for the common case (ASCII keys and timestamps in UTC, text without
    NUL, empty metadata) and otherwise defers to the full converter, which decides the value or
    the reason it is rejected. With ``text_as_bytes``, text columns read as bytes are passed on
    as bytes after the NUL check, unvalidated: PostgreSQL validates UTF-8 on COPY, and the load
    stage re-converts a refused batch without this option to name the bad rows.
    """
    name = column.name
    kind = column.kind
    fromiso = datetime.fromisoformat

    if kind is Kind.KEY:

        def key(raw: Raw) -> Any:
            if (
                type(raw) is bytes
                and 0 < len(raw) <= KEY_MAX_LENGTH
                and raw.isascii()
                and b"\x00" not in raw
            ):
                return raw.decode("ascii")
            return convert_key(raw, name, strip_nul=strip_nul)

        return key
    if kind is Kind.TEXT or kind is Kind.NULLABLE_TEXT:
        return _text_converter(column, strip_nul=strip_nul, text_as_bytes=text_as_bytes)
    if kind is Kind.TIMESTAMP:

        def timestamp(raw: Raw) -> Any:
            # Fast path: YYYY-MM-DDTHH:MM:SS with 0 or 6 fraction digits, then +00:00 or Z.
            if (
                type(raw) is bytes
                and raw.endswith(_FAST_UTC_SUFFIX.get(len(raw), b"-"))
                and raw[13:14] == raw[16:17] == b":"
            ):
                try:
                    value = fromiso(raw.decode("ascii"))
                except (ValueError, UnicodeDecodeError):
                    pass
                else:
                    if value.tzinfo is UTC:
                        return value
            return parse_timestamp(raw, name, naive_timezone=naive_timezone)

        return timestamp
    if kind is Kind.JSON:

        def metadata(raw: Raw) -> Any:
            if raw == b"{}":
                return "{}"
            return json_object_text(raw, name, strip_nul=strip_nul)

        return metadata
    raise AssertionError(kind)


def raw_to_json(raw_row: tuple[Raw, ...], columns: tuple[str, ...]) -> dict[str, Any]:
    """Encode raw source values losslessly for the quarantine's jsonb column.

    Valid UTF-8 text without NUL is a JSON string; anything else is {"base64": ...} of its exact
    bytes; integers are numbers, floats {"float": repr}; NULL is null.
    """
    out: dict[str, Any] = {}
    for name, value in zip(columns, raw_row, strict=True):
        out[name] = raw_value_to_json(value)
    return out


def raw_value_to_json(value: Raw) -> Any:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
    else:
        raise TypeError(f"not a SQLite value: {type(value).__name__}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}
    if "\x00" in text:
        return {"base64": base64.b64encode(data).decode("ascii")}
    return text


def raw_value_from_json(value: Any) -> Raw:
    """Inverse of :func:`raw_value_to_json` (text comes back as bytes, as extract reads it)."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if "float" in value:
        return float(value["float"])
    return base64.b64decode(value["base64"])
