"""`run` into existing tables: it loads only where every value survives unchanged, and refuses
(exit 2, naming the column, its type and the type needed) before writing otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest

from flux_migrate.core.schema import TABLES, TargetNames, create_table_sql
from tests.dirty import app_db
from tests.support import cli, fetchval, source_rows, target_rows

pytestmark = pytest.mark.anyio


async def _precreate(dsn: str, table: str, column: str, ddl_type: str) -> None:
    """Create the app's tables as flux-migrate would, with one column of another type."""
    conn = await asyncpg.connect(dsn)
    try:
        for t in TABLES:
            sql = create_table_sql(t, TargetNames())
            if t.name == table:
                start = sql.index(f'"{column}" ') + len(column) + 3
                end = min(i for i in (sql.find(",", start), sql.find(" NOT NULL", start)) if i > 0)
                sql = sql[:start] + ddl_type + sql[end:]
            await conn.execute(sql)
    finally:
        await conn.close()


def _run(path: Path, dsn: str) -> tuple[int, str]:
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", dsn, "--log-format", "json")
    errors = [json.loads(line)["error"] for line in done.stderr.splitlines() if '"error"' in line]
    return done.returncode, errors[-1] if errors else ""


@pytest.mark.parametrize(
    ("table", "column", "ddl_type", "shown"),
    [
        ("sessions", "created_at", "date", "date"),
        ("sessions", "created_at", "timestamptz(0)", "timestamp(0) with time zone"),
        ("sessions", "created_at", "timestamp", "timestamp without time zone"),
        ("sessions", "created_at", "text", "text"),
        ("sessions", "title", "bytea", "bytea"),
        ("sessions", "title", "char(40)", "character(40)"),
        ("sessions", "id", "uuid", "uuid"),
        ("messages", "id", "integer", "integer"),
        ("messages", "metadata", "json", "json"),
    ],
)
async def test_a_column_type_that_would_change_values_is_refused_before_writing(
    tmp_path: Path, pg_dsn: str, table: str, column: str, ddl_type: str, shown: str
) -> None:
    """Exit 2 names the column, its type and the type needed; no row is written."""
    db = app_db(tmp_path / "app.sqlite").write()
    await _precreate(pg_dsn, table, column, ddl_type)
    code, error = _run(db, pg_dsn)
    assert 2 == code
    assert f'Column {column} of "public"."{table}" is {shown}' in error
    assert "it needs" in error
    assert 0 == await fetchval(pg_dsn, "SELECT count(*) FROM sessions")
    assert 0 == await fetchval(pg_dsn, "SELECT count(*) FROM messages")


async def test_a_missing_column_is_refused_naming_it(tmp_path: Path, pg_dsn: str) -> None:
    """A target table without a mapped column: exit 2 with the column and the type to add."""
    db = app_db(tmp_path / "app.sqlite").write()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("CREATE TABLE sessions (id text PRIMARY KEY, title text)")
    finally:
        await conn.close()
    code, error = _run(db, pg_dsn)
    assert 2 == code
    assert 'Table "public"."sessions" has no column created_at; add it as timestamptz' in error


async def test_varchar_columns_load_exactly_and_quarantine_values_too_long(
    tmp_path: Path, pg_dsn: str
) -> None:
    """ORM-style varchar(255) title and text ids load byte-exact; a 300-character title is
    quarantined (exit 3) with the reason, the rest of the rows load."""
    app = app_db(tmp_path / "app.sqlite")
    long_title = "é" * 300
    long_session = app.session(title=long_title)
    app.session(title="ok title")
    db = app.write()
    await _precreate(pg_dsn, "sessions", "title", "varchar(255)")
    code, _ = _run(db, pg_dsn)
    assert 3 == code
    expected = source_rows(db, "sessions")
    del expected[long_session["id"]]
    assert expected == await target_rows(pg_dsn, "sessions")
    reason = await fetchval(
        pg_dsn,
        "SELECT detail FROM flux_migrate.quarantine WHERE source_key = $1",
        long_session["id"],
    )
    assert "value too long for type character varying(255)" in reason
    assert source_rows(db, "messages") == await target_rows(pg_dsn, "messages")
