"""The orphan rowids of the tables a run has yet to read, found while the tables before them
load.

With converter processes, a child table's batches wait for its orphan set (one anti-join,
stages/extract.orphan_rowids): 0.5 s for the 1M bench messages, while PostgreSQL and the
converters idle. Here a thread of the run, on a read-only SQLite connection of its own, finds
the set of each child table no run has read yet, one table after another, over the table's
whole range up to the run's bound, while the sessions load. The table's start takes the part
of its range the run reads (any resume point lies inside).

A set found earlier is as exact as one found at the table's start: the app may add or remove
parents in between either way. A row flagged wrongly is quarantined as an orphan and retried
by the next run; a row whose parent vanished is set aside when its foreign key is built
(pipeline/key_repair.py). A set not found (the source busy, the thread stopped) is found at
the table's start, as without this.
"""

from __future__ import annotations

import bisect
import sqlite3
import threading
from array import array
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import TypeAlias

import aiosqlite
import anyio

from flux_migrate.core.schema import BEFORE_FIRST_ROWID, Table
from flux_migrate.stages.extract import orphan_rowids, orphan_rowids_now, orphan_rowids_sql

Orphans: TypeAlias = "array[int] | None"  # None: too many, each row is checked as it is read


class OrphansAhead:
    """Orphan sets found in a thread ahead of the tables' starts (see the module)."""

    def __init__(self, uri: str, busy_timeout: float) -> None:
        self._uri, self._busy_timeout = uri, busy_timeout
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="flux-orphans-ahead")
        self._found: dict[str, tuple[int, Future[Orphans]]] = {}
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None  # the one in use: close interrupts it
        self._closed = False

    def start(self, table: Table, upto: int) -> None:
        """Find ``table``'s orphan rowids up to ``upto`` after those queued before (nothing
        for a table without parents or rowid: its start needs no query)."""
        if self._closed or orphan_rowids_sql(table) is None or table.name in self._found:
            return
        self._found[table.name] = (upto, self._executor.submit(self._find, table, upto))

    def _find(self, table: Table, upto: int) -> Orphans:
        with self._lock:
            if self._closed:
                raise sqlite3.OperationalError("interrupted")
            conn = self._conn = sqlite3.connect(
                self._uri, uri=True, timeout=self._busy_timeout, check_same_thread=False
            )
        try:
            return orphan_rowids_now(conn, table, BEFORE_FIRST_ROWID, upto)
        finally:
            with self._lock:
                self._conn = None
            conn.close()

    async def take(self, table: Table, after: int, upto: int) -> tuple[Orphans] | None:
        """The orphan rowids in (``after``, ``upto``] from the set found ahead (waiting for it
        if need be), once; None when there is none for that bound or it failed."""
        entry = self._found.pop(table.name, None)
        if entry is None or entry[0] != upto:
            return None
        future = entry[1]
        try:
            found = await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except (sqlite3.Error, CancelledError):
            return None
        if found is None:
            return (None,)
        return (found[bisect.bisect_right(found, after) : bisect.bisect_right(found, upto)],)

    def close(self) -> None:
        """Stop: a query under way is interrupted, the ones queued are dropped."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.interrupt()
        self._executor.shutdown(wait=False, cancel_futures=True)


async def range_orphans(
    src: aiosqlite.Connection, table: Table, after: int, upto: int, ahead: OrphansAhead | None
) -> Orphans:
    """The orphan rowids of ``table`` in (``after``, ``upto``]: found ahead, else now."""
    found = None if ahead is None else await ahead.take(table, after, upto)
    return found[0] if found is not None else await orphan_rowids(src, table, after, upto)
