"""Hint bits set on a loaded table's pages while they are young, so that the key build after
the load does not write the whole table to the WAL again.

PostgreSQL records that a row's inserting transaction committed in the row itself (a hint
bit), the first time a query reads the row after the commit is on disk. With data checksums
(PostgreSQL 18's default) or ``wal_log_hints``, the first such change to a page after a
checkpoint writes the whole page to the WAL. A bulk load passes checkpoints, so the first
reader of the table, the primary key's build, rewrote the table into the WAL (docs/benchmark.md:
for the 1M bench messages the primary key took 2.3-3.6 s, 1.6-1.9 s with this).

So while a table the run created loads (its keys are built after the load), every EVERY-th
batch commits synchronously, and right after that commit the loader reads the pages written
since the last such read, by one TID range scan (PostgreSQL 14 and later). Both are needed:
the loader's other commits do not wait for the disk (core.target), and PostgreSQL sets no hint
bit while the commit LSN it keeps for a group of 32 transactions is not on disk: a reader
running beside the load found that LSN moved on by the next batches' commits, and set few.
This only saves work: a read that fails leaves the hint bits to the key build, as before, and
is never the load's failure.
"""

from __future__ import annotations

import asyncpg

from flux_migrate.core.errors import MigrateError
from flux_migrate.core.target import Target

EVERY = 4  # batches per synchronous commit and read (the pages of 40k rows at the default)

_CAPABLE_SQL = (
    "SELECT current_setting('full_page_writes') = 'on'"
    " AND (current_setting('data_checksums') = 'on' OR current_setting('wal_log_hints') = 'on')"
)
# The rows from the first page the last read may have left unread (the last page it saw is
# filled further by the next batch), and the table's size in pages, in one round trip.
_READ_SQL = (
    "SELECT (SELECT count(*) FROM {table} WHERE ctid >= $1::tid),"
    " pg_relation_size($2::regclass) / current_setting('block_size')::int"
)


async def worthwhile(conn: asyncpg.Connection) -> bool:
    """Whether the server writes a page to the WAL when a hint bit first changes it after a
    checkpoint, and has TID range scans (PostgreSQL 14)."""
    if conn.get_server_version().major < 14:
        return False
    return bool(await conn.fetchval(_CAPABLE_SQL))


class YoungPages:
    """One table's young pages (see the module)."""

    def __init__(self, qualified: str, every: int = EVERY) -> None:
        self.qualified, self.every = qualified, every
        self.next_page = 0  # the pages below it were read after their rows' commit was on disk

    def flushes(self, seq: int) -> bool:
        """Whether the batch numbered ``seq`` (from 1) commits synchronously, to be read after."""
        return seq % self.every == 0

    async def after_commit(self, target: Target, seq: int) -> None:
        """After batch ``seq``'s commit: read the pages written since the last read, when that
        commit was a synchronous one."""
        if not self.flushes(seq):
            return
        try:
            conn = await target.conn()
            _, size = await conn.fetchrow(
                _READ_SQL.format(table=self.qualified), (self.next_page, 0), self.qualified
            )
        except (MigrateError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            return  # the next batch's commit finds out whether the connection is still good
        self.next_page = max(self.next_page, int(size) - 1)
