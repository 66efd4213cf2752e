"""The orphan sets found ahead of a table's start (pipeline/orphans_ahead.py) are the ones the
table's start would find, for any part of the range, and only once."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_migrate.core.schema import MESSAGES, SESSIONS
from flux_migrate.pipeline import orphans_ahead
from flux_migrate.pipeline.orphans_ahead import OrphansAhead, range_orphans
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import load_settings
from flux_migrate.stages.extract import open_source, orphan_rowids
from flux_migrate.stages.extract_sql import source_uri
from tests.test_orphans import _app_db

pytestmark = pytest.mark.anyio

ROWS = 60


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ahead") / "s.sqlite"
    # sessions s0-s4; message n names s<(7n mod 10)>: half of them name an absent session
    _app_db(path, [f"s{i}" for i in range(5)], [], [f"s{(n * 7) % 10}" for n in range(ROWS)])
    return path


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(after=st.integers(-(2**63), ROWS + 2), upto=st.integers(0, ROWS + 2))
async def test_the_set_found_ahead_is_the_one_found_at_the_start(
    source: Path, after: int, upto: int
) -> None:
    """For any bound and any resume point, the orphan rowids taken from the set found ahead
    are exactly those orphan_rowids finds then, the rows of a range outside it left out."""
    ahead = OrphansAhead(source_uri(source), 5.0)
    try:
        ahead.start(MESSAGES, upto)
        found = await ahead.take(MESSAGES, after, upto)
        async with open_source(source) as src:
            want = await orphan_rowids(src, MESSAGES, after, upto)
        assert found is not None and found[0] is not None and want is not None
        assert list(found[0]) == list(want)
        assert all(after < r <= upto for r in want)
        assert await ahead.take(MESSAGES, after, upto) is None, "taken once"
    finally:
        ahead.close()


async def test_a_set_is_taken_only_for_its_bound_and_never_after_close(source: Path) -> None:
    """A bound other than the one found ahead, a table without parents, or a closed finder
    give nothing, and range_orphans then finds the set itself, the same one."""
    ahead = OrphansAhead(source_uri(source), 5.0)
    ahead.start(MESSAGES, ROWS)
    ahead.start(SESSIONS, ROWS)  # no parents: nothing to find ahead
    assert await ahead.take(MESSAGES, 0, ROWS - 1) is None
    assert await ahead.take(SESSIONS, 0, ROWS) is None
    ahead.close()
    closed = OrphansAhead(source_uri(source), 5.0)
    closed.close()
    closed.start(MESSAGES, ROWS)
    assert await closed.take(MESSAGES, 0, ROWS) is None
    async with open_source(source) as src:
        want: Any = await orphan_rowids(src, MESSAGES, 0, ROWS)
        assert want is not None and len(want) == ROWS // 2
        assert list(await range_orphans(src, MESSAGES, 0, ROWS, closed) or ()) == list(want)
        assert list(await range_orphans(src, MESSAGES, 0, ROWS, None) or ()) == list(want)


async def test_a_fresh_run_takes_the_set_found_ahead(
    source: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh run with converter processes reads its child table with the set found ahead
    (no anti-join at the table's start), and quarantines exactly its orphans."""

    async def not_at_the_start(*args: Any) -> Any:
        raise AssertionError("the orphan set was found at the table's start")

    monkeypatch.setattr(orphans_ahead, "orphan_rowids", not_at_the_start)
    settings = load_settings(sqlite_path=source, postgres_dsn=pg_dsn, batch_size=7, workers=2)
    report = await migrate(settings)
    assert report.tables["messages"].loaded == ROWS // 2
    assert report.tables["messages"].quarantined == ROWS // 2


async def test_a_set_found_before_a_write_is_found_again(tmp_path: Path) -> None:
    """A parent the app deletes after the set was found, before the table starts (say while
    the run reads the parents): the set found ahead is not used, and the one found at the
    start has the deleted parent's rows as orphans, so none of them is loaded without it."""
    path = tmp_path / "s.sqlite"
    _app_db(path, [f"s{i}" for i in range(5)], [], [f"s{n % 5}" for n in range(ROWS)])
    ahead = OrphansAhead(source_uri(path), 5.0)
    try:
        ahead.start(MESSAGES, ROWS)
        async with open_source(path) as src:
            before = await orphan_rowids(src, MESSAGES, 0, ROWS)
            assert before is not None and list(before) == []
            ahead._found["messages"][1].result(timeout=10)  # the set is found: none
            app = sqlite3.connect(path)
            app.execute("DELETE FROM sessions WHERE id = 's3'")
            app.commit()
            app.close()
            found = await range_orphans(src, MESSAGES, 0, ROWS, ahead)
        assert found is not None
        assert list(found) == [n + 1 for n in range(ROWS) if n % 5 == 3]
    finally:
        ahead.close()
