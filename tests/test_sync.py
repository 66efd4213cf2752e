"""`flux-migrate sync`: inserts, updates and deletes reach the target; PostgreSQL's own writes
are never overwritten; a kill mid-sync converges on rerun (real PostgreSQL, real processes)."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_migrate.core.errors import EXIT_CONFLICTS, EXIT_OK
from flux_migrate.pipeline import sync_plan
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.sync import sync
from tests.support import (
    app_copy,
    app_settings,
    assert_app_tables_equal,
    cli,
    kill_after,
    source_rows,
    target_rows,
)

NOW = "2026-01-02T03:04:05+00:00"
NEW_SESSION = "INSERT INTO sessions (id, title, created_at, updated_at, metadata) VALUES"


def _app_changes(path: Path) -> None:
    """What the app does between run and sync: every kind of change on both tables."""
    db = sqlite3.connect(path)
    ids = [r[0] for r in db.execute("SELECT id FROM sessions ORDER BY rowid LIMIT 4")]
    db.execute("UPDATE sessions SET title = 'renamed' WHERE id = ?", (ids[0],))
    db.execute("UPDATE sessions SET metadata = '{\"k\": 1}' WHERE id = ?", (ids[1],))
    db.execute("DELETE FROM messages WHERE session_id = ?", (ids[2],))
    db.execute("DELETE FROM sessions WHERE id = ?", (ids[2],))
    new = str(uuid.uuid4())
    db.execute(NEW_SESSION + " (?, 'new', ?, ?, '{}')", (new, NOW, NOW))
    for who in (new, ids[3]):
        db.execute(
            "INSERT INTO messages VALUES (?, ?, 'user', 'hello', '{}', ?)",
            (str(uuid.uuid4()), who, NOW),
        )
    mid = db.execute("SELECT id FROM messages ORDER BY rowid LIMIT 1 OFFSET 100").fetchone()[0]
    db.execute("UPDATE messages SET content = 'edited', role = 'assistant' WHERE id = ?", (mid,))
    gone = db.execute("SELECT id FROM messages ORDER BY rowid LIMIT 1 OFFSET 200").fetchone()[0]
    db.execute("DELETE FROM messages WHERE id = ?", (gone,))
    db.commit()
    db.close()


@pytest.mark.anyio
@pytest.mark.parametrize("chunk", [sync_plan.CHUNK, 37], ids=["in_a_thread", "worker_processes"])
async def test_sync_applies_every_kind_of_change_then_idles(
    sample_db: Path, pg_dsn: str, tmp_path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inserts, updates of any column and deletes on both tables reach the target; a second
    sync finds nothing to do. Read as one range per table (in a thread), or as ranges of 37
    rows, which the sync's worker processes read for both tables, in both syncs."""
    monkeypatch.setattr(sync_plan, "CHUNK", chunk)
    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    _app_changes(path)
    first = await sync(app_settings(path, pg_dsn))
    await assert_app_tables_equal(path, pg_dsn)
    done = {n: (t.inserted, t.updated, t.deleted) for n, t in first.tables.items()}
    deleted_messages = 11  # the deleted session's 10 messages and one more
    assert {"sessions": (1, 2, 1), "messages": (2, 1, deleted_messages)} == done
    second = await sync(app_settings(path, pg_dsn))
    assert second.idle
    assert [] == second.conflicts
    rerun = await migrate(
        app_settings(path, pg_dsn)
    )  # a run after sync: nothing new, counts add up
    assert all(t.up_to_date for t in rerun.tables.values())


@pytest.mark.anyio
async def test_dry_run_writes_nothing(sample_db: Path, pg_dsn: str, tmp_path: Path) -> None:
    """--dry-run counts the changes and leaves the target as it was."""
    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    before = await target_rows(pg_dsn, "sessions")
    _app_changes(path)
    plan = await sync(app_settings(path, pg_dsn), dry_run=True)
    counts = {n: (len(p.inserts), len(p.updates), len(p.deletes)) for n, p in plan.plans.items()}
    assert {"sessions": (1, 2, 1), "messages": (2, 1, 11)} == counts
    done = {n: (t.inserted, t.updated, t.deleted) for n, t in plan.tables.items()}
    assert {"sessions": (1, 2, 1), "messages": (2, 1, 11)} == done
    assert before == await target_rows(pg_dsn, "sessions")


async def _pg(dsn: str, sql: str, *args: object) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


@pytest.mark.anyio
async def test_conflict_rules(sample_db: Path, pg_dsn: str, tmp_path: Path) -> None:
    """Changed only in PostgreSQL: kept; changed in both: PostgreSQL's kept, recorded, exit 4;
    a row the app inserted in PostgreSQL survives."""
    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    db = sqlite3.connect(path)
    a, b, c = [r[0] for r in db.execute("SELECT id FROM sessions ORDER BY rowid LIMIT 3")]
    await _pg(pg_dsn, "UPDATE sessions SET title = 'pg only' WHERE id = $1", a)
    await _pg(pg_dsn, "UPDATE sessions SET title = 'pg side' WHERE id = $1", b)
    await _pg(pg_dsn, "UPDATE sessions SET title = 'pg deleted later' WHERE id = $1", c)
    app_row = str(uuid.uuid4())
    await _pg(
        pg_dsn,
        "INSERT INTO sessions (id, title, created_at, updated_at) VALUES ($1, 'app', now(), now())",
        app_row,
    )
    db.execute("UPDATE sessions SET title = 'sqlite side' WHERE id = ?", (b,))
    db.execute("DELETE FROM messages WHERE session_id = ?", (c,))
    db.execute("DELETE FROM sessions WHERE id = ?", (c,))
    db.commit()
    db.close()
    args = ["sync", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    done = cli(*args)
    assert EXIT_CONFLICTS == done.returncode, done.stderr
    assert f"sessions {b}: changed_in_both" in done.stdout
    rows = await target_rows(pg_dsn, "sessions")
    assert ("pg only", "pg side", "pg deleted later", "app") == (
        rows[a]["title"],
        rows[b]["title"],
        rows[c]["title"],
        rows[app_row]["title"],
    )
    conn = await asyncpg.connect(pg_dsn)
    try:
        recorded = await conn.fetch("SELECT key, kind FROM flux_migrate.conflicts ORDER BY kind")
    finally:
        await conn.close()
    assert sorted([(b, "changed_in_both"), (c, "deleted_in_source")]) == sorted(
        (r["key"], r["kind"]) for r in recorded
    )


def _renumber_messages(db: sqlite3.Connection) -> None:
    """Renumber the messages' rowids compactly in order, as VACUUM may (same schema text)."""
    table_sql, index_sql = (
        db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
        for name in ("messages", "idx_messages_session")
    )
    db.execute("DROP INDEX idx_messages_session")
    db.execute("ALTER TABLE messages RENAME TO old_messages")
    db.execute(table_sql)
    db.execute("INSERT INTO messages SELECT * FROM old_messages ORDER BY rowid")
    db.execute("DROP TABLE old_messages")
    db.execute(index_sql)
    db.commit()


@pytest.mark.anyio
async def test_same_change_on_both_sides_is_adopted(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """A row changed identically in SQLite and PostgreSQL is no conflict: sync adopts it, and
    the source's next change to it is applied again."""
    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    db = sqlite3.connect(path)
    key = db.execute("SELECT id FROM sessions ORDER BY rowid LIMIT 1 OFFSET 5").fetchone()[0]
    await _pg(pg_dsn, "UPDATE sessions SET title = 'same' WHERE id = $1", key)
    db.execute("UPDATE sessions SET title = 'same' WHERE id = ?", (key,))
    db.commit()
    assert [] == (await sync(app_settings(path, pg_dsn))).conflicts
    db.execute("UPDATE sessions SET title = 'later' WHERE id = ?", (key,))
    db.commit()
    db.close()
    again = await sync(app_settings(path, pg_dsn))
    assert ([], 1) == (again.conflicts, again.tables["sessions"].updated)
    await assert_app_tables_equal(path, pg_dsn)


@pytest.mark.anyio
async def test_vacuum_between_run_and_sync_converges(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """Rowids renumbered by VACUUM after deletes still end in target == source, rows that only
    moved being left untouched."""
    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    _app_changes(path)
    db = sqlite3.connect(path)
    db.execute("DELETE FROM messages WHERE rowid IN (SELECT rowid FROM messages LIMIT 30)")
    db.commit()
    _renumber_messages(db)
    db.execute("VACUUM")
    db.close()
    report = await sync(app_settings(path, pg_dsn))
    await assert_app_tables_equal(path, pg_dsn)
    assert report.tables["messages"].moved > 1000
    assert (await sync(app_settings(path, pg_dsn))).idle
    db = sqlite3.connect(path)
    db.execute("UPDATE messages SET content = 'after the move' WHERE rowid = 1000")
    db.commit()
    db.close()
    later = await sync(app_settings(path, pg_dsn))  # a moved row is still flux-migrate's to update
    assert ([], 1) == (later.conflicts, later.tables["messages"].updated)
    await assert_app_tables_equal(path, pg_dsn)


@pytest.mark.anyio
async def test_quarantined_row_fixed_later_is_resolved(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """A row that fails to convert in sync is quarantined once (exit 3), and loaded and
    resolved by the sync after it is fixed."""
    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    db = sqlite3.connect(path)
    key = db.execute("SELECT id FROM sessions ORDER BY rowid DESC LIMIT 1").fetchone()[0]
    new = str(uuid.uuid4())
    db.execute(NEW_SESSION + " (?, 'bad', 'not a time', ?, '{}')", (new, NOW))
    db.execute(NEW_SESSION + " ('doomed', 'bad', 'never', ?, '{}')", (NOW,))
    db.execute("UPDATE sessions SET title = 'ok' WHERE id = ?", (key,))
    db.commit()
    args = ["sync", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert 3 == cli(*args).returncode
    assert 3 == cli(*args).returncode  # still quarantined, not quarantined twice
    db.execute("UPDATE sessions SET created_at = ? WHERE id = ?", (NOW, new))
    db.execute("DELETE FROM sessions WHERE id = 'doomed'")
    db.commit()
    db.close()
    assert EXIT_OK == cli(*args).returncode
    await assert_app_tables_equal(path, pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        states = await conn.fetch("SELECT resolution FROM flux_migrate.quarantine")
    finally:
        await conn.close()
    assert ["loaded", "source_row_gone"] == sorted(r["resolution"] for r in states)
    rerun = await migrate(app_settings(path, pg_dsn))  # the run's accounting agrees with sync's
    assert all(t.up_to_date for t in rerun.tables.values())


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("event", "count"), [("sync_started", 1), ("sync_batch", 2), ("table_synced", 1)]
)
async def test_sigkill_during_sync_then_rerun_converges(
    sample_db: Path, pg_dsn: str, tmp_path: Path, event: str, count: int
) -> None:
    """A sync killed while planning, between batches or between tables ends, after a rerun,
    with the target equal to the source, each row once."""
    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    db = sqlite3.connect(path)
    db.execute("UPDATE sessions SET title = title || '!' WHERE rowid % 3 = 0")
    db.execute("UPDATE messages SET content = 'x' WHERE rowid % 7 = 0")
    db.execute("DELETE FROM messages WHERE rowid % 11 = 0")
    db.commit()
    db.close()
    args = ["sync", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    args += ["--batch-size", "20", "--log-format", "json"]
    kill_after(args, event, count)
    rerun = cli(*args)
    assert EXIT_OK == rerun.returncode, rerun.stderr
    await assert_app_tables_equal(path, pg_dsn)


_OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "update", "delete", "reply"]), st.integers(0, 10**6)),
    max_size=25,
)


@pytest.mark.anyio
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=_OPS)
async def test_any_source_changes_then_sync_yield_target_equal_source(
    sample_db: Path,
    pg_dsn: str,
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[str, int]],
) -> None:
    """Any sequence of source inserts, updates and deletes, then sync: target == source."""
    path = app_copy(sample_db, tmp_path_factory.mktemp("prop"))
    schema = f"s_{uuid.uuid4().hex[:8]}"
    cfg = path.parent / "c.toml"
    cfg.write_text(f'[target]\nschema = "{schema}"\n')
    from flux_migrate.pipeline.settings import load_settings

    s = load_settings(cfg, sqlite_path=path, postgres_dsn=pg_dsn, batch_size=50)
    await migrate(s)
    db = sqlite3.connect(path)
    for op, n in ops:
        sessions = [r[0] for r in db.execute("SELECT id FROM sessions")]
        messages = [r[0] for r in db.execute("SELECT id FROM messages")]
        if op == "insert":
            db.execute(
                NEW_SESSION.replace("INSERT", "INSERT OR IGNORE") + " (?, ?, ?, ?, '{}')",
                (str(n), str(n), NOW, NOW),
            )
        elif op == "update" and messages:
            db.execute(
                "UPDATE messages SET content = ? WHERE id = ?",
                (f"c{n}", messages[n % len(messages)]),
            )
        elif op == "delete" and sessions:
            key = sessions[n % len(sessions)]
            db.execute("DELETE FROM messages WHERE session_id = ?", (key,))
            db.execute("DELETE FROM sessions WHERE id = ?", (key,))
        elif op == "reply" and sessions:
            db.execute(
                "INSERT INTO messages VALUES (?, ?, 'user', 'hi', '{}', ?)",
                (str(uuid.uuid4()), sessions[n % len(sessions)], NOW),
            )
    db.commit()
    db.close()
    await sync(s)
    from flux_migrate.core.schema import TargetNames

    names = TargetNames(schema=schema)
    for table in ("sessions", "messages"):
        assert source_rows(path, table) == await target_rows(pg_dsn, table, names)
