"""`run --data-dir` over the app's data directory: memory.db, other databases, JSONL stores."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from flux_migrate.pipeline.sample import generate
from tests.generic_db import VARIED_TABLES, compare_table, varied_db
from tests.support import cli, fetchval, source_rows, start_cli, target_rows
from tests.test_jsonl import correction, feedback_record, line

pytestmark = pytest.mark.anyio

# The tables of tests.generic_db.varied_db, the audit.db of the data directory.
AUDIT_TABLES = VARIED_TABLES
JSONL_LINES = {"feedback": 40, "error_reports": 3, "corrections": 5}


def _data_dir(root: Path) -> Path:
    """A data directory: the app's memory.db, an audit.db of another shape, three JSONL files."""
    data = root / "data"
    data.mkdir()
    generate(data / "memory.db", sessions=20, messages_per_session=3, seed=5)
    varied_db(data / "audit.db", bad=False)
    (data / "feedback.jsonl").write_bytes(
        b"".join(line(feedback_record(n, 1 + n % 4)) for n in range(JSONL_LINES["feedback"]))
    )
    (data / "error_reports.jsonl").write_bytes(
        b"".join(
            line({"id": f"e{n}", "error_type": "wrong", "created_at": "2024-01-01T00:00:00"})
            for n in range(JSONL_LINES["error_reports"])
        )
    )
    (data / "corrections.jsonl").write_bytes(
        b"".join(line(correction(n)) for n in range(JSONL_LINES["corrections"]))
    )
    return data


async def test_data_dir_migrates_every_database_and_jsonl_file_into_its_schema(
    tmp_path: Path, pg_dsn: str
) -> None:
    """`run --data-dir` puts memory.db and the JSONL files in the main schema and audit.db in
    schema audit, reports them in one summary, loads nothing twice on a rerun, and `verify
    --data-dir` passes."""
    data = _data_dir(tmp_path)
    report_path = tmp_path / "report.json"
    args = ["--data-dir", str(data), "--postgres-dsn", pg_dsn]
    done = cli("run", *args, "--no-progress", "--report-json", str(report_path))
    assert 0 == done.returncode, done.stdout + done.stderr
    assert "not migrated" not in done.stderr
    assert "Mapping of audit.db into schema audit (discovered)" in done.stdout
    report = json.loads(report_path.read_text())
    assert "completed" == report["status"]
    memory = data / "memory.db"
    main, audit = list(report["tables"])[:5], list(report["tables"])[5:]
    assert (["sessions", "messages", *sorted(JSONL_LINES)], sorted(AUDIT_TABLES)) == (
        main,
        sorted(t.removeprefix("audit.") for t in audit),
    )
    # a summary line: the table, then read, loaded, not loaded, seconds, rows/s
    summary = [ln.rsplit(None, 5)[0] for ln in done.stdout.splitlines() if ln.startswith("audit.")]
    assert sorted(f"audit.{t}" for t in AUDIT_TABLES) == sorted(summary)
    for table in ("sessions", "messages"):
        assert source_rows(memory, table) == await target_rows(pg_dsn, table)
    for table, lines in JSONL_LINES.items():
        assert lines == await fetchval(pg_dsn, f"SELECT count(*) FROM public.{table}")
    for table in AUDIT_TABLES:
        equal, held = await compare_table(data / "audit.db", pg_dsn, table, schema="audit")
        assert equal == held
    assert 0 == await fetchval(pg_dsn, "SELECT to_regclass('public.orgs') IS NOT NULL::int")

    again = cli("run", *args, "--no-progress", "--report-json", str(report_path))
    assert 0 == again.returncode, again.stdout + again.stderr
    rerun = json.loads(report_path.read_text())["tables"]
    assert {name: 0 for name in rerun} == {name: t["loaded"] for name, t in rerun.items()}
    assert 40 == await fetchval(pg_dsn, "SELECT count(*) FROM audit.members")
    assert 21 == await fetchval(pg_dsn, "SELECT count(*) FROM audit.log")

    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout + verified.stderr
    assert {"sessions", "messages", *JSONL_LINES} | {f"audit.{t}" for t in AUDIT_TABLES} == {
        ln.rsplit(None, 7)[0] for ln in verified.stdout.splitlines() if ln.endswith(" ok")
    }
    quick = cli("verify", *args, "--quick")
    assert 0 == quick.returncode, quick.stdout + quick.stderr


@pytest.mark.parametrize(
    ("file", "why"),
    [
        ("Audit.db", "which is not a plain PostgreSQL name"),
        ("public.db", "which is the main target schema"),
        ("flux_migrate.db", "which is flux-migrate's"),
        ("pg_audit.db", "which is a PostgreSQL system schema"),
    ],
)
async def test_a_database_without_a_usable_schema_name_is_refused(
    tmp_path: Path, pg_dsn: str, file: str, why: str
) -> None:
    """A *.db file whose stem is no schema name to use stops `run --data-dir` with exit 2
    before anything is written."""
    data = tmp_path / "data"
    data.mkdir()
    generate(data / "memory.db", sessions=2, messages_per_session=1, seed=1)
    varied_db(data / file, bad=False)
    done = cli("run", "--data-dir", str(data), "--postgres-dsn", pg_dsn, "--no-progress")
    assert (2, True) == (done.returncode, why in done.stderr), done.stderr
    assert await fetchval(pg_dsn, "SELECT to_regclass('flux_migrate.checkpoints')") is None


async def test_quarantined_rows_of_another_database_exit_3_and_show_under_its_schema(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Rows of audit.db that fit no column make `run --data-dir` exit 3, counted in the report,
    and `quarantine`/`status --data-dir` show them under schema audit."""
    data = tmp_path / "data"
    data.mkdir()
    generate(data / "memory.db", sessions=3, messages_per_session=2, seed=2)
    varied_db(data / "audit.db", bad=True)
    report_path = tmp_path / "report.json"
    args = ["--data-dir", str(data), "--postgres-dsn", pg_dsn]
    done = cli("run", *args, "--no-progress", "--report-json", str(report_path))
    assert 3 == done.returncode, done.stdout + done.stderr
    assert f"list them with `flux-migrate quarantine --data-dir {data}`." in done.stdout
    report = json.loads(report_path.read_text())
    assert (2, 2) == (
        report["quarantined_open"],
        report["tables"]['audit.we"ird table']["quarantined"],
    )
    listed = cli("quarantine", *args)
    assert 0 == listed.returncode, listed.stderr
    assert ['audit.we"ird', 'audit.we"ird'] == [
        ln.split()[0] for ln in listed.stdout.splitlines() if ln.startswith("audit.")
    ]
    only = cli("quarantine", *args, "--table", "sessions")
    assert "No quarantined rows in schemas public, audit.\n" == only.stdout
    status = cli("status", *args)
    targets = {ln.split()[1] for ln in status.stdout.splitlines()[2:] if "." in ln}
    assert {"public.sessions", "public.messages", "audit.orgs", "audit.log"} <= targets


async def test_sigint_in_another_database_stops_at_a_batch_boundary_and_rerun_resumes(
    tmp_path: Path, pg_dsn: str
) -> None:
    """SIGINT while audit.db loads exits 130 with an `interrupted` report, starts no further
    database, and a rerun finishes every database with each row once."""
    data = tmp_path / "data"
    data.mkdir()
    generate(data / "memory.db", sessions=2, messages_per_session=1, seed=3)
    generate(data / "audit.db", sessions=1500, messages_per_session=1, seed=4)
    varied_db(data / "zlog.db", bad=False)
    report_path = tmp_path / "report.json"
    args = ["run", "--data-dir", str(data), "--postgres-dsn", pg_dsn, "--batch-size", "50"]
    args += ["--log-format", "json", "--no-progress", "--report-json", str(report_path)]
    proc = start_cli(*args)
    assert proc.stderr is not None
    seen = 0
    for raw in proc.stderr:
        seen += '"batch_loaded"' in raw
        if seen == 8:  # memory.db is two batches: these are audit.db's
            proc.send_signal(signal.SIGINT)
            break
    proc.stderr.read()
    proc.wait(timeout=60)
    report = json.loads(report_path.read_text())
    assert (130, "interrupted") == (proc.returncode, report["status"])
    assert 0 < report["tables"]["audit.sessions"]["loaded"] < 1500
    assert await fetchval(pg_dsn, "SELECT to_regnamespace('zlog')") is None
    rerun = cli(*args)
    assert 0 == rerun.returncode, rerun.stderr
    assert 1500 == await fetchval(pg_dsn, "SELECT count(DISTINCT id) FROM audit.sessions")
    assert 1500 == await fetchval(pg_dsn, "SELECT count(*) FROM audit.sessions")
    assert 40 == await fetchval(pg_dsn, "SELECT count(*) FROM zlog.members")


async def test_a_failing_database_does_not_keep_the_others_from_migrating(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A *.db that is no SQLite file fails with its name in the error and a `failed` report,
    while memory.db and the database after it are migrated."""
    data = tmp_path / "data"
    data.mkdir()
    generate(data / "memory.db", sessions=3, messages_per_session=1, seed=3)
    (data / "broken.db").write_bytes(b"not a database at all" * 100)
    varied_db(data / "zlog.db", bad=False)
    report_path = tmp_path / "report.json"
    args = ["--data-dir", str(data), "--postgres-dsn", pg_dsn, "--report-json", str(report_path)]
    done = cli("run", *args, "--no-progress")
    report = json.loads(report_path.read_text())
    assert (2, "failed") == (done.returncode, report["status"]), done.stderr
    assert done.stderr.splitlines()[-1].startswith("flux-migrate: error: broken.db: "), done.stderr
    assert 3 == await fetchval(pg_dsn, "SELECT count(*) FROM public.sessions")
    assert 40 == await fetchval(pg_dsn, "SELECT count(*) FROM zlog.members")
    assert 40 == report["tables"]["zlog.members"]["loaded"]


async def test_sync_data_dir_catches_up_every_database_and_jsonl_file(
    tmp_path: Path, pg_dsn: str
) -> None:
    """After `run --data-dir`, the app changes memory.db, another database and a JSONL file;
    `sync --data-dir` brings all three up to date (the other database's tables named
    ``schema.table``), and a second sync is idle."""
    import sqlite3

    from tests.test_sync_generic import _generic_db

    data = tmp_path / "data"
    data.mkdir()
    generate(data / "memory.db", sessions=20, messages_per_session=3, seed=5)
    _generic_db(data / "audit.db")
    feedback = data / "feedback.jsonl"
    feedback.write_bytes(b"".join(line(feedback_record(n, 1 + n % 4)) for n in range(10)))
    args = ["--data-dir", str(data), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *args, "--no-progress").returncode
    memory = sqlite3.connect(data / "memory.db")
    memory.execute("UPDATE sessions SET title = 'renamed' WHERE rowid = 5")
    memory.commit()
    memory.close()
    audit = sqlite3.connect(data / "audit.db")
    audit.execute("UPDATE orgs SET name = 'renamed' WHERE id = 2")
    audit.execute("DELETE FROM notes WHERE id = 7")
    audit.commit()
    audit.close()
    with feedback.open("ab") as f:
        f.write(b"".join(line(feedback_record(n, 1 + n % 4)) for n in range(10, 12)))
    done = cli("sync", *args)
    assert 0 == done.returncode, done.stdout + done.stderr
    assert "audit.orgs" in done.stdout and "JSONL files" in done.stdout
    assert source_rows(data / "memory.db", "sessions") == await target_rows(pg_dsn, "sessions")
    for table in ("orgs", "projects", "notes"):
        await compare_table(data / "audit.db", pg_dsn, table, schema="audit")
    assert 12 == await fetchval(pg_dsn, "SELECT count(*) FROM public.feedback")
    again = cli("sync", *args)
    assert 0 == again.returncode, again.stdout + again.stderr
    assert "up to date" in again.stdout


def test_data_dir_prints_what_it_takes_and_ignores_and_why(tmp_path: Path, pg_dsn: str) -> None:
    """The inventory names every entry of the directory: the files taken (any case of .db,
    .sqlite, .sqlite3, .jsonl) and where they go, and each one ignored with its reason; a
    directory without memory.db says so on stderr."""
    import shutil
    import sqlite3

    data = tmp_path / "data"
    data.mkdir()
    (data / "backup").mkdir()
    (data / "notes.txt").write_text("hi\n")
    varied_db(data / "audit.SQLite3", bad=False)
    shutil.copyfile(data / "audit.SQLite3", data / "audit.bak")
    sqlite3.connect(data / "events.DB").execute("CREATE TABLE e (id INTEGER PRIMARY KEY)")
    (data / "Feedback.JSONL").write_bytes(line(feedback_record(1, 1)))
    done = cli("verify", "--data-dir", str(data), "--postgres-dsn", pg_dsn, "--quick")
    shown = [ln.strip() for ln in done.stdout.splitlines() if " -> " in ln or "ignored:" in ln]
    assert [
        "Feedback.JSONL -> table public.Feedback",
        "audit.SQLite3 -> schema audit",
        "events.DB -> schema events",
        "ignored: audit.bak (SQLite, but not *.db/*.sqlite/*.sqlite3: rename it to take it)",
        "ignored: backup (a folder: not searched)",
        "ignored: notes.txt (not *.db, *.sqlite, *.sqlite3 or *.jsonl)",
    ] == shown
    assert f"warning: no memory.db in {data}" in done.stderr


def test_data_dir_databases_take_their_own_mapping_and_sync_skips(
    tmp_path: Path, pg_dsn: str
) -> None:
    """The dead ends of --data-dir, each with a way forward through --config: a key-less table
    is left to `run` by [databases.audit.sync] skip_tables; a type that the data would flip is
    pinned by a mapping file ([databases.audit] mapping); a column the app adds is accepted by
    [ignore] columns without reloading anything; a sync failing on audit.db says what it
    applied to memory.db first."""
    import sqlite3

    data = tmp_path / "data"
    data.mkdir()
    generate(data / "memory.db", sessions=5, messages_per_session=2, seed=9)
    audit = sqlite3.connect(data / "audit.db")
    audit.executescript(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, at);"
        "CREATE TABLE log (at TEXT, msg TEXT);"
        "INSERT INTO log VALUES ('2024-01-01', 'started');"
    )
    audit.executemany(
        "INSERT INTO events (kind, at) VALUES (?, ?)",
        [("login", f"2024-01-0{n}T10:00:00Z") for n in range(1, 8)] + [("odd", "n/a")],
    )
    audit.commit()
    base = ["--data-dir", str(data), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *base, "--no-progress").returncode
    mapping = tmp_path / "audit.toml"
    assert (
        0 == cli("init", "--sqlite-path", str(data / "audit.db"), "--out", str(mapping)).returncode
    )
    memory = sqlite3.connect(data / "memory.db")
    memory.execute("UPDATE sessions SET title = 'renamed' WHERE rowid = 1")
    memory.commit()
    refused = cli("sync", *base)
    assert 2 == refused.returncode, refused.stderr
    assert "log has no one-column primary key" in refused.stderr and "skip_tables" in refused.stderr
    assert "Before it, sync applied and committed (inserted/updated/deleted): sessions 0/1/0" in (
        refused.stderr
    )
    config = tmp_path / "flux.toml"
    config.write_text('[databases.audit]\nmapping = "audit.toml"\n[databases.audit.sync]\n'
                      'skip_tables = ["log"]\n')  # fmt: skip
    audit.execute("DELETE FROM events WHERE at = 'n/a'")  # would flip `at` to timestamptz
    audit.commit()
    synced = cli("sync", *base, "--config", str(config))
    assert 0 == synced.returncode, synced.stdout + synced.stderr
    assert "Not synced (skip_tables of --config): audit.log." in synced.stdout
    audit.execute("ALTER TABLE events ADD COLUMN extra TEXT")
    audit.execute("INSERT INTO events (kind, at, extra) VALUES ('logout', 'x', 'new')")
    audit.commit()
    unplaced = cli("sync", *base, "--config", str(config))
    assert 2 == unplaced.returncode and "extra" in unplaced.stderr, unplaced.stderr
    text = mapping.read_text().replace("columns = []", 'columns = ["events.extra"]', 1)
    mapping.write_text(text)
    for command in ("sync", "run", "verify"):
        done = cli(command, *base, "--config", str(config))
        assert 0 == done.returncode, (command, done.stdout + done.stderr)
    assert 8 == await_count(pg_dsn, "SELECT count(*) FROM audit.events")  # 8 - n/a + logout
    typo = tmp_path / "typo.toml"
    typo.write_text('[databases.audti]\nmapping = "audit.toml"\n')
    done = cli("run", *base, "--config", str(typo))
    assert 2 == done.returncode and "did you mean [databases.audit]?" in done.stderr


def await_count(dsn: str, sql: str) -> int:
    import asyncio

    return int(asyncio.run(fetchval(dsn, sql)))
