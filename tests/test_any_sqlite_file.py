"""Any SQLite file, every row (issue 18): rows at any rowid, tables named like FTS shadows,
columns named rowid, generated columns, offsets with seconds; `verify` reads the source by
its own path, so a row the load never read is reported missing."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from flux_migrate.core.errors import MigrateError, RuntimeFailure
from flux_migrate.core.schema import SQLITE_DDL
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import Settings, load_settings
from flux_migrate.pipeline.verify import TableVerify, verify_quick, verify_rows
from tests.support import cli

pytestmark = pytest.mark.anyio


def _db(path: Path, script: str, rows: dict[str, list[tuple[Any, ...]]] | None = None) -> Path:
    db = sqlite3.connect(path)
    db.executescript(script)
    for sql, values in (rows or {}).items():
        db.executemany(sql, values)
    db.commit()
    db.close()
    return path


async def _migrate(path: Path, dsn: str, **options: Any) -> Settings:
    settings = load_settings(None, sqlite_path=path, postgres_dsn=dsn, **options)
    report = await migrate(settings)
    assert "completed" == report.status, report
    return settings


async def _rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(r.values()) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


def _by_table(results: list[TableVerify]) -> dict[str, tuple[int, int, int, int, bool]]:
    return {r.table: (r.matched, r.different, r.missing, r.extra, r.ok) for r in results}


# ---------------------------------------------------------------- case 1: rowid <= 0


@pytest.mark.parametrize("batch_size", [1, 2, 1000])
async def test_rows_at_rowid_zero_and_below_are_read(
    tmp_path: Path, pg_dsn: str, batch_size: int
) -> None:
    """Keys -1, 0 and the most negative but one, and a key-less table's rows at rowid -5 and
    0, all arrive (in pages of any size), and verify matches every one."""
    low = -(2**63) + 1
    path = _db(
        tmp_path / "neg.sqlite",
        "CREATE TABLE k (id INTEGER PRIMARY KEY, v TEXT);CREATE TABLE nokey (v TEXT);",
        {
            "INSERT INTO k VALUES (?, ?)": [(low, "min"), (-1, "a"), (0, "b"), (1, "c")],
            "INSERT INTO nokey (rowid, v) VALUES (?, ?)": [(-5, "x"), (0, "y"), (3, "z")],
        },
    )
    settings = await _migrate(path, pg_dsn, batch_size=batch_size)
    ids = await _rows(pg_dsn, "SELECT id FROM k ORDER BY id")
    assert [(low,), (-1,), (0,), (1,)] == ids
    assert [("x",), ("y",), ("z",)] == await _rows(pg_dsn, "SELECT v FROM nokey ORDER BY v")
    assert {"k": (4, 0, 0, 0, True), "nokey": (3, 0, 0, 0, True)} == _by_table(
        await verify_rows(settings)
    )


async def test_rows_added_below_zero_after_a_run_load_on_the_rerun_only_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A rerun after the first finished loads nothing twice, whatever the rowids."""
    path = _db(
        tmp_path / "neg.sqlite",
        "CREATE TABLE k (id INTEGER PRIMARY KEY, v TEXT);",
        {"INSERT INTO k VALUES (?, ?)": [(-3, "a"), (0, "b")]},
    )
    settings = await _migrate(path, pg_dsn)
    await _migrate(path, pg_dsn)
    assert [(-3,), (0,)] == await _rows(pg_dsn, "SELECT id FROM k ORDER BY id")
    assert {"k": (2, 0, 0, 0, True)} == _by_table(await verify_rows(settings))


async def test_the_smallest_rowid_is_refused_before_writing(tmp_path: Path, pg_dsn: str) -> None:
    """A row at rowid -2**63 (which a checkpoint cannot tell from "nothing read") stops the
    run with exit 2 and one sentence naming the table; nothing is written."""
    path = _db(
        tmp_path / "min.sqlite",
        "CREATE TABLE k (id INTEGER PRIMARY KEY, v TEXT);",
        {"INSERT INTO k VALUES (?, ?)": [(-(2**63), "a"), (1, "b")]},
    )
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 2 == done.returncode, done.stderr
    assert "Table k" in done.stderr and "-9223372036854775808" in done.stderr
    assert "Traceback" not in done.stderr
    assert [(None,)] == await _rows(pg_dsn, "SELECT to_regclass('public.k')")


async def test_verify_reports_rows_the_load_never_read(tmp_path: Path, pg_dsn: str) -> None:
    """Rows added to the source at rowids below what was loaded (never read by a rerun,
    which resumes after its checkpoint) are reported missing by verify and verify --quick."""
    path = _db(
        tmp_path / "late.sqlite",
        "CREATE TABLE k (id INTEGER PRIMARY KEY, v TEXT); CREATE TABLE n (v TEXT);",
        {
            "INSERT INTO k VALUES (?, ?)": [(5, "a"), (6, "b")],
            "INSERT INTO n (rowid, v) VALUES (?, ?)": [(5, "a")],
        },
    )
    settings = await _migrate(path, pg_dsn)
    db = sqlite3.connect(path)
    db.execute("INSERT INTO k VALUES (-7, 'late')")
    db.execute("INSERT INTO n (rowid, v) VALUES (-7, 'late')")
    db.commit()
    db.close()
    found = _by_table(await verify_rows(settings))
    assert (2, 0, 1, 0, False) == found["k"]
    assert (1, 0, 1, 0, False) == found["n"]
    quick = {q.table: (q.source_count, q.target_count, q.ok) for q in await verify_quick(settings)}
    assert {"k": (3, 2, False), "n": (2, 1, False)} == quick


# ---------------------------------------------------------------- case 2: FTS names


@pytest.mark.parametrize("module", ["fts5", "fts4", "fts3"])
async def test_tables_named_like_an_fts_table_are_migrated(
    tmp_path: Path, pg_dsn: str, module: str
) -> None:
    """search_history and search_content2 beside the FTS table search are ordinary tables and
    arrive; the FTS table's own shadow tables are derived data and do not."""
    path = _db(
        tmp_path / "fts.sqlite",
        f"CREATE VIRTUAL TABLE search USING {module}(body);"
        "CREATE TABLE search_history (id INTEGER PRIMARY KEY, q TEXT);"
        "CREATE TABLE search_content2 (q TEXT);"
        "CREATE TABLE search_ (q TEXT);"
        "INSERT INTO search (body) VALUES ('hello world');",
        {
            "INSERT INTO search_history VALUES (?, ?)": [(1, "hello"), (2, "world")],
            "INSERT INTO search_content2 VALUES (?)": [("x",)],
            "INSERT INTO search_ VALUES (?)": [("y",)],
        },
    )
    settings = await _migrate(path, pg_dsn)
    tables = await _rows(
        pg_dsn,
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    assert [("search_",), ("search_content2",), ("search_history",)] == tables
    assert [(1, "hello"), (2, "world")] == await _rows(
        pg_dsn, "SELECT * FROM search_history ORDER BY id"
    )
    assert all(r.ok for r in await verify_rows(settings))
    made = cli("init", "--sqlite-path", str(path), "--out", str(tmp_path / "m.toml"))
    assert 0 == made.returncode, made.stderr
    assert 'name = "search_history"' in (tmp_path / "m.toml").read_text(encoding="utf-8")


# ---------------------------------------------------------------- case 3: a column "rowid"


@pytest.mark.parametrize("batch_size", [1, 1000])
async def test_a_real_column_named_rowid_is_data_and_paging_uses_the_row_id(
    tmp_path: Path, pg_dsn: str, batch_size: int
) -> None:
    """A column called rowid holding NULL, repeated values and text is loaded as it is, every
    row once, in pages of any size; verify matches."""
    path = _db(
        tmp_path / "rowid.sqlite",
        'CREATE TABLE t ("rowid" TEXT, v INTEGER);'
        'CREATE TABLE u ("RowId" INTEGER, "_rowid_" INTEGER, v TEXT);',
        {
            "INSERT INTO t VALUES (?, ?)": [(None, 1), ("7", 2), ("7", 3), ("abc", 4), ("7", 5)],
            "INSERT INTO u VALUES (?, ?, ?)": [(1, 1, "a"), (1, 1, "b"), (None, None, "c")],
        },
    )
    settings = await _migrate(path, pg_dsn, batch_size=batch_size)
    got = await _rows(pg_dsn, 'SELECT "rowid", v FROM t ORDER BY v')
    assert [(None, 1), ("7", 2), ("7", 3), ("abc", 4), ("7", 5)] == got
    assert [(1, 1, "a"), (1, 1, "b"), (None, None, "c")] == await _rows(
        pg_dsn, 'SELECT "RowId", "_rowid_", v FROM u ORDER BY v'
    )
    assert {"t": (5, 0, 0, 0, True), "u": (3, 0, 0, 0, True)} == _by_table(
        await verify_rows(settings)
    )


async def test_columns_named_rowid_oid_and_rowid_alias_with_an_integer_key(
    tmp_path: Path, pg_dsn: str
) -> None:
    """All three row id names taken by columns: an INTEGER PRIMARY KEY (the row id itself)
    pages the table; without one the run is refused with exit 2 naming the table."""
    path = _db(
        tmp_path / "all.sqlite",
        'CREATE TABLE t (k INTEGER PRIMARY KEY, "rowid" TEXT, "_rowid_" TEXT, "oid" TEXT);',
        {"INSERT INTO t VALUES (?, ?, ?, ?)": [(-2, "a", "b", "c"), (0, None, "x", "y")]},
    )
    settings = await _migrate(path, pg_dsn, batch_size=1)
    assert [(-2, "a"), (0, None)] == await _rows(pg_dsn, 'SELECT k, "rowid" FROM t ORDER BY k')
    assert {"t": (2, 0, 0, 0, True)} == _by_table(await verify_rows(settings))
    bad = _db(
        tmp_path / "bad.sqlite",
        'CREATE TABLE w ("rowid" TEXT, "_rowid_" TEXT, "oid" TEXT);'
        "INSERT INTO w VALUES ('a', 'b', 'c');",
    )
    done = cli("run", "--sqlite-path", str(bad), "--postgres-dsn", pg_dsn)
    assert 2 == done.returncode, done.stderr
    assert "Table w" in done.stderr and "Traceback" not in done.stderr


async def test_without_rowid_tables_with_a_column_named_rowid_keep_working(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A WITHOUT ROWID table keyed by a column called rowid loads every row and verifies."""
    path = _db(
        tmp_path / "wr.sqlite",
        'CREATE TABLE t ("rowid" TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID;',
        {"INSERT INTO t VALUES (?, ?)": [(str(i), i) for i in range(-3, 4)]},
    )
    settings = await _migrate(path, pg_dsn, batch_size=2)
    assert 7 == len(await _rows(pg_dsn, "SELECT * FROM t"))
    assert {"t": (7, 0, 0, 0, True)} == _by_table(await verify_rows(settings))


# ---------------------------------------------------------------- case 9: generated columns


async def test_generated_columns_are_loaded_as_values(tmp_path: Path, pg_dsn: str) -> None:
    """VIRTUAL and STORED generated columns arrive as the values SQLite computes; init notes
    them; verify matches."""
    path = _db(
        tmp_path / "gen.sqlite",
        "CREATE TABLE g (id INTEGER PRIMARY KEY, a INTEGER, b INTEGER,"
        " s INTEGER GENERATED ALWAYS AS (a + b) VIRTUAL,"
        " t TEXT GENERATED ALWAYS AS ('x' || a) STORED);",
        {"INSERT INTO g (id, a, b) VALUES (?, ?, ?)": [(1, 1, 2), (2, 5, None)]},
    )
    settings = await _migrate(path, pg_dsn)
    assert [(1, 3, "x1"), (2, None, "x5")] == await _rows(
        pg_dsn, "SELECT id, s, t FROM g ORDER BY id"
    )
    assert {"g": (2, 0, 0, 0, True)} == _by_table(await verify_rows(settings))
    out = tmp_path / "m.toml"
    assert 0 == cli("init", "--sqlite-path", str(path), "--out", str(out)).returncode
    assert "generated" in out.read_text(encoding="utf-8")


# ---------------------------------------------------------------- case 17: offset seconds


async def test_verify_reads_offsets_with_seconds(tmp_path: Path, pg_dsn: str) -> None:
    """Instants written with an offset in seconds (+05:30:15, -01:00:59) load and verify."""
    path = _db(
        tmp_path / "off.sqlite",
        "CREATE TABLE e (id INTEGER PRIMARY KEY, at DATETIME);",
        {
            "INSERT INTO e VALUES (?, ?)": [
                (1, "2024-01-01T10:00:00+05:30:15"),
                (2, "2024-01-01 10:00:00.25-01:00:59"),
                (3, "2024-01-01T10:00:00+0530"),
            ]
        },
    )
    settings = await _migrate(path, pg_dsn)
    got = await _rows(pg_dsn, "SELECT id, (at AT TIME ZONE 'UTC')::text FROM e ORDER BY id")
    expected = [
        (1, "2024-01-01 04:29:45"),
        (2, "2024-01-01 11:00:59.25"),
        (3, "2024-01-01 04:30:00"),
    ]
    assert expected == got
    assert {"e": (3, 0, 0, 0, True)} == _by_table(await verify_rows(settings))


async def test_offsets_postgresql_reads_otherwise_keep_the_column_text(
    tmp_path: Path, pg_dsn: str
) -> None:
    """+053015 and +05:30:15.5 (Python reads them, PostgreSQL does not) keep a DATETIME column
    text, verbatim, instead of loading an instant PostgreSQL would not agree with."""
    path = _db(
        tmp_path / "odd.sqlite",
        "CREATE TABLE e (id INTEGER PRIMARY KEY, at DATETIME);",
        {
            "INSERT INTO e VALUES (?, ?)": [
                (1, "2024-01-01T10:00:00+05:30:15"),
                (2, "2024-01-01T10:00:00+053015"),
                (3, "2024-01-01T10:00:00-05:30:15.5"),
            ]
        },
    )
    settings = await _migrate(path, pg_dsn)
    assert "text" == (await _types(pg_dsn, "e"))["at"]
    assert [
        ("2024-01-01T10:00:00+05:30:15",),
        ("2024-01-01T10:00:00+053015",),
        ("2024-01-01T10:00:00-05:30:15.5",),
    ] == await _rows(pg_dsn, "SELECT at FROM e ORDER BY id")
    assert {"e": (3, 0, 0, 0, True)} == _by_table(await verify_rows(settings))


# ---------------------------------------------------------------- keys pending


async def test_verify_says_when_keys_are_still_pending(tmp_path: Path, pg_dsn: str) -> None:
    """Rows that match in a table whose keys a run has not built yet: verify exits 1 and says
    the keys are pending and how to build them."""
    path = _db(
        tmp_path / "p.sqlite",
        "CREATE TABLE k (id INTEGER PRIMARY KEY, v TEXT);",
        {"INSERT INTO k VALUES (?, ?)": [(1, "a")]},
    )
    await _migrate(path, pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE flux_migrate.checkpoints SET constraints_pending = true")
    finally:
        await conn.close()
    done = cli("verify", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 1 == done.returncode
    assert "KEYS PENDING" in done.stdout and "not built yet" in done.stdout
    quick = cli("verify", "--quick", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 1 == quick.returncode
    assert "KEYS PENDING" in quick.stdout


# ---------------------------------------------------------------- types: cases 4, 5, 6, 8


async def _types(dsn: str, table: str) -> dict[str, str]:
    rows = await _rows(
        dsn,
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute"
        f" WHERE attrelid = 'public.{table}'::regclass AND attnum > 0 ORDER BY attnum",
    )
    return dict(rows)  # type: ignore[arg-type]


async def _quarantined(dsn: str) -> list[tuple[Any, ...]]:
    return await _rows(
        dsn, "SELECT source_table, reason FROM flux_migrate.quarantine ORDER BY source_rowid"
    )


async def test_numbers_in_date_columns_are_never_read_as_epoch(tmp_path: Path, pg_dsn: str) -> None:
    """20240101 in a DATE column, the julian day 2460310.5, seconds mixed with milliseconds,
    negative and fractional numbers arrive as the numbers they are; a column mixing numbers
    and ISO text is kept as text, the numbers as their exact decimal text."""
    path = _db(
        tmp_path / "dates.sqlite",
        "CREATE TABLE d (id INTEGER PRIMARY KEY, day DATE, jd DATETIME, mixed TIMESTAMP,"
        ' "both" DATETIME);',
        {
            "INSERT INTO d VALUES (?, ?, ?, ?, ?)": [
                (1, 20240101, 2460310.5, 1700000000, 1700000000),
                (2, -5, 2460310.75, 1700000000123, "2024-01-01T00:00:00Z"),
                (3, None, 0.5, 0, 1.5),
            ]
        },
    )
    settings = await _migrate(path, pg_dsn)
    types = await _types(pg_dsn, "d")
    assert ("bigint", "numeric", "bigint", "text") == (
        types["day"], types["jd"], types["mixed"], types["both"],
    )  # fmt: skip
    got = await _rows(pg_dsn, 'SELECT day, jd::text, mixed, "both" FROM d ORDER BY id')
    assert [
        (20240101, "2460310.5", 1700000000, "1700000000"),
        (-5, "2460310.75", 1700000000123, "2024-01-01T00:00:00Z"),
        (None, "0.5", 0, "1.5"),
    ] == got
    assert [] == await _quarantined(pg_dsn)
    assert all(r.ok for r in await verify_rows(settings))


async def test_a_mapping_that_names_the_unit_reads_julian_days_and_epochs(
    tmp_path: Path, pg_dsn: str
) -> None:
    """epoch = "julian", "s" and "ms" in an edited mapping read numbers as those instants;
    verify agrees."""
    path = _db(
        tmp_path / "units.sqlite",
        "CREATE TABLE u (id INTEGER PRIMARY KEY, jd REAL, s INTEGER, ms INTEGER);",
        {"INSERT INTO u VALUES (?, ?, ?, ?)": [(1, 2460310.5, 1704067200, 1704067200123)]},
    )
    out = tmp_path / "m.toml"
    assert 0 == cli("init", "--sqlite-path", str(path), "--out", str(out)).returncode
    text = out.read_text(encoding="utf-8")
    for name, unit in (("jd", "julian"), ("s", "s"), ("ms", "ms")):
        block = f'name = "{name}"\nconvert = "'
        start = text.index(block)
        end = text.index("\n\n", start) if "\n\n" in text[start:] else len(text)
        text = (
            text[:start]
            + (
                f'name = "{name}"\nconvert = "instant"\ntype = "timestamptz"\nnot_null = false\n'
                f'epoch = "{unit}"'
            )
            + text[end:]
        )
    out.write_text(text, encoding="utf-8")
    settings = load_settings(out, sqlite_path=path, postgres_dsn=pg_dsn)
    assert "completed" == (await migrate(settings)).status
    got = await _rows(
        pg_dsn,
        "SELECT (jd AT TIME ZONE 'UTC')::text, (s AT TIME ZONE 'UTC')::text,"
        " (ms AT TIME ZONE 'UTC')::text FROM u",
    )
    assert [("2024-01-01 00:00:00", "2024-01-01 00:00:00", "2024-01-01 00:00:00.123")] == got
    assert all(r.ok for r in await verify_rows(settings))


async def test_text_is_never_parsed_as_a_number(tmp_path: Path, pg_dsn: str) -> None:
    """'1_000' in a NUMERIC column keeps the column text, verbatim; a STRICT table's
    ANY column keeps '0123' and ' 7 ' as written, and one holding only integers is bigint."""
    path = _db(
        tmp_path / "num.sqlite",
        "CREATE TABLE n (id INTEGER PRIMARY KEY, amount NUMERIC, plain NUMERIC);"
        "CREATE TABLE s (id INTEGER PRIMARY KEY, a ANY, i ANY) STRICT;",
        {
            "INSERT INTO n VALUES (?, ?, ?)": [(1, "1_000", 12), (2, " 7 ", "3.5"), (3, 12, None)],
            "INSERT INTO s VALUES (?, ?, ?)": [(1, "0123", 1), (2, " 7 ", -2), (3, 5, None)],
        },
    )
    settings = await _migrate(path, pg_dsn)
    types = await _types(pg_dsn, "n")
    assert ("text", "numeric") == (types["amount"], types["plain"])
    # ' 7 ' is a number to SQLite's NUMERIC affinity: it stored the integer 7
    assert [("1_000", 12), ("7", 3.5), ("12", None)] == [
        (a, None if p is None else float(p))
        for a, p in await _rows(pg_dsn, "SELECT amount, plain FROM n ORDER BY id")
    ]
    types = await _types(pg_dsn, "s")
    assert ("text", "bigint") == (types["a"], types["i"])
    assert [("0123", 1), (" 7 ", -2), ("5", None)] == await _rows(
        pg_dsn, "SELECT a, i FROM s ORDER BY id"
    )
    assert all(r.ok for r in await verify_rows(settings))


async def test_promotions_that_would_lose_information_keep_the_text(
    tmp_path: Path, pg_dsn: str
) -> None:
    """JSON with a key twice (TEXT or JSON declared) and instants with a 7th fraction digit
    stay text, each value verbatim: two different fractions stay two values."""
    path = _db(
        tmp_path / "lossy.sqlite",
        "CREATE TABLE l (id INTEGER PRIMARY KEY, doc TEXT, js JSON, at TEXT, dt DATETIME,"
        " ok TEXT);",
        {
            "INSERT INTO l VALUES (?, ?, ?, ?, ?, ?)": [
                (1, '{"a":1,"a":2}', '{"a":1,"a":2}', "2024-01-01T00:00:00.1234567Z",
                 "2024-01-01 00:00:00.1234567", '{"b": [1, 2]}'),
                (2, '{"a":1}', "[1]", "2024-01-01T00:00:00.1234568Z",
                 "2024-01-01 00:00:00.1234568", '{"a": {"a": 1}}'),
            ]
        },
    )  # fmt: skip
    settings = await _migrate(path, pg_dsn)
    types = await _types(pg_dsn, "l")
    assert ["text", "text", "text", "text", "jsonb"] == [
        types[c] for c in ("doc", "js", "at", "dt", "ok")
    ]
    got = await _rows(pg_dsn, "SELECT doc, js, at, dt FROM l ORDER BY id")
    assert [
        ('{"a":1,"a":2}', '{"a":1,"a":2}', "2024-01-01T00:00:00.1234567Z",
         "2024-01-01 00:00:00.1234567"),
        ('{"a":1}', "[1]", "2024-01-01T00:00:00.1234568Z", "2024-01-01 00:00:00.1234568"),
    ] == got  # fmt: skip
    assert all(r.ok for r in await verify_rows(settings))


async def test_a_mapping_forcing_jsonb_quarantines_duplicate_keys(
    tmp_path: Path, pg_dsn: str
) -> None:
    """An edited mapping that makes a text column jsonb: the object with a key twice is
    quarantined as json_duplicate_key (never loaded with one key dropped); verify passes."""
    path = _db(
        tmp_path / "dup.sqlite",
        "CREATE TABLE j (id INTEGER PRIMARY KEY, doc TEXT);",
        {"INSERT INTO j VALUES (?, ?)": [(1, '{"a":1,"a":2}'), (2, '{"a":1}')]},
    )
    out = tmp_path / "m.toml"
    assert 0 == cli("init", "--sqlite-path", str(path), "--out", str(out)).returncode
    text = out.read_text(encoding="utf-8")
    text = text.replace(
        'name = "doc"\nconvert = "nullable_text"\ntype = "text"',
        'name = "doc"\nconvert = "json_value"\ntype = "jsonb"',
    )
    out.write_text(text, encoding="utf-8")
    settings = load_settings(out, sqlite_path=path, postgres_dsn=pg_dsn)
    assert "completed" == (await migrate(settings)).status
    assert [("j", "json_duplicate_key")] == await _quarantined(pg_dsn)
    assert [(2,)] == await _rows(pg_dsn, "SELECT id FROM j")
    assert all(r.ok for r in await verify_rows(settings))


async def test_a_type_is_decided_on_every_value_not_a_sample(tmp_path: Path, pg_dsn: str) -> None:
    """1,000 timestamps then 'soon', ISO week dates, and JSON arrays with one '[NaN]' all keep
    their column text: nothing is quarantined and every value arrives verbatim."""
    stamps = [(f"2024-01-01T00:00:{i % 60:02d}Z",) for i in range(1000)] + [("soon",)]
    path = _db(
        tmp_path / "guess.sqlite",
        "CREATE TABLE a (at TEXT); CREATE TABLE w (at TEXT); CREATE TABLE j (doc TEXT);",
        {
            "INSERT INTO a VALUES (?)": stamps,
            "INSERT INTO w VALUES (?)": [("2024-W01-1T10:00:00",), ("2024-W52-7T00:00:00",)],
            "INSERT INTO j VALUES (?)": [("[1]",)] * 1000 + [("[NaN]",)],
        },
    )
    settings = await _migrate(path, pg_dsn)
    assert [] == await _quarantined(pg_dsn)
    for table, column in (("a", "at"), ("w", "at"), ("j", "doc")):
        assert "text" == (await _types(pg_dsn, table))[column]
    assert [("soon",)] == await _rows(pg_dsn, "SELECT at FROM a WHERE at = 'soon'")
    assert [(1001,)] == await _rows(pg_dsn, "SELECT count(*) FROM j")
    assert all(r.ok for r in await verify_rows(settings))


# ---------------------------------------------------------------- accounting and sync


@pytest.mark.parametrize("skipped", ["a", "z"])
async def test_a_row_the_reader_skips_fails_the_run_by_its_count(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch, skipped: str
) -> None:
    """A reader that misses rows (here: pages that start at rowid 0, the old bug) is caught
    by the run's own comparison with SQLite's count(*): the run fails naming the table, and
    the table is not recorded as finished. Whether it is the first table (counted before the
    next one starts) or the last (counted while the keys are built)."""
    import flux_migrate.stages.extract as extract

    original = extract.keyset_sql

    def skipping(table: Any) -> str:
        return original(table).replace(" WHERE ", " WHERE t.rowid > 0 AND ", 1)

    monkeypatch.setattr(extract, "keyset_sql", skipping)
    other = "z" if skipped == "a" else "a"
    path = _db(
        tmp_path / "skip.sqlite",
        f"CREATE TABLE {skipped} (id INTEGER PRIMARY KEY, v TEXT);"
        f" CREATE TABLE {other} (id INTEGER PRIMARY KEY, v TEXT);",
        {
            f"INSERT INTO {skipped} VALUES (?, ?)": [(-1, "a"), (0, "b"), (1, "c")],
            f"INSERT INTO {other} VALUES (?, ?)": [(1, "d"), (2, "e")],
        },
    )
    settings = load_settings(None, sqlite_path=path, postgres_dsn=pg_dsn)
    with pytest.raises(
        RuntimeFailure, match=f"Accounting failed for {skipped}: SQLite counts 3 rows"
    ):
        await migrate(settings)
    status = dict(await _rows(pg_dsn, "SELECT source_table, status FROM flux_migrate.checkpoints"))
    assert status[skipped] != "finished"
    # Tables load in name order: "a" first, and the run stops before "z" is read.
    assert (status[other] == "finished") == (other == "a")


@pytest.mark.parametrize("failing", ["a", "z"])
async def test_a_witness_count_that_fails_fails_the_run(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """The count that witnesses a table's rows failing (here: SQLite refusing it) fails the
    run with that failure, whether it ran before the next table or beside the key build; the
    table is not recorded as finished."""
    import flux_migrate.pipeline.runner as runner

    original = runner.count_between

    async def count(conn: Any, table: Any, after: int, upto: int, **kw: Any) -> int:
        if table.name == failing and not kw.get("by_index"):
            raise sqlite3.OperationalError("disk I/O error")
        return await original(conn, table, after, upto, **kw)

    monkeypatch.setattr(runner, "count_between", count)
    path = _db(
        tmp_path / "witness.sqlite",
        "CREATE TABLE a (id INTEGER PRIMARY KEY, v TEXT); CREATE TABLE z (id INTEGER PRIMARY KEY);",
        {"INSERT INTO a VALUES (?, ?)": [(1, "a"), (2, "b")], "INSERT INTO z VALUES (?)": [(7,)]},
    )
    with pytest.raises(MigrateError, match="disk I/O error"):
        await migrate(load_settings(None, sqlite_path=path, postgres_dsn=pg_dsn))
    status = dict(await _rows(pg_dsn, "SELECT source_table, status FROM flux_migrate.checkpoints"))
    assert status[failing] != "finished"


async def test_sync_and_verify_agree_on_rows_at_negative_rowids(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Rows the app adds at negative rowids after a run, and updates of rows at rowid 0, are
    applied by sync, and verify then matches every row (none called "not in the source")."""
    path = _db(
        tmp_path / "sync.sqlite",
        "CREATE TABLE k (id INTEGER PRIMARY KEY, v TEXT);",
        {"INSERT INTO k VALUES (?, ?)": [(-2, "a"), (0, "b"), (4, "c")]},
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *args).returncode
    db = sqlite3.connect(path)
    db.execute("INSERT INTO k VALUES (-9, 'new')")
    db.execute("UPDATE k SET v = 'changed' WHERE id = 0")
    db.commit()
    db.close()
    done = cli("sync", *args)
    assert 0 == done.returncode, done.stdout + done.stderr
    assert [(-9, "new"), (-2, "a"), (0, "changed"), (4, "c")] == await _rows(
        pg_dsn, "SELECT id, v FROM k ORDER BY id"
    )
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout
    status = cli("status", "--postgres-dsn", pg_dsn)
    assert "-9223372036854775808" not in status.stdout


async def test_the_apps_own_tables_are_read_at_every_rowid(tmp_path: Path, pg_dsn: str) -> None:
    """sessions and messages rows stored at rowids -1 and 0 arrive and verify, like the rest."""
    ts = "2025-01-01T00:00:00+00:00"
    path = _db(
        tmp_path / "app.sqlite",
        SQLITE_DDL,
        {
            "INSERT INTO sessions (rowid, id, title, created_at, updated_at, metadata, user_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)": [
                (-1, "s-neg", "a", ts, ts, "{}", "u"),
                (0, "s-zero", "b", ts, ts, "{}", ""),
                (5, "s-pos", "c", ts, ts, "{}", "u"),
            ],
            "INSERT INTO messages (rowid, id, session_id, role, content, metadata, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)": [
                (-7, "m-neg", "s-neg", "user", "hi", "{}", ts),
                (0, "m-zero", "s-zero", "assistant", "yo", "{}", ts),
            ],
        },
    )
    settings = await _migrate(path, pg_dsn)
    assert [("s-neg",), ("s-pos",), ("s-zero",)] == await _rows(
        pg_dsn, "SELECT id FROM sessions ORDER BY id"
    )
    assert [("m-neg",), ("m-zero",)] == await _rows(pg_dsn, "SELECT id FROM messages ORDER BY id")
    assert {"sessions": (3, 0, 0, 0, True), "messages": (2, 0, 0, 0, True)} == _by_table(
        await verify_rows(settings)
    )


async def test_new_values_do_not_change_the_types_an_earlier_run_created(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A rerun, verify and sync keep the mapping the first run used (recorded in the target):
    'soon' added to a column of instants is quarantined by the rerun instead of the rerun
    being refused, and verify still matches; --restart decides the types again."""
    path = _db(
        tmp_path / "flip.sqlite",
        "CREATE TABLE e (id INTEGER PRIMARY KEY, at TEXT);",
        {"INSERT INTO e VALUES (?, ?)": [(1, "2024-01-01T00:00:00Z"), (2, "2024-01-02 10:00:00")]},
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *args).returncode
    db = sqlite3.connect(path)
    db.execute("INSERT INTO e VALUES (3, 'soon')")
    db.commit()
    db.close()
    again = cli("run", *args)
    assert 3 == again.returncode, again.stderr
    assert [("e", "invalid_timestamp")] == await _quarantined(pg_dsn)
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout
    restarted = cli("run", *args, "--restart", "--yes")
    assert 0 == restarted.returncode, restarted.stderr
    assert "text" == (await _types(pg_dsn, "e"))["at"]
    assert [("soon",)] == await _rows(pg_dsn, "SELECT at FROM e WHERE id = 3")
