"""Requeue against an older SQLite (hardening 13.10): before 3.32 a statement may bind only 999
host parameters, so retrying more than 1,000 quarantined rows must not bind them all at once."""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path

import pytest

import flux_migrate.pipeline.runner
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import load_settings
from flux_migrate.stages.extract import open_source
from tests.dirty import GOOD_TS, app_db
from tests.support import source_rows, target_rows

pytestmark = pytest.mark.anyio

BAD_ROWS = 1_200


async def test_requeue_of_more_rows_than_host_parameters_works_and_loads_the_fixed_ones(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the source limited to 999 host parameters, 1,200 quarantined sessions are retried
    by every rerun without "too many SQL variables", and once fixed all of them load."""
    monkeypatch.setattr(
        flux_migrate.pipeline.runner,
        "open_source",
        functools.partial(open_source, limits={sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER: 999}),
    )
    db = app_db(tmp_path / "app.sqlite")
    for _ in range(BAD_ROWS):
        db.session(created_at="not a date")
    db.write()
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn)
    first = await migrate(settings)
    assert first.quarantined_open == BAD_ROWS
    still_bad = await migrate(settings)  # requeue reads all 1,200 rowids; none converts yet
    assert (
        still_bad.status,
        still_bad.quarantined_open,
        still_bad.tables["sessions"].requeued,
    ) == ("completed", BAD_ROWS, 0)
    conn = sqlite3.connect(db.path)
    conn.execute("UPDATE sessions SET created_at = ? WHERE created_at = 'not a date'", (GOOD_TS,))
    conn.commit()
    conn.close()
    fixed = await migrate(settings)
    assert (fixed.quarantined_open, fixed.tables["sessions"].requeued) == (0, BAD_ROWS)
    assert source_rows(db.path, "sessions") == await target_rows(pg_dsn, "sessions")


async def test_the_limit_hook_really_limits_the_source(tmp_path: Path) -> None:
    """The hook the test above relies on: a query binding 1,000 parameters fails under it."""
    db = app_db(tmp_path / "app.sqlite").write()
    limits = {sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER: 999}
    async with open_source(db, limits=limits) as src:
        marks = ", ".join("?" for _ in range(1000))
        with pytest.raises(sqlite3.OperationalError) as info:
            await src.execute(f"SELECT 1 WHERE 1 IN ({marks})", list(range(1000)))
    assert "too many SQL variables" in str(info.value)
