"""Sync while the app keeps writing to SQLite: rows that name a parent the app inserted after
sync planned the parent table are left for the next sync (never an error), and once the app
stops, one more sync makes the target equal to the source (real PostgreSQL, real processes)."""

from __future__ import annotations

import random
import sqlite3
import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest

from bench.writer import step
from flux_migrate.core.target import Target
from flux_migrate.pipeline.runner import migrate, resolve_run_mapping
from flux_migrate.pipeline.stop import StopFlag
from flux_migrate.pipeline.sync import _apply, sync
from flux_migrate.pipeline.sync_apply import TableSync
from flux_migrate.stages.extract import open_source
from tests.support import (
    app_copy,
    app_settings,
    assert_app_tables_equal,
    cli,
    target_rows,
)

NOW = "2026-01-02T03:04:05+00:00"


@pytest.mark.anyio
async def test_a_child_of_a_parent_sync_did_not_plan_waits_for_the_next_sync(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """The app inserts a session and its first message after sync planned sessions but
    before it planned messages: the message is counted as left over, nothing fails, and the
    next sync loads both."""
    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    session, message = str(uuid.uuid4()), str(uuid.uuid4())
    db = sqlite3.connect(path)
    db.execute(
        "INSERT INTO sessions (id, title, created_at, updated_at, metadata)"
        " VALUES (?, 'new', ?, ?, '{}')",
        (session, NOW, NOW),
    )
    db.execute(
        "INSERT INTO messages VALUES (?, ?, 'user', 'hello', '{}', ?)", (message, session, NOW)
    )
    db.commit()
    db.close()
    report = await sync(app_settings(path, pg_dsn), dry_run=True)
    assert 1 == len(report.plans["messages"].inserts)
    report.plans["sessions"].inserts.clear()  # as if sessions were planned before the insert
    report.dry_run = False
    report.tables = {name: TableSync() for name in report.tables}  # the dry run's counts
    settings = await resolve_run_mapping(app_settings(path, pg_dsn), path)
    async with open_source(path) as src:
        await _apply(src, Target(pg_dsn), settings, report, settings.tables, StopFlag())
    assert (1, 0) == (report.tables["messages"].deferred, report.tables["messages"].inserted)
    assert message not in await target_rows(pg_dsn, "messages")
    later = await sync(app_settings(path, pg_dsn))
    assert (1, 1) == (later.tables["sessions"].inserted, later.tables["messages"].inserted)
    await assert_app_tables_equal(path, pg_dsn)


def test_syncs_while_the_app_writes_then_a_final_one(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """Three syncs while a writer inserts, appends, renames, edits and deletes as the app
    does, each exiting 0; after the writer stops, a last sync and verify leave nothing
    different."""
    path = app_copy(sample_db, tmp_path)
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *args).returncode
    stop, done = threading.Event(), Counter[str]()

    def write() -> None:
        db = sqlite3.connect(path, timeout=30)
        rng = random.Random(5)
        while not stop.is_set():
            step(db, rng, done)
            stop.wait(0.005)
        db.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(3):
            live = cli("sync", *args)
            assert 0 == live.returncode, live.stdout + live.stderr
    finally:
        stop.set()
        writer.join()
    assert done["sessions inserted"] > 10, done
    final = cli("sync", *args)
    assert 0 == final.returncode, final.stdout + final.stderr
    assert "left for the next sync" not in final.stdout
    checked = cli("verify", *args)
    assert 0 == checked.returncode, checked.stdout + checked.stderr
