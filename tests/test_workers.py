"""Converter processes (`run --workers N`): the same target, quarantine and checkpoints for every
N; killing the coordinator, a worker, or stopping with a signal loses and duplicates nothing."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from flux_migrate.core.errors import ConfigError
from flux_migrate.core.schema import quote_ident
from flux_migrate.pipeline.convert_worker import receive, send
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.sample import generate
from flux_migrate.pipeline.settings import load_settings
from flux_migrate.pipeline.workers import SPAWN
from flux_migrate.stages.batch import Batch
from tests.conftest import fresh_database
from tests.dirty import app_db
from tests.generic_db import varied_db
from tests.support import alive, assert_app_tables_equal, cli, start_cli
from tests.test_zero_loss import CASES

pytestmark = pytest.mark.anyio


@pytest.fixture
def second_dsn(pg_server_dsn: str) -> Iterator[str]:
    """Another brand-new database on the test server, dropped after the test."""
    yield from fresh_database(pg_server_dsn)


def _dirty_app(path: Path) -> Path:
    """An app database of good rows with every bad value of test_zero_loss among them, a
    deleted session's messages (orphans), NULLs, and a value only PostgreSQL refuses."""
    db = app_db(path, good_sessions=20, messages_each=6)
    for table, column, value, _reason in CASES:
        if value is None:  # NOT NULL in the app's schema
            continue
        if table == "sessions":
            s = db.session(**{column: value})
            db.message(s["id"])
        else:
            values = {"session_id": db.sessions[len(db.messages) % 20]["id"], column: value}
            db.message(**values)
    db.message("0badc0de-0000-4000-8000-000000000000")
    db.message(db.sessions[3]["id"], metadata=None, content="")
    for _ in range(30):
        db.message(db.sessions[5]["id"])
    return db.write()


async def _state(dsn: str) -> dict[str, Any]:
    """Every table of the target schema, the quarantine and the checkpoints' counts."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            r["t"]
            for r in await conn.fetch(
                "SELECT tablename AS t FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
        ]
        state: dict[str, Any] = {
            t: sorted(str(tuple(r)) for r in await conn.fetch(f"SELECT * FROM {quote_ident(t)}"))
            for t in tables
        }
        state["quarantine"] = sorted(
            tuple(r)
            for r in await conn.fetch(
                "SELECT source_table, source_key, source_rowid, reason, stage, raw::text"
                " FROM flux_migrate.quarantine"
            )
        )
        state["checkpoints"] = sorted(
            tuple(r)
            for r in await conn.fetch(
                "SELECT source_table, last_rowid, extracted, loaded, quarantined, skipped,"
                " status FROM flux_migrate.checkpoints"
            )
        )
    finally:
        await conn.close()
    return state


class _Lines:
    """A live display that records its lines: which tables started, and the rows they advanced."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.rows: dict[str, int] = {}

    def start(self, table: str, total: int) -> None:
        self.started.append(table)

    def advance(self, table: str, rows: int, quarantined: int = 0) -> None:
        self.rows[table] = self.rows.get(table, 0) + rows

    def finish(self, table: str) -> None:
        pass


@pytest.mark.parametrize("source", ["app", "generic"])
async def test_one_and_two_workers_load_the_same(
    tmp_path: Path, pg_dsn: str, second_dsn: str, source: str
) -> None:
    """With 1 and with 2 converter processes, the target tables, the quarantine (raw values,
    reasons, stages), the checkpoints' counts and the live display (one line per table, the
    same rows) are identical, bad rows and orphans included."""
    path = tmp_path / "src.sqlite"
    _dirty_app(path) if source == "app" else varied_db(path)
    states, lines = [], []
    for workers, dsn in ((1, pg_dsn), (2, second_dsn)):
        settings = load_settings(sqlite_path=path, postgres_dsn=dsn, batch_size=7, workers=workers)
        display = _Lines()
        await migrate(settings, progress=display)
        states.append(await _state(dsn))
        lines.append((display.started, display.rows))
    assert states[0] == states[1]
    assert lines[0] == lines[1]
    assert len(set(lines[1][0])) == len(lines[1][0]), "one line per table"
    reasons = {q[3] for q in states[0]["quarantine"]}
    assert (
        {"rejected_by_server", "orphan_message"} if source == "app" else {"type_mismatch"}
    ) <= reasons


def _args(path: Path, dsn: str, *extra: str) -> list[str]:
    return ["run", "--sqlite-path", str(path), "--postgres-dsn", dsn, "--batch-size", "50",
            "--log-format", "json", "--no-progress", "--workers", "2", *extra]  # fmt: skip


def _workers_of(pid: int) -> list[int]:
    """The converter processes among ``pid``'s children (multiprocessing's spawned workers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmdline:
                found.append(int(child))
    return found


def _run_until(args: list[str], batches: int, *, session: bool = False) -> tuple[Any, list[int]]:
    """Start the CLI, wait for ``batches`` committed batches, return it and its workers."""
    proc = start_cli(*args, session=session)
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        if '"batch_loaded"' in line:
            seen += 1
            if seen >= batches:
                break
    workers = _workers_of(proc.pid)
    assert 2 == len(workers), "the run converts in two worker processes"
    return proc, workers


@pytest.mark.parametrize("batches", [2, 25])
async def test_coordinator_killed_workers_exit_and_rerun_loads_exactly_once(
    sample_db: Path, pg_dsn: str, batches: int
) -> None:
    """SIGKILL of the run (in sessions, in messages): its workers exit within two seconds,
    and a rerun (with 2 workers, or with 1) leaves every source row in the target exactly
    once."""
    proc, workers = _run_until(_args(sample_db, pg_dsn), batches)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 2
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [] == [w for w in workers if alive(w)]
    rerun = cli(*_args(sample_db, pg_dsn)[:-2], "--workers", "1" if batches > 2 else "2")
    assert 0 == rerun.returncode, rerun.stderr
    await assert_app_tables_equal(sample_db, pg_dsn)


async def test_worker_killed_the_run_goes_on_and_loads_exactly_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    """SIGKILL of a worker mid-table (whatever it was doing, a reply half sent included): the
    run converts that worker's batches itself, says so once, exits 0 and loads every source
    row exactly once."""
    source = generate(tmp_path / "mid.sqlite", sessions=1500, messages_per_session=10, seed=7)
    proc, workers = _run_until(_args(source, pg_dsn), 8)
    os.kill(workers[0], signal.SIGKILL)
    assert proc.stderr is not None
    rest = proc.stderr.read()
    assert 0 == proc.wait(timeout=120), rest
    assert 1 == rest.count('"converter_worker_lost"')
    await assert_app_tables_equal(source, pg_dsn)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_signal_stops_at_a_boundary_with_two_workers(
    sample_db: Path, pg_dsn: str, signum: int
) -> None:
    """SIGINT/SIGTERM with 2 workers: exit 130/143 at a batch boundary, no worker left behind,
    and the rerun completes the table exactly once."""
    proc, workers = _run_until(_args(sample_db, pg_dsn), 10)
    proc.send_signal(signum)
    assert proc.stderr is not None
    rest = proc.stderr.read()
    assert (130 if signum == signal.SIGINT else 143) == proc.wait(timeout=60), rest
    assert [] == [w for w in workers if alive(w)]
    rerun = cli(*_args(sample_db, pg_dsn))
    assert 0 == rerun.returncode, rerun.stderr
    await assert_app_tables_equal(sample_db, pg_dsn)


async def test_sigterm_to_the_whole_group_stops_at_a_boundary_with_two_workers(
    sample_db: Path, pg_dsn: str
) -> None:
    """SIGTERM to the run's whole process group (as a service manager stops it): the workers
    ignore a SIGTERM their run did not send, so the run stops at a batch boundary with 143
    rather than losing a worker, none is left behind, and the rerun loads exactly once."""
    proc, workers = _run_until(_args(sample_db, pg_dsn), 10, session=True)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.stderr is not None
    rest = proc.stderr.read()
    assert 143 == proc.wait(timeout=60), rest
    assert "ended abruptly" not in rest and "converter_worker_lost" not in rest, rest
    deadline = time.monotonic() + 5
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [] == [w for w in workers if alive(w)]
    rerun = cli(*_args(sample_db, pg_dsn))
    assert 0 == rerun.returncode, rerun.stderr
    await assert_app_tables_equal(sample_db, pg_dsn)


def test_workers_setting_comes_from_flag_config_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--workers beats [load] workers, which beats FLUX_MIGRATE_WORKERS; 0 or a word is refused
    with a sentence."""
    config = tmp_path / "c.toml"
    config.write_text("[load]\nworkers = 3\n")
    monkeypatch.setenv("FLUX_MIGRATE_WORKERS", "2")
    assert 2 == load_settings().workers
    assert 3 == load_settings(config).workers
    assert 1 == load_settings(config, workers=1).workers
    with pytest.raises(ConfigError, match="--workers must be between 1 and"):
        load_settings(workers=0)
    monkeypatch.setenv("FLUX_MIGRATE_WORKERS", "many")
    with pytest.raises(ConfigError, match="FLUX_MIGRATE_WORKERS must be a whole number"):
        load_settings()
    monkeypatch.delenv("FLUX_MIGRATE_WORKERS")
    for cpus, expected in ((1, 1), (2, 2), (16, 2)):  # the CPUs it may use, from 1 to 2
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert expected == load_settings().workers


def test_a_worker_pool_starts_every_process_before_its_first_job() -> None:
    """sync's and verify's process pools know all their processes before the first job: a
    process started per job while the pool's manager already ran, then one of them killed,
    left the manager joining a process it never terminated (verify hung, 2 early kills in 80);
    here a killed process breaks the pool at once and every process ends."""
    import threading
    from concurrent.futures.process import BrokenProcessPool

    from flux_migrate.pipeline.workers import worker_pool

    pool = worker_pool(2)
    processes = list(pool._processes.values())  # noqa: SLF001 - what the manager will know
    assert len(processes) == 2
    os.kill(processes[0].pid, signal.SIGKILL)
    with pytest.raises(BrokenProcessPool):
        list(pool.map(abs, range(-4, 4)))
    closing = threading.Thread(target=pool.shutdown, daemon=True)
    closing.start()
    closing.join(timeout=30)
    assert not closing.is_alive(), "the pool's shutdown hung"
    for p in processes:
        p.join(timeout=10)
    assert [p.exitcode is not None for p in processes] == [True, True]


@pytest.mark.parametrize("size", [0, 1, 65_535, 3_000_017])
def test_a_payload_crosses_the_pipe_byte_for_byte(size: int) -> None:
    """A batch's payload goes over the converter's pipe as bare bytes (convert_worker.send);
    what the coordinator reads back (receive) is the same batch, the same bytes, whatever its
    size against the socket's buffer, and the message after it is read whole."""
    ours, theirs = SPAWN.Pipe(duplex=True)
    payload = os.urandom(size)
    batch = Batch("messages", 1, 0, 9, 9, payload=payload, payload_rows=3)
    sender = threading.Thread(target=lambda: [send(theirs, ("ok", (batch, []))), theirs.send(7)])
    sender.start()
    kind, (got, columns) = receive(ours)
    assert ours.recv() == 7  # the stream is in step after the payload
    sender.join()
    assert (kind, columns, got) == ("ok", [], batch)
    assert bytes(got.payload) == payload


def test_a_converter_dying_in_the_middle_of_a_payload_is_an_eof() -> None:
    """A converter killed while its payload is on the way leaves the coordinator an EOFError
    (its batch is then converted in the coordinator), never a short payload."""
    ours, theirs = SPAWN.Pipe(duplex=True)
    batch = Batch("messages", 1, 0, 9, 9, payload=b"", payload_rows=3)
    theirs.send(("payload", (batch, [], 1000)))
    os.write(theirs.fileno(), b"x" * 999)
    theirs.close()
    with pytest.raises(EOFError):
        receive(ours)


@pytest.mark.anyio
@pytest.mark.parametrize("when", ["before_its_first_range", "while_a_range_is_read"])
async def test_a_sync_worker_killed_between_tables_is_one_sentence(
    tmp_path: Path, when: str
) -> None:
    """sync's scan workers serve every table of a round (sync_scan.ScanPool). One killed while
    a table is read, or after, before the next table hands its first range to the pool, ends
    the scan with the sentence of a lost worker (RuntimeFailure: exit 1), never the pool's
    own error (which the command printed as an internal error)."""
    from concurrent.futures.process import BrokenProcessPool

    from flux_migrate.core.errors import RuntimeFailure
    from flux_migrate.pipeline.sync_plan import _scanned
    from flux_migrate.pipeline.sync_scan import ScanPool

    path = tmp_path / "t.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (id TEXT PRIMARY KEY, v TEXT)")
    db.executemany("INSERT INTO t VALUES (?, ?)", [(f"k{i}", "x" * 10) for i in range(40)])
    db.commit()
    db.close()
    sql = "SELECT rowid, id, v FROM t WHERE rowid >= ? AND rowid <= ? ORDER BY rowid"
    args = (f"file:{path}?mode=ro", sql, 2, 0, 5.0)
    ranges = [(1, 10), (11, 20), (21, 30), (31, 40)]
    scanners = ScanPool()
    try:
        pool = scanners.executor(len(ranges))
        if when == "while_a_range_is_read":
            pool.submit(time.sleep, 30)  # the first range waits behind this one
        for process in list(pool._processes.values()):  # noqa: SLF001 - the pool's own
            os.kill(process.pid, signal.SIGKILL)
        if when == "before_its_first_range":
            with pytest.raises(BrokenProcessPool):  # the pool knows it is broken
                for _ in range(200):
                    pool.submit(abs, -1).result(timeout=10)
                    time.sleep(0.05)
        with pytest.raises(RuntimeFailure, match="ended abruptly"):
            async for _ in _scanned(ranges, args, scanners, {}):
                pass
    finally:
        scanners.close()


def _collection_settings() -> tuple[int, bool]:
    import gc

    return gc.get_threshold()[0], gc.get_freeze_count() > 0


def test_pool_workers_collect_rarely() -> None:
    """A pool worker (verify's and sync's readers) starts as every worker does: its modules
    frozen out of collections, its young generation collected every 50,000 allocations, not
    Python's 700 (which traversed each page's live rows again and again)."""
    from flux_migrate.pipeline import workers

    pool = workers.worker_pool(1)
    try:
        threshold, frozen = pool.submit(_collection_settings).result(timeout=60)
    finally:
        pool.shutdown()
    assert (threshold, frozen) == (workers._YOUNG_COLLECTION_EVERY, True)


@pytest.mark.parametrize("jobs", [0, 1, 3])
def test_a_pool_closed_ends_its_processes_whether_or_not_it_got_a_job(jobs: int) -> None:
    """sync's and verify's worker pools, started up front, end their processes when closed
    even when no job ever reached them (a sync stopped by Ctrl-C before its first scan): the
    command then exits instead of waiting for them for ever."""
    from flux_migrate.pipeline.sync_scan import ScanPool

    scanners = ScanPool()
    pool = scanners.executor(2)
    processes = list(pool._processes.values())  # type: ignore[attr-defined]
    assert len(processes) == 2
    for _ in range(jobs):
        assert pool.submit(os.getpid).result(timeout=30) != os.getpid()
    scanners.close()
    assert [p.pid for p in processes if p.is_alive()] == []
