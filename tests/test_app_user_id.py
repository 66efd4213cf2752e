"""The app's database in both shapes (with and without sessions.user_id) migrates end to end,
and the app's PostgreSQL memory then shows each user only their own sessions."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from flux_migrate.core.schema import SQLITE_DDL
from flux_migrate.memory.postgres import PostgresMemory
from tests.support import cli, fetchval

pytestmark = pytest.mark.anyio

WITHOUT_USER_ID = SQLITE_DDL.replace(",\n    user_id TEXT DEFAULT ''", "").replace(
    "CREATE INDEX IF NOT EXISTS idx_sessions_user ON sessions(user_id, updated_at);", ""
)
USERS = ("alice", "bob", "")


def _app_db(path: Path, *, with_user_id: bool) -> dict[str, str]:
    """An app database of 12 sessions with 3 messages each; return each session's user_id
    as the source says it ('' where the source has no column)."""
    db = sqlite3.connect(path)
    db.executescript(SQLITE_DDL if with_user_id else WITHOUT_USER_ID)
    owners = {}
    for i in range(12):
        sid = f"s{i:02d}"
        owner = USERS[i % 3] if with_user_id else ""
        stamp = f"2024-03-{i + 1:02d}T10:00:00+00:00"
        if with_user_id:
            db.execute(
                "INSERT INTO sessions (id, title, created_at, updated_at, metadata, user_id)"
                " VALUES (?, ?, ?, ?, '{}', ?)",
                (sid, f"t{i}", stamp, stamp, owner),
            )
        else:
            db.execute(
                "INSERT INTO sessions (id, title, created_at, updated_at, metadata)"
                " VALUES (?, ?, ?, ?, '{}')",
                (sid, f"t{i}", stamp, stamp),
            )
        owners[sid] = owner
        for m in range(3):
            db.execute(
                "INSERT INTO messages VALUES (?, ?, 'user', ?, '{}', ?)",
                (f"{sid}-m{m}", sid, f"hello {m}", stamp),
            )
    db.commit()
    db.close()
    return owners


@pytest.mark.parametrize("with_user_id", [True, False])
async def test_the_app_database_keeps_every_sessions_owner(
    tmp_path: Path, pg_dsn: str, with_user_id: bool
) -> None:
    """run copies each session's user_id (or '' without the column), verify passes, and the
    app's memory lists for a user exactly that user's sessions."""
    path = tmp_path / "chat.sqlite"
    owners = _app_db(path, with_user_id=with_user_id)
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == done.returncode, done.stderr
    loaded = await fetchval(
        pg_dsn, "SELECT json_object_agg(id, user_id ORDER BY id)::text FROM sessions"
    )
    assert owners == json.loads(loaded)
    assert 36 == await fetchval(pg_dsn, "SELECT count(*) FROM messages")
    verified = cli("verify", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == verified.returncode, verified.stdout + verified.stderr
    async with PostgresMemory(pg_dsn, min_size=1, max_size=1) as memory:
        for user in ("alice", "bob"):
            listed = await memory.get_sessions(limit=100, user_id=user)
            expected = sorted(s for s, o in owners.items() if o == user)
            assert expected == sorted(s["id"] for s in listed)
        assert 12 == len(await memory.get_sessions(limit=100))
