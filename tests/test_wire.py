"""The binary COPY payload a converter builds (stages/wire.py) loads exactly what the load's
record encoder loads from the same converted values, for any values of every kind it takes;
kinds with more than one wire form get no payload."""

from __future__ import annotations

import dataclasses
import math
from array import array
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_migrate.core.errors import RuntimeFailure
from flux_migrate.core.instant import instant_micros
from flux_migrate.core.schema import TABLES, Column, Kind, Table, TargetNames, create_table_sql
from flux_migrate.core.target import Target
from flux_migrate.pipeline.convert_worker import RangeJob, convert_packed
from flux_migrate.stages import load, wire
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.extract_sql import source_uri
from flux_migrate.stages.load import LoadContext
from tests.support import generated_with

pytestmark = pytest.mark.anyio

TABLE = Table(
    "wired",
    (
        Column("id", Kind.KEY),
        Column("body", Kind.TEXT),
        Column("note", Kind.NULLABLE_TEXT),
        Column("at", Kind.TIMESTAMP),
        Column("seen", Kind.INSTANT),
        Column("meta", Kind.JSON),
        Column("doc", Kind.JSON_VALUE),
        Column("blob", Kind.BLOB),
        Column("flag", Kind.BOOLEAN),
        Column("ratio", Kind.REAL),
    ),
    primary_key=(),
    profile="generic",
)

# Text as transform hands it over: str, or (text_as_bytes) the source's UTF-8 bytes.
TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"))
TEXT_OR_BYTES = TEXT | TEXT.map(str.encode)
INSTANT = st.datetimes(timezones=st.just(UTC)) | st.sampled_from(
    [datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)]
)
# An instant as the converter ships it (non-key columns): its microseconds.
INSTANT_OR_MICROS = INSTANT | INSTANT.map(instant_micros)
JSON_TEXT = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
).map(lambda v: __import__("json").dumps(v))


def _row(i: int) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.tuples(
        st.just(f"k{i:04d}"),
        TEXT_OR_BYTES,
        st.none() | TEXT_OR_BYTES,
        INSTANT,
        st.none() | INSTANT_OR_MICROS,
        JSON_TEXT,
        st.none() | JSON_TEXT,
        st.none() | st.binary(max_size=40),
        st.none() | st.booleans(),
        st.none() | st.floats() | st.integers(-(2**53), 2**53),
    )


ROWS = st.integers(0, 12).flatmap(lambda n: st.tuples(*(_row(i) for i in range(n))).map(list))


async def _load_both(dsn: str, rows: list[tuple[Any, ...]]) -> tuple[list[str], list[str]]:
    names = TargetNames()
    target = Target(dsn)
    conn = await target.conn()
    try:
        for name in ("by_payload", "by_records"):
            await conn.execute(create_table_sql(Table(name, TABLE.columns), names))
            await conn.execute(f"TRUNCATE {name}")
        encode = wire.payload_encoder(TABLE)
        assert encode is not None
        columns = [list(c) for c in zip(*rows, strict=True)] or [[] for _ in TABLE.columns]
        payload = encode(columns)
        assert payload is not None
        await conn.copy_to_table(
            "by_payload", source=memoryview(payload), columns=TABLE.column_names, format="binary"
        )
        await conn.copy_records_to_table("by_records", records=rows, columns=TABLE.column_names)
        fetched = []
        for name in ("by_payload", "by_records"):
            fetched.append(
                [r[0] for r in await conn.fetch(f"SELECT t::text FROM {name} t ORDER BY id")]
            )
        return fetched[0], fetched[1]
    finally:
        await target.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=ROWS)
async def test_payload_loads_what_records_load(pg_dsn: str, rows: list[tuple[Any, ...]]) -> None:
    """Any converted rows of every wire kind (NULLs, non-ASCII text as str or bytes, the first
    and last instants, NaN and -0.0, JSON of any shape): the payload loads the same rows as
    the record encoder, value for value as PostgreSQL prints them, and as many."""
    by_payload, by_records = await _load_both(pg_dsn, rows)
    assert len(by_records) == len(rows)
    assert by_payload == by_records


async def test_special_values_load_alike(pg_dsn: str) -> None:
    """The values most likely to differ between two encoders, in one batch."""
    rows = [
        (
            "k0",
            b"caf\xc3\xa9",
            None,
            datetime.min.replace(tzinfo=UTC),
            None,
            "{}",
            None,
            b"",
            True,
            math.nan,
        ),
        (
            "k1",
            "\u2603 snow",
            "x",
            datetime.max.replace(tzinfo=UTC),
            instant_micros(datetime(2000, 1, 1, tzinfo=UTC) - timedelta(microseconds=1)),
            '{"a": [1, 2.5e300]}',
            '"s"',
            b"\x00\xff",
            False,
            -0.0,
        ),
        (
            "k2",
            "",
            "",
            datetime(2026, 12, 7, tzinfo=UTC),
            None,
            '{"b": null}',
            "[]",
            None,
            None,
            math.inf,
        ),
    ]
    by_payload, by_records = await _load_both(pg_dsn, rows)
    assert len(by_payload) == 3
    assert by_payload == by_records


def test_kinds_with_more_than_one_wire_form_get_no_payload() -> None:
    """INTEGER loads into bigint or numeric, NUMERIC has no simple form, and a column naming
    a type of its own other than its kind's: such tables go as rows."""
    for column in (
        Column("n", Kind.INTEGER),
        Column("n", Kind.NUMERIC),
        Column("t", Kind.TEXT, type="citext"),
    ):
        assert wire.payload_encoder(Table("t", (Column("id", Kind.KEY), column))) is None
    named = Table(
        "t", (Column("id", Kind.KEY, type="varchar(36)"), Column("x", Kind.TEXT, type="text"))
    )
    assert wire.payload_encoder(named) is not None


def test_a_value_text_cannot_encode_gives_no_payload() -> None:
    """A lone surrogate has no UTF-8 form: the batch goes as rows (whose encoder refuses it)."""
    encode = wire.payload_encoder(Table("t", (Column("id", Kind.KEY), Column("x", Kind.TEXT))))
    assert encode is not None
    assert encode([["a"], ["\ud800"]]) is None
    assert encode([["a"], ["ok"]]) is not None


def test_a_converter_ships_the_app_tables_as_payloads(sample_db: Path) -> None:
    """The hot path stays the payload's: a converter job for either app table (as a run with
    converter processes hands it out) comes back with its rows as one payload, counted, and
    as columns when the run asked for rows (an upsert)."""
    for table in TABLES:
        job = _job(sample_db, table, 0, 200)
        packed = convert_packed(job)
        assert packed is not None
        batch, columns = packed
        assert batch.payload is not None and batch.payload.startswith(wire.SIGNATURE)
        assert batch.row_count == batch.payload_rows == 200 and columns == [] and not batch.rows
        as_rows = convert_packed(dataclasses.replace(job, payload=False))
        assert as_rows is not None and as_rows[0].payload is None
        assert len(as_rows[1]) == len(table.columns) and len(as_rows[1][0]) == 200


async def test_a_payload_is_never_split_row_by_row(pg_dsn: str) -> None:
    """A payload batch that reached the row-by-row split (a refused batch not re-converted
    into rows) is an internal error, not a batch loaded as empty."""
    table = TABLES[0]
    ctx = LoadContext(table=table, names=TargetNames(), run_id="r")
    batch = Batch(table.name, 1, 0, 1, 1, payload=b"x", payload_rows=1)
    conn = await asyncpg.connect(pg_dsn)
    try:
        with pytest.raises(RuntimeFailure, match="internal error"):
            await load._write_rows(conn, ctx, batch, isolate=True)
    finally:
        await conn.close()


async def test_the_loader_sends_payloads_through_a_wide_socket_buffer(pg_dsn: str) -> None:
    """The loader's connection takes a COPY chunk whole into the kernel: its socket's send
    buffer is SEND_BUFFER (as far as the system allows; Linux reports it doubled)."""
    import socket

    from flux_migrate.core import target as target_module

    allowed = target_module.SEND_BUFFER
    limit = Path("/proc/sys/net/core/wmem_max")
    if limit.exists():
        allowed = min(allowed, int(limit.read_text()))
    target = Target(pg_dsn)
    try:
        conn = await target.conn()
        sock = conn._transport.get_extra_info("socket")  # type: ignore[attr-defined]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= allowed
    finally:
        await target.close()


@pytest.fixture(scope="module")
def uneven_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated app source (~600 messages) with rows the column path does not convert
    here and there: an instant no reader takes, a session that is not there."""
    return generated_with(
        tmp_path_factory.mktemp("pieces") / "chat.sqlite",
        60,
        5,
        "UPDATE messages SET created_at = 'not a time' WHERE rowid % 97 = 0",
        "UPDATE messages SET session_id = 'nobody' WHERE rowid % 89 = 0",
        "UPDATE sessions SET created_at = 'never' WHERE rowid % 23 = 0",
    )


def _job(source: Path, table: Table, lo: int, hi: int, **how: Any) -> RangeJob:
    """A converter's job as a run with converter processes hands it out (payload asked)."""
    fields: dict[str, Any] = {
        "orphans": array("q"),
        "naive_timezone": UTC,
        "strip_nul": False,
        "missing_parents": frozenset(),
        "payload": True,
    }
    fields.update(how)
    return RangeJob(uri=source_uri(source), busy_timeout=5, table=table, lo=lo, hi=hi, **fields)


@settings(max_examples=40, deadline=None)
@given(
    table=st.sampled_from(TABLES),
    lo=st.integers(-3, 650),
    span=st.integers(0, 700),
    piece=st.integers(1, 300),
    strip_nul=st.booleans(),
    orphans=st.none()
    | st.lists(st.integers(0, 700), max_size=6).map(lambda r: array("q", sorted(set(r)))),
    missing=st.sets(st.sampled_from(["nobody", "x"]), max_size=1),
)
def test_a_batch_converted_piece_by_piece_is_the_batch_converted_at_once(
    uneven_source: Path,
    table: Table,
    lo: int,
    span: int,
    piece: int,
    strip_nul: bool,
    orphans: array[int] | None,
    missing: set[str],
) -> None:
    """A converter's batch built piece by piece (payload, rowids, keys, digests, checkpoint,
    counts) is byte for byte the batch converted at once, for any range, piece size, orphan
    list and quarantined parents; a piece the column path does not convert sends the whole
    batch the old way, and the result is the same."""
    from flux_migrate.pipeline import convert_worker as cw

    job = _job(
        uneven_source,
        table,
        lo,
        lo + span,
        orphans=orphans,
        strip_nul=strip_nul,
        missing_parents=frozenset(missing),
    )
    held = cw.PIECE
    try:
        cw.PIECE = piece
        pieced = cw.convert_packed(job)
    finally:
        cw.PIECE = held
    assert pieced == cw._converted_whole(job)


def test_a_clean_range_is_converted_piece_by_piece(sample_db: Path) -> None:
    """The piece by piece path is the one a clean range takes (not the whole batch's)."""
    from flux_migrate.pipeline import convert_worker as cw

    job = _job(sample_db, TABLES[1], 0, 1000)
    encode = wire.payload_encoder(TABLES[1])
    assert encode is not None
    streamed = cw._streamed(job, encode)
    assert streamed is not cw._AS_A_WHOLE and streamed == cw._converted_whole(job)
    assert streamed is not None and streamed[0].payload_rows == 1000
