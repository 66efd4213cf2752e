"""verify's own parallel scan of the source: a table's row id range cut into ranges, each read
by a worker process with its own read-only stdlib sqlite3 connection (no aiosqlite, nothing of
the load's extract, paging or converters), small ``fetchmany`` pages in row id order.

Workers are started with the 'spawn' context and import only this module and what it imports.
With one worker (or a small table, unless the caller asked for a number) the ranges are read in
this process. The source is never written: every connection is opened with ``mode=ro``.
"""

from __future__ import annotations

import operator
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from itertools import repeat
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from flux_migrate.core.schema import Table, quote_ident
from flux_migrate.pipeline import reference as ref
from flux_migrate.pipeline import verify_canon as canon
from flux_migrate.pipeline import verify_hash
from flux_migrate.pipeline.workers import worker_lost, worker_pool

# Rows per fetchmany: a page is checked, joined and hashed while its rows are still in the
# core's cache; 2.2 µs a message row against 3.0 for pages of 20,000 (docs/benchmark.md,
# "ninth session").
PAGE = 256
SMALL = 50_000  # row ids: below this span a table is read in this process (unless told)
RANGES_PER_WORKER = 4  # ranges per worker, so that an uneven range does not leave one idle

J = TypeVar("J")
R = TypeVar("R")


def open_reader(path: str, busy_timeout: float = 10.0) -> sqlite3.Connection:
    """The source read-only (text as bytes, as SQLite stores it in UTF-8)."""
    uri = "file:" + quote(Path(path).resolve().as_posix()) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout, check_same_thread=False)
    conn.text_factory = bytes
    return conn


def rowid_ranges(
    path: str, table: Table, parts: int, busy_timeout: float = 10.0
) -> list[tuple[int, int]]:
    """``parts`` contiguous row id ranges covering every row of ``table`` (none when empty or
    a WITHOUT ROWID table)."""
    if table.without_rowid:
        return []
    conn = open_reader(path, busy_timeout)
    try:
        rowid = table.rowid_sql()
        name = quote_ident(table.name)
        lo, hi = conn.execute(  # one aggregate per SELECT reads the b-tree's edge, not the table
            f"SELECT (SELECT min({rowid}) FROM {name}), (SELECT max({rowid}) FROM {name})"
        ).fetchone()
    finally:
        conn.close()
    if lo is None:
        return []
    step = max(1, -(-(hi - lo + 1) // max(1, parts)))
    return [(a, min(a + step - 1, hi)) for a in range(lo, hi + 1, step)]


def _cpus() -> int:
    """The CPUs this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Scanner:
    """Runs range jobs in worker processes (``workers`` > 1) or in this process."""

    def __init__(self, workers: int | None = None) -> None:
        self.explicit = workers is not None
        self.workers = max(1, workers if workers is not None else _cpus())
        self._pool: Executor | None = None
        self._lock = threading.Lock()  # tables are scanned from several threads at once

    def parallel(self, span: int) -> bool:
        return self.workers > 1 and (self.explicit or span >= SMALL)

    def ranges(self, path: str, table: Table, busy_timeout: float) -> list[tuple[int, int]]:
        """The table's ranges: one when it is read in this process."""
        whole = rowid_ranges(path, table, 1, busy_timeout)
        if not whole or not self.parallel(whole[0][1] - whole[0][0] + 1):
            return whole
        return rowid_ranges(path, table, self.workers * RANGES_PER_WORKER, busy_timeout)

    def map(self, fn: Callable[[J], R], jobs: Sequence[J]) -> list[R]:
        """``fn`` over ``jobs``, in their order (blocks: call it from a worker thread)."""
        if len(jobs) <= 1 or self.workers <= 1:
            return [fn(job) for job in jobs]
        with self._lock:
            if self._pool is None:
                self._pool = worker_pool(self.workers)
            pool = self._pool
        try:
            return list(pool.map(fn, jobs))
        except BrokenProcessPool:
            raise worker_lost("verify") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


# ---------------------------------------------------------------- --quick


@dataclass(frozen=True)
class RangeJob:
    """One rowid range of one table for a worker reading the source (either verify)."""

    path: str
    table: Table
    lo: int
    hi: int
    quarantined: frozenset[int] = frozenset()
    skipped: frozenset[str] = frozenset()
    zone: tzinfo = UTC
    strip_nul: bool = False
    busy_timeout: float = 10.0


@dataclass(frozen=True, kw_only=True)
class QuickJob(RangeJob):
    """One range of one table for the quick's checksum."""

    want_keys: bool = False  # return the keys of the rows counted (a table that held rows)
    row_hash: str = verify_hash.MD5  # the hash the checksum sums (verify_hash)


@dataclass
class QuickSum:
    rows: int = 0  # source rows read
    count: int = 0  # rows the target must hold, plus those the reference cannot read
    checksum: int = 0
    keys: list[str] = field(default_factory=list)

    def add(self, other: QuickSum) -> None:
        self.rows += other.rows
        self.count += other.count
        self.checksum += other.checksum
        self.keys += other.keys


def quarantined_keys(
    path: str, table: Table, quarantined: set[int], busy_timeout: float = 10.0
) -> set[str]:
    """The keys (verify_canon.key_column, as text) of the source rows at the ``quarantined``
    row ids whose text no other source row's key has (1, '1' and x'31' are one key once
    loaded): a target row with such a key is a quarantined row's previous version, which sync
    keeps, and the full verify sets it aside too. A key set aside wrongly can only make the
    target's count smaller than the source's: a MISMATCH, never a pass."""
    key = f"CAST({quote_ident(canon.key_column(table))} AS TEXT)"
    rowid, name = table.rowid_sql(), quote_ident(table.name)
    found: set[bytes] = set()
    conn = open_reader(path, busy_timeout)
    try:
        at_rowids = f"SELECT {key} FROM {name} WHERE {rowid} IN ({{marks}})"
        found.update(t for (t,) in rows_in(conn, at_rowids, sorted(quarantined)) if t is not None)
        same_text = f"SELECT {key}, {rowid} FROM {name} WHERE {key} IN ({{marks}})"
        shared = rows_in(conn, same_text, sorted(found), mark="CAST(? AS TEXT)")  # SQLite filters
        found.difference_update(text for text, at in shared if at not in quarantined)
    finally:
        conn.close()
    return {t.decode() for t in found if b"\x00" not in t and _utf8(t)}  # none other in PG


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def rows_in(
    conn: sqlite3.Connection, sql: str, values: Sequence[Any], *, mark: str = "?"
) -> Iterator[Any]:
    """The rows of ``sql``, whose ``{marks}`` is an IN list, for all ``values``: one query per
    900 of them (under the oldest SQLite's bound on parameters, 999)."""
    for at in range(0, len(values), 900):
        part = values[at : at + 900]
        yield from conn.execute(sql.format(marks=", ".join(mark for _ in part)), part)


def _pages(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> Iterator[list[Any]]:
    cursor = conn.execute(sql, args)
    while page := cursor.fetchmany(PAGE):
        yield page


def quick_range(job: QuickJob) -> QuickSum:
    """Count and checksum of one range's canonical rows (see verify_canon)."""
    out = QuickSum()
    conn = open_reader(job.path, job.busy_timeout)
    try:
        keyed = job.want_keys or bool(job.skipped)
        sql = canon.source_select(job.table, with_key=keyed)
        checks = canon.instant_checks(job.table, first=2 if keyed else 1)
        seps = len(canon.compared(job.table)) - 1
        slow: list[int] = []
        for page in _pages(conn, sql, (job.lo, job.hi)):
            out.rows += len(page)
            rows = [r for r in page if r[0] not in job.quarantined] if job.quarantined else page
            rows = shaped(rows, checks, slow)
            texts = (
                _keyed_texts(rows, job, seps, slow, out)
                if keyed
                else _texts(rows, seps, slow, job.strip_nul)
            )
            out.count += len(texts)
            out.checksum += verify_hash.page_sum(job.row_hash, texts)
        _quick_by_reference(conn, job, slow, out)
    finally:
        conn.close()
    return out


def shaped(rows: list[Any], checks: Sequence[canon.InstantCheck], slow: list[int]) -> list[Any]:
    """``rows`` without those whose instants are off the canonical shape (verify_canon's
    instant_checks; their row ids go to ``slow``, for the reference reader): a page's column
    checked at once by one regex, row by row only when a value fails."""
    for check in checks:
        column = [r[check.at] for r in rows]
        try:
            lines = b"\n".join(column)
        except TypeError:  # NULL, or not text: SQL gave no value
            lines = None
        if (
            lines is not None
            and lines.count(b"\n") == len(column) - 1
            and check.lines.fullmatch(lines) is not None
        ):
            continue
        kept = []
        for row, value in zip(rows, column, strict=True):
            if _one(check, value):
                kept.append(row)
            else:
                slow.append(row[0])
        rows = kept
    return rows


def _one(check: canon.InstantCheck, value: Any) -> bool:
    return type(value) is bytes and check.one.fullmatch(value) is not None


_VALUES = operator.itemgetter(slice(1, None))  # a row without its row id
_JOIN = b"\x00".join


def canonical(fields: Sequence[Any]) -> bytes | None:
    """The canonical text of values SQL rendered, or None when it could not render one (a
    NULL, a number where text is stored) or a text holds NUL."""
    try:
        text = b"\x00".join(fields)
    except TypeError:
        return None
    return text if text.count(0) == len(fields) - 1 else None


def canonical_page(rows_fields: Iterable[Sequence[Any]], count: int) -> list[bytes] | None:
    """canonical of each row's ``count`` fields, or None as soon as one row has none: the
    same test, a page at once (every text holds at least the separators, so their sum is
    exact only when no text holds NUL)."""
    try:
        texts = list(map(_JOIN, rows_fields))
    except TypeError:
        return None
    if sum(map(bytes.count, texts, repeat(b"\x00"))) != (count - 1) * len(texts):
        return None
    return texts


def _texts(page: list[Any], seps: int, slow: list[int], strip_nul: bool = True) -> list[bytes]:
    """The canonical text of each row (rowid, then its values); the row ids of the rows SQL
    could not render go to ``slow``.

    A text holding NUL is the reference's to render only when ``strip_nul`` (it removes them);
    otherwise the reference refuses such a row, and its text, with more NULs than separators,
    is one no target row has (PostgreSQL text holds no NUL): hashed as it is, it differs."""
    if not strip_nul:  # the whole page in C, unless a row is not rendered
        try:
            return list(map(_JOIN, map(_VALUES, page)))
        except TypeError:
            pass  # NULL or a number somewhere: row by row below
    join = _JOIN
    out: list[bytes] = []
    append = out.append
    for row in page:
        try:
            text = join(row[1:])
        except TypeError:  # NULL or a number: SQL did not render a value
            slow.append(row[0])
            continue
        if strip_nul and text.count(0) != seps:
            slow.append(row[0])
            continue
        append(text)
    return out


def _keyed_texts(
    page: list[Any], job: QuickJob, seps: int, slow: list[int], out: QuickSum
) -> list[bytes]:
    """As _texts for rows laid out rowid, raw key, values: rows with a skipped key left out,
    the keys of the others kept when ``job.want_keys``."""
    kept = []
    for row in page:
        if canonical(row[2:]) is None:
            slow.append(row[0])
            continue
        key = row[1].decode("utf-8", "surrogateescape")
        if key in job.skipped:
            continue
        if job.want_keys:
            out.keys.append(key)
        kept.append((row[0], *row[2:]))
    return _texts(kept, seps, slow)


def _quick_by_reference(
    conn: sqlite3.Connection, job: QuickJob, rowids: list[int], out: QuickSum
) -> None:
    """Add the rows SQL could not render, rendered by the reference reader."""
    render = canon.reference_canon(job.table, zone=job.zone, strip_nul=job.strip_nul)
    read_key = ref.source_reader(job.table.columns[0], zone=job.zone, strip_nul=job.strip_nul)
    sql = canon.raw_select(job.table)
    for rowid in rowids:
        found = conn.execute(sql, (rowid,)).fetchone()
        if found is None:
            continue  # deleted since the scan read it
        try:
            text = render(found)
            key = read_key(found[0]) if job.skipped or job.want_keys else None
        except ref.Unreadable:
            out.count += 1  # neither loadable nor quarantined: counted so that counts differ
            continue
        if key is not None and key in job.skipped:
            continue
        if job.want_keys and key is not None:
            out.keys.append(str(key))
        out.count += 1
        out.checksum += verify_hash.page_sum(job.row_hash, [text])
