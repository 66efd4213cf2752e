"""One table's stream, for any kind of source: its batches (a SQLite rowid range, a JSONL
file's byte range) come from a producer task through a bounded buffer to the consumer, which
commits each batch with its checkpoint; logs and progress of each committed batch."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import asyncpg
import structlog
from anyio.abc import ObjectSendStream

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.errors import single_error
from flux_migrate.core.target import Target
from flux_migrate.pipeline.progress import Progress
from flux_migrate.pipeline.report import TableReport
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.load import BatchResult, CheckpointRewound

log = structlog.get_logger("flux_migrate")

# Log at most this many quarantined rows per table and run; the rest are counted.
QUARANTINE_LOG_LIMIT = 50


class BatchLog:
    """The log and progress of one table's committed batches: each batch's counts (debug),
    the first QUARANTINE_LOG_LIMIT quarantined rows, retries. ``position`` names the source
    position in the events: ``rowid`` (SQLite) or ``offset`` (a JSONL file's bytes)."""

    def __init__(self, run_id: str, table: str, progress: Progress, *, position: str) -> None:
        self.table = table
        self.log = log.bind(run_id=run_id, table=table)
        self.progress = progress
        self.position = position
        self.quarantined = 0

    def on_batch(self, result: BatchResult) -> None:
        """Log a committed batch, its first quarantined rows, and advance the progress."""
        batch = result.batch
        last = {f"last_{self.position}": batch.last_rowid}
        if result.already:
            self.log.info("batch_already_committed", seq=batch.seq, **last)
        for reject in result.quarantined:
            if self.quarantined < QUARANTINE_LOG_LIMIT:
                at: dict[str, Any] = {self.position: reject.rowid}
                self.log.warning(
                    "row_quarantined",
                    key=reject.key,
                    **at,
                    reason=reject.reason,
                    stage=reject.stage,
                )
            self.quarantined += 1
        self.log.debug(
            "batch_loaded",
            seq=batch.seq,
            rows=batch.extracted,
            loaded=result.loaded,
            quarantined=result.quarantined_count,
            skipped=result.skipped,
            **last,
        )
        self.progress.advance(self.table, batch.extracted, result.quarantined_count)

    def on_retry(self, attempt: int, exc: BaseException, delay: float) -> None:
        self.log.warning(
            "batch_retried", attempt=attempt, error=type(exc).__name__, wait_s=round(delay, 2)
        )

    def close(self) -> None:
        if self.quarantined > QUARANTINE_LOG_LIMIT:
            self.log.warning(
                "rows_quarantined_not_logged", count=self.quarantined - QUARANTINE_LOG_LIMIT
            )


async def stream_table(
    source: AsyncIterator[Batch],
    commit: Callable[[asyncpg.Connection, Batch], Awaitable[BatchResult]],
    target: Target,
    batches: BatchLog,
    *,
    buffer_batches: int,
    stop: Callable[[], bool],
    on_commit: Callable[[BatchResult], None] | None = None,
    single_transaction: bool = False,
    after_commit: Callable[[Target, int], Awaitable[None]] | None = None,
) -> None:
    """Commit every batch of ``source`` with ``commit`` (one transaction holding the batch and
    its checkpoint), reading ahead at most ``buffer_batches`` batches in a producer task;
    ``on_commit`` (if given), then ``batches``, hear of each committed batch, and then
    ``after_commit`` (if given) with the target and the batch's number.

    Returns when the source is done, or early after a committed batch once ``stop()`` says so.
    Transient failures retry the batch (safe: the checkpoint says whether it committed).
    Raises CheckpointRewound when the server lost commits (the caller streams again from
    there). On cancellation the producer is cancelled, the source closed, and the open
    transaction abandoned (the server rolls it back); every batch reported is committed.
    """
    send, receive = anyio.create_memory_object_stream[Batch](buffer_batches)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pump, source, send)
            async with receive:
                await _commit_each(
                    receive,
                    commit,
                    target,
                    batches,
                    stop,
                    on_commit,
                    single_transaction,
                    after_commit,
                )
                tg.cancel_scope.cancel()  # stopped early: the reader may still be waiting to send
    except BaseExceptionGroup as group:
        raise single_error(group) from None
    batches.close()


async def _commit_each(
    source: AsyncIterator[Batch],
    commit: Callable[[asyncpg.Connection, Batch], Awaitable[BatchResult]],
    target: Target,
    batches: BatchLog,
    stop: Callable[[], bool],
    on_commit: Callable[[BatchResult], None] | None,
    single_transaction: bool,
    after_commit: Callable[[Target, int], Awaitable[None]] | None,
) -> None:
    """The consumer: commit each batch (retrying), report it, stop at a boundary when asked."""
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(contextlib.aclosing(source))  # type: ignore[type-var]
        if single_transaction:  # benchmark baseline: batches become savepoints, one commit
            await stack.enter_async_context((await target.conn()).transaction())
        async for batch in source:

            async def attempt(conn: asyncpg.Connection, batch: Batch = batch) -> BatchResult:
                return await commit(conn, batch)

            result = await target.retrying(
                attempt,
                what=f"loading {batches.table} batch {batch.seq}",
                on_retry=batches.on_retry,
            )
            if on_commit is not None:
                on_commit(result)
            batches.on_batch(result)
            if after_commit is not None:
                await after_commit(target, batch.seq)
            if stop():
                return  # stop at a batch boundary: everything reported is committed


async def _pump(source: AsyncIterator[Batch], send: ObjectSendStream[Batch]) -> None:
    """Move batches from the source into the bounded buffer, then close it."""
    async with send, contextlib.aclosing(source):  # type: ignore[type-var]
        try:
            async for batch in source:
                await send.send(batch)
        except anyio.BrokenResourceError:
            return  # the consumer stopped (at a boundary, or failing: it reports why)


async def until_streamed(
    stream: Callable[[], Awaitable[None]], rewind: Callable[[int], Awaitable[None]]
) -> None:
    """Run ``stream``; when the server lost commits (the checkpoint is behind a batch), let
    ``rewind`` move the source back to the checkpoint's position, and stream again."""
    while True:
        try:
            await stream()
            return
        except CheckpointRewound as rewound:
            await rewind(rewound.rowid)


@contextlib.contextmanager
def showing(
    progress: Progress, table: str, total: int, treport: TableReport, *, started: float
) -> Iterator[None]:
    """The table's line in the live display while it streams, and its seconds (since
    ``started``, a time.monotonic()) in the report, however the stream ends."""
    progress.start(table, total)
    try:
        yield
    finally:
        treport.seconds = time.monotonic() - started
        progress.finish(table)


def record_counts(treport: TableReport, start: ckpt.Checkpoint, end: ckpt.Checkpoint) -> None:
    """What the checkpoints say this run did: exact even when lost commits were redone."""
    treport.extracted = end.extracted - start.extracted
    treport.loaded = end.loaded - start.loaded
    treport.quarantined = end.quarantined - start.quarantined
    treport.skipped = end.skipped - start.skipped


async def read_checkpoint(target: Target, schema: str, table: str) -> ckpt.Checkpoint:
    """The table's checkpoint as committed now."""
    found = await target.retrying(
        lambda c: ckpt.read_checkpoints(c, schema), what="reading checkpoints"
    )
    return found[table]
