"""The orphan rowids of the tables a run has yet to read, found while the tables before them
load.

With converter processes, a child table's batches wait for its orphan set (one anti-join,
stages/extract.orphan_rowids): 0.5 s for the 1M bench messages, while PostgreSQL and the
converters idle. Here a thread of the run, on a read-only SQLite connection of its own, finds
the set of each child table no run has read yet, one table after another, over the table's
whole range up to the run's bound, while the sessions load. The table's start takes the part
of its range the run reads (any resume point lies inside).

The set is used only when nothing was written to the source since it was found (SQLite's
``PRAGMA data_version``, read before the anti-join and again at the table's start, on the same
connection): then it is the set an anti-join at the start would find. The order of the run
matters here: found at the table's start, after its parents were read, a parent the app
deleted before the run read it makes its rows orphans; found earlier, their rows would be
loaded without the parent and the foreign key could not be built. A set not found, or found
before a write (the app is writing: a catch-up, not a quiet bulk run), is found at the table's
start, as without this.
"""

from __future__ import annotations

import bisect
import sqlite3
import threading
from array import array
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import NamedTuple, TypeAlias

import aiosqlite
import anyio

from flux_migrate.core.schema import BEFORE_FIRST_ROWID, Table
from flux_migrate.stages.extract import orphan_rowids, orphan_rowids_now, orphan_rowids_sql

Orphans: TypeAlias = "array[int] | None"  # None: too many, each row is checked as it is read


class _Found(NamedTuple):
    conn: sqlite3.Connection  # kept open: its data_version tells whether the source changed
    version: int  # the source's data_version before the anti-join
    orphans: Orphans


class OrphansAhead:
    """Orphan sets found in a thread ahead of the tables' starts (see the module)."""

    def __init__(self, uri: str, busy_timeout: float) -> None:
        self._uri, self._busy_timeout = uri, busy_timeout
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="flux-orphans-ahead")
        self._found: dict[str, tuple[int, Future[_Found]]] = {}
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None  # the one querying: close interrupts it
        self._closed = False

    def start(self, table: Table, upto: int) -> None:
        """Find ``table``'s orphan rowids up to ``upto`` after those queued before (nothing
        for a table without parents or rowid: its start needs no query)."""
        if self._closed or orphan_rowids_sql(table) is None or table.name in self._found:
            return
        self._found[table.name] = (upto, self._executor.submit(self._find, table, upto))

    def _find(self, table: Table, upto: int) -> _Found:
        with self._lock:
            if self._closed:
                raise sqlite3.OperationalError("interrupted")
            conn = self._conn = sqlite3.connect(
                self._uri, uri=True, timeout=self._busy_timeout, check_same_thread=False
            )
        try:
            version = _data_version(conn)
            return _Found(conn, version, orphan_rowids_now(conn, table, BEFORE_FIRST_ROWID, upto))
        except BaseException:
            conn.close()
            raise
        finally:
            with self._lock:
                self._conn = None

    async def take(self, table: Table, after: int, upto: int) -> tuple[Orphans] | None:
        """The orphan rowids in (``after``, ``upto``] from the set found ahead (waiting for it
        if need be), once; None when there is none for that bound, it failed, or something
        was written to the source since (SQLite's data_version): then the set is found again."""
        entry = self._found.pop(table.name, None)
        if entry is None or entry[0] != upto:
            return None
        try:
            found = await anyio.to_thread.run_sync(_if_unchanged, entry[1], abandon_on_cancel=True)
        except (sqlite3.Error, CancelledError):
            return None
        if found is None:
            return None
        if found.orphans is None:
            return (None,)
        orphans = found.orphans
        return (orphans[bisect.bisect_right(orphans, after) : bisect.bisect_right(orphans, upto)],)

    def close(self) -> None:
        """Stop: a query under way is interrupted, the ones queued are dropped, the sets not
        taken let go."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.interrupt()
        self._executor.shutdown(wait=False, cancel_futures=True)
        for _, future in self._found.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().conn.close()
        self._found.clear()


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _if_unchanged(future: Future[_Found]) -> _Found | None:
    """The set ``future`` found (waiting for it) if no other connection committed to the
    source since; its connection closed either way."""
    found = future.result()
    try:
        return found if _data_version(found.conn) == found.version else None
    finally:
        found.conn.close()


async def range_orphans(
    src: aiosqlite.Connection, table: Table, after: int, upto: int, ahead: OrphansAhead | None
) -> Orphans:
    """The orphan rowids of ``table`` in (``after``, ``upto``]: found ahead, else now."""
    found = None if ahead is None else await ahead.take(table, after, upto)
    return found[0] if found is not None else await orphan_rowids(src, table, after, upto)
