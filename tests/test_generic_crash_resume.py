"""Crash and resume of a database of another shape: SIGKILL a real run over a three-table
foreign-key chain, rerun it, and find every row exactly once with its keys built."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.generic_db import chain_db, compare_table
from tests.support import cli, fetchval, kill_after

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

CHAIN = ("parent", "child", "grandchild")


def _args(path: Path, dsn: str) -> list[str]:
    return [
        "run", "--sqlite-path", str(path), "--postgres-dsn", dsn, "--batch-size", "100",
        "--log-format", "json", "--no-progress",
    ]  # fmt: skip


async def _assert_chain_exactly_once(path: Path, dsn: str) -> None:
    for table in CHAIN:
        equal, held = await compare_table(path, dsn, table)
        assert equal == held
    statuses = await fetchval(
        dsn, "SELECT array_agg(status ORDER BY source_table) FROM flux_migrate.checkpoints"
    )
    assert ["finished", "finished", "finished"] == statuses
    read = await fetchval(
        dsn, "SELECT array_agg(extracted ORDER BY source_table) FROM flux_migrate.checkpoints"
    )
    assert [800, 1600, 200] == read  # child, grandchild, parent: each row counted once
    assert False is await fetchval(
        dsn, "SELECT bool_or(constraints_pending) FROM flux_migrate.checkpoints"
    )
    keys = await fetchval(
        dsn,
        "SELECT array_agg(contype::text || ':' || conrelid::regclass::text ORDER BY 1)"
        " FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND contype IN ('p', 'f')",
    )
    expected = ["f:child", "f:grandchild", "p:child", "p:grandchild", "p:parent"]
    assert expected == sorted(keys)
    verified = cli("verify", "--sqlite-path", str(path), "--postgres-dsn", dsn)
    assert 0 == verified.returncode, verified.stdout + verified.stderr


@pytest.mark.parametrize("without_rowid", [False, True], ids=["rowid", "without_rowid"])
@pytest.mark.parametrize("k", [1, 6, 15], ids=["in_parent", "in_child", "in_grandchild"])
async def test_sigkill_of_a_generic_run_then_rerun_loads_each_row_once(
    tmp_path: Path, pg_dsn: str, k: int, without_rowid: bool
) -> None:
    """Killed after k committed batches, a rerun ends with each row of the three tables
    exactly once, the checkpoints finished and every key built."""
    path = chain_db(tmp_path / "chain.sqlite", without_rowid=without_rowid)
    assert k == kill_after(_args(path, pg_dsn), "batch_loaded", k)
    committed = await fetchval(pg_dsn, "SELECT sum(loaded) FROM flux_migrate.checkpoints")
    assert committed >= k * 100
    rerun = cli(*_args(path, pg_dsn))
    assert 0 == rerun.returncode, rerun.stderr
    await _assert_chain_exactly_once(path, pg_dsn)


async def test_two_kills_of_a_generic_run_still_converge(tmp_path: Path, pg_dsn: str) -> None:
    """Killing the resumed run too still ends, after a third run, with each row exactly once."""
    path = chain_db(tmp_path / "chain.sqlite")
    kill_after(_args(path, pg_dsn), "batch_loaded", 4)
    kill_after(_args(path, pg_dsn), "batch_loaded", 8)
    rerun = cli(*_args(path, pg_dsn))
    assert 0 == rerun.returncode, rerun.stderr
    await _assert_chain_exactly_once(path, pg_dsn)
