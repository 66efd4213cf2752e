"""The end of a run: the accounting check, and the one synchronous commit that makes the run's
commits durable."""

from __future__ import annotations

import contextlib

import anyio
import asyncpg

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.errors import RuntimeFailure, is_driver_error, is_lost_connection
from flux_migrate.pipeline.report import RunReport
from flux_migrate.pipeline.settings import Settings


async def make_durable(lock: asyncpg.Connection, dsn: str, schema: str) -> None:
    """One synchronous commit: flushes the WAL, so every batch committed before is durable
    (batches commit without waiting for the flush). On the lock's connection, or on a new one
    when that one was lost (a server restart during the run). Best effort and bounded."""
    with anyio.move_on_after(10):
        if not lock.is_closed() and await _touch(lock, schema):
            # Release the run's lock now: a terminated connection frees it only once the
            # server notices, and a run started right after this one would be refused meanwhile.
            with contextlib.suppress(asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
                await lock.execute("SELECT pg_advisory_unlock_all()")
            return
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except Exception as exc:
            if not (is_driver_error(exc) or is_lost_connection(exc)):
                raise
            return
        try:
            await _touch(conn, schema)
        finally:
            conn.terminate()


async def _touch(conn: asyncpg.Connection, schema: str) -> bool:
    """Whether a synchronous commit on ``conn`` succeeded."""
    try:
        await ckpt.touch_checkpoints(conn, schema)
    except Exception as exc:
        if not (is_driver_error(exc) or is_lost_connection(exc)):
            raise
        return False
    return True


async def check_accounting(conn: asyncpg.Connection, settings: Settings, report: RunReport) -> None:
    """Every row read is loaded, quarantined or skipped; the target holds what was loaded."""
    names = settings.names
    current = await ckpt.read_checkpoints(conn, names.schema)
    for name, t in report.tables.items():
        if t.extracted != t.loaded + t.quarantined + t.skipped:
            raise RuntimeFailure(
                f"Accounting failed for {name}: read {t.extracted} but loaded {t.loaded},"
                f" quarantined {t.quarantined}, skipped {t.skipped}; please report this."
            )
        c = current[name]
        if c.extracted != c.loaded + c.quarantined + c.skipped:
            raise RuntimeFailure(f"The checkpoint of {name} does not add up; please report this.")
        if not c.preexisting_rows:
            in_target = await conn.fetchval(f"SELECT count(*) FROM {names.qualified(name)}")
            if in_target != c.loaded:
                raise RuntimeFailure(
                    f"Table {names.qualified(name)} holds {in_target} rows but flux-migrate"
                    f" loaded {c.loaded}; something else wrote to it."
                )
