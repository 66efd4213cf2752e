"""A target database whose defaults are as unlike PostgreSQL's as a DBA may set them (backslash
escapes in plain strings, another time zone and date style, fewer float digits, bytea printed
escaped, verbose intervals): run, sync and every verify agree with a database of the defaults.

The database's defaults are set with ALTER DATABASE, so every connection flux-migrate opens
gets them; each command must say what it needs on its own connections."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import anyio
import asyncpg
import pytest

from flux_migrate.core.target import Target, connect
from tests.support import cli

pytestmark = pytest.mark.anyio

HOSTILE = {
    "standard_conforming_strings": "off",
    "TimeZone": "Pacific/Chatham",
    "DateStyle": "SQL, DMY",
    "extra_float_digits": "0",
    "bytea_output": "escape",
    "IntervalStyle": "postgres_verbose",
}
VERIFIES = (("verify",), ("verify", "--quick"), ("verify", "--workers", "2"), ("verify", "--api"))


async def _set_defaults(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        name = await conn.fetchval("SELECT current_database()")
        for setting, value in HOSTILE.items():
            await conn.execute(f"ALTER DATABASE \"{name}\" SET {setting} = '{value}'")
    finally:
        await conn.close()


def _edit(path: Path) -> None:
    """Text with backslashes and quotes, a fraction of a second and a changed title."""
    db = sqlite3.connect(path)
    sid = db.execute("SELECT id FROM sessions ORDER BY rowid LIMIT 1").fetchone()[0]
    metadata = json.dumps({"path": "C:\\new\\x00", "q": 'say "hi"', "n": 0.1})
    db.execute(
        "UPDATE messages SET content = content || ?, metadata = ?,"
        " created_at = '2024-03-01T10:00:00.123456+00:00' WHERE session_id = ?",
        (" C:\\new\\x00 it's", metadata, sid),
    )
    db.execute("UPDATE sessions SET title = 'back\\slash ''quoted''' WHERE id = ?", (sid,))
    db.commit()
    db.close()


async def test_every_command_agrees_under_a_hostile_database_default(
    tmp_path: Path, sample_db: Path, pg_dsn: str
) -> None:
    source = tmp_path / "chat.sqlite"
    shutil.copy(sample_db, source)
    _edit(source)
    await _set_defaults(pg_dsn)
    where = ("--sqlite-path", str(source), "--postgres-dsn", pg_dsn)
    done = cli("run", *where)
    assert 0 == done.returncode, done.stdout + done.stderr
    for form in VERIFIES:
        done = cli(*form, *where)
        assert 0 == done.returncode, (form, done.stdout + done.stderr)
    _edit(source)  # the same rows changed again: sync updates them
    db = sqlite3.connect(source)
    db.execute("UPDATE messages SET content = content || ' again' WHERE rowid % 7 = 0")
    db.commit()
    db.close()
    done = cli("sync", *where)
    assert 0 == done.returncode, done.stdout + done.stderr
    for form in VERIFIES:
        done = cli(*form, *where)
        assert 0 == done.returncode, (form, done.stdout + done.stderr)
    conn = await asyncpg.connect(pg_dsn)  # one value changed in PostgreSQL: all must see it
    try:
        await conn.execute(
            "UPDATE messages SET content = content || 'x' WHERE id = (SELECT min(id) FROM messages)"
        )
    finally:
        await conn.close()
    for form in VERIFIES:
        done = cli(*form, *where)
        assert 1 == done.returncode, (form, done.stdout + done.stderr)


async def test_own_connections_undo_the_database_timeouts(pg_dsn: str) -> None:
    """A statement or idle-in-transaction timeout set for the app's queries does not cancel
    flux-migrate's own statements (a batch, a key build, verify's aggregate), on the loader's
    connection and on the others alike, as pg_dump's sessions do."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f"ALTER DATABASE \"{name}\" SET statement_timeout = '100ms'")
        await conn.execute(
            f"ALTER DATABASE \"{name}\" SET idle_in_transaction_session_timeout = '100ms'"
        )
    finally:
        await conn.close()
    plain = await asyncpg.connect(pg_dsn)  # the app's connection keeps the database's default
    try:
        with pytest.raises(asyncpg.QueryCanceledError):
            await plain.execute("SELECT pg_sleep(0.3)")
    finally:
        await plain.close()
    target = Target(pg_dsn)
    own = [await connect(pg_dsn), await target.conn()]
    try:
        for conn in own:
            await conn.execute("SELECT pg_sleep(0.3)")
            async with conn.transaction():
                await anyio.sleep(0.3)
                assert 1 == await conn.fetchval("SELECT 1")
    finally:
        await own[0].close()
        await target.close()
