"""A converted batch as PostgreSQL's binary COPY payload, built once, column by column.

A converter process builds the whole payload of its batch (the signature, one tuple per row,
the trailer) from the converted columns; the load sends it to ``COPY ... FROM STDIN (FORMAT
binary)`` as it is. Each value goes on the wire exactly as the load's record encoder sends it
(asyncpg's binary codecs and the two the target sets, core.target): text as its UTF-8 bytes,
an instant as its microseconds since 2000-01-01 UTC, jsonb as version 1 and its text, bytea
as its bytes, a boolean as one byte, a double as its 8 bytes. A table with a column whose
kind has more than one possible target type (INTEGER: bigint or numeric) or a type of its
own gets no payload: its batches go as rows.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Sequence
from enum import Enum
from itertools import repeat
from typing import Any

from flux_migrate.core.instant import aware_micros, shipped_micros
from flux_migrate.core.schema import Column, Kind, Table

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # the signature, no flags, no extension
TRAILER = b"\xff\xff"
NULL = b"\xff\xff\xff\xff"
_LENGTH = struct.Struct(">i").pack
_INSTANT = struct.Struct(">iq").pack  # the length (8), then the microseconds
_DOUBLE = struct.Struct(">id").pack
_TRUE, _FALSE = b"\x00\x00\x00\x01\x01", b"\x00\x00\x00\x01\x00"


class Wire(Enum):
    TEXT = "text"
    INSTANT = "instant"
    JSONB = "jsonb"
    BYTEA = "bytea"
    BOOLEAN = "boolean"
    DOUBLE = "double"


_WIRE = {
    Kind.KEY: Wire.TEXT,
    Kind.TEXT: Wire.TEXT,
    Kind.NULLABLE_TEXT: Wire.TEXT,
    Kind.TIMESTAMP: Wire.INSTANT,
    Kind.INSTANT: Wire.INSTANT,
    Kind.JSON: Wire.JSONB,
    Kind.JSON_VALUE: Wire.JSONB,
    Kind.BLOB: Wire.BYTEA,
    Kind.BOOLEAN: Wire.BOOLEAN,
    Kind.REAL: Wire.DOUBLE,
}

# The target types a column may name for itself (Column.type) that share its kind's wire form.
_TYPES = {
    Wire.TEXT: ("text", "varchar", "character varying"),
    Wire.INSTANT: ("timestamptz", "timestamp with time zone", "timestamptz(6)"),
    Wire.JSONB: ("jsonb",),
    Wire.BYTEA: ("bytea",),
    Wire.BOOLEAN: ("boolean", "bool"),
    Wire.DOUBLE: ("double precision", "float8"),
}

Items = list[Sequence[bytes]]  # per row, in order: the pieces of one field


def _wire(column: Column) -> Wire | None:
    wire = _WIRE.get(column.kind)
    if wire is None or column.type is None:
        return wire
    named = column.type.lower()
    if wire is Wire.TEXT and (named.startswith(("varchar(", "character varying("))):
        return wire
    return wire if named in _TYPES[wire] else None


def _texts(values: Sequence[Any]) -> Items:
    # All bytes, or all str: the unbound methods refuse any other value (TypeError, in C)
    # with no type test per value; a NULL among them, value by value.
    try:
        return [list(map(_LENGTH, map(bytes.__len__, values))), values]
    except TypeError:
        pass
    try:
        data = list(map(str.encode, values))
    except TypeError:
        return [[NULL if v is None else _field(_utf8(v)) for v in values]]
    return [list(map(_LENGTH, map(len, data))), data]


def _field(data: bytes) -> bytes:
    return _LENGTH(len(data)) + data


def _instants(values: Sequence[Any]) -> Items:
    try:  # all aware datetimes, as transform makes them: anything else cannot be subtracted
        micros = aware_micros(values)
    except TypeError:  # NULLs, instants a converter made ints (a naive one: no payload)
        return [[NULL if v is None else _INSTANT(8, shipped_micros(v)) for v in values]]
    return [list(map(_INSTANT, repeat(8, len(micros)), micros))]


def _jsonb(values: Sequence[Any]) -> Items:
    try:
        data = list(map(str.encode, values))  # all str (else TypeError, as in _texts)
    except TypeError:
        return [[NULL if v is None else _field(b"\x01" + _utf8(v)) for v in values]]
    return [[_LENGTH(len(d) + 1) for d in data], [b"\x01"] * len(data), data]


def _utf8(value: str | bytes) -> bytes:
    return value if type(value) is bytes else value.encode()  # type: ignore[union-attr]


def _bytea(values: Sequence[Any]) -> Items:
    return [[NULL if v is None else _field(v) for v in values]]


def _booleans(values: Sequence[Any]) -> Items:
    return [[NULL if v is None else _TRUE if v else _FALSE for v in values]]


def _doubles(values: Sequence[Any]) -> Items:
    return [[NULL if v is None else _DOUBLE(8, v) for v in values]]


_ENCODE: dict[Wire, Callable[[Sequence[Any]], Items]] = {
    Wire.TEXT: _texts,
    Wire.INSTANT: _instants,
    Wire.JSONB: _jsonb,
    Wire.BYTEA: _bytea,
    Wire.BOOLEAN: _booleans,
    Wire.DOUBLE: _doubles,
}


def joined(payloads: Sequence[bytes]) -> bytes:
    """One payload of the rows of ``payloads`` (each as payload_encoder makes it), in order."""
    if len(payloads) == 1:
        return payloads[0]
    head, tail = len(SIGNATURE), len(TRAILER)
    parts: list[bytes | memoryview] = [memoryview(p)[head:-tail] for p in payloads]
    return b"".join([SIGNATURE, *parts, TRAILER])


@functools.lru_cache(maxsize=64)
def payload_encoder(table: Table) -> Callable[[Sequence[Sequence[Any]]], bytes | None] | None:
    """The encoder of ``table``'s converted columns (one sequence of values per column, in
    table order, as transform converts them) into one binary COPY payload; None when a column
    has no single wire form. The encoder returns None for a value it cannot encode (text that
    is not UTF-8-encodable): the batch then goes as rows."""
    wires = [_wire(c) for c in table.columns]
    if not wires or any(w is None for w in wires):
        return None
    encoders = [_ENCODE[w] for w in wires if w is not None]
    header = struct.pack(">h", len(encoders))

    def encode(columns: Sequence[Sequence[Any]]) -> bytes | None:
        try:
            items = [
                piece for enc, col in zip(encoders, columns, strict=True) for piece in enc(col)
            ]
        except (UnicodeEncodeError, AttributeError, TypeError, struct.error, OverflowError):
            return None
        count = len(columns[0]) if columns else 0
        # The payload's pieces in one list, the tuples' field counts in place, each column's
        # pieces put at their rows' places by one slice assignment (a column of another
        # length: ValueError); a quarter less time than joining zipped tuples.
        width = len(items) + 1
        end = 1 + count * width
        flat = [header] * (end + 1)
        flat[0], flat[end] = SIGNATURE, TRAILER
        for at, pieces in enumerate(items, start=2):
            flat[at:end:width] = pieces
        return b"".join(flat)

    return encode
