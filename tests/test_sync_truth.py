"""Sync's exit codes and reports match what happened: transient states of a live app are
retried within the sync, a final sync (app stopped) never exits 0 with rows left over, and a
dry run predicts the real sync's counts and exit code (real PostgreSQL, real processes)."""

from __future__ import annotations

import re
import sqlite3
import uuid
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from flux_migrate.core.errors import EXIT_CONFLICTS, EXIT_OK
from flux_migrate.pipeline.progress import NoProgress
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.sync import sync
from flux_migrate.pipeline.sync_report import sync_exit_code
from tests.generic_db import compare_table
from tests.support import app_copy, app_settings, assert_app_tables_equal, cli
from tests.test_sync_generic import _generic_db
from tests.test_sync_shapes_live import _seed as _seed_tree

pytestmark = pytest.mark.anyio

NOW = "2026-01-02T03:04:05+00:00"


async def _pg(dsn: str, sql: str, *args: object) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


class _AppWritesAfter(NoProgress):
    """A progress display that lets the app write once, right after sync read ``table``."""

    def __init__(self, table: str, write: object) -> None:
        self.table, self.write = table, write

    def finish(self, table: str) -> None:
        if table == self.table and callable(self.write):
            self.write()
            self.write = None


async def test_a_reused_rowid_while_syncing_is_retried_not_a_conflict(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """The app deletes its newest session and starts a new chat (SQLite reuses the rowid)
    after sync read the sessions: nobody touched PostgreSQL, so there is no conflict; the
    sync retries and ends with the target equal to the source, nothing left over."""
    path = app_copy(sample_db, tmp_path)
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode

    def new_chat() -> None:
        db = sqlite3.connect(path)
        rowid, newest = db.execute("SELECT rowid, id FROM sessions ORDER BY rowid DESC").fetchone()
        db.execute("DELETE FROM messages WHERE session_id = ?", (newest,))
        db.execute("DELETE FROM sessions WHERE id = ?", (newest,))
        chat = str(uuid.uuid4())
        db.execute(
            "INSERT INTO sessions (id, title, created_at, updated_at, metadata)"
            " VALUES (?, 'new chat', ?, ?, '{}')",
            (chat, NOW, NOW),
        )
        assert rowid == db.execute("SELECT rowid FROM sessions WHERE id = ?", (chat,)).fetchone()[0]
        db.execute(
            "INSERT INTO messages VALUES (?, ?, 'user', 'hi', '{}', ?)",
            (str(uuid.uuid4()), chat, NOW),
        )
        db.commit()
        db.close()

    report = await sync(app_settings(path, pg_dsn), progress=_AppWritesAfter("sessions", new_chat))
    assert [] == report.conflicts
    assert 0 == sum(t.deferred for t in report.tables.values())
    assert EXIT_OK == sync_exit_code(report, report.quarantined_open)
    await assert_app_tables_equal(path, pg_dsn)


async def test_a_key_reused_in_a_deleted_subtree_while_syncing_is_no_conflict(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A subtree of a self-referencing table is deleted in SQLite; after sync planned it, the
    app adds a node that takes a deleted leaf's key: the target's old leaf still references
    its ancestors, which sync must keep for now, but nobody touched PostgreSQL, so they wait
    for the next round (no child_rows_kept conflict) and the sync ends equal, nothing left."""
    path = tmp_path / "tree.sqlite"
    _seed_tree(path)
    settings = app_settings(path, pg_dsn, batch_size=3)
    settings = replace(settings, names=replace(settings.names, schema="reuse"))
    await migrate(settings)
    db = sqlite3.connect(path)
    db.execute(
        "WITH RECURSIVE sub(id) AS (SELECT 2 UNION SELECT node.id FROM node JOIN sub"
        " ON node.up = sub.id) DELETE FROM node WHERE id IN sub"
    )
    db.commit()
    top = db.execute("SELECT max(id) FROM node").fetchone()[0]

    def new_node() -> None:
        db.execute("INSERT INTO node (up, name) VALUES (3, 'new')")
        db.commit()
        assert top + 1 == db.execute("SELECT max(id) FROM node").fetchone()[0]

    try:
        report = await sync(settings, progress=_AppWritesAfter("node", new_node))
    finally:
        db.close()
    assert top + 1 <= 39  # the new node took a key the deleted subtree held
    assert [] == report.conflicts
    assert 0 == sum(t.deferred for t in report.tables.values())
    await compare_table(path, pg_dsn, "node", schema="reuse")


async def test_a_final_sync_reports_a_parent_deleted_in_postgres_at_once(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """App stopped: a session someone deleted in PostgreSQL moved rowid in SQLite and gained
    a message; the first sync says so (parent_deleted_in_postgres, exit 4), not 'left for the
    next sync' with exit 0."""
    path = app_copy(sample_db, tmp_path)
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode
    db = sqlite3.connect(path)
    row = db.execute("SELECT * FROM sessions ORDER BY rowid LIMIT 1 OFFSET 5").fetchone()
    await _pg(pg_dsn, "DELETE FROM public.sessions WHERE id = $1", row[0])
    db.execute("DELETE FROM sessions WHERE id = ?", (row[0],))
    db.execute(f"INSERT INTO sessions VALUES ({', '.join('?' * len(row))})", row)  # new rowid
    db.execute(
        "INSERT INTO messages VALUES (?, ?, 'user', 'late', '{}', ?)",
        (str(uuid.uuid4()), row[0], NOW),
    )
    db.commit()
    db.close()
    done = cli("sync", *args)
    assert EXIT_CONFLICTS == done.returncode, done.stdout + done.stderr
    assert "parent_deleted_in_postgres" in done.stdout
    assert "left for the next sync" not in done.stdout


async def test_a_final_sync_names_rows_it_cannot_load(tmp_path: Path, pg_dsn: str) -> None:
    """App stopped: two new rows naming each other across two tables cannot be synced one
    after the other; the sync retries, then names them (parent_missing, exit 4) instead of
    exiting 0 with them 'left for the next sync' forever."""
    path = tmp_path / "ab.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE a (id INTEGER PRIMARY KEY, b_id INT REFERENCES b(id));"
        "CREATE TABLE b (id INTEGER PRIMARY KEY, a_id INT REFERENCES a(id));"
        "INSERT INTO a VALUES (1, NULL); INSERT INTO b VALUES (1, 1);"
    )
    db.commit()
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode, cli("run", *args).stderr
    db.executescript("INSERT INTO a VALUES (10, 20); INSERT INTO b VALUES (20, 10);")
    db.commit()
    db.close()
    done = cli("sync", *args)
    assert EXIT_CONFLICTS == done.returncode, done.stdout + done.stderr
    assert "parent_missing" in done.stdout and "left for the next sync" not in done.stdout


def _counts(stdout: str) -> list[list[str]]:
    """The per-table rows of sync's table, without the seconds column."""
    rows = [
        line.split()
        for line in stdout.splitlines()
        if re.match(r"^\s*(orgs|projects|notes)\s+[\d,]+\s", line)
    ]
    return [r[:-1] for r in rows]


async def test_a_dry_run_predicts_the_sync(tmp_path: Path, pg_dsn: str) -> None:
    """With a quarantined new row, a conflict, a row already deleted in PostgreSQL and plain
    changes, --dry-run prints the counts and exits with the code the real sync then has,
    twice in a row (it writes nothing)."""
    path = _generic_db(tmp_path / "generic.sqlite")
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode
    await _pg(pg_dsn, "UPDATE public.projects SET budget = 1 WHERE id = 'p2'")
    await _pg(pg_dsn, "DELETE FROM public.notes WHERE id = 9")
    db = sqlite3.connect(path)
    db.execute("INSERT INTO projects VALUES ('p-bad', 1, 'not a number', NULL)")
    db.execute("UPDATE projects SET budget = 2 WHERE id = 'p2'")
    db.execute("DELETE FROM notes WHERE id IN (9, 10)")
    db.execute("INSERT INTO notes VALUES (700, 'p3', 'new', 1)")
    db.execute("UPDATE orgs SET name = 'x' WHERE id = 3")
    db.commit()
    db.close()
    dry = [cli("sync", *args, "--dry-run") for _ in range(2)]
    real = cli("sync", *args)
    assert EXIT_CONFLICTS == real.returncode, real.stdout + real.stderr
    for d in dry:
        assert real.returncode == d.returncode, d.stdout + d.stderr
        assert _counts(real.stdout) == _counts(d.stdout), d.stdout + real.stdout
    assert [["orgs", "5", "0", "1", "0", "0", "0"], ["projects", "31", "0", "0", "0", "1", "1"],
            ["notes", "199", "1", "0", "1", "0", "0"]] == _counts(real.stdout)  # fmt: skip
    again_dry, again = cli("sync", *args, "--dry-run"), cli("sync", *args)
    assert again.returncode == again_dry.returncode == EXIT_CONFLICTS
    assert _counts(again.stdout) == _counts(again_dry.stdout)
    await compare_table(path, pg_dsn, "orgs")


async def test_sync_takes_runs_output_and_conflict_options(tmp_path: Path, pg_dsn: str) -> None:
    """`sync` accepts what `run` takes for output and conflicts (--no-progress, -q, -v,
    --log-format, --on-conflict): a run with --on-conflict skip is synced with the same."""
    path = _generic_db(tmp_path / "generic.sqlite")
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn, "--on-conflict", "skip"]
    assert EXIT_OK == cli("run", *args).returncode
    for extra in (["--no-progress"], ["-q"], ["-v"], ["--log-format", "json", "--no-progress"]):
        done = cli("sync", *args, *extra)
        assert EXIT_OK == done.returncode, (extra, done.stdout + done.stderr)


def _status_counts(stdout: str, table: str) -> tuple[int, int]:
    """(loaded, quarantined) of ``table`` in `status`'s output."""
    for line in stdout.splitlines():
        cells = line.split()
        if cells and cells[0] == table:
            numbers = [c for c in cells if re.fullmatch(r"[\d,]+", c)]
            return int(numbers[1].replace(",", "")), int(numbers[2].replace(",", ""))
    raise AssertionError(stdout)


async def test_rows_sync_quarantines_are_counted_once_and_advised_to_sync(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """A loaded message changed to a value that does not convert is quarantined by sync:
    `status` counts it as quarantined, not also as loaded; `quarantine` says to fix it and
    rerun sync; fixing it loads it (counts back), and a second such row deleted from the
    source leaves the counts equal to the source's rows."""
    path = app_copy(sample_db, tmp_path)
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode
    db = sqlite3.connect(path)
    total = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    first, second = (r[0] for r in db.execute("SELECT id FROM messages LIMIT 2 OFFSET 7"))
    db.execute("UPDATE messages SET created_at = 'never' WHERE id IN (?, ?)", (first, second))
    db.commit()
    done = cli("sync", *args)
    assert 3 == done.returncode, done.stdout + done.stderr
    assert (total - 2, 2) == _status_counts(cli("status", *args).stdout, "messages")
    listed = cli("quarantine", *args)
    assert "rerun `flux-migrate sync`" in listed.stdout, listed.stdout
    meanwhile = cli("verify", *args)  # the rows' previous versions are no "extra" rows
    assert "not in the source" not in meanwhile.stdout, meanwhile.stdout
    assert re.search(r"messages\s+[\d,]+\s+0\s+0\s+0\s+2\s", meanwhile.stdout), meanwhile.stdout
    db.execute("UPDATE messages SET created_at = ? WHERE id = ?", (NOW, first))
    db.execute("DELETE FROM messages WHERE id = ?", (second,))
    db.commit()
    db.close()
    fixed = cli("sync", *args)
    assert EXIT_OK == fixed.returncode, fixed.stdout + fixed.stderr
    assert (total - 1, 0) == _status_counts(cli("status", *args).stdout, "messages")
    await assert_app_tables_equal(path, pg_dsn)
    checked = cli("verify", *args)
    assert EXIT_OK == checked.returncode, checked.stdout + checked.stderr


class _Recorded(NoProgress):
    """A progress display that records what it was shown."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.finished: list[str] = []

    def start(self, table: str, total: int) -> None:
        self.totals[table] = total
        self.done[table] = 0

    def advance(self, table: str, rows: int, quarantined: int = 0) -> None:
        self.done[table] += rows

    def finish(self, table: str) -> None:
        self.finished.append(table)


async def test_sync_shows_its_scan_and_its_writes(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """The progress display gets each table's scan (rows read of its rows) and, for a table
    with changes, its writes (changes applied of those planned), each line finished."""
    path = app_copy(sample_db, tmp_path)
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode
    db = sqlite3.connect(path)
    db.execute("UPDATE messages SET content = 'x' WHERE rowid % 5 = 0")
    db.commit()
    changed = db.execute("SELECT count(*) FROM messages WHERE rowid % 5 = 0").fetchone()[0]
    rows = {
        t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("sessions", "messages")
    }
    db.close()
    shown = _Recorded()
    await sync(app_settings(path, pg_dsn, batch_size=100), progress=shown)
    assert {**rows, "messages writes": changed} == shown.totals
    assert shown.totals == shown.done
    assert sorted(shown.totals) == sorted(shown.finished)
