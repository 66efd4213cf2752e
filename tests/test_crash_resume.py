"""Crash and resume: SIGKILL a real migration process, rerun it, and count every row once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import cli, fetchval, kill_after, source_rows, target_rows

pytestmark = pytest.mark.slow


async def _assert_exactly_once(source: Path, dsn: str) -> None:
    for table in ("sessions", "messages"):
        expected = source_rows(source, table)
        actual = await target_rows(dsn, table)
        assert expected == actual
        count = await fetchval(dsn, f"SELECT count(*) FROM {table}")
        assert len(expected) == count
    statuses = await fetchval(
        dsn, "SELECT array_agg(status ORDER BY source_table) FROM flux_migrate.checkpoints"
    )
    assert statuses == ["finished", "finished"]
    pending = await fetchval(
        dsn, "SELECT bool_or(constraints_pending) FROM flux_migrate.checkpoints"
    )
    assert pending is False


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("event", "k"),
    [
        ("batch_loaded", 1),  # mid-way through sessions
        ("batch_loaded", 3),  # sessions done, messages not started
        ("batch_loaded", 12),  # mid-way through messages
        ("batch_loaded", 30),  # near the end of messages
        ("constraint_build_started", 2),  # while building keys after the load
    ],
)
async def test_sigkill_then_rerun_loads_each_row_exactly_once(
    sample_db: Path, pg_dsn: str, event: str, k: int
) -> None:
    """Killed after k committed batches (or during the key build), a rerun ends with each
    source row exactly once and the checkpoints finished."""
    args = [
        "run",
        "--sqlite-path",
        str(sample_db),
        "--postgres-dsn",
        pg_dsn,
        "--batch-size",
        "100",
        "--log-format",
        "json",
        "--no-progress",
    ]
    seen = kill_after(args, event, k)
    assert k == seen
    if event == "batch_loaded":
        committed = await fetchval(pg_dsn, "SELECT sum(loaded) FROM flux_migrate.checkpoints")
        assert committed >= k * 100 if k <= 3 else committed >= 300 + (k - 3) * 100
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    await _assert_exactly_once(sample_db, pg_dsn)


@pytest.mark.anyio
async def test_two_kills_in_a_row_still_converge(sample_db: Path, pg_dsn: str) -> None:
    """Killing the resumed run too still ends, after a third run, with each row exactly once."""
    args = [
        "run",
        "--sqlite-path",
        str(sample_db),
        "--postgres-dsn",
        pg_dsn,
        "--batch-size",
        "100",
        "--log-format",
        "json",
        "--no-progress",
    ]
    kill_after(args, "batch_loaded", 5)
    kill_after(args, "batch_loaded", 5)
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    await _assert_exactly_once(sample_db, pg_dsn)
