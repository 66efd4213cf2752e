"""Faults: lost connections, a restarted or vanished server, signals; the run recovers or stops
cleanly, and a rerun always ends with each source row exactly once."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from flux_migrate.core.catalog import MIGRATION_LOCK_KEY
from flux_migrate.core.errors import RuntimeFailure
from flux_migrate.core.jsonl_schema import JsonlFile
from flux_migrate.pipeline.jsonl_run import migrate_jsonl
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import Settings, load_settings
from tests.proxy import FlakyProxy
from tests.support import (
    cli,
    fetchval,
    ignore_asyncpg_orphaned_waiters,
    source_rows,
    start_cli,
    target_rows,
)
from tests.test_jsonl import feedback_record
from tests.test_jsonl import line as jsonl_line

pytestmark = pytest.mark.anyio


class AfterBatches:
    """A progress sink that calls ``action`` in a thread once ``n`` batches (of ``table``, or of
    any table) have committed; with ``wait`` it blocks the run until the action is done."""

    def __init__(
        self, n: int, action: Any, *, table: str | None = None, wait: bool = False
    ) -> None:
        self.n, self.action, self.table, self.wait, self.seen = n, action, table, wait, 0

    def start(self, table: str, total: int) -> None:
        pass

    def finish(self, table: str) -> None:
        pass

    def advance(self, table: str, rows: int, quarantined: int = 0) -> None:
        if self.table not in (None, table):
            return
        self.seen += 1
        if self.seen == self.n:
            worker = threading.Thread(target=self.action, daemon=True)
            worker.start()
            if self.wait:
                worker.join()


async def _exactly_once(source: Path, dsn: str) -> None:
    for table in ("sessions", "messages"):
        assert source_rows(source, table) == await target_rows(dsn, table)
    total = await fetchval(dsn, "SELECT sum(loaded) FROM flux_migrate.checkpoints")
    assert len(source_rows(source, "sessions")) + len(source_rows(source, "messages")) == total


@pytest.mark.parametrize("workers", [1, 2])  # converting in 2 processes too
async def test_connection_lost_mid_run_is_retried_and_the_run_finishes(
    sample_db: Path, pg_dsn: str, workers: int
) -> None:
    """Every connection dropped in the middle of the messages: the batch is retried with backoff
    and the run completes by itself with each row once."""
    proxy = FlakyProxy(pg_dsn)

    def blip() -> None:
        proxy.cut()
        time.sleep(1.0)
        proxy.restore()

    try:
        settings = load_settings(
            None,
            sqlite_path=sample_db,
            postgres_dsn=proxy.proxied_dsn,
            batch_size=100,
            workers=workers,
        )
        with capture_logs() as logs:
            report = await migrate(settings, progress=AfterBatches(8, blip))
    finally:
        proxy.close()
    assert report.status == "completed"
    assert any(e["event"] == "batch_retried" for e in logs)
    await _exactly_once(sample_db, pg_dsn)


@pytest.mark.parametrize("workers", [1, 2])  # converting in 2 processes too
async def test_server_restart_mid_run_is_survived(
    sample_db: Path, pg_dsn: str, restart_server: Any, workers: int
) -> None:
    """The real test server restarted in the middle of a run: the run carries on by itself.
    (Against TEST_POSTGRES_DSN, which may not be restarted, the server's connections are cut.)"""
    proxy = FlakyProxy(pg_dsn)

    def outage() -> None:
        if restart_server is not None:
            restart_server()
        else:
            proxy.cut()
            time.sleep(2)
            proxy.restore()

    try:
        settings = load_settings(
            None,
            sqlite_path=sample_db,
            postgres_dsn=proxy.proxied_dsn,
            batch_size=100,
            workers=workers,
        )
        with ignore_asyncpg_orphaned_waiters(), capture_logs() as logs:
            report = await migrate(settings, progress=AfterBatches(6, outage))
    finally:
        proxy.close()
    assert report.status == "completed"
    assert any(e["event"] == "batch_retried" for e in logs)
    await _exactly_once(sample_db, pg_dsn)


async def test_postgres_gone_for_good_fails_with_exit_1_and_a_rerun_resumes(
    sample_db: Path, pg_dsn: str
) -> None:
    """PostgreSQL away longer than the retry budget: one clear RuntimeFailure (exit 1); once it
    is back, rerunning resumes and ends with each row once."""
    proxy = FlakyProxy(pg_dsn)
    try:
        settings = load_settings(
            None,
            sqlite_path=sample_db,
            postgres_dsn=proxy.proxied_dsn,
            batch_size=100,
            retry_seconds=2.0,
        )
        with pytest.raises(RuntimeFailure) as info:
            await migrate(settings, progress=AfterBatches(5, proxy.cut))
        assert info.value.exit_code == 1
        assert "stayed unreachable" in info.value.message
        assert "rerun" in info.value.message
        loaded = await fetchval(pg_dsn, "SELECT sum(loaded) FROM flux_migrate.checkpoints")
        assert loaded >= 400
        proxy.restore()
        report = await migrate(settings)
    finally:
        proxy.close()
    assert report.status == "completed"
    await _exactly_once(sample_db, pg_dsn)


def test_unreachable_server_exits_1_without_traceback(sample_db: Path) -> None:
    """A DSN to a port nobody listens on exits 1 with one sentence and no password."""
    done = cli(
        "run",
        "--sqlite-path",
        str(sample_db),
        "--postgres-dsn",
        "postgresql://app:hunter2-secret@127.0.0.1:9/chat",
        "--log-format",
        "json",
    )
    assert done.returncode == 1
    assert "cannot be reached" in done.stderr
    assert "hunter2-secret" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_signal_stops_at_a_batch_boundary_and_a_rerun_resumes(
    sample_db: Path, pg_dsn: str, tmp_path: Path, signum: int, code: int
) -> None:
    """SIGTERM/SIGINT stop the run at a batch boundary with exit 143/130, print the summary so
    far, leave consistent checkpoints, and a rerun finishes with each row once."""
    report_path = tmp_path / "report.json"
    args = [
        "run",
        "--sqlite-path",
        str(sample_db),
        "--postgres-dsn",
        pg_dsn,
        "--batch-size",
        "50",
        "--log-format",
        "json",
        "--no-progress",
        "--report-json",
        str(report_path),
    ]
    proc = start_cli(*args)
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        if '"batch_loaded"' in line:
            seen += 1
            if seen == 10:
                proc.send_signal(signum)
                break
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert code == proc.returncode, rest
    assert "rerun the same command to resume" in rest
    assert "Traceback" not in rest
    report = json.loads(report_path.read_text())
    assert report["status"] == "interrupted"
    # Consistent: the rows in the target are exactly what the checkpoints say was loaded.
    in_target = await fetchval(
        pg_dsn, "SELECT (SELECT count(*) FROM sessions) + (SELECT count(*) FROM messages)"
    )
    assert in_target == await fetchval(pg_dsn, "SELECT sum(loaded) FROM flux_migrate.checkpoints")
    assert (
        report["tables"]["sessions"]["loaded"]
        + report["tables"].get("messages", {"loaded": 0})["loaded"]
        == in_target
    )
    # Autovacuum waits while the tables load (every batch commits), and comes back with the
    # run that finishes them.
    assert await _autovacuum_paused(pg_dsn) == {"sessions": True, "messages": True}
    rerun = cli(*args[:-2])
    assert rerun.returncode == 0, rerun.stderr
    await _exactly_once(sample_db, pg_dsn)
    assert await _autovacuum_paused(pg_dsn) == {"sessions": False, "messages": False}


async def _autovacuum_paused(dsn: str) -> dict[str, bool]:
    """Whether each app table (and its TOAST table) has autovacuum turned off."""
    found = {}
    for table in ("sessions", "messages"):
        options = await fetchval(
            dsn,
            "SELECT array_to_string(c.reloptions, ',') || ';'"
            " || coalesce(array_to_string(t.reloptions, ','), '')"
            " FROM pg_class c LEFT JOIN pg_class t ON t.oid = c.reltoastrelid"
            f" WHERE c.oid = 'public.{table}'::regclass",
        )
        found[table] = options == "autovacuum_enabled=false;autovacuum_enabled=false"
        assert found[table] or options is None, options
    return found


async def test_a_second_concurrent_run_is_refused(sample_db: Path, pg_dsn: str) -> None:
    """While one run holds the target, a second one stops with a clear sentence (exit 2)."""
    import asyncpg

    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.fetchval(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})", "public")
        done = await anyio.to_thread.run_sync(
            lambda: cli("run", "--sqlite-path", str(sample_db), "--postgres-dsn", pg_dsn)
        )
    finally:
        await conn.close()
    assert done.returncode == 2
    assert "Another flux-migrate run" in done.stderr


@pytest.mark.parametrize("workers", [1, 2])  # converting in 2 processes too
async def test_a_lost_commit_reply_is_accounted_once(
    sample_db: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """When a batch commits but its reply is lost, the retry finds it committed, loads nothing
    twice, and the run's accounting still adds up."""
    import flux_migrate.stages.load

    real = flux_migrate.stages.load.commit_batch
    calls = {"n": 0}

    async def commit_then_lose_reply(conn: Any, ctx: Any, batch: Any, *, isolate: bool) -> Any:
        result = await real(conn, ctx, batch, isolate=isolate)
        calls["n"] += 1
        if calls["n"] == 5:
            raise ConnectionResetError("reply lost after commit")
        return result

    monkeypatch.setattr(flux_migrate.stages.load, "commit_batch", commit_then_lose_reply)
    settings = load_settings(
        None, sqlite_path=sample_db, postgres_dsn=pg_dsn, batch_size=100, workers=workers
    )
    with capture_logs() as logs:
        report = await migrate(settings)
    assert report.status == "completed"
    assert any(e["event"] == "batch_already_committed" for e in logs)
    n_messages = len(source_rows(sample_db, "messages"))
    assert (n_messages, n_messages) == (
        report.tables["messages"].extracted,
        report.tables["messages"].loaded,
    )
    await _exactly_once(sample_db, pg_dsn)


@pytest.mark.parametrize("workers", [1, 2])  # converting in 2 processes too
async def test_commits_lost_by_the_server_are_redone(
    sample_db: Path, pg_dsn: str, workers: int
) -> None:
    """If the server loses its latest commits (a crash before they were flushed: batches commit
    without waiting for the WAL flush), the run rewinds to the checkpoint it finds and streams
    those rows again: each row ends loaded once and the report still adds up."""
    import asyncio
    import sqlite3

    import asyncpg

    async def lose_last_two_batches() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            last = await conn.fetchval(
                "SELECT last_rowid FROM flux_migrate.checkpoints WHERE source_table = 'messages'"
            )
            back = last - 200
            src = sqlite3.connect(sample_db)
            ids = [
                r[0]
                for r in src.execute(
                    "SELECT id FROM messages WHERE rowid > ? AND rowid <= ?", (back, last)
                )
            ]
            src.close()
            async with conn.transaction():
                await conn.execute("DELETE FROM messages WHERE id = ANY($1::text[])", ids)
                await conn.execute(
                    "UPDATE flux_migrate.checkpoints SET last_rowid = $1,"
                    " extracted = extracted - $2, loaded = loaded - $2"
                    " WHERE source_table = 'messages'",
                    back,
                    len(ids),
                )
        finally:
            await conn.close()

    settings = load_settings(
        None, sqlite_path=sample_db, postgres_dsn=pg_dsn, batch_size=100, workers=workers
    )
    with capture_logs() as logs:
        # Blocks the loop while it runs, so nothing commits meanwhile.
        lose = AfterBatches(
            6, lambda: asyncio.run(lose_last_two_batches()), table="messages", wait=True
        )
        report = await migrate(settings, progress=lose)
    assert any(e["event"] == "checkpoint_rewound" for e in logs)
    n_messages = len(source_rows(sample_db, "messages"))
    assert (n_messages, n_messages) == (
        report.tables["messages"].extracted,
        report.tables["messages"].loaded,
    )
    await _exactly_once(sample_db, pg_dsn)


# ---------------------------------------------------------------- the same faults, a JSONL file


def _feedback_file(path: Path, n: int) -> list[bytes]:
    """A feedback file of ``n`` lines, every ninth not JSON; returns its lines."""
    lines = [
        b"not json\n" if k % 9 == 4 else jsonl_line(feedback_record(k, 1 + k % 4)) for k in range(n)
    ]
    path.write_bytes(b"".join(lines))
    return lines


async def _jsonl_exactly_once(dsn: str, lines: list[bytes]) -> None:
    """Each good line once in the table, each bad one once in the quarantine at its offset."""
    offsets = [sum(map(len, lines[:k])) for k in range(len(lines))]
    good = sorted(json.loads(ln)["id"] for ln in lines if ln != b"not json\n")
    bad = [at for at, ln in zip(offsets, lines, strict=True) if ln == b"not json\n"]
    assert good == await fetchval(dsn, "SELECT array_agg(id ORDER BY id) FROM feedback")
    assert bad == await fetchval(
        dsn, "SELECT array_agg(source_rowid ORDER BY source_rowid) FROM flux_migrate.quarantine"
    )
    counts = await fetchval(
        dsn,
        "SELECT ARRAY[last_rowid, extracted, loaded, quarantined] FROM flux_migrate.checkpoints"
        " WHERE source_table = 'feedback'",
    )
    assert [sum(map(len, lines)), len(lines), len(good), len(bad)] == counts


async def test_jsonl_commits_lost_by_the_server_are_redone(tmp_path: Path, pg_dsn: str) -> None:
    """If the server loses a JSONL file's latest commits, the run rewinds to the checkpoint's
    offset and reads those lines again: each line ends loaded or quarantined once, and the
    report adds up."""
    import asyncio
    import hashlib

    import asyncpg

    path = tmp_path / "feedback.jsonl"
    lines = _feedback_file(path, 600)
    data = path.read_bytes()
    offsets = [sum(map(len, lines[:k])) for k in range(len(lines) + 1)]
    boundaries = offsets[::50]

    async def lose_last_two_batches() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            last = await conn.fetchval(
                "SELECT last_rowid FROM flux_migrate.checkpoints WHERE source_table = 'feedback'"
            )
            back = boundaries[boundaries.index(last) - 2]
            lost = [ln for at, ln in zip(offsets, lines, strict=False) if back <= at < last]
            ids = [json.loads(ln)["id"] for ln in lost if ln != b"not json\n"]
            async with conn.transaction():
                await conn.execute("DELETE FROM feedback WHERE id = ANY($1::text[])", ids)
                await conn.execute(
                    "DELETE FROM flux_migrate.quarantine WHERE source_rowid >= $1", back
                )
                await conn.execute(
                    "UPDATE flux_migrate.checkpoints SET last_rowid = $1, last_key = $2,"
                    " extracted = extracted - $3, loaded = loaded - $4,"
                    " quarantined = quarantined - $5 WHERE source_table = 'feedback'",
                    back,
                    hashlib.sha256(data[:back]).hexdigest(),
                    len(lost),
                    len(ids),
                    len(lost) - len(ids),
                )
        finally:
            await conn.close()

    settings = Settings(postgres_dsn=pg_dsn, batch_size=50)
    with capture_logs() as logs:
        # Blocks the loop while it runs, so nothing commits meanwhile.
        lose = AfterBatches(6, lambda: asyncio.run(lose_last_two_batches()), wait=True)
        report, _ = await migrate_jsonl(settings, [JsonlFile(path, "feedback")], progress=lose)
    rewound = [e for e in logs if e["event"] == "checkpoint_rewound"]
    assert [boundaries[4]] == [e["to_offset"] for e in rewound]
    t = report.tables["feedback"]
    assert (600, 600 - 600 // 9 - 1, 600 // 9 + 1) == (t.extracted, t.loaded, t.quarantined)
    await _jsonl_exactly_once(pg_dsn, lines)


async def test_jsonl_lost_commit_reply_is_accounted_once(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a JSONL batch commits but its reply is lost, the retry finds it committed, loads
    and quarantines nothing twice, and the run's accounting still adds up."""
    import flux_migrate.stages.jsonl_load

    path = tmp_path / "feedback.jsonl"
    lines = _feedback_file(path, 600)
    real = flux_migrate.stages.jsonl_load.commit_jsonl_batch
    calls = {"n": 0}

    async def commit_then_lose_reply(conn: Any, ctx: Any, converted: Any) -> Any:
        result = await real(conn, ctx, converted)
        calls["n"] += 1
        if calls["n"] == 5:
            raise ConnectionResetError("reply lost after commit")
        return result

    monkeypatch.setattr(
        flux_migrate.stages.jsonl_load, "commit_jsonl_batch", commit_then_lose_reply
    )
    settings = Settings(postgres_dsn=pg_dsn, batch_size=50)
    with capture_logs() as logs:
        report, _ = await migrate_jsonl(settings, [JsonlFile(path, "feedback")])
    assert report.status == "completed"
    already = [e for e in logs if e["event"] == "batch_already_committed"]
    assert [5] == [e["seq"] for e in already]
    t = report.tables["feedback"]
    assert (600, 600 - 600 // 9 - 1, 600 // 9 + 1) == (t.extracted, t.loaded, t.quarantined)
    await _jsonl_exactly_once(pg_dsn, lines)
