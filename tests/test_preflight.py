"""Preflight and policies: conflicts, fingerprints, --restart, source problems, verify, secrets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import asyncpg
import pytest

import flux_migrate.pipeline.verify
from flux_migrate.core.errors import RuntimeFailure, TargetError
from flux_migrate.core.schema import TargetNames, target_ddl
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import load_settings
from flux_migrate.pipeline.verify import verify_quick, verify_rows
from tests.dirty import GOOD_TS, app_db, new_id
from tests.support import cli, fetchval, source_rows, target_rows

pytestmark = pytest.mark.anyio


async def _execute(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


async def _prefill_target(dsn: str, session_id: str, title: str) -> None:
    await _execute(dsn, *target_ddl(TargetNames()))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO sessions (id, title, created_at, updated_at)"
            " VALUES ($1, $2, now(), now())",
            session_id,
            title,
        )
    finally:
        await conn.close()


async def test_foreign_rows_stop_the_run_before_anything_is_written(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A target table holding rows we did not write stops the run with exit 2 and a sentence
    naming the table, and nothing (not even the bookkeeping schema) is written."""
    db = app_db(tmp_path / "app.sqlite")
    db.write()
    await _prefill_target(pg_dsn, new_id(), "the app's own row")
    done = cli("run", "--sqlite-path", str(db.path), "--postgres-dsn", pg_dsn)
    assert done.returncode == 2
    assert '"public"."sessions" already holds rows' in done.stderr
    assert "--on-conflict" in done.stderr
    assert await fetchval(pg_dsn, "SELECT to_regnamespace('flux_migrate')") is None
    assert await fetchval(pg_dsn, "SELECT count(*) FROM sessions") == 1


async def test_on_conflict_skip_leaves_existing_rows_and_counts_them(
    tmp_path: Path, pg_dsn: str
) -> None:
    """--on-conflict skip keeps a row whose key exists, counts it as skipped, loads the rest,
    and verify accounts for it."""
    db = app_db(tmp_path / "app.sqlite")
    clash = db.sessions[0]["id"]
    db.write()
    await _prefill_target(pg_dsn, clash, "kept as it was")
    # The owner's own storage settings on tables flux-migrate did not create stay as they are
    # (a run gives autovacuum back only to the tables it created and paused).
    await _execute(pg_dsn, "ALTER TABLE sessions SET (autovacuum_enabled = false)")
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn, on_conflict="skip")
    report = await migrate(settings)
    options = "SELECT reloptions::text FROM pg_class WHERE oid = $1::regclass"
    assert await fetchval(pg_dsn, options, "sessions") == "{autovacuum_enabled=false}"
    assert await fetchval(pg_dsn, options, "messages") is None
    assert (
        report.tables["sessions"].skipped,
        report.tables["sessions"].loaded,
        report.tables["sessions"].extracted,
    ) == (1, 1, 2)
    assert (
        await fetchval(pg_dsn, "SELECT title FROM sessions WHERE id = $1", clash)
        == "kept as it was"
    )
    assert report.tables["messages"].loaded == 4
    results = await verify_rows(settings)
    assert all(r.ok for r in results), results
    assert results[0].skipped == 1


async def test_on_conflict_update_overwrites_existing_rows(tmp_path: Path, pg_dsn: str) -> None:
    """--on-conflict update overwrites a row whose key exists with the source's values."""
    db = app_db(tmp_path / "app.sqlite")
    clash = db.sessions[0]["id"]
    db.write()
    await _prefill_target(pg_dsn, clash, "stale title")
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn, on_conflict="update")
    report = await migrate(settings)
    assert report.tables["sessions"].loaded == 2
    assert source_rows(db.path, "sessions") == await target_rows(pg_dsn, "sessions")


async def test_resuming_with_another_source_is_refused_and_restart_starts_over(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A target filled from database A refuses database B (exit 2); --restart --yes clears what
    flux-migrate wrote and migrates B exactly."""
    a = app_db(tmp_path / "a.sqlite").write()
    b = app_db(tmp_path / "b.sqlite", good_sessions=3).write()
    assert cli("run", "--sqlite-path", str(a), "--postgres-dsn", pg_dsn).returncode == 0
    refused = cli("run", "--sqlite-path", str(b), "--postgres-dsn", pg_dsn)
    assert refused.returncode == 2
    assert "different SQLite database" in refused.stderr
    no_yes = cli("run", "--sqlite-path", str(b), "--postgres-dsn", pg_dsn, "--restart")
    assert no_yes.returncode == 2
    assert "--yes" in no_yes.stderr
    restarted = cli("run", "--sqlite-path", str(b), "--postgres-dsn", pg_dsn, "--restart", "--yes")
    assert restarted.returncode == 0, restarted.stderr
    for table in ("sessions", "messages"):
        assert source_rows(b, table) == await target_rows(pg_dsn, table)


async def test_resuming_with_other_settings_is_refused(tmp_path: Path, pg_dsn: str) -> None:
    """Changing a setting that shapes the output (the naive time zone) between runs is refused."""
    db = app_db(tmp_path / "app.sqlite").write()
    await migrate(load_settings(None, sqlite_path=db, postgres_dsn=pg_dsn))
    with pytest.raises(TargetError) as info:
        await migrate(
            load_settings(None, sqlite_path=db, postgres_dsn=pg_dsn, naive_timezone="Europe/Berlin")
        )
    assert "naive_timezone" in info.value.message


def test_a_source_without_tables_exits_2(tmp_path: Path, pg_dsn: str) -> None:
    """A SQLite file with nothing to migrate (only a view) is refused up front with exit 2."""
    path = tmp_path / "empty.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE VIEW v AS SELECT 1 AS x")
    conn.close()
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 2 == done.returncode
    assert "has no tables to migrate" in done.stderr


@pytest.mark.parametrize(
    "ddl",
    ["CREATE TABLE sessions (id TEXT PRIMARY KEY)", "CREATE TABLE other (x INT)"],
)
def test_a_source_of_another_shape_is_migrated_whole(tmp_path: Path, pg_dsn: str, ddl: str) -> None:
    """A database that is not the app's memory (issue 9: the app's other stores) is no longer
    refused: its tables arrive under the discovered mapping, every value included."""
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(ddl)
    table = ddl.split()[2]
    conn.execute(
        f"INSERT INTO {table} VALUES ('a')" if "id" in ddl else f"INSERT INTO {table} VALUES (7)"
    )
    conn.commit()
    conn.close()
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == done.returncode, done.stderr
    value = "a" if "id" in ddl else 7
    assert [value] == [r for r in asyncio.run(_column_values(pg_dsn, table))]


async def _column_values(dsn: str, table: str) -> list[object]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch(f"SELECT * FROM {table}")]
    finally:
        await conn.close()


async def test_locked_source_is_refused_after_the_timeout(tmp_path: Path, pg_dsn: str) -> None:
    """A source held under an exclusive lock beyond the timeout stops the run with exit 1 (a
    rerun when the app is idle works), saying nothing was written."""
    db = app_db(tmp_path / "app.sqlite").write()
    holder = sqlite3.connect(db, check_same_thread=False)
    holder.execute("PRAGMA journal_mode=DELETE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(RuntimeFailure) as info:
            await migrate(
                load_settings(None, sqlite_path=db, postgres_dsn=pg_dsn, busy_timeout=0.3)
            )
    finally:
        holder.rollback()
        holder.close()
    assert info.value.exit_code == 1
    assert "locked" in info.value.message and "nothing was written: rerun" in info.value.message


async def test_source_file_is_byte_identical_after_a_run(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """The SQLite file is opened read-only: its bytes do not change, and no journal is left."""
    copy = tmp_path / "copy.sqlite"
    shutil.copy(sample_db, copy)
    before = hashlib.sha256(copy.read_bytes()).hexdigest()
    await migrate(load_settings(None, sqlite_path=copy, postgres_dsn=pg_dsn))
    assert before == hashlib.sha256(copy.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.sqlite"]


async def test_a_live_writer_does_not_break_the_run(tmp_path: Path, pg_dsn: str) -> None:
    """While the app keeps writing (WAL mode), the run migrates the rows that existed at its
    start and the next run picks up the rest; both end exact."""
    path = tmp_path / "live.sqlite"
    db = app_db(path, good_sessions=50, messages_each=20)
    db.write()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    stop = threading.Event()

    def writer() -> None:
        w = sqlite3.connect(path, timeout=10)
        sid = new_id()
        w.execute(
            "INSERT INTO sessions (id, title, created_at, updated_at, metadata)"
            " VALUES (?, 't', ?, ?, '{}')",
            (sid, GOOD_TS, GOOD_TS),
        )
        w.commit()
        while not stop.is_set():
            w.execute(
                "INSERT INTO messages VALUES (?, ?, 'user', 'live', '{}', ?)",
                (new_id(), sid, GOOD_TS),
            )
            w.commit()
            time.sleep(0.002)
        w.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        settings = load_settings(None, sqlite_path=path, postgres_dsn=pg_dsn, batch_size=50)
        first = await migrate(settings)
    finally:
        stop.set()
        thread.join()
    assert first.status == "completed"
    await migrate(settings)
    for table in ("sessions", "messages"):
        assert source_rows(path, table) == await target_rows(pg_dsn, table)


async def test_verify_finds_a_changed_character_a_deleted_row_and_an_extra_row(
    sample_db: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify reports one changed character, a deleted target row and an extra target row (over
    many pages on both sides), and --quick sees the difference too."""
    monkeypatch.setattr(flux_migrate.pipeline.verify, "PAGE", 97)
    settings = load_settings(None, sqlite_path=sample_db, postgres_dsn=pg_dsn)
    await migrate(settings)
    assert all(r.ok for r in await verify_rows(settings))
    assert all(q.ok for q in await verify_quick(settings))
    conn = await asyncpg.connect(pg_dsn)
    try:
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM messages ORDER BY id LIMIT 2")]
        await conn.execute(
            "UPDATE messages SET content = overlay(content placing 'Z' from 1 for 1) WHERE id = $1",
            ids[0],
        )
        await conn.execute("DELETE FROM messages WHERE id = $1", ids[1])
        session = await conn.fetchval("SELECT id FROM sessions LIMIT 1")
        await conn.execute(
            "INSERT INTO messages (id, session_id, role, content, created_at)"
            " VALUES ($1, $2, 'user', 'x', now())",
            "ffffffff-0000-4000-8000-000000000000",
            session,
        )
    finally:
        await conn.close()
    [sessions, messages] = await verify_rows(settings)
    assert sessions.ok
    assert (messages.different, messages.missing, messages.extra) == (1, 1, 1)
    assert any(ids[0] in line and "content" in line for line in messages.samples)
    quick = {q.table: q for q in await verify_quick(settings)}
    assert quick["sessions"].ok and not quick["messages"].ok
    done = cli("verify", "--sqlite-path", str(sample_db), "--postgres-dsn", pg_dsn)
    assert done.returncode == 1
    assert "MISMATCH" in done.stdout


async def test_identifiers_from_config_are_quoted(tmp_path: Path, pg_dsn: str) -> None:
    """Schema and table names with quotes, spaces and capitals work: they are never pasted raw."""
    db = app_db(tmp_path / "app.sqlite").write()
    config = tmp_path / "odd.toml"
    config.write_text(
        '[target]\nschema = "Chat \\"Memory\\"; DROP"\n'
        '[tables.sessions]\ntarget = "Sessions Table"\n[tables.messages]\ntarget = "msg-log"\n'
    )
    done = cli("run", "--config", str(config), "--sqlite-path", str(db), "--postgres-dsn", pg_dsn)
    assert done.returncode == 0, done.stderr
    names = TargetNames(schema='Chat "Memory"; DROP', sessions="Sessions Table", messages="msg-log")
    assert source_rows(db, "messages") == await target_rows(pg_dsn, "messages", names)
    verify = cli(
        "verify", "--config", str(config), "--sqlite-path", str(db), "--postgres-dsn", pg_dsn
    )
    assert verify.returncode == 0, verify.stdout


async def test_passwords_never_appear_in_output_report_or_quarantine(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A password in the DSN appears nowhere: logs, errors, summary, report JSON, quarantine."""
    secret = "pw-Secret-4242"
    dsn = pg_dsn.replace("postgres:@", f"postgres:{secret}@")
    db = app_db(tmp_path / "app.sqlite")
    db.session(created_at="bad")
    db.write()
    report = tmp_path / "report.json"
    ok = cli(
        "run",
        "--sqlite-path",
        str(db.path),
        "--postgres-dsn",
        dsn,
        "--report-json",
        str(report),
        "--log-format",
        "json",
    )
    assert ok.returncode == 3, ok.stderr
    bad_db = dsn.replace("/t_", "/missing_t_")
    failed = cli(
        "run", "--sqlite-path", str(db.path), "--postgres-dsn", bad_db, "--log-format", "json"
    )
    assert failed.returncode == 2
    assert "does not exist" in failed.stderr
    listing = cli("quarantine", "--postgres-dsn", dsn)
    status = cli("status", "--postgres-dsn", dsn)
    everything = (
        ok.stdout + ok.stderr + failed.stdout + failed.stderr + listing.stdout + status.stdout
    )
    everything += report.read_text()
    everything += json.dumps(
        await fetchval(pg_dsn, "SELECT json_agg(q) FROM flux_migrate.quarantine q")
    )
    assert secret not in everything
    assert "invalid_timestamp" in listing.stdout


async def test_reused_rowids_below_the_checkpoint_are_loaded_not_skipped(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Deleting the newest message and adding another (which takes its rowid): the next run
    resumes below the reused rowid and loads the new row once instead of silently skipping it."""
    db = app_db(tmp_path / "app.sqlite")
    db.write()
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn)
    await migrate(settings)
    conn = sqlite3.connect(db.path)
    last = conn.execute("SELECT max(rowid) FROM messages").fetchone()[0]
    sid = conn.execute("SELECT session_id FROM messages WHERE rowid = ?", (last,)).fetchone()[0]
    conn.execute("DELETE FROM messages WHERE rowid = ?", (last,))
    added = new_id()
    conn.execute(
        "INSERT INTO messages VALUES (?, ?, 'user', 'new', '{}', ?)", (added, sid, GOOD_TS)
    )
    assert last == conn.execute("SELECT max(rowid) FROM messages").fetchone()[0]
    conn.commit()
    conn.close()
    report = await migrate(settings)
    assert 1 == report.tables["messages"].loaded
    assert "new" == await fetchval(pg_dsn, "SELECT content FROM messages WHERE id = $1", added)
    expected = source_rows(db.path, "messages")
    actual = await target_rows(pg_dsn, "messages")
    assert expected == {k: v for k, v in actual.items() if k in expected}


async def test_verify_compares_numbers_exactly_and_handles_blob_keys(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Metadata numbers PostgreSQL prints differently (1e+23) still match, and a key stored as a
    BLOB is compared without breaking the key-ordered scan."""
    db = app_db(tmp_path / "app.sqlite")
    db.session(metadata='{"x": 1e+23, "y": 0.1, "z": 123456789012345678901234567890}')
    db.write()
    conn = sqlite3.connect(db.path)
    conn.execute(
        "INSERT INTO sessions (id, title, created_at, updated_at, metadata)"
        " VALUES (?, 't', ?, ?, '{}')",
        (new_id().encode(), GOOD_TS, GOOD_TS),
    )
    conn.commit()
    conn.close()
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn)
    report = await migrate(settings)
    assert report.tables["sessions"].loaded == 4
    results = await verify_rows(settings)
    assert all(r.ok for r in results), results
    assert results[0].matched == 4


async def test_on_conflict_needs_a_unique_key_on_id(tmp_path: Path, pg_dsn: str) -> None:
    """--on-conflict skip into a table with rows but no unique key on id is refused with exit 2."""
    db = app_db(tmp_path / "app.sqlite").write()
    await _execute(
        pg_dsn,
        "CREATE TABLE sessions (id varchar(36), title text, created_at timestamptz NOT NULL,"
        " updated_at timestamptz NOT NULL, metadata jsonb NOT NULL DEFAULT '{}')",
        "INSERT INTO sessions VALUES ('x', 't', now(), now(), '{}')",
    )
    done = cli("run", "--sqlite-path", str(db), "--postgres-dsn", pg_dsn, "--on-conflict", "skip")
    assert done.returncode == 2
    assert "needs a primary key or unique index" in done.stderr
