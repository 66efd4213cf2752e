"""`flux-migrate sync` on every key and foreign-key shape: foreign keys to a UNIQUE column
that is not the primary key (text and integer), key columns with no declared type holding
integers, self-referencing trees deleted as a whole (real PostgreSQL, real processes)."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from flux_migrate.core.errors import EXIT_CONFLICTS, EXIT_OK, EXIT_QUARANTINED
from tests.generic_db import compare_table
from tests.support import cli

pytestmark = pytest.mark.anyio


def _db(path: Path, ddl: str, *rows: tuple[str, list[tuple[object, ...]]]) -> None:
    db = sqlite3.connect(path)
    db.executescript(ddl)
    for sql, values in rows:
        db.executemany(sql, values)
    db.commit()
    db.close()


def _change(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    for sql in statements:
        db.execute(sql)
    db.commit()
    db.close()


async def _pg(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


UNIQUE_TEXT = """
CREATE TABLE parent (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, name TEXT);
CREATE TABLE child (id INTEGER PRIMARY KEY,
    pcode TEXT REFERENCES parent(code) ON DELETE CASCADE, body TEXT);
"""
UNIQUE_INT = """
CREATE TABLE parent (id TEXT PRIMARY KEY, code INTEGER NOT NULL UNIQUE, name TEXT);
CREATE TABLE child (id INTEGER PRIMARY KEY,
    pcode INTEGER REFERENCES parent(code) ON DELETE CASCADE, body TEXT);
"""


def _unique_db(path: Path, integer: bool) -> list[str]:
    ddl = UNIQUE_INT if integer else UNIQUE_TEXT
    parents = [
        (f"p{i}" if integer else i, 100 + i if integer else f"c{i}", f"n{i}") for i in range(1, 9)
    ]
    children = [(i, 100 + i % 8 + 1 if integer else f"c{i % 8 + 1}", f"b{i}") for i in range(40)]
    _db(
        path,
        ddl,
        ("INSERT INTO parent VALUES (?, ?, ?)", parents),
        ("INSERT INTO child VALUES (?, ?, ?)", children),
    )
    return ["--sqlite-path", str(path)]


@pytest.mark.parametrize("integer", [False, True], ids=["text_code", "integer_code"])
async def test_a_parent_referenced_by_a_unique_column_is_never_cascaded_away(
    tmp_path: Path, pg_dsn: str, integer: bool
) -> None:
    """Parents deleted in SQLite that a child still references through a UNIQUE non-key
    column (a child someone inserted in PostgreSQL, or one still in SQLite) are kept as
    child_rows_kept conflicts (exit 4), no child is cascaded away; an unreferenced deleted
    parent goes, and the next syncs still work (no text = bigint error)."""
    path = tmp_path / "u.sqlite"
    args = _unique_db(path, integer) + ["--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode
    code = (lambda i: str(100 + i)) if integer else (lambda i: f"'c{i}'")
    await _pg(pg_dsn, f"INSERT INTO public.child VALUES (1000, {code(1)}, 'theirs')")
    _change(
        path,
        f"DELETE FROM child WHERE pcode IN ({code(1)}, {code(3)})",
        f"DELETE FROM parent WHERE code IN ({code(1)}, {code(2)}, {code(3)})",
    )  # parent 2 keeps its children in SQLite; 1 keeps PostgreSQL's; 3 is free to go
    done = cli("sync", *args)
    assert EXIT_CONFLICTS == done.returncode, done.stdout + done.stderr
    assert "child_rows_kept" in done.stdout and "internal error" not in done.stderr
    left = {r["b"] for r in await _pg(pg_dsn, "SELECT body AS b FROM public.child")}
    assert "theirs" in left
    assert 40 - 10 + 1 == len(left)  # 5 children of parent 1, 5 of parent 3 deleted in SQLite
    codes = {str(r["c"]) for r in await _pg(pg_dsn, "SELECT code AS c FROM public.parent")}
    assert {code(1).strip("'"), code(2).strip("'")} <= codes
    assert code(3).strip("'") not in codes
    _change(
        path,
        f"DELETE FROM parent WHERE code = {code(4)}",
        f"DELETE FROM child WHERE pcode = {code(4)}",
    )
    again = cli("sync", *args)
    assert EXIT_CONFLICTS == again.returncode, again.stdout + again.stderr
    assert "internal error" not in again.stderr
    codes = {str(r["c"]) for r in await _pg(pg_dsn, "SELECT code AS c FROM public.parent")}
    assert code(4).strip("'") not in codes


UNTYPED = "CREATE TABLE kv (k PRIMARY KEY, v REAL, note TEXT);"


async def test_an_untyped_integer_key_keeps_one_identity(tmp_path: Path, pg_dsn: str) -> None:
    """A key column with no declared type holding integers: a quarantined row stays
    quarantined (listed, exit 3) sync after sync instead of being 'resolved' as gone, a
    deleted row is deleted, and fixing the row loads it."""
    path = tmp_path / "kv.sqlite"
    rows = [(i, "n/a" if i == 6 else i / 2, f"r{i}") for i in range(1, 21)]
    _db(path, UNTYPED, ("INSERT INTO kv VALUES (?, ?, ?)", rows))
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert EXIT_QUARANTINED == cli("run", *args).returncode
    _change(path, "UPDATE kv SET note = 'edited' WHERE k = 6", "DELETE FROM kv WHERE k = 7")
    for _ in range(2):
        done = cli("sync", *args)
        assert EXIT_QUARANTINED == done.returncode, done.stdout + done.stderr
        listed = cli("quarantine", *args)
        assert "1 quarantined row(s)" in listed.stdout, listed.stdout
    gone = await _pg(
        pg_dsn, "SELECT count(*) AS n FROM flux_migrate.quarantine WHERE resolution IS NOT NULL"
    )
    assert 0 == gone[0]["n"]
    assert [] == await _pg(pg_dsn, "SELECT 1 FROM public.kv WHERE k::text = '7'")
    _change(path, "UPDATE kv SET v = 3.5 WHERE k = 6")
    fixed = cli("sync", *args)
    assert EXIT_OK == fixed.returncode, fixed.stdout + fixed.stderr
    await compare_table(path, pg_dsn, "kv")
    status = cli("status", *args)
    assert " 19 " in status.stdout and "quarantined" in status.stdout, status.stdout
    _change(path, "UPDATE kv SET v = 'bad' WHERE k = 8")  # its previous version stays
    assert EXIT_QUARANTINED == cli("sync", *args).returncode
    checked = cli("verify", *args)
    assert "not in the source" not in checked.stdout, checked.stdout
    assert EXIT_OK == checked.returncode, checked.stdout + checked.stderr
    status = cli("status", *args)
    assert re.search(r"\bkv\b.*\s18\s+1\s", status.stdout), status.stdout


TREE = (
    "CREATE TABLE nodes (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES nodes(id){},"
    " name TEXT);"
)


@pytest.mark.parametrize("action", ["", " ON DELETE CASCADE"], ids=["no_action", "cascade"])
async def test_a_deleted_subtree_goes_in_one_sync(tmp_path: Path, pg_dsn: str, action: str) -> None:
    """A chain of 6 and a branching subtree of a self-referencing table deleted in SQLite
    leave PostgreSQL in one sync (exit 0, no child_rows_kept), whatever the batch size and
    the order of the rows; a row someone else hangs under a deleted node keeps that node
    and its ancestors (conflicts), and nothing else."""
    path = tmp_path / "tree.sqlite"
    # rows inserted leaves first, so rowid order is child before parent
    chain = [(10 + i, 10 + i + 1 if i < 5 else None, f"c{i}") for i in range(6)]
    tree = [(30, None, "root"), (31, 30, "a"), (32, 30, "b"), (33, 31, "aa"), (34, 33, "aaa")]
    keep = [(50, None, "keep"), (51, 50, "keep child")]
    _db(
        path,
        TREE.format(action),
        ("INSERT INTO nodes VALUES (?, ?, ?)", chain + list(reversed(tree)) + keep),
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn, "--batch-size", "2"]
    assert EXIT_OK == cli("run", *args).returncode
    _change(path, "DELETE FROM nodes WHERE id BETWEEN 10 AND 15 OR id BETWEEN 30 AND 34")
    done = cli("sync", *args)
    assert EXIT_OK == done.returncode, done.stdout + done.stderr
    await compare_table(path, pg_dsn, "nodes")
    assert "up to date" in cli("sync", *args).stdout


async def test_a_subtree_with_a_foreign_child_keeps_only_its_ancestors(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A row someone inserted in PostgreSQL under a node of a deleted subtree keeps that node
    and its ancestors (child_rows_kept, exit 4); the rest of the subtree goes in one sync."""
    path = tmp_path / "tree.sqlite"
    tree = [(1, None, "root"), (2, 1, "a"), (3, 2, "aa"), (4, 1, "b"), (5, 4, "bb"), (6, 5, "x")]
    rows = [(50, None, "kept")] + list(reversed(tree))
    _db(path, TREE.format(""), ("INSERT INTO nodes VALUES (?, ?, ?)", rows))
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn, "--batch-size", "2"]
    assert EXIT_OK == cli("run", *args).returncode
    await _pg(pg_dsn, "INSERT INTO public.nodes VALUES (100, 3, 'theirs')")
    _change(path, "DELETE FROM nodes WHERE id < 50")
    done = cli("sync", *args)
    assert EXIT_CONFLICTS == done.returncode, done.stdout + done.stderr
    left = {r["id"] for r in await _pg(pg_dsn, "SELECT id FROM public.nodes")}
    assert {1, 2, 3, 50, 100} == left
    kept = await _pg(pg_dsn, "SELECT key, kind FROM flux_migrate.conflicts ORDER BY key")
    assert [("1", "child_rows_kept"), ("2", "child_rows_kept"), ("3", "child_rows_kept")] == [
        (r["key"], r["kind"]) for r in kept
    ]


async def test_rows_at_rowid_zero_and_below_are_synced_as_run_loads_them(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Rows at rowid 0 and below are loaded by `run`, so a sync right after is idle; changed,
    deleted and new rows there are synced like any others, and verify finds them equal."""
    path = tmp_path / "neg.sqlite"
    rows = [(i, f"v{i}") for i in (-(2**62), -5, -1, 0, 1, 2, 3)]
    _db(
        path,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);",
        ("INSERT INTO t VALUES (?, ?)", rows),
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode
    first = cli("sync", *args)
    assert "up to date" in first.stdout, first.stdout + first.stderr
    _change(path, "UPDATE t SET v = 'edited' WHERE id = -5", "DELETE FROM t WHERE id = 0")
    _change(path, "INSERT INTO t VALUES (-9, 'new')")
    done = cli("sync", *args)
    assert EXIT_OK == done.returncode, done.stdout + done.stderr
    await compare_table(path, pg_dsn, "t")
    checked = cli("verify", *args)
    assert EXIT_OK == checked.returncode, checked.stdout + checked.stderr


async def test_a_parent_referenced_by_a_two_column_key_is_kept(tmp_path: Path, pg_dsn: str) -> None:
    """A foreign key of two columns to a UNIQUE pair of the parent: a parent deleted in SQLite
    that a child someone inserted in PostgreSQL still references is kept (child_rows_kept),
    its child is not cascaded away; an unreferenced one goes. New children are checked by
    both columns: one naming a new parent is loaded, one naming a parent someone deleted in
    PostgreSQL is a conflict (not a foreign-key error)."""
    path = tmp_path / "pair.sqlite"
    _db(
        path,
        "CREATE TABLE parent (id INTEGER PRIMARY KEY, a TEXT NOT NULL, b INTEGER NOT NULL,"
        " UNIQUE (a, b));"
        "CREATE TABLE child (id INTEGER PRIMARY KEY, a TEXT, b INTEGER, FOREIGN KEY (a, b)"
        " REFERENCES parent (a, b) ON DELETE CASCADE);",
        ("INSERT INTO parent VALUES (?, ?, ?)", [(i, f"x{i}", i) for i in range(1, 6)]),
        ("INSERT INTO child VALUES (?, ?, ?)", [(i, "x1", 1) for i in range(1, 4)]),
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode
    await _pg(pg_dsn, "INSERT INTO public.child VALUES (100, 'x2', 2)")
    _change(path, "DELETE FROM parent WHERE id IN (2, 3)")
    done = cli("sync", *args)
    assert EXIT_CONFLICTS == done.returncode, done.stdout + done.stderr
    assert "child_rows_kept" in done.stdout
    assert [2] == [
        r["id"] for r in await _pg(pg_dsn, "SELECT id FROM public.parent WHERE id IN (2, 3)")
    ]
    assert [100] == [
        r["id"] for r in await _pg(pg_dsn, "SELECT id FROM public.child WHERE id = 100")
    ]


async def test_a_changed_unique_key_waits_for_the_rows_referencing_it(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A parent whose referenced UNIQUE code changes (its children deleted in SQLite, or the
    row reused for a new parent) is updated in the same sync once those children are gone
    (exit 0, no foreign-key error); when a row someone inserted in PostgreSQL still names the
    old code, the parent is kept as it is (child_rows_kept, exit 4)."""
    path = tmp_path / "u.sqlite"
    args = _unique_db(path, integer=False) + ["--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode
    _change(
        path,
        "DELETE FROM child WHERE pcode = 'c8'",
        "UPDATE parent SET code = 'c8-new', name = 'reused' WHERE code = 'c8'",
    )
    done = cli("sync", *args)
    assert EXIT_OK == done.returncode, done.stdout + done.stderr
    await compare_table(path, pg_dsn, "parent")
    await compare_table(path, pg_dsn, "child")
    await _pg(pg_dsn, "INSERT INTO public.child VALUES (1000, 'c7', 'theirs')")
    _change(
        path,
        "DELETE FROM child WHERE pcode = 'c7'",
        "UPDATE parent SET code = 'c7-new' WHERE code = 'c7'",
    )
    kept = cli("sync", *args)
    assert EXIT_CONFLICTS == kept.returncode, kept.stdout + kept.stderr
    assert "parent 7: child_rows_kept" in kept.stdout, kept.stdout
    assert [("c7",)] == [
        tuple(r) for r in await _pg(pg_dsn, "SELECT code FROM public.parent WHERE id = 7")
    ]


async def test_a_renamed_unique_key_with_its_children_is_named_not_misreported(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A parent's referenced UNIQUE code renamed in SQLite together with its children's
    references (ON UPDATE CASCADE) cannot be written one statement after the other: a final
    sync names the parent child_rows_kept and the children parent_missing (exit 4), never
    parent_deleted_in_postgres (nobody deleted it) and never a foreign-key error."""
    path = tmp_path / "u.sqlite"
    args = _unique_db(path, integer=False) + ["--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode
    _change(
        path,
        "UPDATE child SET pcode = 'c5b' WHERE pcode = 'c5'",
        "UPDATE parent SET code = 'c5b' WHERE code = 'c5'",
    )
    done = cli("sync", *args)
    assert EXIT_CONFLICTS == done.returncode, done.stdout + done.stderr
    assert "parent 5: child_rows_kept" in done.stdout, done.stdout
    assert "parent_missing" in done.stdout and "parent_deleted_in_postgres" not in done.stdout


async def test_a_subtree_of_a_tree_linked_by_a_unique_code_goes_in_one_sync(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A self-referencing table whose rows name their parent by a UNIQUE code (not the key):
    a deleted subtree leaves in one sync and a new subtree (children before parents in rowid
    order) arrives in the same sync, exit 0, equal to the source."""
    path = tmp_path / "codes.sqlite"
    rows = [(50, "keep", None)] + [
        (i, f"n{i}", f"n{i - 1}" if i > 1 else None) for i in range(6, 0, -1)
    ]
    _db(
        path,
        "CREATE TABLE t (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE,"
        " up TEXT REFERENCES t(code));",
        ("INSERT INTO t VALUES (?, ?, ?)", rows),
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn, "--batch-size", "2"]
    assert EXIT_OK == cli("run", *args).returncode
    _change(
        path,
        "DELETE FROM t WHERE id BETWEEN 2 AND 6",
        "INSERT INTO t VALUES (103, 'm3', 'm2')",
        "INSERT INTO t VALUES (102, 'm2', 'm1')",
        "INSERT INTO t VALUES (101, 'm1', 'n1')",
    )
    done = cli("sync", *args)
    assert EXIT_OK == done.returncode, done.stdout + done.stderr
    assert "left for the next" not in done.stdout
    await compare_table(path, pg_dsn, "t")


CYCLE = (
    "CREATE TABLE a (id INTEGER PRIMARY KEY, b_id INT REFERENCES b(id), v TEXT);"
    "CREATE TABLE b (id INTEGER PRIMARY KEY, a_id INT REFERENCES a(id), v TEXT);"
)


async def test_rows_of_two_tables_naming_each_other_are_deleted_together(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Rows of two tables that reference each other, deleted in SQLite, leave PostgreSQL in
    one sync (exit 0), not as child_rows_kept conflicts sync after sync; a pair that a row
    someone inserted in PostgreSQL still references stays, named (exit 4)."""
    path = tmp_path / "cycle.sqlite"
    _db(
        path,
        CYCLE,
        ("INSERT INTO a VALUES (?, ?, ?)", [(i, i, f"a{i}") for i in range(1, 6)]),
        ("INSERT INTO b VALUES (?, ?, ?)", [(i, i, f"b{i}") for i in range(1, 6)]),
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode
    _change(path, "DELETE FROM a WHERE id IN (2, 3)", "DELETE FROM b WHERE id IN (2, 3)")
    done = cli("sync", *args)
    assert EXIT_OK == done.returncode, done.stdout + done.stderr
    for table in ("a", "b"):
        await compare_table(path, pg_dsn, table)
    assert [] == await _pg(pg_dsn, "SELECT key FROM flux_migrate.conflicts")
    await _pg(pg_dsn, "INSERT INTO public.a VALUES (100, 4, 'theirs')")
    _change(path, "DELETE FROM a WHERE id = 4", "DELETE FROM b WHERE id = 4")
    kept = cli("sync", *args)
    assert EXIT_CONFLICTS == kept.returncode, kept.stdout + kept.stderr
    assert "a 4: child_rows_kept" in kept.stdout and "b 4: child_rows_kept" in kept.stdout
    assert 1 == len(await _pg(pg_dsn, "SELECT 1 FROM public.b WHERE id = 4"))
