"""Extract and convert a JSON Lines file: complete lines from a byte offset, in batches.

Each batch holds only complete lines (a last line without its newline is not consumed: the app
may still be writing it) and carries the byte offset after its last line and a fingerprint of
every byte before that offset (sha256), which the load commits as the checkpoint. Each raw row
is ``(offset, line bytes)``. Converting is pure: a line becomes a COPY-ready tuple in the
table's column order, or a reject with a stable reason code; keys not yet columns become new
columns typed from the batch's values.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, tzinfo
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import orjson

from flux_migrate.core.errors import SourceError
from flux_migrate.core.jsonl_schema import JSONL_PG_TYPES
from flux_migrate.core.schema import NAME_MAX_BYTES, Column, Kind, Table
from flux_migrate.stages.batch import Batch, Reject
from flux_migrate.stages.convert import Rejected, decode_text, parse_timestamp

MAX_BATCH_BYTES = 16 * 1024 * 1024  # a batch also ends after this many bytes of lines
_READ_CHUNK = 1024 * 1024
_INT64 = 2**63
_FLOAT_EXACT = 2**53


# ---------------------------------------------------------------- reading


def fingerprint_prefix(path: Path, upto: int) -> tuple[Any, int]:
    """A sha256 of the first ``upto`` bytes of ``path`` (streamed, bounded memory), and how many
    bytes there were (fewer than ``upto`` when the file is now shorter)."""
    digest = hashlib.sha256()
    seen = 0
    with path.open("rb") as f:
        while seen < upto:
            chunk = f.read(min(_READ_CHUNK, upto - seen))
            if not chunk:
                break
            digest.update(chunk)
            seen += len(chunk)
    return digest, seen


def count_lines(path: Path, start: int, end: int) -> int:
    """How many newlines the bytes ``start``..``end`` of ``path`` hold (for progress)."""
    count = 0
    with path.open("rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(_READ_CHUNK, left))
            if not chunk:
                break
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count


def read_complete_lines(
    path: Path, offset: int, *, limit: int, max_lines: int, max_bytes: int = MAX_BATCH_BYTES
) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The bytes of up to ``max_lines`` complete lines starting at ``offset`` and ending at or
    before ``limit``, and those lines as ``(offset, bytes without the newline)``; lines holding
    only whitespace are not records and are left out of the list (their bytes count)."""
    if offset >= limit:
        return b"", []
    buf = bytearray()
    newlines = 0
    with path.open("rb") as f:
        f.seek(offset)
        while newlines < max_lines and len(buf) < max_bytes and offset + len(buf) < limit:
            chunk = f.read(min(_READ_CHUNK, limit - offset - len(buf)))
            if not chunk:
                break
            newlines += chunk.count(b"\n")
            buf += chunk
    end = 0
    lines: list[tuple[int, bytes]] = []
    count = 0
    while count < max_lines:
        nl = buf.find(b"\n", end)
        if nl < 0:
            break
        line = bytes(buf[end:nl])
        if line.strip():
            lines.append((offset + end, line))
        count += 1
        end = nl + 1
        if end >= max_bytes:
            break
    return bytes(buf[:end]), lines


async def extract_jsonl(
    path: Path,
    table: str,
    *,
    after_offset: int,
    digest: Any,
    limit: int,
    batch_size: int,
) -> AsyncGenerator[Batch, None]:
    """Yield the complete lines between ``after_offset`` and ``limit`` in batches of at most
    ``batch_size`` lines; ``digest`` is the sha256 of the bytes before ``after_offset`` and is
    advanced with every batch (``last_key`` is its hex digest at the batch's end).

    The file is opened, read and closed for each batch in a worker thread; nothing is held open
    across a yield, so cancellation or close leaves nothing behind. Stops early when the file
    became shorter than the offset reached (rewritten during the run: the next run reconciles).
    """
    seq = 0
    offset = after_offset
    while offset < limit:
        try:
            span, lines = await anyio.to_thread.run_sync(
                functools.partial(
                    read_complete_lines, path, offset, limit=limit, max_lines=batch_size
                )
            )
        except OSError as exc:
            raise SourceError(f"The JSONL file {path} cannot be read ({exc.strerror}).") from None
        if not span:
            return
        digest.update(span)
        seq += 1
        after, offset = offset, offset + len(span)
        yield Batch(
            table=table,
            seq=seq,
            after_rowid=after,
            last_rowid=offset,
            extracted=len(lines),
            last_key=digest.hexdigest(),
            raw=lines,
        )


def file_size(path: Path) -> int:
    """The size of the JSONL file; SourceError when it is missing or not a file."""
    if path.is_dir():
        raise SourceError(f"{path} is a directory, not a JSONL file; check --jsonl.")
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise SourceError(f"The JSONL file {path} does not exist; check --jsonl.") from None


# ---------------------------------------------------------------- parsing a line

_LONG_INTEGER = re.compile(rb"\d{19}")


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def parse_line(line: bytes) -> dict[str, Any]:
    """One JSONL line as a record, or Rejected: not UTF-8, not JSON, not an object, or a key
    that cannot be a column name."""
    value: Any
    try:
        if _LONG_INTEGER.search(line) is not None:  # orjson turns big integers into floats
            raise orjson.JSONDecodeError("long integer", "", 0)
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Rejected(
                "invalid_utf8", f"the line is not valid UTF-8 at byte {exc.start}"
            ) from None
        try:
            value = json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            raise Rejected("json_too_deep", "the line is nested too deeply to parse") from None
        except ValueError:
            raise Rejected("invalid_json_line", "the line is not valid JSON") from None
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
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


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
    """The kind for a key from its values: booleans, integers (bigint), numbers (double), ISO
    timestamps (timestamptz, naive = UTC), text; nested or mixed values (and only nulls) jsonb."""
    present = [v for v in values if v is not None]
    if not present:
        return Kind.JSON_VALUE
    types = {type(v) for v in present}
    if types == {bool}:
        return Kind.BOOLEAN
    if types == {int}:
        return Kind.INTEGER if all(-_INT64 <= v < _INT64 for v in present) else Kind.NUMERIC
    if types <= {int, float}:
        return Kind.REAL
    if types == {str}:
        return Kind.INSTANT if all(_is_instant(v) for v in present) else Kind.NULLABLE_TEXT
    return Kind.JSON_VALUE


def inferred_column(name: str, values: Iterable[Any]) -> Column:
    kind = infer_kind(values)
    note = "typed from the values of the first batch holding it"
    return Column(name, kind, type=JSONL_PG_TYPES[kind], note=note)


# ---------------------------------------------------------------- converters

Converter = Callable[[Any], Any]


def _mismatch(column: str, value: Any, wanted: str) -> Rejected:
    return Rejected(
        "type_mismatch", f"column {column} holds a JSON {_json_type(value)} where {wanted} belongs"
    )


def json_converter(column: Column, *, naive_timezone: tzinfo = UTC) -> Converter:
    """The converter from a parsed JSON value to the COPY value of ``column`` (None stays None,
    except in a NOT NULL column); raises Rejected, never coerces."""
    name = column.name
    kind = column.kind
    convert: Converter
    if kind in (Kind.TEXT, Kind.NULLABLE_TEXT, Kind.KEY):

        def convert(value: Any) -> Any:
            if value is None or type(value) is str:
                return decode_text(value, name)
            raise _mismatch(name, value, "text")

    elif kind is Kind.INTEGER:

        def convert(value: Any) -> Any:
            if value is None:
                return None
            if type(value) is not int:
                raise _mismatch(name, value, "an integer")
            if not -_INT64 <= value < _INT64:
                raise Rejected("number_out_of_range", f"column {name} holds {value}, beyond bigint")
            return value

    elif kind is Kind.REAL:

        def convert(value: Any) -> Any:
            if value is None:
                return None
            if type(value) is int:
                if abs(value) <= _FLOAT_EXACT or float(value) == value:
                    return float(value)
                raise Rejected(
                    "number_out_of_range", f"column {name} holds {value}, beyond a double"
                )
            if type(value) is not float:
                raise _mismatch(name, value, "a number")
            if not math.isfinite(value):
                raise Rejected("number_out_of_range", f"column {name} holds {value!r}")
            return value

    elif kind is Kind.NUMERIC:

        def convert(value: Any) -> Any:
            if value is None:
                return None
            if type(value) is int:
                return Decimal(value)
            if type(value) is float and math.isfinite(value):
                return Decimal(repr(value))
            raise _mismatch(name, value, "a number")

    elif kind is Kind.BOOLEAN:

        def convert(value: Any) -> Any:
            if value is None or type(value) is bool:
                return value
            raise _mismatch(name, value, "a boolean")

    elif kind is Kind.INSTANT:

        def convert(value: Any) -> Any:
            if value is None:
                return None
            if type(value) is not str:
                raise _mismatch(name, value, "an ISO-8601 timestamp")
            return parse_timestamp(value, name, naive_timezone=naive_timezone)

    elif kind is Kind.JSON_VALUE:

        def convert(value: Any) -> Any:
            if value is None:
                return None
            return json_text(value, name)

    else:
        raise AssertionError(kind)
    if column.nullable:
        return convert

    def required(value: Any) -> Any:
        if value is None or value == "":
            raise Rejected(
                "missing_key" if name == "id" else "null_value", f"column {name} is null or empty"
            )
        return convert(value)

    return required


def json_text(value: Any, column: str) -> str:
    """A JSON value as text for jsonb; refuses what jsonb refuses (\\u0000, NaN, surrogates)."""
    try:
        text = orjson.dumps(value).decode("utf-8")
    except TypeError:  # integers beyond 64 bits, lone surrogates
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise Rejected("invalid_utf8", f"column {column} holds a lone surrogate") from None
        except ValueError:
            raise Rejected(
                "number_out_of_range", f"column {column} holds NaN or Infinity"
            ) from None
    if "\\u0000" in text:
        raise Rejected("json_nul_character", f"column {column} contains \\u0000")
    return text


# ---------------------------------------------------------------- a batch


@dataclass(frozen=True)
class ConvertedBatch:
    """A converted batch, the table it was converted for (with the columns it added) and the
    ids of its rows (same positions as ``batch.rows``)."""

    batch: Batch
    table: Table
    added: tuple[Column, ...]
    ids: list[str | None]


def key_of_record(record: dict[str, Any] | None) -> str | None:
    value = None if record is None else record.get("id")
    if value is None or isinstance(value, dict | list):
        return None
    return str(value).replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()


def convert_jsonl_batch(
    batch: Batch, table: Table, *, naive_timezone: tzinfo = UTC
) -> ConvertedBatch:
    """Parse and convert one batch of lines for ``table``; keys that are not columns yet become
    new columns (typed from this batch's values), returned in ``added``."""
    records: list[tuple[int, bytes, dict[str, Any]]] = []
    rejects: list[Reject] = list(batch.rejects)
    for offset, line in batch.raw:
        try:
            records.append((offset, line, parse_line(line)))
        except Rejected as exc:
            rejects.append(Reject(offset, None, (line,), exc.reason, exc.detail, "transform"))
    known = set(table.column_names)
    new_keys: dict[str, list[Any]] = {}
    for _, _, record in records:
        for key, value in record.items():
            if key not in known:
                new_keys.setdefault(key, []).append(value)
    added = tuple(inferred_column(k, vs) for k, vs in new_keys.items())
    if added:
        table = replace(table, columns=table.columns + added)
    converters = [(c.name, json_converter(c, naive_timezone=naive_timezone)) for c in table.columns]
    id_at = table.column_names.index("id") if "id" in table.primary_key else None
    rows: list[tuple[Any, ...]] = []
    raw: list[tuple[Any, ...]] = []
    ids: list[str | None] = []
    for offset, line, record in records:
        get = record.get
        try:
            row = tuple([convert(get(name)) for name, convert in converters])
        except Rejected as exc:
            rkey = key_of_record(record)
            rejects.append(Reject(offset, rkey, (line,), exc.reason, exc.detail, "transform"))
            continue
        rows.append(row)
        raw.append((offset, line))
        ids.append(None if id_at is None else str(row[id_at]))
    converted = replace(batch, raw=raw, rows=rows, rejects=rejects)
    return ConvertedBatch(converted, table, added, ids)


async def transform_jsonl(
    source: AsyncGenerator[Batch, None], table: Table, *, naive_timezone: tzinfo = UTC
) -> AsyncGenerator[ConvertedBatch, None]:
    """Yield each upstream batch converted (in a worker thread), each for the table as the
    batches before it left it (with the columns they added); closes its upstream when closed or
    cancelled."""
    async with contextlib.aclosing(source):
        async for batch in source:
            converted = await anyio.to_thread.run_sync(
                functools.partial(convert_jsonl_batch, batch, table, naive_timezone=naive_timezone)
            )
            table = converted.table
            yield converted
