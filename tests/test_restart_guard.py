"""`run --restart --yes` never deletes what someone else wrote into the tables it filled."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from flux_migrate.pipeline.sample import generate
from tests.support import cli, fetchval, source_rows, target_rows

pytestmark = pytest.mark.anyio


def _run(path: Path, dsn: str, *extra: str) -> tuple[int, str]:
    """Exit code and the error sentence (or all of stderr) of one `run`."""
    done = cli(
        "run", "--sqlite-path", str(path), "--postgres-dsn", dsn, "--log-format", "json", *extra
    )
    errors = [
        json.loads(line).get("error") for line in done.stderr.splitlines() if '"error"' in line
    ]
    return done.returncode, errors[-1] if errors else done.stderr


async def _exec(dsn: str, sql: str, *args: object) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def test_restart_refuses_when_the_app_inserted_a_session(tmp_path: Path, pg_dsn: str) -> None:
    """A session the app wrote after switching survives: restart exits 2 naming the count."""
    path = generate(tmp_path / "app.sqlite", sessions=20, messages_per_session=3)
    assert 0 == _run(path, pg_dsn)[0]
    app_id = str(uuid.uuid4())
    await _exec(
        pg_dsn,
        "INSERT INTO sessions (id, title, created_at, updated_at, metadata)"
        " VALUES ($1, 'written by the app', now(), now(), '{}')",
        app_id,
    )
    code, err = _run(path, pg_dsn, "--restart", "--yes")
    assert 2 == code
    assert '--restart would delete 1 row(s) of "public"."sessions"' in err
    assert "written by the app" == await fetchval(
        pg_dsn, "SELECT title FROM sessions WHERE id = $1", app_id
    )
    assert 21 == await fetchval(pg_dsn, "SELECT count(*) FROM sessions")


async def test_restart_refuses_when_the_app_updated_a_migrated_row(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A title the app changed in PostgreSQL is another's write too: restart refuses, keeps it."""
    path = generate(tmp_path / "app.sqlite", sessions=20, messages_per_session=3)
    assert 0 == _run(path, pg_dsn)[0]
    await _exec(
        pg_dsn, "UPDATE messages SET content = 'edited' WHERE id = (SELECT min(id) FROM messages)"
    )
    code, err = _run(path, pg_dsn, "--restart", "--yes")
    assert 2 == code
    assert '1 row(s) of "public"."messages"' in err
    assert 1 == await fetchval(pg_dsn, "SELECT count(*) FROM messages WHERE content = 'edited'")


async def test_restart_of_an_untouched_target_reloads_it_exactly(
    tmp_path: Path, pg_dsn: str
) -> None:
    """With nothing written by others (two runs of flux-migrate only), restart still works."""
    path = generate(tmp_path / "app.sqlite", sessions=20, messages_per_session=3)
    assert 0 == _run(path, pg_dsn)[0]
    assert 0 == _run(path, pg_dsn)[0]
    code, err = _run(path, pg_dsn, "--restart", "--yes")
    assert 0 == code, err
    for table in ("sessions", "messages"):
        assert source_rows(path, table) == await target_rows(pg_dsn, table)
