"""End to end: a generated app database migrates exactly, reruns are idempotent, appends flow."""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from pathlib import Path

import pytest

from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import load_settings
from tests.support import cli, fetchval, source_rows, target_rows

pytestmark = pytest.mark.anyio


async def test_every_target_row_equals_its_source_row(sample_db: Path, pg_dsn: str) -> None:
    """After a migration every source row is in PostgreSQL once, equal field by field."""
    report = await migrate(
        load_settings(None, sqlite_path=sample_db, postgres_dsn=pg_dsn, batch_size=500)
    )
    assert report.status == "completed"
    for table in ("sessions", "messages"):
        expected = source_rows(sample_db, table)
        actual = await target_rows(pg_dsn, table)
        assert len(expected) == report.tables[table].loaded
        assert expected == actual


async def test_keys_and_index_exist_after_a_bulk_load(sample_db: Path, pg_dsn: str) -> None:
    """Tables the tool created end with their primary keys, foreign key and index."""
    await migrate(load_settings(None, sqlite_path=sample_db, postgres_dsn=pg_dsn))
    names = await fetchval(
        pg_dsn,
        "SELECT array_agg(name ORDER BY name) FROM (SELECT conname AS name FROM pg_constraint"
        " WHERE contype IN ('p', 'f') AND connamespace = 'public'::regnamespace"
        " UNION SELECT indexname FROM pg_indexes WHERE schemaname = 'public') x",
    )
    assert names == [
        "idx_messages_session",
        "idx_sessions_user_md5",
        "messages_pkey",
        "messages_session_id_fkey",
        "sessions_pkey",
    ]


async def test_rerun_after_completion_writes_nothing(sample_db: Path, pg_dsn: str) -> None:
    """A second run finds nothing new, loads nothing and reports the target up to date."""
    settings = load_settings(None, sqlite_path=sample_db, postgres_dsn=pg_dsn)
    await migrate(settings)
    before = await fetchval(pg_dsn, "SELECT max(updated_at) FROM flux_migrate.checkpoints")
    second = await migrate(settings)
    assert all(t.up_to_date and t.loaded == 0 and t.extracted == 0 for t in second.tables.values())
    count = await fetchval(pg_dsn, "SELECT count(*) FROM messages")
    assert len(source_rows(sample_db, "messages")) == count
    after_loaded = await fetchval(pg_dsn, "SELECT sum(loaded) FROM flux_migrate.checkpoints")
    assert (
        len(source_rows(sample_db, "messages")) + len(source_rows(sample_db, "sessions"))
        == after_loaded
    )
    assert before is not None


async def test_rows_appended_to_the_source_are_picked_up(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """Rows the app adds after a run are loaded by the next run, and only those."""
    source = tmp_path / "live.sqlite"
    shutil.copy(sample_db, source)
    settings = load_settings(None, sqlite_path=source, postgres_dsn=pg_dsn)
    await migrate(settings)
    db = sqlite3.connect(source)
    sid = str(uuid.uuid4())
    db.execute(
        "INSERT INTO sessions (id, title, created_at, updated_at, metadata) VALUES (?, ?, ?, ?, ?)",
        (
            sid,
            "new 🚀",
            "2026-11-26T10:00:00+00:00",
            "2026-11-26T10:05:00+00:00",
            json.dumps({"n": 1}),
        ),
    )
    for i in range(3):
        db.execute(
            "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
            (str(uuid.uuid4()), sid, "user", f"hello {i} 👋", "{}", f"2026-11-26T10:0{i}:00+00:00"),
        )
    db.commit()
    db.close()
    third = await migrate(settings)
    assert third.tables["sessions"].loaded == 1
    assert third.tables["messages"].loaded == 3
    for table in ("sessions", "messages"):
        assert source_rows(source, table) == await target_rows(pg_dsn, table)


def test_cli_run_writes_the_report_and_summary(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """`flux-migrate run` exits 0, prints the summary and writes the report JSON."""
    report_path = tmp_path / "report.json"
    done = cli(
        "run",
        "--sqlite-path",
        str(sample_db),
        "--postgres-dsn",
        pg_dsn,
        "--report-json",
        str(report_path),
        "--log-format",
        "json",
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert "rows/s" in done.stdout
    report = json.loads(report_path.read_text())
    assert report["status"] == "completed"
    n_messages = len(source_rows(sample_db, "messages"))
    assert {"extracted": n_messages, "loaded": n_messages, "quarantined": 0} == {
        k: report["tables"]["messages"][k] for k in ("extracted", "loaded", "quarantined")
    }
    again = cli(
        "run", "--sqlite-path", str(sample_db), "--postgres-dsn", pg_dsn, "--log-format", "json"
    )
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout
    status = cli("status", "--postgres-dsn", pg_dsn)
    assert status.returncode == 0
    assert status.stdout.count("finished") == 2
    verify = cli("verify", "--sqlite-path", str(sample_db), "--postgres-dsn", pg_dsn)
    assert verify.returncode == 0, verify.stdout
    assert verify.stdout.count(" ok") == 2
    quick = cli("verify", "--quick", "--sqlite-path", str(sample_db), "--postgres-dsn", pg_dsn)
    assert quick.returncode == 0, quick.stdout
    assert quick.stdout.count("same") == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sqlite-path", "/nonexistent/chat.sqlite"], "does not exist"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_usage_errors_exit_2_with_one_sentence(
    args: list[str], needle: str, pg_dsn: str, sample_db: Path
) -> None:
    """Bad input exits 2 with one sentence on stderr and no traceback."""
    base = ["run", "--postgres-dsn", pg_dsn, "--sqlite-path", str(sample_db)]
    done = cli(*base, *args)
    assert done.returncode == 2
    assert needle in done.stderr
    assert "Traceback" not in done.stderr


def test_not_a_database_exits_2(tmp_path: Path, pg_dsn: str) -> None:
    """A file that is not SQLite is refused up front with exit 2 and nothing written."""
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello, I am not a database\n" * 100)
    done = cli("run", "--sqlite-path", str(bogus), "--postgres-dsn", pg_dsn)
    assert done.returncode == 2
    assert "not a readable SQLite database" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_dsn_exits_2(sample_db: Path) -> None:
    """Without a DSN the run stops with exit 2 and says how to give one."""
    done = cli("run", "--sqlite-path", str(sample_db))
    assert done.returncode == 2
    assert "POSTGRES_DSN" in done.stderr


async def test_a_row_someone_else_writes_into_a_filled_table_fails_the_accounting(
    sample_db: Path, pg_dsn: str
) -> None:
    """A row written by someone else into a table flux-migrate created and filled makes the
    next run's accounting fail (exit 1) with a sentence naming the table and both counts."""
    args = ["run", "--sqlite-path", str(sample_db), "--postgres-dsn", pg_dsn, "--no-progress"]
    assert 0 == cli(*args).returncode
    loaded = await fetchval(pg_dsn, "SELECT count(*) FROM sessions")
    await fetchval(
        pg_dsn,
        'INSERT INTO sessions SELECT (jsonb_populate_record(s, \'{"id": "someone-else"}\')).*'
        " FROM sessions s LIMIT 1 RETURNING 1",
    )
    done = cli(*args)
    assert (
        1,
        f'Table "public"."sessions" holds {loaded + 1} rows but flux-migrate loaded {loaded};'
        " something else wrote to it.",
    ) == (
        done.returncode,
        done.stderr.strip().splitlines()[-1].removeprefix("flux-migrate: error: "),
    )


async def test_a_checkpoint_gone_before_the_accounting_fails_it_naming_the_table(
    sample_db: Path, pg_dsn: str
) -> None:
    """A table that read rows this run but whose checkpoint someone deleted fails the
    accounting with a sentence (it used to be passed over), while a table that read nothing and
    has no checkpoint (a JSONL file without a line yet) is passed over."""
    import asyncpg

    from flux_migrate.core.errors import RuntimeFailure
    from flux_migrate.pipeline.finish import check_accounting
    from flux_migrate.pipeline.report import RunReport, TableReport
    from tests.support import app_settings

    args = ["run", "--sqlite-path", str(sample_db), "--postgres-dsn", pg_dsn, "--no-progress"]
    assert 0 == cli(*args).returncode
    loaded = await fetchval(pg_dsn, "SELECT count(*) FROM sessions")
    report = RunReport(run_id="r")
    report.tables["sessions"] = TableReport(extracted=loaded, loaded=loaded)
    report.tables["nothing_yet"] = TableReport()
    settings = app_settings(sample_db, pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await check_accounting(conn, settings, report)  # as the run left it: passes
        await conn.execute(
            "DELETE FROM flux_migrate.checkpoints WHERE target_schema = 'public'"
            " AND source_table = 'sessions'"
        )
        with pytest.raises(RuntimeFailure, match="The checkpoint of sessions .* vanished"):
            await check_accounting(conn, settings, report)
    finally:
        await conn.close()
