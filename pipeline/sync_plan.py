"""Find what changed in the source since flux-migrate last wrote a table: a merge of the source
(in rowid order, each row digested) with the row digests kept in the bookkeeping schema.

The stored digests are the load's packs (one row per batch: arrays of rowids, keys, digests)
overlaid with ``digest_rows``, one entry per key sync wrote, moved or deleted since, which wins
over the key's pack entries (the overrides are few, and read once per table). The source and
the packs are read in windows of rowids, one short query each (nothing is held open between
windows). Within a window a source row and a digest with the same rowid and the
same digest are the same row, unchanged (the digest covers the key). Any other row is set aside
and matched by key once the whole table is read: a key on both sides with another digest is an
update, one with the same digest moved rowid (a VACUUM), a key only in the source is an insert,
a key only in the digests a delete. So correctness never depends on rowids staying put; they
only make the common case (nothing moved) one comparison per row.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
from array import array
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

import aiosqlite
import asyncpg

from flux_migrate.core import bookkeeping
from flux_migrate.core.digest import key_position
from flux_migrate.core.schema import Table, quote_ident
from flux_migrate.core.target import Target
from flux_migrate.pipeline.progress import NoProgress, Progress
from flux_migrate.pipeline.stop import StopFlag
from flux_migrate.pipeline.sync_scan import (
    WORKERS,
    ScanPool,
    ShippedKeys,
    received_keys,
    scan_range,
)
from flux_migrate.pipeline.workers import worker_lost
from flux_migrate.stages.extract import fetch_rows, variable_limit
from flux_migrate.stages.extract_sql import source_uri
from flux_migrate.stages.transform import key_of

CHUNK = 100_000  # source rowids per worker job (and per window of the merge)


Ranges = tuple[int, list[tuple[int, int]]]  # a table's row count and rowid ranges (_ranges)
Stored = tuple[int, str | None]  # a key's stored digest, and its pack's xmin (None: digest_rows)
Override = tuple[int, str, int]  # a live digest_rows entry: rowid, key, digest


@dataclass
class TablePlan:
    """What sync will do to one table: source rowids to insert or update, keys to delete, and
    digests whose rowid moved (bookkeeping only); and, per key involved, what was stored."""

    table: Table
    scanned: int = 0
    inserts: list[int] = field(default_factory=list)
    updates: list[int] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    moves: list[tuple[str, int, int]] = field(default_factory=list)  # key, new rowid, digest
    # key -> (stored digest, xmin of its pack as text, or None for a digest_rows entry);
    # None for a key nothing was stored for (an insert).
    known: dict[str, Stored | None] = field(default_factory=dict)
    last_rowid: int | None = None  # None: the table is empty (the checkpoint stays)
    last_key: str | None = None

    @property
    def changes(self) -> int:
        return len(self.inserts) + len(self.updates) + len(self.deletes)


async def _ranges(
    src: aiosqlite.Connection, table: Table, chunk: int
) -> tuple[int, list[tuple[int, int]]]:
    """The table's row count, and its rowids cut into consecutive ranges of about ``chunk``
    rows (by value, so as many ranges as ``chunk``-row pieces; none for an empty table)."""
    rows = await fetch_rows(
        src,
        f"SELECT count(*), min({table.rowid_sql()}), max({table.rowid_sql()})"
        f" FROM {quote_ident(table.name)}",
    )
    count, low, high = rows[0]
    if not count:
        return 0, []
    pieces = -(-int(count) // chunk)
    span = -(-(int(high) - int(low) + 1) // pieces)
    return int(count), [
        (lo, min(lo + span - 1, int(high))) for lo in range(int(low), int(high) + 1, span)
    ]


ScanArgs = tuple[str, str, int, int, float]  # scan_range's: uri, sql, columns, key at, timeout
Scanned = tuple[bytes, bytes, ShippedKeys]  # what scan_range returns
Started = dict[int, "asyncio.Future[Scanned]"]  # a table's ranges being read, by position


def scan_args(table: Table, path: Path, busy_timeout: float) -> ScanArgs:
    """What scan_range needs to read ``table``'s rows, every column, in rowid order."""
    at = key_position(table.column_names, table.primary_key)
    assert at is not None, table.name
    cols = ", ".join(quote_ident(c) for c in table.column_names)
    rowid = table.rowid_sql()
    sql = (
        f"SELECT {rowid}, {cols} FROM {quote_ident(table.name)}"
        f" WHERE {rowid} >= ? AND {rowid} <= ? ORDER BY {rowid}"
    )
    return source_uri(path), sql, len(table.column_names), at, busy_timeout


class RangesAhead:
    """The count and rowid ranges of a round's tables (_ranges), asked of the source from the
    round's start, one table after another: a table's count, a walk of its smallest b-tree
    (0.2 s for the 950k bench messages), runs while the tables before it are read, and the
    scan's worker processes start as soon as a table will need them (about 0.15 s), not when
    its turn comes. The first table that needs them has its first WORKERS ranges read by them
    at once (``started``): the processes would otherwise wait while the tables before it are
    read in this process (the app's 100k sessions: 0.4-0.6 s). Later tables are not read
    ahead: what is held waiting stays two ranges. ``close`` cancels what is still being asked
    or read ahead (a round that ends early)."""

    def __init__(
        self,
        src: aiosqlite.Connection,
        tables: Sequence[Table],
        scanners: ScanPool,
        *,
        path: Path,
        busy_timeout: float,
    ):
        loop = asyncio.get_running_loop()
        self._found: dict[str, asyncio.Future[Ranges]] = {}
        self._started: dict[str, Started] = {}  # until handed over
        self._read_ahead = False  # a table's ranges have been: none after it
        for table in tables:
            self._found[table.name] = found = loop.create_future()
            found.add_done_callback(_retrieved)  # a failure nobody awaited is no warning
        read = functools.partial(scan_args, path=path, busy_timeout=busy_timeout)
        self._asking = asyncio.ensure_future(self._ask(src, tables, scanners, read))

    async def _ask(
        self,
        src: aiosqlite.Connection,
        tables: Sequence[Table],
        scanners: ScanPool,
        read: Callable[[Table], ScanArgs],
    ) -> None:
        for table in tables:  # in turn: queued together, a count's fetch would wait on the next
            found = self._found[table.name]
            try:
                count, ranges = await _ranges(src, table, CHUNK)
                if len(ranges) > 1:
                    pool = scanners.executor(len(ranges))  # the processes start now
                    if not self._read_ahead:
                        self._read_ahead = True
                        self._started[table.name] = _read_first(pool, ranges, read(table))
            except Exception as exc:  # noqa: BLE001 - raised where the table's plan asks
                found.set_exception(exc)
                continue
            found.set_result((count, ranges))

    async def of(self, table: Table) -> Ranges:
        return await asyncio.shield(self._found[table.name])

    def started(self, table: Table) -> Started:
        """The table's ranges read ahead, handed over (once) to the caller, who awaits them."""
        return self._started.pop(table.name, {})

    def close(self) -> None:
        self._asking.cancel()
        for found in self._found.values():
            found.cancel()
        for jobs in self._started.values():
            _drop(jobs)
        self._started.clear()


def _read(pool: Executor, args: ScanArgs, span: tuple[int, int]) -> asyncio.Future[Scanned]:
    """One range (``span``: its lowest and highest rowid) handed to ``pool`` to read."""
    uri, sql, ncols, at, timeout = args
    lo, hi = span
    loop = asyncio.get_running_loop()
    return loop.run_in_executor(pool, scan_range, uri, sql, lo, hi, ncols, at, timeout)


def _read_first(pool: Executor, ranges: Sequence[tuple[int, int]], args: ScanArgs) -> Started:
    """The first WORKERS of ``ranges`` handed to ``pool`` to read now."""
    jobs: Started = {}
    try:
        for k, span in enumerate(ranges[:WORKERS]):
            jobs[k] = _read(pool, args, span)
    except BrokenProcessPool:  # the table's own scan hands them again, and says so
        _drop(jobs)
        return {}
    return jobs


def _drop(jobs: Started) -> None:
    """Jobs whose result is not needed: cancelled, or retrieved (never reported)."""
    for job in jobs.values():
        if not job.cancel() and not job.cancelled():
            job.exception()


def _retrieved(found: asyncio.Future[Ranges]) -> None:
    if not found.cancelled():
        found.exception()


async def plan_table(
    src: aiosqlite.Connection,
    target: Target,
    schema: str,
    table: Table,
    *,
    path: Path,
    busy_timeout: float = 10.0,
    progress: Progress | None = None,
    stop: StopFlag | None = None,
    scanners: ScanPool,
    ahead: RangesAhead,
) -> TablePlan:
    """Merge the table's source rows with its stored digests; return what changed.

    The source is read and digested in worker processes (one rowid range each, on a read-only
    connection of its own: with the app stopped, one consistent state; with a live app, each
    range as it was when read, and what changed meanwhile is left to the next sync), while this
    process reads the stored digests of the same range and merges. Blocks until the whole table
    is read; writes nothing. ``stop`` is checked after each range (Interrupted: the workers
    are told to stop, the ranges being read finish). Cancellation leaves nothing behind (it
    only reads). The worker processes are ``scanners``' (the round's: its caller closes them);
    the table's ranges are ``ahead``'s (asked at the round's start).
    """
    plan = TablePlan(table)
    src_odd: dict[str, tuple[int, int]] = {}  # key -> (rowid, digest), not matched by rowid
    stored_odd: dict[str, tuple[int, int, str | None]] = {}  # key -> (rowid, digest, pair)
    stored = _StoredDigests(target, schema, table.name)
    await stored.read_overrides()
    count, ranges = await ahead.of(table)
    progress = progress or NoProgress()
    progress.start(table.name, count)
    after = -(2**63)  # the first window takes every digest below it too
    args = scan_args(table, path, busy_timeout)
    scan = _scanned(ranges, args, scanners, ahead.started(table))
    async with contextlib.aclosing(scan):
        async for n, (rowids, values, keys) in scan:
            last, hi = n == len(ranges) - 1, ranges[n][1]
            window = await stored.window(after, None if last else hi)
            _merge_window(rowids, values, keys, window, plan, src_odd, stored_odd)
            plan.scanned += len(rowids)
            progress.advance(table.name, len(rowids))
            if len(rowids):
                plan.last_rowid, plan.last_key = rowids[-1], keys[-1]
            after = hi
            if stop is not None:
                stop.check()
    progress.finish(table.name)
    if not ranges:  # an empty source table: every stored digest is a delete
        window = await stored.window(-(2**63), None)
        _merge_window(array("q"), array("q"), [], window, plan, src_odd, stored_odd)
    _resolve_by_key(plan, src_odd, stored_odd)
    if plan.deletes:  # a stale second entry of a key the source still holds is no delete
        present = await source_rowids(src, table, table.primary_key[0], plan.deletes)
        plan.deletes = [k for k in plan.deletes if k not in present]
    return plan


async def _scanned(
    ranges: Sequence[tuple[int, int]], args: ScanArgs, scanners: ScanPool, started: Started
) -> AsyncGenerator[tuple[int, tuple[array[int], array[int], list[str]]], None]:
    """Each range read and digested by scan_range (``args``), in order, at most WORKERS ranges
    read ahead so memory stays bounded (``started``: those RangesAhead already handed to the
    processes); in worker processes, or in a thread for a table of one range (starting
    processes costs more). A worker that dies (killed, out of memory) ends the sync with one
    sentence."""
    pool = scanners.executor(len(ranges))
    jobs: Started = dict(started)

    def submit(k: int) -> None:
        if k < len(ranges) and k not in jobs:
            jobs[k] = _read(pool, args, ranges[k])

    try:
        try:
            for k in range(WORKERS):
                submit(k)
            for n in range(len(ranges)):
                rowids_b, values_b, keys = await jobs.pop(n)
                submit(n + WORKERS)
                rowids, values = array("q"), array("q")
                rowids.frombytes(rowids_b)
                values.frombytes(values_b)
                yield n, (rowids, values, received_keys(keys))
        except BrokenProcessPool:  # awaiting a range, or handing one to a pool broken already
            raise worker_lost("sync") from None
    finally:
        _drop(jobs)  # read ahead, not needed now
        if not scanners.shared(pool):
            pool.shutdown(wait=True, cancel_futures=True)


async def source_rowids(
    src: aiosqlite.Connection, table: Table, column: str, keys: Sequence[str]
) -> dict[str, int]:
    """The source rowid of each of ``keys`` (values of ``column``, as the bookkeeping spells
    them) that ``table`` holds now."""
    return {
        k: rowid for k, (rowid, _key) in (await source_rows_of(src, table, column, keys)).items()
    }


async def source_rows_of(
    src: aiosqlite.Connection, table: Table, column: str, keys: Sequence[str]
) -> dict[str, tuple[int, str]]:
    """The source rowid and primary key (as the bookkeeping spells it) of the row holding each
    of ``keys`` (values of ``column``, as the bookkeeping spells them) that ``table`` holds
    now. A key is looked up as every value SQLite may store for it (text, and the integer or
    real it spells: a column without a declared type keeps 6 and '6' apart), so a key's
    identity is its text whatever the storage class."""
    size = max(1, await variable_limit(src) // 3)
    found: dict[str, tuple[int, str]] = {}
    ref, pk = quote_ident(column), quote_ident(table.primary_key[0])
    for start in range(0, len(keys), size):
        part = [v for k in keys[start : start + size] for v in stored_forms(k)]
        marks = ", ".join("?" for _ in part)
        rows = await fetch_rows(
            src,
            f"SELECT {ref}, {table.rowid_sql()}, {pk} FROM {quote_ident(table.name)}"
            f" WHERE {ref} IN ({marks})",
            part,
        )
        found.update((key_of(r[0]) or "", (r[1], key_of(r[2]) or "")) for r in rows)
    return found


async def source_rows_by(
    src: aiosqlite.Connection,
    table: Table,
    columns: Sequence[str],
    values: Sequence[tuple[str, ...]],
) -> dict[tuple[str, ...], tuple[int, str]]:
    """As source_rows_of, for the values of several columns together (each compared as its
    text: a rare lookup, of parents missing from the target, that no index serves)."""
    width = len(columns)
    size = max(1, min(200, await variable_limit(src) // width))  # SQLite's expression depth
    match = " AND ".join(f"CAST({quote_ident(c)} AS TEXT) = ?" for c in columns)
    cols = ", ".join(quote_ident(c) for c in columns)
    pk = quote_ident(table.primary_key[0])
    found: dict[tuple[str, ...], tuple[int, str]] = {}
    for start in range(0, len(values), size):
        part = values[start : start + size]
        rows = await fetch_rows(
            src,
            f"SELECT {cols}, {table.rowid_sql()}, {pk} FROM {quote_ident(table.name)}"
            f" WHERE {' OR '.join(f'({match})' for _ in part)}",
            [text for value in part for text in value],
        )
        for r in rows:
            key = tuple(key_of(v) or "" for v in r[:width])
            found[key] = (r[width], key_of(r[width + 1]) or "")
    return found


def stored_forms(key: str) -> list[str | int | float]:
    """The values SQLite may hold for a bookkeeping key: its text, and the integer or real
    number whose text it is (as key_of spells them)."""
    forms: list[str | int | float] = [key]
    try:
        number: int | float = int(key)
    except ValueError:
        try:
            number = float(key)
        except ValueError:
            return forms
    if str(number) == key:
        forms.append(number)
    return forms


_GALLOP, _GALLOP_MAX = 16, 4096  # rows compared at once by the merge's fast path
_FEW = 64  # overrides in a pack or window handled one by one; more in one pass


@dataclass
class Window:
    """The stored digests of one window of rowids, position by position, in rowid order."""

    rowids: array[int] = field(default_factory=lambda: array("q"))
    digests: array[int] = field(default_factory=lambda: array("q"))
    keys: list[str] = field(default_factory=list)
    pairs: list[str | None] = field(default_factory=list)  # the entry's pack xmin, or None

    def add(
        self, rowids: Sequence[int], digests: Sequence[int], keys: list[str], pair: str | None
    ) -> None:
        self.rowids.extend(rowids)
        self.digests.extend(digests)
        self.keys += keys
        self.pairs += [pair] * len(keys)

    def insert(self, at: int, rowid: int, digest: int, key: str, pair: str | None) -> None:
        self.rowids.insert(at, rowid)
        self.digests.insert(at, digest)
        self.keys.insert(at, key)
        self.pairs.insert(at, pair)

    def drop(self, at: int) -> None:
        del self.rowids[at], self.digests[at], self.keys[at], self.pairs[at]

    def keep(self, positions: Sequence[int]) -> Window:
        return Window(
            array("q", [self.rowids[i] for i in positions]),
            array("q", [self.digests[i] for i in positions]),
            [self.keys[i] for i in positions],
            [self.pairs[i] for i in positions],
        )


class _StoredDigests:
    """A table's stored digests, read a window of rowids at a time: pack entries whose key
    has no override, plus the live overrides."""

    def __init__(self, target: Target, schema: str, table: str) -> None:
        self.target, self.schema, self.table = target, schema, table
        self.overridden: set[str] = set()
        self.live: list[Override] = []  # the overrides that still answer for a row, by rowid

    async def read_overrides(self) -> None:
        async def fetch(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return await bookkeeping.digest_overrides(conn, self.schema, self.table)

        rows = await self.target.retrying(fetch, what=f"reading the digests of {self.table}")
        self.overridden = {r["key"] for r in rows}
        self.live = sorted(
            (r["source_rowid"], r["key"], r["digest"]) for r in rows if r["digest"] is not None
        )

    async def window(self, after: int, upto: int | None) -> Window:
        """The stored digests with ``after < rowid <= upto`` (no upper bound when None), in
        rowid order; of a key stored twice (a row loaded again), only the newest entry."""

        async def fetch(conn: asyncpg.Connection) -> list[bookkeeping.Pack]:
            return await bookkeeping.packs_between(conn, self.schema, self.table, after, upto)

        packs = await self.target.retrying(fetch, what=f"reading the digests of {self.table}")
        high = 2**63 - 1 if upto is None else upto
        return assemble_window(packs, after, high, self.overridden, self.live)


def assemble_window(
    packs: Sequence[bookkeeping.Pack],
    after: int,
    high: int,
    overridden: set[str],
    live: list[Override],
) -> Window:
    """The stored digests with ``after < rowid <= high`` in rowid order: the entries of
    ``packs`` (oldest first, each in rowid order) whose key has no override, then the live
    overrides (``live``, by rowid) among them; when packs overlap (rows loaded again), only
    the newest entry of a key."""
    window, ordered = Window(), True
    for pack in packs:
        part = Window()
        part.add(pack.rowids, pack.digests, pack.keys, pack.pair)
        if not (after < pack.first_rowid and pack.last_rowid <= high):
            part = part.keep([i for i, r in enumerate(part.rowids) if after < r <= high])
        hit = overridden.intersection(part.keys) if overridden else set()
        if len(hit) > _FEW:  # one pass, rather than a search and a shift per key
            part = part.keep([i for i, k in enumerate(part.keys) if k not in hit])
        else:
            for key in hit:
                part.drop(part.keys.index(key))
        if part.rowids and window.rowids and part.rowids[0] <= window.rowids[-1]:
            ordered = False  # packs overlap: rows loaded again (requeued, --on-conflict)
        window.add(part.rowids, part.digests, part.keys, pack.pair)
    if not ordered:
        newest = dict(zip(window.keys, range(len(window.keys)), strict=True))
        kept = sorted(newest.values())  # then by rowid, ties in the order read
        window = window.keep(sorted(kept, key=window.rowids.__getitem__))
    lo = bisect.bisect_right(live, after, key=itemgetter(0))
    hi = bisect.bisect_right(live, high, key=itemgetter(0))
    inside = live[lo:hi]
    if len(inside) > _FEW:  # append them all, then one stable sort of two sorted runs
        for rowid, key, digest in inside:
            window.add((rowid,), (digest,), [key], None)
        return window.keep(sorted(range(len(window.keys)), key=window.rowids.__getitem__))
    for rowid, key, digest in inside:
        window.insert(bisect.bisect_right(window.rowids, rowid), rowid, digest, key, None)
    return window


def _merge_window(
    rowids: array[int],
    values: array[int],
    keys: Sequence[str],
    stored: Window,
    plan: TablePlan,
    src_odd: dict[str, tuple[int, int]],
    stored_odd: dict[str, tuple[int, int, str | None]],
) -> None:
    """Compare one window, both sides in rowid order: a source row and a stored digest with
    the same rowid and digest are the same row, unchanged (the digest covers the key); the
    same rowid and key with another digest is an update; everything else is set aside to be
    matched by key. Runs of equal rows are skipped by comparing whole slices of the arrays
    (galloping), so an unchanged window costs a few comparisons, not a step per row."""
    rs, ds, ks, ps = stored.rowids, stored.digests, stored.keys, stored.pairs
    i = j = 0
    n, m = len(rowids), len(rs)
    step = _GALLOP
    while i < n and j < m:
        if step > 1:
            if (
                rowids[i : i + step] == rs[j : j + step]
                and values[i : i + step] == ds[j : j + step]
            ):
                i, j, step = i + step, j + step, min(2 * step, _GALLOP_MAX)
            else:
                step //= 2
            continue
        step = _GALLOP
        if rowids[i] < rs[j]:
            src_odd[keys[i]] = (rowids[i], values[i])
            i += 1
        elif rowids[i] > rs[j]:
            stored_odd[ks[j]] = (rs[j], ds[j], ps[j])
            j += 1
        else:
            if values[i] != ds[j]:
                if keys[i] == ks[j]:
                    plan.updates.append(rowids[i])
                    plan.known[ks[j]] = (ds[j], ps[j])
                else:
                    src_odd[keys[i]] = (rowids[i], values[i])
                    stored_odd[ks[j]] = (rs[j], ds[j], ps[j])
            i += 1
            j += 1
    for a in range(i, n):
        src_odd[keys[a]] = (rowids[a], values[a])
    for b in range(j, m):
        stored_odd[ks[b]] = (rs[b], ds[b], ps[b])


def _resolve_by_key(
    plan: TablePlan,
    src_odd: dict[str, tuple[int, int]],
    stored_odd: dict[str, tuple[int, int, str | None]],
) -> None:
    """Match the rows set aside by key: moved, updated, inserted or deleted."""
    known = plan.known
    for key, (rowid, digest) in sorted(src_odd.items(), key=lambda item: item[1][0]):
        old = stored_odd.pop(key, None)
        if old is None:
            plan.inserts.append(rowid)
            known[key] = None
        else:
            known[key] = (old[1], old[2])
            if old[1] == digest:
                plan.moves.append((key, rowid, digest))
            else:
                plan.updates.append(rowid)
    for key, (_rowid, digest, pair) in sorted(stored_odd.items(), key=lambda item: item[1][0]):
        plan.deletes.append(key)
        known.setdefault(key, (digest, pair))  # a stale second entry of a key matched above
    plan.inserts.sort()
    plan.updates.sort()
