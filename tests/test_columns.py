"""The column-wise hot path of transform gives exactly what the row path gives, for any batch.

transform_batch converts a batch without a rejected row column by column (stages/columns.py)
and any other batch row by row (transform_rows). These laws compare the two on batches mixing
plain values with every kind of odd one: a value the fast checks let through changed, or a row
the column path loaded that the row path would have quarantined, fails here.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_migrate.core.schema import MESSAGES, SESSIONS, Column, ForeignKey, Kind, Table
from flux_migrate.stages import columns
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.columns import batch_converter
from flux_migrate.stages.transform import (
    digest_ids,
    transform_batch,
    transform_columns,
    transform_rows,
)

GENERIC = Table(
    name="things",
    columns=(
        Column("id", Kind.INTEGER, not_null=True),
        Column("name", Kind.TEXT, not_null=False),
        Column("owner", Kind.TEXT, not_null=False),
        Column("seen", Kind.INSTANT),
        Column("score", Kind.REAL),
        Column("doc", Kind.JSON_VALUE),
    ),
    foreign_keys=(ForeignKey(("owner",), "owners", ("id",)),),
    profile="generic",
)

_instants = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
_plain_times = st.builds(
    lambda d, z, frac: (
        (d.replace(microsecond=0) if not frac else d)
        .isoformat()
        .replace("+00:00", "Z" if z else "+00:00")
        .encode()
    ),
    _instants,
    st.booleans(),
    st.booleans(),
)
# Texts next to the one shape the column path takes, and other zones.
_NEAR_TIMES = [
    b"2024-02-30T00:00:00+00:00",
    b"2024-01-01T24:00:00+00:00",
    b"2024-01-01T00:00:00.1234567+00:00",
    b"2024-01-01T00:00:00.123+00:00",
    b"2024-01-01T00:00:00",
    b"2024-01-01 00:00:00+00:00",
    b"2024-01-01T00:00:00z",
    b"2024-01-01T00:00:00+01:00",
    b"2024-01-01T00:00:00-00:00",
    b"20240101T000000+00:00",
    b"2024-01-01T00:00:00Z\n2024-01-01T00:00:00Z",
    b"2024-01-01T00:00:00Z\n",
    "２０２４-01-01T00:00:00Z".encode(),
    b"\xff2024-01-01T00:00:00+00:00",
    b"",
    None,
]
_zoned_times = st.builds(
    lambda d, m: d.astimezone(timezone(timedelta(minutes=m))).isoformat().encode(),
    _instants,
    st.integers(-900, 900),
)
_plain_keys = st.uuids().map(lambda u: str(u).encode())
_ODD_KEYS = [
    b"",
    b"x" * 36,
    b"x" * 37,
    "é".encode(),
    "é".encode() * 20,
    b"a\x00b",
    b"\xff",
    None,
    7,
    1.5,
]
_plain_texts = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))
_ODD_TEXTS = [None, b"a\x00", b"\xc3", b"", 3, 2.5, "str"]
_plain_json = st.sampled_from([b"{}", b'{"model": "gpt-4o", "tokens": 637}', b'{"a": {"b": [1]}}'])
_ODD_JSON = [
    *(b"[]", b"null", b"NaN", b'{"a": NaN}', b"{", None, b"", 5, 1.5, "{}", b" {}", b"{} "),
    *(b'{"a": 1, "a": 2}', b'{"a": {"b": 1, "b": 2}}', b'{"a": 1, "\\u0061": 2}'),
    *(b'{"a": [{"b": 1, "b": 2}]}', b'{"a": 1 , "a": 2}', b'{"a": "x\\":", "a": 2}'),
    *(b'{"a": "1e5"}', b'{"a": "\xff"}', b'{"a": 1}\x00', b'{"a": -1E+5}', b'{"a": 1}{}'),
    *(b'{"a": "\\u0000"}', b'{"a": "\\\\u0000"}', b'{"a": 1e5}', b'{"a": 1.5E-3}'),
    *(b'{"a": 12345678901234567890}', b'{"a": "12345678901234567890"}', b'[{"a": 1}]'),
    *(b'{"\xe9": 1}', '{"é": "٣e5"}'.encode(), b'{"a": "x\\"y"}', b"[" * 1100 + b"]" * 1100),
    b'{"a": ' * 1100 + b"1" + b"}" * 1100,
]
_ODD_NUMBERS = [None, b"1", b"x", 1.0, 2**60 + 1, 2**63]


def _odd_values(column: Column) -> list[Any]:
    """Values of the column's kind the fast checks must not let through as plain: wrong
    storage class, NUL, bad UTF-8, near-miss shapes."""
    kind = column.kind
    if kind is Kind.KEY:
        return _ODD_KEYS
    if kind in (Kind.TEXT, Kind.NULLABLE_TEXT):
        return _ODD_TEXTS
    if kind in (Kind.TIMESTAMP, Kind.INSTANT):
        return _NEAR_TIMES
    if kind in (Kind.INTEGER, Kind.REAL):
        return _ODD_NUMBERS
    return _ODD_JSON


def _value(column: Column, odd: bool) -> st.SearchStrategy[Any]:
    """A plain value of the column's kind, or (``odd``) one of _odd_values (a timestamp also
    in another zone)."""
    kind = column.kind
    if odd:
        found = st.sampled_from(_odd_values(column))
        return found | _zoned_times if kind in (Kind.TIMESTAMP, Kind.INSTANT) else found
    if kind is Kind.KEY:
        return _plain_keys
    if kind in (Kind.TEXT, Kind.NULLABLE_TEXT):
        return _plain_texts.map(str.encode)
    if kind in (Kind.TIMESTAMP, Kind.INSTANT):
        return _plain_times
    if kind is Kind.INTEGER:
        return st.integers(-(2**63), 2**63 - 1)
    if kind is Kind.REAL:
        return st.floats(allow_nan=False)
    return _plain_json


@st.composite
def _batches(draw: st.DrawFn, table: Table, plain: bool = False) -> tuple[Batch, frozenset[str]]:
    """A batch read from ``table`` (rowid, the columns, the orphan flag) of plain rows, into
    which, unless ``plain``, up to two odd things are put: an odd value in one cell, an orphan
    flag, a quarantined parent key. One odd thing alone decides whether the batch may take the
    column path, so a check of the hot path that lets it through shows."""
    size = draw(st.integers(1, 6))
    rows = [
        [rowid, *(draw(_value(c, odd=False)) for c in table.columns), 0]
        for rowid in range(1, size + 1)
    ]
    missing: frozenset[str] = frozenset()
    for _ in range(0 if plain else draw(st.sampled_from([0, 1, 1, 1, 2]))):
        row = draw(st.sampled_from(rows))
        what = draw(st.sampled_from(["value"] * 6 + ["flag", "missing"]))
        if what == "value":
            at = draw(st.integers(0, len(table.columns) - 1))
            row[at + 1] = draw(_value(table.columns[at], odd=True))
        elif what == "flag" and (table.parent_column or table.foreign_keys):
            row[-1] = 1
        elif what == "missing" and table.parent_column is not None:
            key = row[1 + table.column_names.index(table.parent_column)]
            if isinstance(key, bytes) and key:
                missing = missing | {key.decode(errors="replace")}
        elif what == "missing" and table.foreign_keys:
            missing = missing | {"0\x00x"}
    raw = [tuple(r) for r in rows]
    batch = Batch(table=table.name, seq=1, after_rowid=0, last_rowid=size, extracted=size)
    return Batch(**{**batch.__dict__, "raw": raw}), missing


def _same(table: Table, batch: Batch, missing: frozenset[str], text_as_bytes: bool) -> None:
    options: dict[str, Any] = {"missing_parents": missing, "text_as_bytes": text_as_bytes}
    fast = transform_batch(batch, table, **options)
    slow = transform_rows(batch, table, **options)
    assert fast.rows == slow.rows
    assert [[type(v) for v in r] for r in fast.rows] == [[type(v) for v in r] for r in slow.rows]
    assert fast.rejects == slow.rejects
    assert fast.digests == slow.digests
    assert list(fast.raw) == list(slow.raw)
    # A digest pack's keys taken from the converted key column (a converter process does)
    # are the keys of the raw values.
    converted, plain = transform_columns(batch, table, **options)
    if plain is not None:
        assert digest_ids(table, converted.raw, plain) == digest_ids(table, converted.raw)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([SESSIONS, MESSAGES, GENERIC]).flatmap(
        lambda t: st.tuples(st.just(t), _batches(t))
    ),
    st.booleans(),
)
def test_column_path_equals_row_path(
    drawn: tuple[Table, tuple[Batch, frozenset[str]]], as_bytes: bool
) -> None:
    table, (batch, missing) = drawn
    _same(table, batch, missing, as_bytes)


@given(
    st.sampled_from([SESSIONS, MESSAGES]).flatmap(
        lambda t: st.tuples(st.just(t), _batches(t, plain=True))
    )
)
def test_plain_batches_take_the_column_path(
    drawn: tuple[Table, tuple[Batch, frozenset[str]]],
) -> None:
    """A batch of plain values (uuid keys, UTF-8 text, isoformat() UTC instants, small JSON)
    passes every C-speed check of its columns, so the law above covers the hot path itself,
    not only the per-value converters behind it."""
    table, (batch, _) = drawn
    checks = {Kind.KEY: columns._keys, Kind.TIMESTAMP: columns._utc_instants}
    checks |= {Kind.JSON: columns._json_objects}
    checks |= {Kind.TEXT: columns._texts_as_bytes, Kind.NULLABLE_TEXT: columns._texts_as_bytes}
    for i, column in enumerate(table.columns):
        if column.kind in checks:
            assert checks[column.kind]([r[i + 1] for r in batch.raw]) is not None, column.name
    assert batch_converter(table, text_as_bytes=True)(batch.raw) is not None


_PLAIN_ROW = {
    "sessions": (
        b"6f1c-s",
        b"a title",
        b"2025-01-01T00:00:00+00:00",
        b"2025-01-01T00:00:01Z",
        b"{}",
    ),
    "messages": (
        b"6f1c-m",
        b"6f1c-s",
        b"user",
        "hé 😀".encode(),
        b'{"model": "gpt-4o"}',
        b"2025-01-01T00:03:07.541676+00:00",
    ),
    "things": (1, b"n", b"o", b"2025-01-01T00:00:00Z", 1.5, b"[1]"),
}


@pytest.mark.parametrize(
    ("table", "at", "odd"),
    [
        (t, i, v)
        for t in (SESSIONS, MESSAGES, GENERIC)
        for i, c in enumerate(t.columns)
        for v in _odd_values(c)
    ],
)
@pytest.mark.parametrize("as_bytes", [True, False])
def test_one_odd_value_in_a_plain_batch(table: Table, at: int, odd: Any, as_bytes: bool) -> None:
    """Every odd value of the lists above, alone in one cell of a plain batch: the batch
    gives what the row path gives (so a value the hot path must not take is never taken)."""
    plain = _PLAIN_ROW[table.name]
    rows = [(n, *plain, 0) for n in (1, 2, 3)]
    rows[1] = (2, *plain[:at], odd, *plain[at + 1 :], 0)
    batch = Batch(table=table.name, seq=1, after_rowid=0, last_rowid=3, extracted=3, raw=rows)
    _same(table, batch, frozenset(), as_bytes)
