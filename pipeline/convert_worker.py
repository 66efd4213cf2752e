"""A converter process of the run (see convert_pool): reads one rowid range of a table on a
read-only connection of its own, converts it with the in-process path's extract and transform
code and sends the batch back. It imports no event loop, driver or logger (about 20 MB less
resident memory per process than the coordinator's modules)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import sqlite3
from array import array
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from multiprocessing.connection import Connection
from typing import Any, cast

from flux_migrate.core.instant import instant_micros
from flux_migrate.core.schema import Kind, Table
from flux_migrate.pipeline.workers import worker_started
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.extract_sql import keyset_sql, mark_orphans, page_batch, select_sql
from flux_migrate.stages.transform import digest_ids, transform_columns
from flux_migrate.stages.wire import joined, payload_encoder


@dataclass(frozen=True)
class RangeJob:
    """One batch to convert: the rows of ``table`` with ``lo < rowid <= hi``, and how."""

    uri: str
    busy_timeout: float
    table: Table
    lo: int
    hi: int
    orphans: array[int] | None  # the orphan rowids in the range; None: the per-row check
    naive_timezone: tzinfo
    strip_nul: bool
    missing_parents: Collection[str]
    payload: bool = False  # ship a batch as its binary COPY payload where the table has one


def read_range(job: RangeJob, *, per_row_check: bool = False) -> list[tuple[Any, ...]]:
    """The source rows of the job's range in rowid order, as extract reads them (orphans
    flagged), on a read-only connection opened for the call."""
    per_row = per_row_check or job.orphans is None
    with _range_cursor(job, per_row) as cursor:
        rows: list[tuple[Any, ...]] = cursor.fetchall()
    return rows if per_row else mark_orphans(rows, job.orphans or ())


@contextlib.contextmanager
def _range_cursor(job: RangeJob, per_row: bool) -> Iterator[sqlite3.Cursor]:
    """The cursor over the job's range as extract reads it (rowid order, text as bytes; with
    ``per_row`` SQL flags each orphan, else the caller does: mark_orphans), on a connection
    of its own, closed when the block ends."""
    sql = select_sql(job.table, orphan_flag=per_row) + keyset_sql(job.table)
    db = sqlite3.connect(job.uri, uri=True, timeout=job.busy_timeout)
    try:
        db.text_factory = bytes
        every = min(job.hi - job.lo, 2**62)  # the most rowids the range can hold: no limit
        yield db.execute(sql, (job.lo, job.hi, every))
    finally:
        db.close()


def convert_range(job: RangeJob) -> Batch | None:
    """After a worker died, in a thread of the coordinator: the job's batch as a converter
    process sends it (convert_packed), unpacked."""
    packed = convert_packed(job)
    return None if packed is None else unpack(packed)


# A converted batch as a converter sends it: the batch without its rows, and its rows column
# by column (a third of the pickling of as many tuples; instants as their microseconds), or
# none when the batch carries them as its binary COPY payload (stages/wire.py).
Packed = tuple[Batch, list[Sequence[Any]]]


def convert_packed(job: RangeJob) -> Packed | None:
    """The job's batch read, converted and stripped of its raw values, packed (None when the
    range holds no row now)."""
    encode = payload_encoder(job.table) if job.payload else None
    if encode is not None:
        streamed = _streamed(job, encode)
        if streamed is not _AS_A_WHOLE:
            return cast("Packed | None", streamed)
    return _converted_whole(job)


# Rows read and converted at a time into a batch's payload: a piece is converted while the row
# objects fetchmany just made are still in the core's cache (256 message rows, about 300 KB);
# a whole batch of 10,000 (about 12 MB) is not. Reading, converting and encoding a message
# row: 6.9 µs against 9.2 for the batch at once (docs/benchmark.md, "ninth session").
PIECE = 256
_AS_A_WHOLE = object()  # a piece holds a row the column path does not convert: the old way


def _streamed(job: RangeJob, encode: Callable[[Sequence[Sequence[Any]]], bytes | None]) -> Any:
    """The job's batch with its payload built piece by piece (PIECE rows: what the whole
    batch's conversion gives, byte for byte), None when the range holds no row, or
    _AS_A_WHOLE when a piece needs the row path (a reject, a value the payload cannot hold)."""
    table = job.table
    per_row = job.orphans is None
    payloads: list[bytes] = []
    rowids: list[int] = []
    keys: list[str] = []
    digested: list[int] = []
    last: Batch | None = None
    with _range_cursor(job, per_row) as cursor:
        while rows := cursor.fetchmany(PIECE):
            if not per_row:
                mark_orphans(rows, job.orphans or ())
            batch, plain = _converted(job, job.lo if last is None else last.last_rowid, rows)
            payload = None if plain is None else encode(plain)
            if plain is None or payload is None or batch.rejects:
                return _AS_A_WHOLE
            piece_rowids, piece_keys = digest_ids(table, rows, None if job.strip_nul else plain)
            payloads.append(payload)
            rowids += piece_rowids
            keys += piece_keys
            digested += batch.digests or []
            last = batch
    if last is None:
        return None
    count = len(rowids)
    whole = dataclasses.replace(
        last,
        after_rowid=job.lo,
        extracted=count,
        raw=[],
        rows=[],
        digests=digested,
        ids=(rowids, keys),
        payload=joined(payloads),
        payload_rows=count,
    )
    return whole, []


def _converted(
    job: RangeJob, after: int, rows: list[tuple[Any, ...]]
) -> tuple[Batch, list[Sequence[Any]] | None]:
    """``rows`` (read after rowid ``after``) converted as the job asks, column by column
    (transform_columns: None for the columns when a row takes the row path)."""
    return transform_columns(
        page_batch(job.table, 0, after, rows),
        job.table,
        naive_timezone=job.naive_timezone,
        strip_nul=job.strip_nul,
        missing_parents=job.missing_parents,
        text_as_bytes=True,
    )


def _converted_whole(job: RangeJob) -> Packed | None:
    """convert_packed with the whole batch read, then converted at once."""
    rows = read_range(job)
    if not rows:
        return None
    batch, plain = _converted(job, job.lo, rows)
    del rows  # the raw values go as soon as their digest keys are taken: less memory at peak
    count = len(batch.rows) if plain is None else len(batch.raw)
    columns: list[Sequence[Any]] = list(zip(*batch.rows, strict=True)) if plain is None else plain
    converted = None if job.strip_nul else plain  # its keys are the pack's (digest_ids)
    ids = digest_ids(job.table, batch.raw, converted)
    stripped = dataclasses.replace(batch, rows=[], raw=[], ids=ids)
    encode = payload_encoder(job.table) if job.payload and count else None
    payload = None if encode is None else encode(columns)
    if payload is not None:
        return dataclasses.replace(stripped, payload=payload, payload_rows=count), []
    _instants_as_micros(job.table, columns)
    return stripped, columns


def unpack(packed: Packed) -> Batch:
    """The batch a converter packed, with its rows as tuples again."""
    batch, columns = packed
    if batch.payload is not None:
        return batch
    return dataclasses.replace(batch, rows=list(zip(*columns, strict=True)))


def _instants_as_micros(table: Table, columns: list[Sequence[Any]]) -> None:
    """Replace, in ``columns``, the instants of timestamp columns outside the key by their
    instant_micros (what the load's timestamptz encoder sends either way), cheaper to ship
    than datetimes."""
    instants = (Kind.TIMESTAMP, Kind.INSTANT)
    for i, c in enumerate(table.columns[: len(columns)]):
        if i and c.kind in instants and c.name not in table.primary_key:
            columns[i] = [None if v is None else instant_micros(v) for v in columns[i]]


def serve(conn: Connection, parent: int) -> None:
    """A converter process: convert each job received on ``conn`` and send back ("ok", batch)
    or ("error", exception), until ``conn`` closes. It dies with ``parent`` and ignores the
    terminal's SIGINT (the run stops at a batch boundary)."""
    worker_started(parent)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    keep_memory()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[str, Any] = ("ok", convert_packed(job))
        except Exception as exc:  # noqa: BLE001 - sent to the coordinator, which raises it
            reply = ("error", exc if isinstance(exc, sqlite3.Error) else RuntimeError(repr(exc)))
        try:
            send(conn, reply)
        except OSError:
            return
        del job, reply


def send(conn: Connection, reply: tuple[str, Any]) -> None:
    """Send ``reply``; a batch's payload goes after it as its bare bytes, its size in the
    message before them, not pickled and not framed by the pipe: the coordinator reads it
    straight into one buffer (see ``receive``)."""
    kind, value = reply
    payload = value[0].payload if kind == "ok" and value is not None else None
    if payload is None:
        conn.send(reply)
        return
    conn.send(("payload", (dataclasses.replace(value[0], payload=b""), value[1], len(payload))))
    view, fd = memoryview(payload), conn.fileno()
    while view:
        view = view[os.write(fd, view) :]


def receive(conn: Connection) -> tuple[str, Any]:
    """The reply ``send`` sent, its payload back in its batch (blocks; EOFError when the
    process died, even in the middle of a payload).

    The payload is read into a buffer of its size as the socket hands it over. The pipe's own
    framing (``recv_bytes``) gathers each read in a BytesIO and copies it out again; for the
    850 MB a 1M-message run moves that cost this process 0.73-0.88 CPU-s, this 0.16-0.20."""
    kind, value = conn.recv()
    if kind != "payload":
        return kind, value
    batch, columns, size = value
    payload = bytearray(size)
    view, fd, at = memoryview(payload), conn.fileno(), 0
    while at < size:
        got = os.readv(fd, [view[at:]])
        if not got:
            raise EOFError("the converter ended in the middle of a payload")
        at += got
    return "ok", (dataclasses.replace(batch, payload=payload), columns)


# glibc's mallopt parameters: the heap is never trimmed, and blocks up to 32 MB (a batch's
# payload, its source text) come from the heap instead of a mapping of their own.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_memory() -> None:
    """Keep the memory a batch freed for the next batch (glibc; nothing elsewhere). A page
    given back to the system and touched again costs a page fault, and on a virtual machine
    a fault the host serves: with glibc's defaults a converter faulted in 1.7 GB for 480k
    messages (436k faults, sys 1.5 s), with this 0.3 GB (80k faults), 0.72x the CPU. Its
    resident memory stays at the largest batch's instead of falling between batches. The
    run's own process calls it too when it starts converters: on a 1M run it then faulted
    in 0.11 GB instead of 0.63 GB (29k faults against 163k), 0.4 s less system time."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    except (OSError, AttributeError):
        pass
