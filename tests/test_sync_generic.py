"""`flux-migrate sync` on a three-table generic schema (integer and text keys, a chain of
foreign keys): every kind of change on every table reaches PostgreSQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from flux_migrate.core.errors import EXIT_USAGE
from tests.generic_db import compare_table
from tests.support import cli

pytestmark = pytest.mark.anyio

DDL = """
CREATE TABLE orgs (id INTEGER PRIMARY KEY, name TEXT NOT NULL, founded TEXT);
CREATE TABLE projects (id TEXT PRIMARY KEY, org_id INTEGER REFERENCES orgs(id),
                       budget REAL, meta TEXT);
CREATE TABLE notes (id INTEGER PRIMARY KEY, project_id TEXT REFERENCES projects(id),
                    body TEXT, score INTEGER);
"""


def _generic_db(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.executescript(DDL)
    db.executemany(
        "INSERT INTO orgs VALUES (?, ?, ?)", [(i, f"org {i}", "2020-01-01") for i in range(1, 6)]
    )
    db.executemany(
        "INSERT INTO projects VALUES (?, ?, ?, ?)",
        [(f"p{i}", 1 + i % 5, i * 1.5, f'{{"n": {i}}}') for i in range(30)],
    )
    db.executemany(
        "INSERT INTO notes VALUES (?, ?, ?, ?)",
        [(i, f"p{i % 30}", f"note {i}", i) for i in range(1, 201)],
    )
    db.commit()
    db.close()
    return path


async def test_every_change_on_every_generic_table_is_synced(tmp_path: Path, pg_dsn: str) -> None:
    """Inserts, updates and deletes on three generic tables (children deleted before their
    parents) leave every PostgreSQL table equal to its source table; a second sync is idle."""
    path = _generic_db(tmp_path / "generic.sqlite")
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *args).returncode
    db = sqlite3.connect(path)
    db.execute("INSERT INTO orgs VALUES (6, 'new org', NULL)")
    db.execute("UPDATE orgs SET name = 'renamed', founded = '2021-02-03' WHERE id = 2")
    db.execute("DELETE FROM notes WHERE project_id IN (SELECT id FROM projects WHERE org_id = 5)")
    db.execute("DELETE FROM projects WHERE org_id = 5")
    db.execute("DELETE FROM orgs WHERE id = 5")
    db.execute("INSERT INTO projects VALUES ('p-new', 6, 0.1, NULL)")
    db.execute("UPDATE projects SET budget = 99.25, meta = '{\"n\": -1}' WHERE id = 'p1'")
    db.execute("INSERT INTO notes VALUES (500, 'p-new', 'fresh', NULL)")
    db.execute("UPDATE notes SET body = 'edited', score = -7 WHERE id = 3")
    db.execute("DELETE FROM notes WHERE id = 7")
    db.commit()
    db.close()
    done = cli("sync", *args)
    assert 0 == done.returncode, done.stdout + done.stderr
    for table in ("orgs", "projects", "notes"):
        await compare_table(path, pg_dsn, table)
    again = cli("sync", *args)
    assert "up to date" in again.stdout


@pytest.mark.parametrize(
    ("ddl", "said"),
    [
        (
            "CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID",
            "Table kv is a WITHOUT ROWID table, which sync cannot follow yet",
        ),
        (
            "CREATE TABLE kv (k TEXT, n INTEGER, v TEXT, PRIMARY KEY (k, n))",
            "Table kv has no one-column primary key to sync by; list it in skip_tables",
        ),
        (
            "CREATE TABLE kv (k BLOB PRIMARY KEY, v TEXT)",
            "Table kv's primary key k is bytea in PostgreSQL; sync matches keys as text or",
        ),
        (
            "CREATE TABLE kv (k TIMESTAMP PRIMARY KEY, v TEXT)",
            "Table kv's primary key k is timestamptz in PostgreSQL;",
        ),
    ],
)
async def test_tables_sync_cannot_follow_are_refused_by_name(
    tmp_path: Path, pg_dsn: str, ddl: str, said: str
) -> None:
    """A table sync cannot follow stops it before anything is read or written: exit 2, one
    sentence naming the table (not an internal error)."""
    path = tmp_path / "kv.sqlite"
    db = sqlite3.connect(path)
    db.execute(ddl)
    if "BLOB" in ddl:
        keys: list[object] = [f"k{i}".encode() for i in range(50)]
    elif "TIMESTAMP" in ddl:
        keys = [f"2024-01-01T00:00:{i:02d}+00:00" for i in range(50)]
    else:
        keys = [f"k{i}" for i in range(50)]
    db.executemany(
        "INSERT INTO kv (k, v) VALUES (?, ?)"
        if "n INTEGER" not in ddl
        else "INSERT INTO kv (k, n, v) VALUES (?, 1, ?)",
        [(k, f"v{i}") for i, k in enumerate(keys)],
    )
    db.commit()
    db.close()
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *args).returncode
    done = cli("sync", *args)
    assert (EXIT_USAGE, "") == (done.returncode, done.stdout.strip()), done.stdout
    assert said in done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr


async def test_a_table_referencing_itself_syncs_parents_before_children(
    tmp_path: Path, pg_dsn: str
) -> None:
    """New rows of a self-referencing table whose parents come in a later batch wait instead
    of failing on the foreign key (also a row naming one that waits), and are tried again
    once their parents are written: one sync loads them all, the table equals its source."""
    path = tmp_path / "tree.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE nodes (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES nodes(id),"
        " name TEXT)"
    )
    db.executemany("INSERT INTO nodes VALUES (?, NULL, ?)", [(i, f"n{i}") for i in range(1, 21)])
    db.commit()
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *args).returncode
    # rowid order 1001, 1002, 1003; with batches of 2, 1003 comes in the second batch
    db.executemany(
        "INSERT INTO nodes VALUES (?, ?, ?)",
        [(1001, 1002, "leaf"), (1002, 1003, "middle"), (1003, None, "root")],
    )
    db.commit()
    db.close()
    first = cli("sync", *args, "--batch-size", "2")
    assert 0 == first.returncode, first.stdout + first.stderr
    assert "left for the next" not in first.stdout
    await compare_table(path, pg_dsn, "nodes")
    second = cli("sync", *args, "--batch-size", "2")
    assert "up to date" in second.stdout, second.stdout + second.stderr


async def test_a_new_child_of_a_quarantined_parent_is_quarantined_too(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A new project whose budget does not convert is quarantined by sync, and a new note
    naming it is quarantined with it (as `run` would), not put off to a next sync forever."""
    path = _generic_db(tmp_path / "generic.sqlite")
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *args).returncode
    db = sqlite3.connect(path)
    db.execute("INSERT INTO projects VALUES ('p-bad', 1, 'not a number', NULL)")
    db.execute("INSERT INTO notes VALUES (600, 'p-bad', 'orphan', 1)")
    db.commit()
    db.close()
    for _ in range(2):
        done = cli("sync", *args)
        assert 3 == done.returncode, done.stdout + done.stderr
        assert "left for the next sync" not in done.stdout
    listed = cli("quarantine", *args)
    assert "orphan_row" in listed.stdout and "600" in listed.stdout, listed.stdout
