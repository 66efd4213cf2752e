"""Sync's source scan in worker processes: a rowid range of a table read and digested on a
read-only connection of its own, and the one pool of such workers a sync round keeps for all
its tables.

A spawned worker imports the module of the function it runs; this one imports no event loop,
driver or logger, so a worker is ready in about 0.1 s instead of the 0.3 s sync_plan's
modules took, and a round starts its workers once, not once per table (pipeline/sync_plan.py
merges what they read)."""

from __future__ import annotations

import operator
import sqlite3
import threading
from array import array
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from flux_migrate.core.digest import digests
from flux_migrate.pipeline.workers import worker_pool
from flux_migrate.stages.transform import pack_keys

WORKERS = 2
# Rows a worker fetches and digests at a time. A page small enough to stay in the core's cache
# (256 rows of the app's messages: about 300 KB of row objects) is digested while its rows are
# still there: 2.0-2.2 µs a message row fetched and digested, against 2.9 for pages of 5,000
# (docs/benchmark.md, "ninth session").
PAGE = 256

_ROWID = operator.itemgetter(0)

# The keys of a range as a worker sends them: one bytes object, the keys joined by NUL, when
# they are all ASCII bytes without NUL (pack_keys makes their plain decode); else pack_keys's
# list. For the 950k bench messages, pickling the keys and reading them back took 0.30-0.33
# CPU-s one by one, 0.06-0.09 so (of a scan's 4 CPU-s).
ShippedKeys = bytes | list[str]


def scan_range(
    uri: str, sql: str, lo: int, hi: int, ncols: int, at: int, busy_timeout: float
) -> tuple[bytes, bytes, ShippedKeys]:
    """In a worker process: the rowids, digests (both as int64 arrays) and keys (shipped_keys)
    of the source rows with ``lo <= rowid <= hi``, in rowid order, read on a read-only
    connection of its own."""
    rowids, values = array("q"), array("q")
    raw_keys: list[Any] = []
    key = operator.itemgetter(at + 1)
    db = sqlite3.connect(uri, uri=True, timeout=busy_timeout)
    try:
        db.text_factory = bytes
        cursor = db.execute(sql, (lo, hi))
        while rows := cursor.fetchmany(PAGE):  # a page at a time: the worker's memory is small
            rowids.extend(map(_ROWID, rows))
            values.extend(digests(rows, ncols))
            raw_keys.extend(map(key, rows))
    finally:
        db.close()
    return rowids.tobytes(), values.tobytes(), shipped_keys(raw_keys)


def shipped_keys(raw_keys: list[Any]) -> ShippedKeys:
    """pack_keys of ``raw_keys`` in the form a worker sends (see ShippedKeys)."""
    try:
        joined = b"\x00".join(raw_keys)
    except TypeError:  # a NULL or a number among them
        return pack_keys(raw_keys)
    if joined.isascii() and joined.count(0) == len(raw_keys) - 1:  # none: -1
        return joined
    return pack_keys(raw_keys)


def received_keys(keys: ShippedKeys) -> list[str]:
    """The keys a worker sent (shipped_keys) as pack_keys gives them."""
    return keys.decode("ascii").split("\x00") if isinstance(keys, bytes) else keys


class ScanPool:
    """The worker processes of one sync round, started when a table first has more than one
    range to read and kept for the round's next tables; ``close`` stops them (sync closes them
    before the round's writes). A table of one range is read in a thread of its own (starting
    processes would cost more)."""

    def __init__(self) -> None:
        self._pool: Executor | None = None
        self._lock = threading.Lock()

    def executor(self, ranges: int) -> Executor:
        """Where to read a table of ``ranges`` ranges: the shared processes, or a new thread
        (the caller shuts a thread's executor down; the processes stay until ``close``)."""
        if ranges <= 1:
            return ThreadPoolExecutor(max_workers=1)
        with self._lock:
            if self._pool is None:
                self._pool = worker_pool(WORKERS)
            return self._pool

    def shared(self, executor: Executor) -> bool:
        return executor is self._pool

    def close(self) -> None:
        """Stop the processes (the jobs queued are dropped, the ones running finish)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
