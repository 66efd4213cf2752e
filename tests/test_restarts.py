"""Server restarts at many points of one run (hardening 13.11): during a COPY, between batches,
during a checkpoint commit and during the key build. Every time, the connection that failed
mid-operation is replaced and the run finishes by itself with each source row exactly once."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from flux_migrate.core.bookkeeping import ADVANCE_SQL
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import load_settings
from tests.support import fetchval, ignore_asyncpg_orphaned_waiters, source_rows, target_rows

pytestmark = [pytest.mark.anyio, pytest.mark.embedded]


@pytest.fixture(scope="module")
def pg_server_dsn(embedded_server_dsn: str) -> str:
    """This module restarts its server: always the embedded server, whose binaries match its
    data directory, whatever TEST_POSTGRES_DSN names."""
    return embedded_server_dsn


class Restarts:
    """Counts the target's COPY and execute calls and restarts the server at chosen ones:
    ``blocking`` restarts hold the event loop (the operation then meets a dead connection),
    the others run in a thread while the operation is in flight."""

    def __init__(self, restart: Callable[[], None]) -> None:
        self.restart = restart
        self.copies = self.advances = self.constraints = 0
        self.done: list[str] = []
        self.threads: list[threading.Thread] = []
        self.one_at_a_time = threading.Lock()

    def now(self, where: str) -> None:
        with self.one_at_a_time:  # pg_ctl fails when a second restart overlaps the first
            self.done.append(where)
            self.restart()

    def soon(self, where: str, delay: float = 0.0) -> None:
        def run() -> None:
            time.sleep(delay)
            self.now(where)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        self.threads.append(worker)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_copy = asyncpg.Connection.copy_records_to_table
        real_payload_copy = asyncpg.Connection.copy_to_table
        real_execute = asyncpg.Connection.execute
        faults = self

        def halfway(records: Iterable[Any]) -> Iterator[Any]:
            for i, record in enumerate(records):
                if i == 20:
                    faults.now("during COPY")  # the first rows are already on the wire
                yield record

        async def after_first_chunk(chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for chunk in chunks:
                yield chunk
                break
            faults.now("during COPY")  # the first chunk is on the wire, the COPY not ended

        def mid_copy(kw: dict[str, Any]) -> bool:
            """Count a COPY into the app's tables; True when this one is to be cut halfway."""
            if kw.get("schema_name") != "public":
                return False
            faults.copies += 1
            if faults.copies == 7:
                faults.soon("during COPY (async)")
            return faults.copies in (3, 12)

        async def copy(self: Any, table_name: str, *, records: Any, **kw: Any) -> Any:
            if mid_copy(kw):
                records = halfway(list(records))
            return await real_copy(self, table_name, records=records, **kw)

        async def payload_copy(self: Any, table_name: str, *, source: Any, **kw: Any) -> Any:
            """The COPY of a payload a converter process built (run --workers 2)."""
            if mid_copy(kw):
                source = after_first_chunk(source)
            return await real_payload_copy(self, table_name, source=source, **kw)

        async def execute(self: Any, query: str, *args: Any, **kw: Any) -> Any:
            if query == ADVANCE_SQL:
                faults.advances += 1
                if faults.advances in (5, 15):
                    faults.now("before a checkpoint commit")
                elif faults.advances == 18:
                    faults.soon("during a checkpoint commit")
            elif query.startswith("ALTER TABLE") or query.startswith("CREATE INDEX"):
                faults.constraints += 1
                if faults.constraints == 2:
                    faults.now("during the key build")
                elif faults.constraints == 4:
                    faults.soon("during the key build (async)")
            return await real_execute(self, query, *args, **kw)

        monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", copy)
        monkeypatch.setattr(asyncpg.Connection, "copy_to_table", payload_copy)
        monkeypatch.setattr(asyncpg.Connection, "execute", execute)


class BetweenBatches:
    """A progress sink that restarts the server (blocking the run) after chosen batches."""

    def __init__(self, faults: Restarts, at: set[int]) -> None:
        self.faults, self.at, self.seen = faults, at, 0

    def start(self, table: str, total: int) -> None:
        pass

    def finish(self, table: str) -> None:
        pass

    def advance(self, table: str, rows: int, quarantined: int = 0) -> None:
        self.seen += 1
        if self.seen in self.at:
            self.faults.now("between batches")


@pytest.mark.parametrize("workers", [1, 2])
async def test_server_restarts_anywhere_in_a_run_are_survived_exactly(
    sample_db: Path,
    pg_dsn: str,
    restart_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
) -> None:
    """Restarts during COPY, between batches, around checkpoint commits and during the key
    build: the run completes by itself and the target equals the source, each row once; in
    one process (rows COPYed as records) and with 2 converter processes (COPY payloads)."""
    if restart_server is None:
        pytest.fail("this test needs the embedded server (it restarts it)")
    faults = Restarts(restart_server)
    faults.install(monkeypatch)
    settings = load_settings(
        None, sqlite_path=sample_db, postgres_dsn=pg_dsn, batch_size=150, workers=workers
    )
    with ignore_asyncpg_orphaned_waiters(), capture_logs() as logs:
        report = await migrate(settings, progress=BetweenBatches(faults, {2, 10, 21}))
        for worker in faults.threads:
            worker.join(timeout=60)
        gc.collect()  # orphaned waiters are reported when collected: while the filter is on
    monkeypatch.undo()
    assert report.status == "completed"
    assert {
        "during COPY",
        "during COPY (async)",
        "between batches",
        "before a checkpoint commit",
        "during a checkpoint commit",
        "during the key build",
        "during the key build (async)",
    } == set(faults.done)
    assert any(e["event"] == "batch_retried" for e in logs)
    for table in ("sessions", "messages"):
        assert source_rows(sample_db, table) == await target_rows(pg_dsn, table)
        assert len(source_rows(sample_db, table)) == report.tables[table].loaded
    total = await fetchval(pg_dsn, "SELECT sum(loaded) FROM flux_migrate.checkpoints")
    expected = len(source_rows(sample_db, "sessions")) + len(source_rows(sample_db, "messages"))
    assert expected == total
    keys = await fetchval(
        pg_dsn, "SELECT count(*) FROM pg_constraint WHERE conrelid = 'messages'::regclass"
    )
    assert keys >= 2  # primary and foreign key were built despite the restarts
