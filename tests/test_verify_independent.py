"""Verify is independent of the load: a converter or encoder that changes values is caught."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flux_migrate.core.target
import flux_migrate.stages.columns
import flux_migrate.stages.values
from flux_migrate.core.schema import SQLITE_DDL, Column, Kind, Table, TargetNames
from flux_migrate.pipeline import verify_generic as generic
from flux_migrate.pipeline.reference import (
    Unreadable,
    instant_micros,
    instant_text,
    pg_instant_text,
)
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import load_settings
from flux_migrate.pipeline.verify import TableVerify, verify_quick, verify_rows
from flux_migrate.stages.batch import Reject
from flux_migrate.stages.load import quarantine_records
from tests.dirty import GOOD_TS, app_db
from tests.support import cli, fetchval

pytestmark = pytest.mark.anyio

Wrap = Callable[[Column, Any], Any]


@pytest.fixture
def broken_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Kind, Wrap], None]]:
    """Make the load's converters for one kind of column change every value they return: the
    per-value one (the row path) and the column-wise one (the column path)."""
    original = flux_migrate.stages.values.any_column_converter
    original_column = flux_migrate.stages.columns._column_converter

    def install(kind: Kind, change: Wrap) -> None:
        def any_column_converter(column: Column, **options: Any) -> Any:
            convert = original(column, **options)
            if column.kind is not kind:
                return convert
            return lambda raw: change(column, convert(raw))

        def column_converter(column: Column, **options: Any) -> Any:
            convert = original_column(column, **options)
            if column.kind is not kind:
                return convert

            def changed(values: Any) -> Any:
                found = convert(values)
                return None if found is None else [change(column, v) for v in found]

            return changed

        monkeypatch.setattr(
            flux_migrate.stages.values, "any_column_converter", any_column_converter
        )
        monkeypatch.setattr(flux_migrate.stages.columns, "_column_converter", column_converter)
        _clear_caches()

    yield install
    _clear_caches()


def _clear_caches() -> None:
    flux_migrate.stages.values.row_converter.cache_clear()
    flux_migrate.stages.columns.batch_converter.cache_clear()


def _counts(results: list[TableVerify]) -> list[tuple[str, int, int, int, int]]:
    return [(r.table, r.matched, r.different, r.missing, r.extra) for r in results]


async def _run(path: Path, dsn: str) -> Any:
    settings = load_settings(None, sqlite_path=path, postgres_dsn=dsn)
    report = await migrate(settings)
    assert "completed" == report.status
    return settings


async def test_verify_reports_timestamps_the_load_truncated_to_the_second(
    tmp_path: Path, pg_dsn: str, broken_load: Callable[[Kind, Wrap], None]
) -> None:
    """A load that drops the microseconds of every timestamp fails verify and verify --quick."""
    broken_load(Kind.TIMESTAMP, lambda _, value: value.replace(microsecond=0))
    db = app_db(tmp_path / "app.sqlite", good_sessions=2, messages_each=2)
    db.write()
    settings = await _run(db.path, pg_dsn)
    expected = [("sessions", 0, 2, 0, 0), ("messages", 0, 4, 0, 0)]
    assert expected == _counts(await verify_rows(settings))
    assert [False, False] == [q.ok for q in await verify_quick(settings)]


async def test_verify_reports_instants_the_load_wrote_as_infinity(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Year-1 and year-9999 instants written as -infinity and infinity (asyncpg's own encoder)
    fail verify and verify --quick, though asyncpg reads infinity back as those instants."""

    async def asyncpg_default(conn: Any) -> None:
        return None

    monkeypatch.setattr(flux_migrate.core.target, "send_instants_exactly", asyncpg_default)
    db = app_db(tmp_path / "app.sqlite", good_sessions=1, messages_each=0)
    db.session(created_at="0001-01-01T00:00:00Z", updated_at="9999-12-31T23:59:59.999999+00:00")
    db.write()
    settings = await _run(db.path, pg_dsn)
    results = await verify_rows(settings)
    expected = [("sessions", 1, 1, 0, 0), ("messages", 0, 0, 0, 0)]
    assert expected == _counts(results)
    assert "differs in created_at, updated_at" == results[0].samples[0].split(": ", 1)[1]
    assert [False, True] == [q.ok for q in await verify_quick(settings)]


async def test_verify_reports_metadata_the_load_re_encoded_through_floats(
    tmp_path: Path, pg_dsn: str, broken_load: Callable[[Kind, Wrap], None]
) -> None:
    """Metadata whose numbers the load passed through a double (losing digits) fails verify."""
    broken_load(Kind.JSON, lambda _, text: json.dumps(json.loads(text)))
    db = app_db(tmp_path / "app.sqlite", good_sessions=1, messages_each=0)
    db.session(metadata='{"p": 3.14159265358979323846, "e": [2.718281828459045235360287]}')
    db.write()
    settings = await _run(db.path, pg_dsn)
    results = await verify_rows(settings)
    expected = [("sessions", 1, 1, 0, 0), ("messages", 0, 0, 0, 0)]
    assert expected == _counts(results)
    assert "differs in metadata" == results[0].samples[0].split(": ", 1)[1]


async def test_verify_reports_text_the_load_changed(
    tmp_path: Path, pg_dsn: str, broken_load: Callable[[Kind, Wrap], None]
) -> None:
    """Message content the load normalized (stripped of surrounding spaces) fails verify."""
    broken_load(Kind.TEXT, lambda _, text: text.strip() if isinstance(text, str | bytes) else text)
    db = app_db(tmp_path / "app.sqlite", good_sessions=0, messages_each=0)
    session = db.session()
    db.message(session["id"], content="  padded  ")
    db.message(session["id"])
    db.write()
    settings = await _run(db.path, pg_dsn)
    expected = [("sessions", 1, 0, 0, 0), ("messages", 1, 1, 0, 0)]
    assert expected == _counts(await verify_rows(settings))


GENERIC_DEFECTS: list[tuple[Kind, Wrap, int]] = [
    (Kind.INSTANT, lambda _, v: v if v is None else v.replace(microsecond=0), 1),
    (Kind.JSON_VALUE, lambda _, v: v if v is None else json.dumps(json.loads(v)), 2),
]


@pytest.mark.parametrize(("kind", "change", "different"), GENERIC_DEFECTS)
async def test_verify_reports_a_generic_tables_instants_and_json_the_load_changed(
    tmp_path: Path,
    pg_dsn: str,
    broken_load: Callable[[Kind, Wrap], None],
    kind: Kind,
    change: Wrap,
    different: int,
) -> None:
    """In a table outside the app profile, instants cut to the second and JSON re-encoded
    through floats count as different rows."""
    broken_load(kind, change)
    path = tmp_path / "other.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, at TIMESTAMP, doc JSON)")
    db.executemany(
        "INSERT INTO events VALUES (?, ?, ?)",
        [
            (1, "2024-01-01T00:00:00Z", "[1]"),
            (2, "2024-01-01T00:00:00.5Z", "[2.718281828459045235360287]"),
            (3, "2024-01-01T00:00:00Z", "[3.14159265358979323846]"),
        ],
    )
    db.commit()
    db.close()
    settings = await _run(path, pg_dsn)
    assert [("events", 3 - different, different, 0, 0)] == _counts(await verify_rows(settings))


REFERENCE_INSTANTS = [
    (b"2024-01-01T00:00:00Z", "2024-01-01 00:00:00+00"),
    (b"2024-01-01 05:30:00.25+05:30", "2024-01-01 00:00:00.25+00"),
    (b"2024-01-01T00:00:00.0000015Z", "2024-01-01 00:00:00.000002+00"),
    (b"2024-01-01T00:00:00.0000005Z", "2024-01-01 00:00:00+00"),
    (b"9999-12-31T23:59:59.999999", "9999-12-31 23:59:59.999999+00"),
    (b"0001-01-01T00:00:00-00:00", "0001-01-01 00:00:00+00"),
    (b"2024-02-29", "2024-02-29 00:00:00+00"),
    (b"2024-01-01T24:00:00Z", "2024-01-02 00:00:00+00"),
]


def test_the_reference_reads_instants_as_postgresql_prints_them() -> None:
    """The reference parser gives PostgreSQL's own UTC text for each ISO-8601 shape."""
    expected = [want for _, want in REFERENCE_INSTANTS]
    actual = [pg_instant_text(instant_micros(text)) for text, _ in REFERENCE_INSTANTS]
    assert expected == actual


def test_the_fast_utc_shape_gives_the_same_text_as_the_parser() -> None:
    """UTC text in the common shape is rewritten to exactly what the full parser computes."""
    texts = [
        b"2024-01-01T00:00:00Z",
        b"2024-01-01T23:59:59.120000+00:00",
        b"0001-01-01T00:00:00.000001Z",
        b"9999-12-31T23:59:59.999999+00:00",
    ]
    expected = [pg_instant_text(instant_micros(text)) for text in texts]
    assert expected == [instant_text(text) for text in texts]


def test_the_reference_refuses_what_is_not_an_instant() -> None:
    """Impossible dates, an hour alone, numbers and instants beyond year 9999 are unreadable."""
    texts: list[Any] = [b"2023-02-29", b"2024-01-01T05", 20240101, b"9999-12-31T23:59:59.9999995Z"]
    refused = []
    for raw in texts:
        try:
            instant_micros(raw, UTC)
        except Unreadable:
            refused.append(raw)
    assert texts == refused


def test_the_reference_is_not_the_converter() -> None:
    """The reference module imports nothing from the load's stages (it must stay separate)."""
    source = (Path(__file__).parent.parent / "pipeline" / "reference.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("from ", "import "))]
    assert [] == [line for line in imports if "stages" in line]


async def test_verify_of_a_utf16_source_with_non_ascii_keys_ends_and_judges_every_row(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A UTF-16 SQLite file (which orders keys by UTF-16 code units) with non-ASCII keys over
    several pages: verify and verify --quick end, match every row, and still find a missing
    and an extra row."""
    import anyio

    import flux_migrate.pipeline.verify

    path = tmp_path / "utf16.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA encoding = 'UTF-16le'")  # before the first table: the file's encoding
    db.executescript(SQLITE_DDL)
    db.execute(
        "INSERT INTO sessions (id, title, created_at, updated_at) VALUES (?, 't', ?, ?)",
        ("séance-Ā", GOOD_TS, GOOD_TS),
    )
    keys = ["A", "Ā", "é", "B", "東京", "🚀", "z", "ÿ", "\uffff", "a\u0100"]
    db.executemany(
        "INSERT INTO messages (id, session_id, role, content, created_at)"
        " VALUES (?, 'séance-Ā', 'user', 'héllo', ?)",
        [(f"m-{key}", GOOD_TS) for key in keys],
    )
    db.commit()
    db.close()
    assert [("UTF-16le",)] == sqlite3.connect(path).execute("PRAGMA encoding").fetchall()
    settings = await _run(path, pg_dsn)
    monkeypatch.setattr(flux_migrate.pipeline.verify, "PAGE", 3)
    with anyio.fail_after(60):
        assert [("sessions", 1, 0, 0, 0), ("messages", 10, 0, 0, 0)] == _counts(
            await verify_rows(settings)
        )
        assert [True, True] == [q.ok for q in await verify_quick(settings)]
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("DELETE FROM messages WHERE id = 'm-東京'")
        await conn.execute(
            "INSERT INTO messages (id, session_id, role, content, created_at)"
            " VALUES ('m-ü', 'séance-Ā', 'user', 'x', now())"
        )
    finally:
        await conn.close()
    with anyio.fail_after(60):
        results = await verify_rows(settings)
    assert [("sessions", 1, 0, 0, 0), ("messages", 9, 0, 1, 1)] == _counts(results)
    expected = ["messages m-東京: in the source but not in PostgreSQL"]
    expected.append("messages m-ü: in PostgreSQL but not in the source")
    assert expected == results[1].samples


_SQLITE_VALUES = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=8).map(str.encode),
    st.binary(max_size=8),
)


@settings(max_examples=150, deadline=None)
@given(row=st.lists(_SQLITE_VALUES, min_size=1, max_size=4), ascii_only=st.booleans())
def test_verify_reads_a_quarantined_row_back_as_the_source_row_it_was(
    row: list[Any], ascii_only: bool
) -> None:
    """A WITHOUT ROWID table's quarantined row is known to verify by its raw values: verify's
    own reading of what the quarantine wrote (either server encoding) gives the same identity
    as the source row it came from, and differs from any row with another value or storage
    class (an integer 1 and a real 1.0, the integer 1 and the text '1')."""
    columns = tuple(f"c{i}" for i in range(len(row)))
    table = Table(
        "t",
        tuple(Column(c, Kind.TEXT) for c in columns),
        primary_key=columns[:1],
        without_rowid=True,
        profile="generic",
    )
    ctx = SimpleNamespace(run_id="r", names=TargetNames(), table=table)
    reject = Reject(1, "k", tuple(row), "duplicate_key", "detail", "load")
    (record,) = quarantine_records(ctx, [reject], ascii_only=ascii_only)  # type: ignore[arg-type]
    raw_json = record[-1]
    assert generic.raw_identity(row) == generic.stored_identity(table, raw_json)
    for i, value in enumerate(row):
        for other in (1, 1.0, b"1", None):
            if type(other) is not type(value) or other != value:
                changed = [*row[:i], other, *row[i + 1 :]]
                if repr(changed) != repr(row):
                    assert generic.raw_identity(changed) != generic.stored_identity(table, raw_json)


async def test_a_loaded_row_sharing_its_key_with_a_quarantined_one_is_still_verified(
    tmp_path: Path, pg_dsn: str
) -> None:
    """In a WITHOUT ROWID table with an untyped key, 1 and '1' (and 2.5 and '2.5', x'61' and
    'a') are two source rows that convert to one key: the second is quarantined as a
    duplicate. verify and --quick pass, and still see a change to the row that was loaded
    with that key (before, every source row with a quarantined key was left out, so the
    loaded one was never compared)."""
    path = tmp_path / "kv.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE kv (k PRIMARY KEY, v TEXT) WITHOUT ROWID")
    rows = [(1, "int"), ("1", "text"), (2.5, "real"), ("2.5", "text"), (b"a", "blob")]
    db.executemany("INSERT INTO kv VALUES (?, ?)", [*rows, ("a", "text"), ("z", "alone")])
    db.commit()
    db.close()
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert 3 == cli("run", *args).returncode
    assert 3 == await fetchval(pg_dsn, "SELECT count(*) FROM flux_migrate.quarantine")
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout
    assert re.search(r"kv\s+4\s+0\s+0\s+0\s+3\s+0\s+ok", verified.stdout), verified.stdout
    assert 0 == cli("verify", "--quick", *args).returncode
    for key in ("1", "2.5", "a"):
        await fetchval(pg_dsn, "UPDATE kv SET v = v || '!' WHERE k = $1", key)
        changed = cli("verify", *args)
        assert 1 == changed.returncode, changed.stdout
        assert f"kv k='{key}': differs" in changed.stdout, changed.stdout
        assert 1 == cli("verify", "--quick", *args).returncode
        await fetchval(pg_dsn, "UPDATE kv SET v = rtrim(v, '!') WHERE k = $1", key)


_NUMBERS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False),
    st.decimals(allow_nan=False, places=None),
    st.sampled_from([0, 10, 10.0, Decimal("1E+1"), Decimal("10.000"), -0.0, Decimal("-0")]),
)
_INSTANTS = st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]))


@settings(max_examples=300, deadline=None)
@given(a=st.one_of(_NUMBERS, _INSTANTS), b=st.one_of(_NUMBERS, _INSTANTS))
def test_the_quick_of_another_table_hashes_equal_values_alike_and_others_apart(
    a: Any, b: Any
) -> None:
    """`verify --quick` of a table outside the app hashes a text of each row that is the same
    exactly when the full verify finds the rows equal (Python's ==): the source's reading of
    a numeric 1.078057635350481e+16 and PostgreSQL's 10780576353504810 are one value (the
    quick said MISMATCH), an instant is one whatever its offset, and 40 digits are not
    rounded to 28."""
    assert (generic.canonical_text((a,)) == generic.canonical_text((b,))) == (a == b)
    edge = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5, minutes=30)))  # before year 1 UTC
    assert generic.canonical_text((edge,)) != generic.canonical_text((edge.replace(tzinfo=UTC),))
    assert generic.canonical_text((Decimal(10**39 + 1),)) != generic.canonical_text(
        (Decimal(10**39),)
    )
