"""The one stream driver (pipeline/stream.py) that SQLite tables and JSONL files share: each
batch committed in order with its report, the source closed however the stream ends, a failure
raised as itself, a lost commit streamed again (real PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

from flux_migrate.core.errors import RuntimeFailure, SourceError
from flux_migrate.core.target import Target
from flux_migrate.pipeline.stream import BatchLog, stream_table, until_streamed
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.load import BatchResult, CheckpointRewound

pytestmark = pytest.mark.anyio


class Source:
    """``n`` batches of one row each; records how many were read and whether it was closed,
    and raises ``fail`` instead of the batch numbered ``fail_at``."""

    def __init__(self, n: int, *, fail_at: int = 0, fail: Exception | None = None) -> None:
        self.n, self.fail_at, self.fail = n, fail_at, fail
        self.read = 0
        self.closed = False

    async def batches(self) -> AsyncGenerator[Batch, None]:
        try:
            for seq in range(1, self.n + 1):
                if seq == self.fail_at and self.fail is not None:
                    raise self.fail
                self.read = seq
                yield Batch(table="t", seq=seq, after_rowid=seq - 1, last_rowid=seq, extracted=1)
        finally:
            self.closed = True


class Progress:
    def __init__(self) -> None:
        self.rows = 0

    def start(self, table: str, total: int) -> None:
        pass

    def advance(self, table: str, rows: int, quarantined: int = 0) -> None:
        self.rows += rows

    def finish(self, table: str) -> None:
        pass


class Commits:
    """A per-batch commit on the real server that records the batches it committed; it fails
    with ``fail`` at batch ``fail_at``, or waits forever there with ``hang``."""

    def __init__(
        self, *, fail_at: int = 0, fail: Exception | None = None, hang: bool = False
    ) -> None:
        self.fail_at, self.fail, self.hang = fail_at, fail, hang
        self.done: list[int] = []

    async def __call__(self, conn: asyncpg.Connection, batch: Batch) -> BatchResult:
        if batch.seq == self.fail_at:
            if self.hang:
                await anyio.sleep_forever()
            assert self.fail is not None
            raise self.fail
        assert batch.seq == await conn.fetchval("SELECT $1::int", batch.seq)
        self.done.append(batch.seq)
        return BatchResult(batch, batch.extracted, [])


async def _stream(
    dsn: str, source: AsyncIterator[Batch], commit: Commits, *, stop_after: int = 0
) -> Progress:
    progress = Progress()
    target = Target(dsn, retry_seconds=5)
    try:
        await stream_table(
            source,
            commit,
            target,
            BatchLog("run", "t", progress, position="offset"),
            buffer_batches=2,
            stop=lambda: stop_after > 0 and len(commit.done) >= stop_after,
        )
    finally:
        await target.close()
    return progress


async def test_every_batch_is_committed_in_order_reported_and_the_source_closed(
    pg_dsn: str,
) -> None:
    """Every batch of the source is committed once, in order, logged with the source's
    position name and counted in the progress; the source is closed at its end."""
    source, commits = Source(7), Commits()
    with capture_logs() as logs:
        progress = await _stream(pg_dsn, source.batches(), commits)
    assert [1, 2, 3, 4, 5, 6, 7] == commits.done
    loaded = [e for e in logs if e["event"] == "batch_loaded"]
    assert [(n, n) for n in range(1, 8)] == [(e["seq"], e["last_offset"]) for e in loaded]
    assert (7, True) == (progress.rows, source.closed)


async def test_stop_ends_at_a_batch_boundary_and_closes_the_source(pg_dsn: str) -> None:
    """Once stop() says so after a committed batch, the stream returns without committing
    another, the reader ahead of it is cancelled and the source closed."""
    source, commits = Source(50), Commits()
    await _stream(pg_dsn, source.batches(), commits, stop_after=2)
    assert [1, 2] == commits.done
    assert source.closed
    assert source.read <= 2 + 2 + 1  # at most the buffer and the batch being sent ahead


async def test_a_failing_commit_is_raised_as_itself_and_the_source_closed(pg_dsn: str) -> None:
    """A commit that fails for good is raised as that error (not a task group's exception
    group), after the batches before it were committed; the source is closed."""
    source = Source(10)
    commits = Commits(fail_at=3, fail=RuntimeFailure("the checkpoint moved"))
    with pytest.raises(RuntimeFailure, match="the checkpoint moved"):
        await _stream(pg_dsn, source.batches(), commits)
    assert ([1, 2], True) == (commits.done, source.closed)


async def test_a_failing_source_is_raised_as_itself(pg_dsn: str) -> None:
    """A source that fails (an unreadable file) is raised as that error; what was committed
    before is a run of the batches it read, in order (the rest are read again by a rerun)."""
    source = Source(10, fail_at=4, fail=SourceError("The JSONL file cannot be read."))
    commits = Commits()
    with pytest.raises(SourceError, match="cannot be read"):
        await _stream(pg_dsn, source.batches(), commits)
    assert commits.done == [1, 2, 3][: len(commits.done)]
    assert source.closed


async def test_cancelled_from_outside_the_stream_closes_its_source(pg_dsn: str) -> None:
    """Cancelled while a batch is committing, the stream ends with that batch not reported
    and the source closed."""
    source, commits = Source(10), Commits(fail_at=3, hang=True)
    with anyio.move_on_after(1) as scope:
        await _stream(pg_dsn, source.batches(), commits)
    assert scope.cancelled_caught
    assert ([1, 2], True) == (commits.done, source.closed)


async def test_a_rewound_checkpoint_streams_again_from_where_it_stands() -> None:
    """When the server lost commits, the source is moved back to the checkpoint's position
    and streamed again from there, until it goes through."""
    starts: list[int] = []
    position = 5

    async def stream() -> None:
        starts.append(position)
        if len(starts) < 3:
            raise CheckpointRewound(position - 2)

    async def rewind(to: int) -> None:
        nonlocal position
        position = to

    await until_streamed(stream, rewind)
    assert [5, 3, 1] == starts
