"""Hint bits set on a created table's pages while it loads (stages/page_hints): when the run
stops before its key build, the rows of the batches read so far already carry PostgreSQL's
"inserting transaction committed" bit, so the key build will not write their pages to the
WAL again; and a read that fails costs the load nothing."""

from __future__ import annotations

import signal
from pathlib import Path

import asyncpg
import pytest

from flux_migrate.core.errors import Interrupted
from flux_migrate.core.target import Target
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.stop import StopFlag
from flux_migrate.stages.page_hints import EVERY, YoungPages, worthwhile
from tests.support import app_copy, app_settings
from tests.test_faults import AfterBatches

pytestmark = pytest.mark.anyio

_XMIN_COMMITTED = 0x0100  # HEAP_XMIN_COMMITTED in t_infomask

# Of each live row of the table: whether its xmin's commit bit is set (pageinspect, which
# reads the pages as they are: it sets no hint bit itself).
_HINTED_SQL = f"""
SELECT (t_infomask & {_XMIN_COMMITTED}) <> 0 AS hinted, count(*) AS n
FROM generate_series(0, pg_relation_size('public.messages') / 8192 - 1) AS page,
     LATERAL heap_page_items(get_raw_page('public.messages', page::int))
WHERE lp_len > 0
GROUP BY 1
"""


async def test_the_rows_of_batches_read_are_hinted_before_the_key_build(
    sample_db: Path, tmp_path: Path, pg_dsn: str
) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        capable = await worthwhile(conn)
    finally:
        await conn.close()
    stop = StopFlag()
    settings = app_settings(app_copy(sample_db, tmp_path), pg_dsn, batch_size=300)
    batches = 2 * EVERY  # the last of them commits synchronously and is read after
    stopping = AfterBatches(  # waited for: the flag is up before the loader looks at it
        batches, lambda: stop.request(signal.SIGINT), table="messages", wait=True
    )
    with pytest.raises(Interrupted):
        await migrate(settings, progress=stopping, stop=stop)
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = {r["hinted"]: r["n"] for r in await conn.fetch(_HINTED_SQL)}
        pending = await conn.fetchval(
            "SELECT constraints_pending FROM flux_migrate.checkpoints"
            " WHERE source_table = 'messages'"
        )
    finally:
        await conn.close()
    assert pending  # stopped before the key build, which would set every bit itself
    assert sum(rows.values()) == batches * 300
    if capable:
        assert rows.get(False, 0) <= 0.02 * batches * 300, rows
    else:  # the server logs no page for a hint bit: nothing to save, nothing done
        assert rows.get(True, 0) == 0, rows


async def test_a_read_that_fails_leaves_the_load_alone(pg_dsn: str) -> None:
    """A failing read (here: a table that is not there) returns quietly, and the loader's
    connection stays usable for the next batch."""
    target = Target(pg_dsn)
    try:
        young = YoungPages('"public"."no_such_table"')
        await young.after_commit(target, EVERY)
        assert young.next_page == 0
        assert await (await target.conn()).fetchval("SELECT 1") == 1
    finally:
        await target.close()
