"""Converter processes: a table's batches extracted and transformed in worker processes, fed in
order to the run's one loader.

The coordinator cuts the table into the sequential reader's batches (batch k covers the rowids
after batch k-1's last one up to the ``batch_size``-th one after it, found by one query walking
the rowid b-tree), hands batch k to worker k mod N (at most IN_FLIGHT per worker ahead of the
loader, so memory stays flat) and yields them strictly in order. Each worker reads its batch on a
read-only connection of its own and runs the same extract and transform code as the in-process
path; it ships back the converted rows (for a plain COPY, as the batch's binary COPY payload,
stages/wire.py, which the loader sends as it is), rejects, digests and the rows' rowids and
keys, not the raw values (a batch PostgreSQL refuses is read again here, see ``refill``). The
checkpoint chain is the loader's, unchanged, so exactly-once and resume do not depend on the
workers.

Workers die with the coordinator (``die_with_parent``) and ignore the terminal's SIGINT. Each
has a pipe of its own (not a shared result queue, which a worker killed mid-reply leaves
half-written for everyone): a worker that dies (killed, out of memory) loses nothing, its
batches are converted in this process instead, and the run goes on.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import os
import sqlite3
from collections.abc import AsyncGenerator, Collection
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import aiosqlite
import anyio
import structlog

from flux_migrate.core.schema import Table, quote_ident
from flux_migrate.pipeline.convert_worker import (
    RangeJob,
    convert_range,
    keep_memory,
    read_range,
    receive,
    serve,
    unpack,
)
from flux_migrate.pipeline.orphans_ahead import OrphansAhead, range_orphans
from flux_migrate.pipeline.settings import Settings
from flux_migrate.pipeline.workers import SPAWN
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.extract import fetch_rows, read_failure
from flux_migrate.stages.extract_sql import source_uri

log = structlog.get_logger("flux_migrate")

IN_FLIGHT = 2  # batches handed to the pool ahead of the loader, per worker


@dataclass
class _Converter:
    """One converter process and the coordinator's end of its pipe."""

    process: Any
    conn: Connection
    lost: bool = False

    def receive(self) -> tuple[str, Any]:
        """The next reply (blocks; EOFError when the process died)."""
        return receive(self.conn)


@dataclass(frozen=True)
class Ticket:
    """A job handed out: the converter converting it (None: convert it here)."""

    job: RangeJob
    converter: _Converter | None


class ConverterPool:
    """The run's converter processes, each with a pipe of its own (a converter dying in the
    middle of a reply spoils only its own pipe): started when a table first needs them, the
    k-th batch of a table handed to converter k mod N, stopped by ``close``."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._converters: list[_Converter] = []

    def submit(self, k: int, job: RangeJob) -> Ticket:
        """Hand ``job`` (the table's k-th batch) to converter k mod N."""
        if not self._converters:
            keep_memory()  # this process too: it receives every payload and sends it on
            self._converters = [_start(os.getpid()) for _ in range(self.workers)]
        converter = self._converters[k % self.workers]
        if not converter.lost:
            try:
                converter.conn.send(job)
                return Ticket(job, converter)
            except OSError:
                self._lost(converter)
        return Ticket(job, None)

    async def result(self, ticket: Ticket) -> Batch | None:
        """The converted batch of ``ticket``: its converter's, else converted in a thread here
        (the converter died). Blocks until its converter replies (a batch's work at most)."""
        converter = ticket.converter
        if converter is not None and not converter.lost:
            try:
                kind, value = await anyio.to_thread.run_sync(converter.receive)
            except (EOFError, OSError):
                self._lost(converter)
            else:
                if kind == "ok":
                    return None if value is None else unpack(value)
                if isinstance(value, sqlite3.OperationalError):
                    raise read_failure(ticket.job.table, ticket.job.lo, value) from None
                raise value
        try:
            return await anyio.to_thread.run_sync(convert_range, ticket.job)
        except sqlite3.OperationalError as exc:
            raise read_failure(ticket.job.table, ticket.job.lo, exc) from None

    def _lost(self, converter: _Converter) -> None:
        converter.lost = True
        log.warning("converter_worker_lost", action="converting its batches in the coordinator")

    def close(self) -> None:
        """Stop the converters: each finishes the batch it converts (its reply is dropped) and
        exits when its pipe closes; one still there after 5 s is killed. Blocks that long."""
        converters, self._converters = self._converters, []
        for c in converters:
            c.conn.close()
        for c in converters:
            c.process.join(timeout=5)
            if c.process.is_alive():
                c.process.kill()
                c.process.join()


def _start(parent: int) -> _Converter:
    ours, theirs = SPAWN.Pipe(duplex=True)
    process = SPAWN.Process(target=serve, args=(theirs, parent), daemon=True)
    process.start()
    theirs.close()  # only the converter holds its end: its death is an EOF here
    return _Converter(process, ours)


async def batch_ranges(
    src: aiosqlite.Connection, table: Table, after: int, upto: int, batch_size: int
) -> AsyncGenerator[tuple[int, int], None]:
    """The sequential reader's batches of the rowids in (``after``, ``upto``]: each ends at
    the ``batch_size``-th rowid after the previous end, the last one at ``upto``."""
    rowid = table.rowid_sql()
    sql = (
        f"SELECT {rowid} FROM {quote_ident(table.name)} WHERE {rowid} > ? AND {rowid} <= ?"
        f" ORDER BY {rowid} LIMIT 1 OFFSET ?"
    )
    lo = after
    while lo < upto:
        try:
            found = await fetch_rows(src, sql, (lo, upto, batch_size - 1))
        except sqlite3.OperationalError as exc:
            raise read_failure(table, lo, exc) from None
        hi = int(found[0][0]) if found else upto
        yield lo, hi
        lo = hi


def range_job(
    settings: Settings, table: Table, missing_parents: Collection[str], *, payload: bool
) -> RangeJob:
    """The conversion of ``table``'s batches as the in-process path does it (no range yet);
    with ``payload`` a batch comes as its binary COPY payload where the table has one (for a
    plain COPY into the table: an upsert needs the rows' keys)."""
    return RangeJob(
        uri=source_uri(settings.require_source()),
        busy_timeout=settings.busy_timeout,
        table=table,
        lo=0,
        hi=0,
        orphans=None,
        naive_timezone=settings.naive_timezone,
        strip_nul=settings.strip_nul,
        missing_parents=frozenset(missing_parents),
        payload=payload,
    )


async def pooled_batches(
    pool: ConverterPool,
    src: aiosqlite.Connection,
    job: RangeJob,
    *,
    after: int,
    upto: int,
    batch_size: int,
    ahead: OrphansAhead | None = None,
) -> AsyncGenerator[Batch, None]:
    """The table's converted batches from rowid ``after`` to ``upto``, in order, converted by
    the pool's workers as ``job`` says: the batches extract + transform yield (except that a
    batch whose rows all vanished meanwhile is left out, each starting where the one before
    ended). On close or cancellation the batches not yet started are dropped. The orphan set
    is the one ``ahead`` found, where it found one."""
    try:
        orphans = await range_orphans(src, job.table, after, upto, ahead)
    except sqlite3.OperationalError as exc:
        raise read_failure(job.table, after, exc) from None
    job = dataclasses.replace(job, orphans=orphans)
    ranges = batch_ranges(src, job.table, after, upto, batch_size)
    batches = _in_order(pool, job, ranges)
    seq, last = 0, after
    async with contextlib.aclosing(ranges), contextlib.aclosing(batches):
        async for batch in batches:
            seq += 1
            yield dataclasses.replace(batch, seq=seq, after_rowid=last)
            last = batch.last_rowid


async def _in_order(
    pool: ConverterPool, job: RangeJob, ranges: AsyncGenerator[tuple[int, int], None]
) -> AsyncGenerator[Batch, None]:
    """The converted batches of ``ranges`` in order, at most IN_FLIGHT per worker handed out
    ahead; ranges holding no row now are left out."""
    queue: collections.deque[Ticket] = collections.deque()
    try:
        k = 0
        async for lo, hi in ranges:
            queue.append(pool.submit(k, _ranged(job, lo, hi)))
            k += 1
            if len(queue) < pool.workers * IN_FLIGHT:
                continue
            if (batch := await pool.result(queue.popleft())) is not None:
                yield batch
        while queue:
            if (batch := await pool.result(queue.popleft())) is not None:
                yield batch
    finally:
        if queue:  # replies still coming: converters with a clean pipe for the next table
            pool.close()


def _ranged(job: RangeJob, lo: int, hi: int) -> RangeJob:
    """``job`` for the rowids in (``lo``, ``hi``], with the orphan rowids among them."""
    orphans = job.orphans
    if orphans:
        orphans = orphans[bisect.bisect_right(orphans, lo) : bisect.bisect_right(orphans, hi)]
    return dataclasses.replace(job, lo=lo, hi=hi, orphans=orphans)


async def refill(job: RangeJob, batch: Batch) -> Batch:
    """``batch`` (converted by a worker, without its raw values) with the source rows of its
    loaded rows read again, orphans checked per row: what a strict re-conversion needs."""
    ranged = dataclasses.replace(job, lo=batch.after_rowid, hi=batch.last_rowid)
    rows = await anyio.to_thread.run_sync(lambda: read_range(ranged, per_row_check=True))
    wanted = set(batch.ids[0] if batch.ids is not None else ())
    return dataclasses.replace(batch, raw=[r for r in rows if r[0] in wanted], ids=None)
