"""The converters for any table's SQLite types: a value loads into PostgreSQL as itself (under
the canonical form of its type) or is rejected with a documented reason, never changed."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_migrate.core.schema import PG_TYPES, Kind
from flux_migrate.stages import values
from flux_migrate.stages.convert import REASONS, Raw, Rejected

# What a SQLite column can hold, as extract reads it: text arrives as UTF-8 bytes.
sqlite_values = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text().map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(),
    st.sampled_from([b"true", b"FALSE", b"n/a", b"12.50", b"1e400", b"0", b"1"]),
    st.sampled_from([b"2024-01-01T00:00:00Z", b"2024-02-29 12:30:00.123456+05:30"]),
    st.sampled_from([b'{"a": [1, 2.50, 1e400, 123456789012345678901234567890]}', b"[]"]),
)

CONVERTERS: dict[Kind, Callable[[str], values.Converter]] = {
    Kind.INTEGER: values.integer,
    Kind.REAL: values.real,
    Kind.NUMERIC: values.numeric,
    Kind.BOOLEAN: values.boolean,
    Kind.BLOB: values.blob,
    Kind.NULLABLE_TEXT: values.text,
    Kind.INSTANT: lambda c: values.timestamp(c, epoch="ms"),
    Kind.JSON_VALUE: values.json_value,
}


def _expected(kind: Kind, raw: Raw) -> Any:
    """The source value in the canonical form of its type, computed without the converters."""
    if raw is None:
        return None
    if kind in (Kind.INTEGER, Kind.REAL, Kind.NUMERIC):
        if isinstance(raw, bytes):
            return Decimal(raw.decode())
        return Decimal(repr(raw)) if isinstance(raw, float) else Decimal(raw)
    if kind is Kind.BOOLEAN:
        words = (b"1", b"true", b"t", b"yes")  # as documented: 0/1, true/false, t/f, yes/no
        return raw == 1 or (isinstance(raw, bytes) and raw.strip().lower() in words)
    if kind is Kind.BLOB:
        return raw
    if kind is Kind.NULLABLE_TEXT:
        return repr(raw) if isinstance(raw, float) else (
            raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        )  # fmt: skip
    if kind is Kind.INSTANT:
        if isinstance(raw, bytes):
            parsed = datetime.fromisoformat(raw.decode())
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=raw)
    if not isinstance(raw, bytes):  # a number stored in a JSON column is a JSON number
        return Decimal(repr(raw)) if isinstance(raw, float) else Decimal(raw)
    return json.loads(raw, parse_float=Decimal, parse_int=Decimal)


def _actual(kind: Kind, value: Any) -> Any:
    """What PostgreSQL returned, in the same canonical form."""
    if value is None:
        return None
    if kind in (Kind.INTEGER, Kind.REAL, Kind.NUMERIC):
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if kind is Kind.JSON_VALUE:
        return json.loads(value, parse_float=Decimal, parse_int=Decimal)
    return value


async def _round_trip(dsn: str, kind: Kind, accepted: list[Any]) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE TEMP TABLE t (n int, v {PG_TYPES[kind]})")
        await conn.copy_records_to_table("t", records=list(enumerate(accepted)))
        return [r["v"] for r in await conn.fetch("SELECT v FROM t ORDER BY n")]
    finally:
        await conn.close()


@pytest.mark.parametrize("kind", list(CONVERTERS), ids=lambda k: k.value)
def test_any_sqlite_value_loads_as_itself_or_is_rejected_with_a_reason(
    kind: Kind, pg_server_dsn: str
) -> None:
    """Converted values come back from PostgreSQL equal to the source; others carry a
    documented reason; nothing else escapes."""

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(sqlite_values, max_size=12))
    def law(raws: list[Raw]) -> None:
        convert = CONVERTERS[kind]("c")
        accepted: list[tuple[Raw, Any]] = []
        for raw in raws:
            try:
                accepted.append((raw, convert(raw)))
            except Rejected as exc:
                assert exc.reason in REASONS
        back = asyncio.run(_round_trip(pg_server_dsn, kind, [v for _, v in accepted]))
        for (raw, _), got in zip(accepted, back, strict=True):
            expected, actual = _expected(kind, raw), _actual(kind, got)
            if kind is Kind.INSTANT and isinstance(raw, float):
                assert abs((expected - actual).total_seconds()) < 1e-3
            elif kind is Kind.REAL and isinstance(raw, int):
                assert float(raw) == float(actual)
            else:
                assert expected == actual

    law()


@pytest.mark.parametrize(
    ("kind", "raw", "reason"),
    [
        (Kind.REAL, b"n/a", "type_mismatch"),
        (Kind.INTEGER, 1.5, "type_mismatch"),
        (Kind.INTEGER, b"12", "type_mismatch"),
        (Kind.REAL, 2**60 + 1, "number_out_of_range"),
        (Kind.NUMERIC, math.inf, "number_out_of_range"),
        (Kind.BOOLEAN, 2, "type_mismatch"),
        (Kind.BLOB, 7, "type_mismatch"),
        (Kind.INSTANT, b"yesterday", "invalid_timestamp"),
        (Kind.JSON_VALUE, b"{nope", "invalid_json"),
    ],
)
def test_values_that_do_not_fit_are_rejected_never_coerced(
    kind: Kind, raw: Raw, reason: str
) -> None:
    """SQLite's dynamic typing: a value of another storage class is quarantined with a reason."""
    with pytest.raises(Rejected) as info:
        CONVERTERS[kind]("c")(raw)
    assert reason == info.value.reason


def test_epoch_seconds_and_milliseconds_read_as_the_same_instant() -> None:
    """1700000000 s and 1700000000000 ms name the same instant; ISO text still parses."""
    seconds = values.timestamp("c", epoch="s")(1_700_000_000)
    millis = values.timestamp("c", epoch="ms")(1_700_000_000_000)
    assert datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC) == seconds == millis
    assert datetime(2024, 1, 1, tzinfo=UTC) == values.timestamp("c")(b"2024-01-01T00:00:00Z")
