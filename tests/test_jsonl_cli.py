"""`run --jsonl` and `run --data-dir` through the CLI: summary, report, status, verify, kill."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flux_migrate.pipeline.sample import generate
from tests.conftest import fresh_database
from tests.support import cli, fetchval, kill_after, start_cli
from tests.test_jsonl import correction, feedback_record, line

pytestmark = pytest.mark.anyio


def _count(db: Path, table: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def _data_dir(root: Path, sample_db: Path) -> Path:
    """An app data directory: memory.db, another database, and three JSONL stores."""
    data = root / "data"
    data.mkdir()
    shutil.copy(sample_db, data / "memory.db")
    generate(data / "audit.db", sessions=3, messages_per_session=1, seed=1)
    (data / "feedback.jsonl").write_bytes(
        b"".join(line(feedback_record(n, 1 + n % 4)) for n in range(50)) + b'{"id": "torn'
    )
    (data / "error_reports.jsonl").write_bytes(
        line({"id": "e1", "error_type": "wrong", "created_at": "2024-01-01T00:00:00"})
        + b"not json\n"
    )
    (data / "corrections.jsonl").write_bytes(b"".join(line(correction(n)) for n in range(4)))
    return data


async def test_data_dir_migrates_memory_and_every_jsonl_store(
    tmp_path: Path, pg_dsn: str, sample_db: Path
) -> None:
    """One `run --data-dir` loads memory.db, audit.db (into schema audit) and the three JSONL
    files, reports them in the summary and the report JSON, exits 3 for the bad line, and
    `verify`/`status` cover all."""
    data = _data_dir(tmp_path, sample_db)
    report_path = tmp_path / "report.json"
    args = ["--data-dir", str(data), "--postgres-dsn", pg_dsn]
    done = cli("run", *args, "--no-progress", "--report-json", str(report_path))
    assert 3 == done.returncode, done.stderr
    tables = json.loads(report_path.read_text())["tables"]
    assert {
        "sessions": (_count(sample_db, "sessions"), 0),
        "messages": (_count(sample_db, "messages"), 0),
        "corrections": (4, 0),
        "error_reports": (1, 1),
        "feedback": (50, 0),
        "audit.sessions": (3, 0),
        "audit.messages": (3, 0),
    } == {name: (t["loaded"], t["quarantined"]) for name, t in tables.items()}
    assert 1 == json.loads(report_path.read_text())["quarantined_open"]
    assert "feedback.jsonl (12 bytes at offset 11,510) has no newline yet" in done.stdout
    notes = json.loads(report_path.read_text())["notes"]
    assert any("has no newline yet" in n for n in notes)
    verified = cli("verify", *args)
    # the torn last line is a record not loaded yet: verify counts it, as missing
    assert 1 == verified.returncode, verified.stdout + verified.stderr
    assert set(tables) - {"feedback"} == {
        ln.split()[0] for ln in verified.stdout.splitlines() if ln.endswith(" ok")
    }
    assert "the last line (offset 11,510) has no newline yet" in verified.stdout
    status = cli("status", "--postgres-dsn", pg_dsn)
    assert {"sessions", "messages", "feedback", "error_reports", "corrections"} <= {
        ln.split()[0] for ln in status.stdout.splitlines()[2:]
    }
    with (data / "feedback.jsonl").open("ab") as f:
        f.write(b'"}\n' + line(feedback_record(99, 4)))
    again = cli("run", *args, "--no-progress", "--report-json", str(report_path))
    assert 3 == again.returncode, again.stderr
    tables = json.loads(report_path.read_text())["tables"]
    # the torn line, completed as {"id": "torn"}, is a record (every other key NULL)
    assert (2, 2) == (tables["feedback"]["extracted"], tables["feedback"]["loaded"])
    assert 52 == await fetchval(pg_dsn, "SELECT count(*) FROM feedback")


async def test_jsonl_alone_rewritten_file_said_in_the_output(tmp_path: Path, pg_dsn: str) -> None:
    """`run --jsonl` without SQLite says when a file was rewritten and what the reconcile did,
    and `verify --jsonl` passes afterwards."""
    path = tmp_path / "corrections.jsonl"
    path.write_bytes(b"".join(line(correction(n)) for n in range(3)))
    args = ["--jsonl", str(path), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *args, "--no-progress").returncode
    path.write_bytes(line(correction(0, "approved", tags={"a": [1]})) + line(correction(2)))
    done = cli("run", *args, "--no-progress")
    assert 0 == done.returncode, done.stderr
    summary = next(ln for ln in done.stdout.splitlines() if ln.startswith("corrections "))
    assert ["2", "1", "1"] == summary.split()[1:4]  # read 2, loaded the 1 changed, 1 not
    assert (
        "corrections: reconciled by id: 0 new, 1 updated, 1 unchanged,"
        " 1 gone from the file, kept in the table (c1)."
    ) in done.stdout
    assert "added column(s) tags" in done.stdout
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout


@pytest.mark.slow
async def test_sigkill_mid_file_then_rerun_loads_each_line_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Killed after some committed batches of a feedback file, a rerun ends with each record
    exactly once and the checkpoint at the end of the file."""
    path = tmp_path / "feedback.jsonl"
    records = [feedback_record(n, 1 + n % 4) for n in range(3000)]
    path.write_bytes(b"".join(line(r) for r in records))
    args = ["run", "--jsonl", str(path), "--postgres-dsn", pg_dsn, "--batch-size", "50"]
    args += ["--log-format", "json", "--no-progress"]
    kill_after(args, "batch_loaded", 5)
    committed = await fetchval(pg_dsn, "SELECT loaded FROM flux_migrate.checkpoints")
    assert 250 <= committed < 3000
    rerun = cli(*args)
    assert 0 == rerun.returncode, rerun.stderr
    ids = await fetchval(pg_dsn, "SELECT array_agg(id ORDER BY id) FROM feedback")
    assert sorted(r["id"] for r in records) == ids
    offset = await fetchval(pg_dsn, "SELECT last_rowid FROM flux_migrate.checkpoints")
    assert path.stat().st_size == offset


@pytest.fixture
def reference_dsn(pg_server_dsn: str) -> Iterator[str]:
    """Another brand-new database on the test server, for an uninterrupted run to compare with."""
    yield from fresh_database(pg_server_dsn)


def _feedback_with_bad_lines(path: Path, n: int) -> None:
    """A feedback file of ``n`` lines among which some are not JSON, some hold a value that
    does not convert, and some repeat an earlier id (refused by PostgreSQL on load)."""
    lines = []
    for k in range(n):
        record = feedback_record(k, 1 + k % 4)
        if k % 7 == 5:
            lines.append(b"not json\n")
            continue
        if k % 11 == 7:
            record["created_at"] = "the day before yesterday"
        if k % 13 == 9:
            record["id"] = feedback_record(k - 9, 1)["id"]
        lines.append(line(record))
    path.write_bytes(b"".join(lines))


async def _migrated_state(dsn: str) -> tuple[Any, ...]:
    """The table, the quarantine and the checkpoint a JSONL run of feedback.jsonl leaves."""
    table = await fetchval(
        dsn, "SELECT array_agg(row_to_json(t)::text ORDER BY id) FROM feedback t"
    )
    quarantine = await fetchval(
        dsn,
        "SELECT array_agg(ROW(source_table, source_key, source_rowid, reason, detail, stage,"
        " raw::text)::text ORDER BY source_rowid, reason) FROM flux_migrate.quarantine",
    )
    checkpoint = await fetchval(
        dsn,
        "SELECT ROW(last_rowid, last_key, extracted, loaded, quarantined, skipped)::text"
        " FROM flux_migrate.checkpoints WHERE source_table = 'feedback'",
    )
    return table, quarantine, checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("batches", [1, 2])
async def test_sigkill_after_one_or_two_batches_resumes_to_the_uninterrupted_result(
    tmp_path: Path, pg_dsn: str, reference_dsn: str, batches: int
) -> None:
    """Killed after 1 or 2 committed batches of a file with bad lines, a rerun leaves the
    table, the quarantine and the checkpoint exactly as one uninterrupted run does: no line
    lost, none loaded or quarantined twice."""
    path = tmp_path / "feedback.jsonl"
    _feedback_with_bad_lines(path, 600)
    args = ["run", "--jsonl", str(path), "--batch-size", "20", "--log-format", "json"]
    args += ["--no-progress"]
    assert 3 == cli(*args, "--postgres-dsn", reference_dsn).returncode
    expected = await _migrated_state(reference_dsn)
    kill_after([*args, "--postgres-dsn", pg_dsn], "batch_loaded", batches)
    offset = await fetchval(pg_dsn, "SELECT last_rowid FROM flux_migrate.checkpoints")
    assert 0 < offset < path.stat().st_size
    rerun = cli(*args, "--postgres-dsn", pg_dsn)
    assert 3 == rerun.returncode, rerun.stderr
    assert expected == await _migrated_state(pg_dsn)


async def test_a_missing_jsonl_file_is_refused_before_anything_is_written(
    tmp_path: Path, pg_dsn: str, sample_db: Path
) -> None:
    """A --jsonl path that does not exist stops the run with exit 2 before the SQLite tables
    are loaded: the target has no bookkeeping yet."""
    missing = tmp_path / "feedback.jsonl"
    done = cli(
        "run", "--sqlite-path", str(sample_db), "--jsonl", str(missing), "--postgres-dsn", pg_dsn
    )
    assert (
        2,
        f"flux-migrate: error: The JSONL file {missing} does not exist; check --jsonl.\n",
    ) == (
        done.returncode,
        done.stderr,
    )
    assert await fetchval(pg_dsn, "SELECT to_regclass('flux_migrate.checkpoints')") is None


@pytest.mark.slow
async def test_sigkill_during_a_reconcile_then_rerun_finishes_it(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Killed midway through reconciling a rewritten file, a rerun resumes the pass: every
    record of the new file once, with its new values, and the gone record reported once."""
    path = tmp_path / "corrections.jsonl"
    path.write_bytes(b"".join(line(correction(n)) for n in range(1500)))
    args = ["run", "--jsonl", str(path), "--postgres-dsn", pg_dsn, "--batch-size", "50"]
    args += ["--log-format", "json", "--no-progress"]
    assert 0 == cli(*args).returncode
    rewritten = [correction(n, "approved" if n % 2 else "pending") for n in range(1, 1600)]
    path.write_bytes(b"".join(line(r) for r in rewritten))
    kill_after(args, "batch_loaded", 6)
    rerun = cli(*args)
    assert 0 == rerun.returncode, rerun.stderr
    reconciled = [
        json.loads(raw) for raw in rerun.stderr.splitlines() if '"file_reconciled"' in raw
    ]
    assert [1] == [r["gone"] for r in reconciled]
    statuses = await fetchval(
        pg_dsn, "SELECT json_object_agg(id, status) FROM corrections WHERE id <> 'c0'"
    )
    assert {r["id"]: r["status"] for r in rewritten} == json.loads(statuses)
    assert 1600 == await fetchval(pg_dsn, "SELECT count(*) FROM corrections")
    verified = cli("verify", "--jsonl", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == verified.returncode, verified.stdout


async def test_restart_drops_the_jsonl_tables_and_loads_again(
    tmp_path: Path, pg_dsn: str, sample_db: Path
) -> None:
    """`run --restart --yes` with SQLite and JSONL sources starts every table over, the JSONL
    ones included (their records once, the gone ones dropped with the table)."""
    path = tmp_path / "corrections.jsonl"
    path.write_bytes(b"".join(line(correction(n)) for n in range(3)))
    args = ["--sqlite-path", str(sample_db), "--jsonl", str(path), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *args, "--no-progress").returncode
    path.write_bytes(line(correction(2)))
    done = cli("run", *args, "--no-progress", "--restart", "--yes")
    assert 0 == done.returncode, done.stderr
    assert ["c2"] == await fetchval(pg_dsn, "SELECT array_agg(id) FROM corrections")
    loaded = await fetchval(
        pg_dsn, "SELECT loaded FROM flux_migrate.checkpoints WHERE source_table = 'corrections'"
    )
    assert 1 == loaded


async def test_sigterm_stops_a_jsonl_run_at_a_batch_boundary(tmp_path: Path, pg_dsn: str) -> None:
    """SIGTERM stops a JSONL run after a committed batch with exit 143 and an `interrupted`
    report; a rerun finishes with each record once."""
    path = tmp_path / "feedback.jsonl"
    path.write_bytes(b"".join(line(feedback_record(n, 4)) for n in range(2000)))
    report_path = tmp_path / "report.json"
    args = ["run", "--jsonl", str(path), "--postgres-dsn", pg_dsn, "--batch-size", "50"]
    args += ["--log-format", "json", "--no-progress", "--report-json", str(report_path)]
    proc = start_cli(*args)
    assert proc.stderr is not None
    seen = 0
    for raw in proc.stderr:
        seen += '"batch_loaded"' in raw
        if seen == 3:
            proc.send_signal(signal.SIGTERM)
            break
    proc.stderr.read()
    proc.wait(timeout=60)
    report = json.loads(report_path.read_text())
    assert (143, "interrupted") == (proc.returncode, report["status"])
    assert 0 < report["tables"]["feedback"]["loaded"] < 2000
    assert 0 == cli(*args).returncode
    assert 2000 == await fetchval(pg_dsn, "SELECT count(DISTINCT id) FROM feedback")
    assert 2000 == await fetchval(pg_dsn, "SELECT count(*) FROM feedback")
