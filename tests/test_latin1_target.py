"""A target database whose encoding cannot hold every character the source holds."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from flux_migrate.pipeline.settings import load_settings
from flux_migrate.pipeline.verify import verify_rows
from tests.conftest import _admin, with_database
from tests.dirty import app_db
from tests.support import cli

pytestmark = pytest.mark.anyio


@pytest.fixture
def latin1_dsn(pg_server_dsn: str) -> Iterator[str]:
    """A brand-new LATIN1 database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    asyncio.run(
        _admin(
            pg_server_dsn,
            f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
            " TEMPLATE template0",
        )
    )
    try:
        yield with_database(pg_server_dsn, name)
    finally:
        asyncio.run(_admin(pg_server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_a_character_latin1_cannot_hold_quarantines_its_row_and_the_run_finishes(
    tmp_path: Path, latin1_dsn: str
) -> None:
    """On a LATIN1 target, the rows holding an emoji are quarantined (rejected_by_server), the
    others load and verify, the run exits 3, and a rerun exits 3 again."""
    db = app_db(tmp_path / "app.sqlite", good_sessions=0, messages_each=0)
    plain = db.session(title="café")
    emoji = db.session(title="hello 👋")
    db.message(plain["id"], content="crème brûlée")
    db.message(plain["id"], content="rocket 🚀")
    db.write()
    args = ("run", "--sqlite-path", str(db.path), "--postgres-dsn", latin1_dsn)
    first = cli(*args)
    second = cli(*args)
    assert (3, 3) == (first.returncode, second.returncode), first.stderr + second.stderr
    rows = asyncio.run(_rows(latin1_dsn))
    expected = (["café"], ["crème brûlée"], [("rejected_by_server", emoji["id"])])
    assert expected == (rows[0], rows[1], [r for r in rows[2] if r[0] != "orphan_message"])
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=latin1_dsn)
    verified = asyncio.run(verify_rows(settings))
    assert [(1, 1, True), (1, 1, True)] == [(r.matched, r.quarantined, r.ok) for r in verified]


async def _rows(dsn: str) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    conn = await asyncpg.connect(dsn)
    try:
        titles = [r[0] for r in await conn.fetch("SELECT title FROM sessions")]
        contents = [r[0] for r in await conn.fetch("SELECT content FROM messages")]
        reasons = [
            (r[0], r[1])
            for r in await conn.fetch(
                "SELECT reason, source_key FROM flux_migrate.quarantine"
                " WHERE source_table = 'sessions' ORDER BY source_key"
            )
        ]
        return titles, contents, reasons
    finally:
        await conn.close()
