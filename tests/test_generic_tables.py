"""Any SQLite file the app keeps: every table and every column arrives in PostgreSQL, or the run
refuses before writing and names what the mapping does not place."""

from __future__ import annotations

import json
import sqlite3
import tomllib
from pathlib import Path

import pytest

from tests.generic_db import compare_table, varied_db
from tests.support import cli, fetchval

pytestmark = pytest.mark.anyio

TABLES = (
    'we"ird table', "orgs", "teams", "members", "a", "b", "empty", "log", 'ünï "q" tbl',
)  # fmt: skip


def _error(stderr: str) -> str:
    errors = [json.loads(line)["error"] for line in stderr.splitlines() if '"error"' in line]
    return errors[-1] if errors else stderr


async def test_a_varied_database_arrives_whole_and_verifies(tmp_path: Path, pg_dsn: str) -> None:
    """Every table and column of a database of another shape loads under its mapping; the two
    values that fit no column are quarantined (exit 3) with type_mismatch; verify passes."""
    path = varied_db(tmp_path / "varied.sqlite")
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 3 == done.returncode, done.stderr
    for table in TABLES:
        await compare_table(path, pg_dsn, table, skip=2 if table == 'we"ird table' else 0)
    reasons = await fetchval(
        pg_dsn, "SELECT array_agg(reason ORDER BY source_rowid) FROM flux_migrate.quarantine"
    )
    assert ["type_mismatch", "type_mismatch"] == reasons
    verified = cli("verify", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == verified.returncode, verified.stdout + verified.stderr
    keys = await fetchval(
        pg_dsn,
        "SELECT array_agg(contype::text || ':' || conrelid::regclass::text ORDER BY 1, 2)"
        " FROM (SELECT contype, conrelid FROM pg_constraint"
        " WHERE connamespace = 'public'::regnamespace) c",
    )
    assert "p:teams" in keys and "f:members" in keys and "f:a" in keys and "f:b" in keys
    assert "p:log" not in keys
    columns = await fetchval(
        pg_dsn,
        "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attnum > 0",
        'public."ünï ""q"" tbl"',
    )
    assert ['a"b', "order", "ключ"] == columns
    partial = await fetchval(
        pg_dsn, "SELECT indexdef FROM pg_indexes WHERE indexname = 'members_user'"
    )
    assert partial.endswith('WHERE ("user" IS NOT NULL)')


async def test_rerun_of_a_varied_database_is_up_to_date(tmp_path: Path, pg_dsn: str) -> None:
    """A second run loads nothing twice, also for the WITHOUT ROWID and key-less tables."""
    path = varied_db(tmp_path / "varied.sqlite", bad=False)
    assert 0 == cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn).returncode
    again = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == again.returncode, again.stderr
    for table in TABLES:
        await compare_table(path, pg_dsn, table)


async def test_init_writes_a_mapping_that_run_uses(tmp_path: Path, pg_dsn: str) -> None:
    """init writes TOML with every table in load order; run --config FILE loads by it."""
    path = varied_db(tmp_path / "varied.sqlite", bad=False)
    out = tmp_path / "mapping.toml"
    made = cli("init", "--sqlite-path", str(path), "--out", str(out))
    assert 0 == made.returncode, made.stderr
    doc = tomllib.loads(out.read_text(encoding="utf-8"))
    names = [t["name"] for t in doc["table"]]
    assert set(TABLES) == set(names)
    assert names.index("orgs") < names.index("teams") < names.index("members")
    assert "# REAL -> double precision" in out.read_text(encoding="utf-8")
    done = cli("run", "--config", str(out), "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == done.returncode, done.stderr
    for table in TABLES:
        await compare_table(path, pg_dsn, table)


async def test_a_column_the_mapping_does_not_place_stops_the_run_before_writing(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A column added to the source after init: exit 2 naming table, column and the line to
    add, nothing written; listing it under [ignore] lets the run go on without it."""
    path = varied_db(tmp_path / "varied.sqlite", bad=False)
    out = tmp_path / "mapping.toml"
    assert 0 == cli("init", "--sqlite-path", str(path), "--out", str(out)).returncode
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE orgs ADD COLUMN country TEXT DEFAULT 'NL'")
    db.commit()
    db.close()
    refused = cli("run", "--config", str(out), "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 2 == refused.returncode
    message = _error(refused.stderr)
    assert "column country of source table orgs is not in the mapping" in message
    assert '"orgs.country" to [ignore] columns' in message
    assert await fetchval(pg_dsn, "SELECT to_regclass('public.orgs')") is None
    text = out.read_text(encoding="utf-8").replace(
        "[ignore]\ntables = []\ncolumns = []", '[ignore]\ntables = []\ncolumns = ["orgs.country"]'
    )
    out.write_text(text, encoding="utf-8")
    done = cli("run", "--config", str(out), "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == done.returncode, done.stderr
    assert 2 == await fetchval(pg_dsn, "SELECT count(*) FROM orgs")
