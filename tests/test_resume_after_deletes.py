"""Ordinary app activity between runs (retention deletes, deleting the newest rows, VACUUM)
never blocks a rerun, and every row the app wrote since is loaded exactly once."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_migrate.core.source import count_between
from flux_migrate.pipeline.mapping_source import resolve_mapping
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.sample import generate
from flux_migrate.pipeline.settings import load_settings
from flux_migrate.stages.extract import open_source
from tests.support import cli, fetchval, source_rows, target_rows

pytestmark = pytest.mark.anyio


def _delete_sessions(path: Path, order: str, count: int) -> list[str]:
    """Delete ``count`` sessions (oldest or newest by rowid) with their messages."""
    db = sqlite3.connect(path)
    ids = [
        r[0]
        for r in db.execute(f"SELECT id FROM sessions ORDER BY rowid {order} LIMIT ?", (count,))
    ]
    for sid in ids:
        db.execute("DELETE FROM messages WHERE session_id = ?", (sid,))
        db.execute("DELETE FROM sessions WHERE id = ?", (sid,))
    db.commit()
    db.close()
    return ids


def _add_sessions(path: Path, count: int, messages_each: int = 3) -> list[str]:
    """Append sessions with messages, as the app does."""
    db = sqlite3.connect(path)
    ids = []
    for i in range(count):
        sid = str(uuid.uuid4())
        ids.append(sid)
        db.execute(
            "INSERT INTO sessions (id, title, created_at, updated_at, metadata)"
            " VALUES (?, ?, '2026-01-02T03:04:05+00:00', '2026-01-02T03:04:05+00:00', '{}')",
            (sid, f"new {i}"),
        )
        for m in range(messages_each):
            db.execute(
                "INSERT INTO messages (id, session_id, role, content, metadata, created_at)"
                " VALUES (?, ?, 'user', ?, '{}', '2026-01-02T03:04:06+00:00')",
                (str(uuid.uuid4()), sid, f"hello {i}.{m}"),
            )
    db.commit()
    db.close()
    return ids


async def _assert_source_in_target_once(path: Path, dsn: str) -> None:
    """Every source row is in the target with equal values, and no id is there twice."""
    for table in ("sessions", "messages"):
        expected = source_rows(path, table)
        actual = await target_rows(dsn, table)
        assert expected == {k: actual[k] for k in expected if k in actual}
        distinct = await fetchval(dsn, f"SELECT count(DISTINCT id) = count(*) FROM {table}")
        assert distinct is True


async def _first_run(tmp_path: Path, dsn: str) -> Path:
    path = generate(tmp_path / "app.sqlite", sessions=40, messages_per_session=4)
    assert cli("run", "--sqlite-path", str(path), "--postgres-dsn", dsn).returncode == 0
    return path


async def test_retention_deleting_the_oldest_sessions_does_not_block_a_rerun(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Deleting the 8 oldest sessions (all the identity sample) and adding new ones: exit 0, the
    new rows load, the target still holds what the first run loaded."""
    path = await _first_run(tmp_path, pg_dsn)
    gone = _delete_sessions(path, "ASC", 8)
    new = _add_sessions(path, 2)
    rerun = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == rerun.returncode, rerun.stderr
    await _assert_source_in_target_once(path, pg_dsn)
    kept = await fetchval(pg_dsn, "SELECT count(*) FROM sessions WHERE id = ANY($1)", gone + new)
    assert 10 == kept


async def test_rows_reusing_the_rowids_of_deleted_newest_rows_are_loaded_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    """The app deletes its newest session, then writes more: the new rows take rowids at or below
    the checkpoint, and the rerun still loads each of them exactly once."""
    path = await _first_run(tmp_path, pg_dsn)
    _delete_sessions(path, "DESC", 2)
    new = _add_sessions(path, 3)
    rerun = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == rerun.returncode, rerun.stderr
    await _assert_source_in_target_once(path, pg_dsn)
    assert 3 == await fetchval(pg_dsn, "SELECT count(*) FROM sessions WHERE id = ANY($1)", new)
    assert 9 == await fetchval(
        pg_dsn, "SELECT count(*) FROM messages WHERE session_id = ANY($1)", new
    )


async def test_vacuum_renumbering_rowids_between_runs_still_loads_new_rows_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Deletes, new rows and a VACUUM that compacts rowids below the checkpoint: the rerun finds
    the new rows and loads them once."""
    path = await _first_run(tmp_path, pg_dsn)
    _delete_sessions(path, "DESC", 5)
    _delete_sessions(path, "ASC", 5)
    _add_sessions(path, 2)
    db = sqlite3.connect(path)
    db.execute("VACUUM")
    db.close()
    settings = load_settings(None, sqlite_path=path, postgres_dsn=pg_dsn)
    report = await migrate(settings)
    assert "completed" == report.status
    assert 2 == report.tables["sessions"].loaded
    assert 6 == report.tables["messages"].loaded
    await _assert_source_in_target_once(path, pg_dsn)


async def test_a_different_database_is_still_refused(tmp_path: Path, pg_dsn: str) -> None:
    """Another database of the same shape, with none of the loaded keys, is refused (exit 2)."""
    await _first_run(tmp_path, pg_dsn)
    other = generate(tmp_path / "other.sqlite", sessions=40, messages_per_session=4, seed=99)
    refused = cli("run", "--sqlite-path", str(other), "--postgres-dsn", pg_dsn)
    assert 2 == refused.returncode
    assert "different SQLite database" in refused.stderr


_INDEXES = [
    "",
    "CREATE INDEX t_v ON t (v)",
    "CREATE INDEX t_v ON t (v) WHERE v > 0",  # partial: holds only some rows
    "CREATE INDEX t_v ON t (abs(v))",
]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rowids=st.lists(st.integers(min_value=-50, max_value=50), unique=True, max_size=30),
    index=st.sampled_from(_INDEXES),
    alias=st.booleans(),
    after=st.integers(min_value=-60, max_value=60),
    width=st.integers(min_value=0, max_value=120),
)
async def test_the_count_of_a_rowid_range_along_an_index_is_the_tables_own(
    tmp_path_factory: pytest.TempPathFactory,
    rowids: list[int],
    index: str,
    alias: bool,
    after: int,
    width: int,
) -> None:
    """The rows a table holds in a row id range, counted along its smallest index (the run's
    start) or in the table (its end-of-table witness), are the rows there: any range, sparse
    and negative row ids, a partial or an expression index, or none."""
    path = tmp_path_factory.mktemp("count") / "t.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE t ({'id INTEGER PRIMARY KEY, ' if alias else ''}v INTEGER)")
    if index:
        db.execute(index)
    db.executemany("INSERT INTO t (rowid, v) VALUES (?, ?)", [(r, r % 7 - 3) for r in rowids])
    db.commit()
    db.close()
    (table,) = resolve_mapping(path, None, 5.0)[0].tables
    upto = after + width
    expected = sum(after < r <= upto for r in rowids)
    async with open_source(path) as src:
        assert expected == await count_between(src, table, after, upto)
        assert expected == await count_between(src, table, after, upto, by_index=True)
