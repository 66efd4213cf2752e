"""An instant as PostgreSQL's timestamptz holds it (its binary wire form): what the load's
encoder sends and what a converter process ships instead of a datetime. Imports nothing else
of the project."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)


def instant_micros(value: datetime) -> int:
    """An aware instant as PostgreSQL's timestamptz holds it: microseconds since 2000-01-01 UTC."""
    if value.tzinfo is None:
        raise TypeError("a naive datetime has no instant; flux-migrate sends only aware ones")
    return (value - PG_EPOCH) // _ONE_MICROSECOND


def aware_micros(values: Sequence[datetime]) -> list[int]:
    """instant_micros of each of ``values``, all aware, without a check per value (a naive one
    cannot be subtracted: TypeError): a third less time than one call each, for a column."""
    return [(v - PG_EPOCH) // _ONE_MICROSECOND for v in values]


def shipped_micros(value: datetime | int) -> int:
    """instant_micros of an aware instant, or the int a converter process made of one."""
    return value if type(value) is int else instant_micros(value)  # type: ignore[arg-type]
