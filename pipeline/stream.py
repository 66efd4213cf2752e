"""One table's stream: extract -> transform in a producer task, load as the consumer, with a
bounded buffer between them; logs and progress of each committed batch."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import AsyncIterator

import aiosqlite
import anyio
import structlog
from anyio.abc import ObjectSendStream

from flux_migrate.core.errors import single_error
from flux_migrate.core.target import Target
from flux_migrate.pipeline.convert_pool import ConverterPool, pooled_batches, range_job, refill
from flux_migrate.pipeline.progress import Progress
from flux_migrate.pipeline.settings import Settings
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.extract import extract
from flux_migrate.stages.load import BatchResult, LoadContext, load
from flux_migrate.stages.transform import transform

log = structlog.get_logger("flux_migrate")

# Log at most this many quarantined rows per table and run; the rest are counted.
QUARANTINE_LOG_LIMIT = 50


class BatchLog:
    """The log and progress of one table's committed batches: each batch's counts (debug),
    the first QUARANTINE_LOG_LIMIT quarantined rows, retries."""

    def __init__(self, ctx: LoadContext, progress: Progress) -> None:
        self.table = ctx.table.name
        self.log = log.bind(run_id=ctx.run_id, table=self.table)
        self.progress = progress
        self.quarantined = 0

    def on_batch(self, result: BatchResult) -> None:
        """Log a committed batch, its first quarantined rows, and advance the progress."""
        batch = result.batch
        if result.already:
            self.log.info("batch_already_committed", seq=batch.seq, last_rowid=batch.last_rowid)
        for reject in result.quarantined:
            if self.quarantined < QUARANTINE_LOG_LIMIT:
                self.log.warning(
                    "row_quarantined",
                    key=reject.key,
                    rowid=reject.rowid,
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
            last_rowid=batch.last_rowid,
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


async def migrate_table(
    src: aiosqlite.Connection,
    target: Target,
    ctx: LoadContext,
    *,
    settings: Settings,
    after: int,
    upto: int,
    after_key: str | None = None,
    progress: Progress,
    missing_parents: set[str],
    pool: ConverterPool | None = None,
) -> None:
    """Stream one table from rowid ``after`` to ``upto`` (a WITHOUT ROWID table: from the
    position ``after`` at key ``after_key``); SQLite reading overlaps the COPY. With ``pool``
    the batches are read and converted in its worker processes, else in this process.

    Returns early, after a committed batch, when the stop flag is set. Raises
    CheckpointRewound when the server lost commits (the caller streams again from there).
    """
    if pool is None:
        chain = transform(
            extract(
                src,
                ctx.table,
                after_rowid=after,
                upto_rowid=upto,
                batch_size=settings.batch_size,
                after_key=after_key,
            ),
            ctx.table,
            naive_timezone=settings.naive_timezone,
            strip_nul=settings.strip_nul,
            missing_parents=missing_parents,
            text_as_bytes=True,
        )
    else:
        job = range_job(settings, ctx.table, missing_parents)
        chain = pooled_batches(
            pool, src, job, after=after, upto=upto, batch_size=settings.batch_size
        )
        ctx = dataclasses.replace(ctx, refill=functools.partial(refill, job))
    batches = BatchLog(ctx, progress)
    send, receive = anyio.create_memory_object_stream[Batch](settings.buffer_batches)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pump, chain, send)
            async with receive:
                await load(
                    receive, target, ctx, on_batch=batches.on_batch, on_retry=batches.on_retry
                )
                tg.cancel_scope.cancel()  # stopped early: the reader may still be waiting to send
    except BaseExceptionGroup as group:
        raise single_error(group) from None
    batches.close()


async def _pump(source: AsyncIterator[Batch], send: ObjectSendStream[Batch]) -> None:
    """Move batches from the extract/transform chain into the bounded buffer, then close it."""
    async with send, contextlib.aclosing(source):  # type: ignore[type-var]
        try:
            async for batch in source:
                await send.send(batch)
        except anyio.BrokenResourceError:
            return  # the consumer stopped (at a boundary, or failing: it reports why)
