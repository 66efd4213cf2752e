"""Any SQLite file the app keeps: every table and every column arrives in PostgreSQL, or the run
refuses before writing and names what the mapping does not place."""

from __future__ import annotations

import json
import sqlite3
import tomllib
from pathlib import Path

import pytest

from flux_migrate.pipeline.mapping_source import resolve_mapping
from flux_migrate.stages.extract import extract, open_source
from tests.generic_db import VARIED_TABLES, compare_table, varied_db
from tests.support import cli, fetchval

pytestmark = pytest.mark.anyio

TABLES = VARIED_TABLES


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


async def test_quarantined_rows_of_a_without_rowid_table_are_retried_by_key(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Bad rows of a WITHOUT ROWID table are quarantined with their key and verify passes; once
    one is fixed in the source and the other deleted, a rerun loads the first and resolves
    the second as gone, and verify still passes."""
    path = tmp_path / "pairs.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE pairs (k TEXT, n INT, v REAL, PRIMARY KEY (k, n)) WITHOUT ROWID")
    rows = [(f"k{i % 7}", i, i / 4) for i in range(250)]
    rows[10] = ("k3", 10, "n/a")
    rows[200] = ("k4", 200, "bad")
    db.executemany("INSERT INTO pairs VALUES (?, ?, ?)", rows)
    db.commit()
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    first = cli("run", *args, "--batch-size", "40")
    assert 3 == first.returncode, first.stderr
    keys = await fetchval(
        pg_dsn, "SELECT array_agg(source_key ORDER BY source_key) FROM flux_migrate.quarantine"
    )
    assert ['["k3", "10"]', '["k4", "200"]'] == keys
    assert 248 == await fetchval(pg_dsn, "SELECT count(*) FROM pairs")
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout + verified.stderr
    db.execute("UPDATE pairs SET v = 2.5 WHERE k = 'k3' AND n = 10")
    db.execute("DELETE FROM pairs WHERE k = 'k4' AND n = 200")
    db.commit()
    db.close()
    again = cli("run", *args)
    assert 0 == again.returncode, again.stderr
    resolutions = await fetchval(
        pg_dsn, "SELECT array_agg(resolution ORDER BY source_key) FROM flux_migrate.quarantine"
    )
    assert ["loaded", "source_row_gone"] == resolutions
    assert 2.5 == await fetchval(pg_dsn, "SELECT v FROM pairs WHERE k = 'k3' AND n = 10")
    await compare_table(path, pg_dsn, "pairs")
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout + verified.stderr
    quick = cli("verify", "--quick", *args)
    assert 0 == quick.returncode, quick.stdout + quick.stderr


async def test_rows_added_after_the_key_of_a_without_rowid_table_load_on_rerun(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A rerun of a WITHOUT ROWID table reads only the rows whose key follows the checkpoint's
    key, and loads them."""
    path = tmp_path / "pairs.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE pairs (k BLOB, n INT, PRIMARY KEY (n, k)) WITHOUT ROWID")
    db.executemany("INSERT INTO pairs VALUES (?, ?)", [(bytes([i]), i) for i in range(50)])
    db.commit()
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn, "--batch-size", "20"]
    assert 0 == cli("run", *args).returncode
    db.executemany("INSERT INTO pairs VALUES (?, ?)", [(bytes([i]), i) for i in range(50, 60)])
    db.commit()
    db.close()
    again = cli("run", *args, "--log-format", "json")
    assert 0 == again.returncode, again.stderr
    started = [json.loads(line) for line in again.stderr.splitlines() if "table_started" in line]
    assert [10] == [s["rows"] for s in started]
    await compare_table(path, pg_dsn, "pairs")
    assert [60, 60] == [
        await fetchval(pg_dsn, "SELECT count(*) FROM pairs"),
        await fetchval(pg_dsn, "SELECT last_rowid FROM flux_migrate.checkpoints"),
    ]


async def test_a_without_rowid_keyset_reads_every_key_of_any_storage_class_once(
    tmp_path: Path,
) -> None:
    """Keys of every storage class in one untyped key column (integers, reals, text, text that
    is not UTF-8, blobs) are each read once, in SQLite's key order, one row per batch, also
    when the read starts after a key taken from a checkpoint."""
    path = tmp_path / "mixed.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE mixed (k, v TEXT, PRIMARY KEY (k)) WITHOUT ROWID")
    keys: list[object] = [3, -1, 2.5, 1e300, "a", "B", "ä", b"\x00", b"\xff", b"", 0]
    db.executemany("INSERT INTO mixed VALUES (?, 'x')", [(k,) for k in keys])
    db.execute("INSERT INTO mixed VALUES (CAST(X'FFFE61' AS TEXT), 'bad utf-8')")
    db.commit()
    db.text_factory = bytes
    expected = [r[0] for r in db.execute("SELECT k FROM mixed ORDER BY k")]
    db.close()
    (table,) = resolve_mapping(path, None, 5.0)[0].tables
    async with open_source(path) as src:
        read, batches = [], []
        async for batch in extract(src, table, after_rowid=0, upto_rowid=99, batch_size=1):
            read += [row[1] for row in batch.raw]
            batches.append(batch)
        assert expected == read
        assert list(range(1, len(expected) + 1)) == [b.last_rowid for b in batches]
        middle = batches[4]
        rest = extract(
            src, table, after_rowid=5, upto_rowid=99, batch_size=3, after_key=middle.last_key
        )
        assert expected[5:] == [row[1] async for batch in rest for row in batch.raw]
