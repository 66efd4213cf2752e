"""Where the app's own class answers differently from ours, ours now answers like it (issue 21,
cases 6, 7, 8, 10 and 11), on both backends, and ``run`` migrates what the app stored."""

from __future__ import annotations

import base64
import json
import math
import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_migrate.core.schema import SQLITE_DDL
from flux_migrate.memory import PostgresMemory, SessionNotFoundError, SQLiteMemory
from flux_migrate.memory import postgres as pg_backend
from flux_migrate.memory import sqlite as sqlite_backend
from tests.support import cli, fetchval

pytestmark = pytest.mark.anyio

AnyMemory = SQLiteMemory | PostgresMemory


@pytest.fixture(params=["sqlite", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """Which backend, and where: a SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "memory.sqlite")
    return "postgres", request.getfixturevalue("pg_dsn")


@pytest.fixture
async def mem(where: tuple[str, str]) -> AsyncIterator[AnyMemory]:
    """A ready memory on each backend, closed after the test."""
    kind, location = where
    memory: AnyMemory
    if kind == "sqlite":
        memory = SQLiteMemory(location)
    else:
        memory = PostgresMemory(location, min_size=1, max_size=2)
    async with memory:
        yield memory


def _same(a: Any, b: Any) -> bool:
    """Equal by value and type, floats by their bits (1e16 is not 10**16, -0.0 not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a.hex() == b.hex()
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


async def test_messages_stamped_in_one_tick_come_back_in_insertion_order(
    mem: AnyMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user turn and its reply with the same created_at keep their order, whatever their
    ids (case 10); the newest-N window cuts by that order too."""
    tick = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    monkeypatch.setattr(pg_backend, "now", lambda: tick)
    monkeypatch.setattr(sqlite_backend, "now", lambda: tick)
    session_id = await mem.create_session("same tick")
    sent = [await mem.add_message(session_id, "user", f"m{i}") for i in range(12)]
    assert sent == [m["id"] for m in await mem.get_history(session_id, limit=-1)]
    assert sent[-10:] == [m["id"] for m in await mem.get_history(session_id)]
    assert sent[-3:] == [m["id"] for m in await mem.get_history(session_id, limit=3)]


@pytest.mark.parametrize("bad", ["\x00", "abc\x00", "\x00" + "0" * 40])
async def test_a_nul_in_an_id_matches_nothing(mem: AnyMemory, bad: str) -> None:
    """A session_id or user_id with a NUL: None, [] or nothing, as the app's class (case 11);
    adding a message to it is the documented SessionNotFoundError."""
    kept = await mem.create_session("kept", user_id="alice")
    assert await mem.get_session(bad) is None
    assert [] == await mem.get_history(bad)
    assert [] == await mem.get_sessions(user_id=bad)
    await mem.update_session_title(bad, "x")
    await mem.delete_session(bad)
    with pytest.raises(SessionNotFoundError):
        await mem.add_message(bad, "user", "x")
    assert ["kept"] == [s["title"] for s in await mem.get_sessions()]
    assert kept == (await mem.get_session(kept) or {}).get("id")


async def test_literal_backslash_u0000_text_is_stored_and_returned(mem: AnyMemory) -> None:
    """The six characters \\u0000 in metadata are text, not a NUL: stored and returned."""
    metadata = {"note": "\\u0000", "path": "C:\\\\u0000x", "k\\u0000": ["\\\\u0000"]}
    session_id = await mem.create_session("t", metadata)
    await mem.add_message(session_id, "user", "x", metadata)
    assert metadata == (await mem.get_session(session_id) or {}).get("metadata")
    assert [metadata] == [m["metadata"] for m in await mem.get_history(session_id)]


@pytest.mark.parametrize("bad", [{"a": "\ud800"}, {"\udc00": 1}, {"a": ["x\udfff"]}])
async def test_a_lone_surrogate_in_metadata_is_a_value_error(
    mem: AnyMemory, bad: dict[str, Any]
) -> None:
    """A lone surrogate, which PostgreSQL cannot store, is the documented ValueError on both
    backends, with nothing written, never a driver error (case 11)."""
    with pytest.raises(ValueError, match="lone surrogate"):
        await mem.create_session("t", bad)
    session_id = await mem.create_session("t")
    with pytest.raises(ValueError, match="lone surrogate"):
        await mem.add_message(session_id, "user", "x", bad)
    assert [] == await mem.get_history(session_id)
    assert 1 == await mem.count_sessions()


_finite = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != 0.0)
_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=5)
_metadata = st.dictionaries(
    _text, st.one_of(_finite, st.integers(-(10**30), 10**30), _text), max_size=5
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(metadata=_metadata)
async def test_metadata_values_come_back_with_their_types(
    mem: AnyMemory, metadata: dict[str, Any]
) -> None:
    """Any float (1e16, 1.5e300, 5e-324) comes back as that float, any int as that int, on
    both backends (case 8); keys come back in the app's order on SQLite and in jsonb's
    documented order on PostgreSQL."""
    session_id = await mem.create_session("m", metadata)
    stored = (await mem.get_session(session_id) or {}).get("metadata")
    assert isinstance(stored, dict)
    if isinstance(mem, PostgresMemory):  # the documented canonical key order
        stored = {k: stored[k] for k in metadata}
    assert _same(metadata, stored)


async def test_the_floats_of_case_8_and_negative_zero(mem: AnyMemory) -> None:
    """1e16 and 1.5e300 are floats, 10**16 an int; -0.0 reads as -0.0 on SQLite and as the
    documented 0.0 on PostgreSQL (jsonb's numbers have no negative zero)."""
    metadata = {"a": 1e16, "b": 1.5e300, "c": 10**16, "d": -0.0, "e": [1e-7, 2e22]}
    session_id = await mem.create_session("floats", metadata)
    stored = (await mem.get_session(session_id) or {}).get("metadata", {})
    for key in ("a", "b", "c", "e"):
        assert _same(metadata[key], stored[key])
    expected_sign = 1.0 if isinstance(mem, PostgresMemory) else -1.0
    assert (float, expected_sign) == (type(stored["d"]), math.copysign(1.0, stored["d"]))


async def test_a_user_id_of_any_length_is_accepted(mem: AnyMemory) -> None:
    """A 20 KB user_id that does not compress: created, listed by that user, never a
    ProgramLimitExceeded (case 6)."""
    long_user = _incompressible(20_000)
    session_id = await mem.create_session("long", user_id=long_user)
    await mem.create_session("other", user_id=long_user[:-1])
    assert [session_id] == [s["id"] for s in await mem.get_sessions(user_id=long_user)]
    assert (await mem.health())["ok"] is True


def _incompressible(length: int) -> str:
    """Random text of ``length`` characters (a repeated letter would compress below the
    index's limit and hide the problem)."""
    return base64.b64encode(os.urandom(length))[:length].decode("ascii")


def _app_db(path: Path, rows: list[tuple[str, str | None, str]]) -> None:
    """An app database with sessions (id, user_id, metadata) and one message each."""
    with sqlite3.connect(path) as db:
        db.executescript(SQLITE_DDL)
        for sid, user, metadata in rows:
            stamp = "2024-03-01T10:00:00+00:00"
            db.execute(
                "INSERT INTO sessions (id, title, created_at, updated_at, metadata, user_id)"
                " VALUES (?, 't', ?, ?, ?, ?)",
                (sid, stamp, stamp, metadata, user),
            )
            db.execute(
                "INSERT INTO messages VALUES (?, ?, 'user', 'hi', ?, ?)",
                (f"{sid}-m", sid, metadata, stamp),
            )


async def test_run_migrates_null_and_long_user_ids_and_floats(tmp_path: Path, pg_dsn: str) -> None:
    """run loads sessions with a NULL user_id as '' (the app reads them alike), a 10 KB
    user_id, and metadata floats as floats: exit 0, nothing quarantined, verify passes, and
    the memory answers for them (cases 6, 7, 8)."""
    path = tmp_path / "memory.db"
    long_user = _incompressible(10_000)
    _app_db(
        path,
        [
            ("s-null", None, "{}"),
            ("s-long", long_user, "{}"),
            ("s-empty", "", json.dumps({"big": 1e16, "huge": 1.5e300, "int": 10**16})),
        ],
    )
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == done.returncode, done.stderr
    assert 0 == await fetchval(pg_dsn, "SELECT count(*) FROM flux_migrate.quarantine")
    verified = cli("verify", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == verified.returncode, verified.stdout + verified.stderr
    async with PostgresMemory(pg_dsn, min_size=1, max_size=1) as memory:
        assert 3 == len(await memory.get_sessions())
        assert ["s-long"] == [s["id"] for s in await memory.get_sessions(user_id=long_user)]
        expected = {"big": 1e16, "huge": 1.5e300, "int": 10**16}
        stored = (await memory.get_session("s-empty") or {})["metadata"]
        assert _same(expected, {k: stored[k] for k in expected})  # keys: jsonb's order
        [message] = await memory.get_history("s-empty")
        assert _same(stored, message["metadata"])
    assert "" == await fetchval(pg_dsn, "SELECT user_id FROM sessions WHERE id = 's-null'")


_EARLIER_RELEASE = (
    "DROP INDEX idx_sessions_user_md5",
    "CREATE INDEX idx_sessions_user ON sessions (user_id, updated_at)",
    "ALTER TABLE messages DROP COLUMN seq",
)


async def test_tables_of_an_earlier_release_are_brought_up_to_date(pg_dsn: str) -> None:
    """Tables made by an earlier release (the (user_id, updated_at) index, no messages.seq):
    the memory drops that index, builds the md5 one and adds seq on open, keeping the rows;
    then a long user_id and same-tick ordering work (cases 6, 10)."""
    async with PostgresMemory(pg_dsn, min_size=1, max_size=1) as memory:
        kept = await memory.create_session("kept")
        await memory.add_message(kept, "user", "old")
    for statement in _EARLIER_RELEASE:
        await fetchval(pg_dsn, statement)
    long_user = _incompressible(12_000)
    async with PostgresMemory(pg_dsn, min_size=1, max_size=1) as memory:
        session_id = await memory.create_session("long", user_id=long_user)
        assert [session_id] == [s["id"] for s in await memory.get_sessions(user_id=long_user)]
        assert ["old"] == [m["content"] for m in await memory.get_history(kept)]
    indexes = await fetchval(
        pg_dsn,
        "SELECT array_agg(indexname ORDER BY indexname) FROM pg_indexes"
        " WHERE tablename = 'sessions'",
    )
    assert ["idx_sessions_user_md5", "sessions_pkey"] == indexes


async def test_run_brings_an_earlier_releases_empty_target_up_to_date(
    tmp_path: Path, pg_dsn: str
) -> None:
    """run into empty tables of an earlier release loads a long user_id (the old index is
    dropped, the md5 one built) and fills messages.seq in source order (cases 6, 10)."""
    async with PostgresMemory(pg_dsn, min_size=1, max_size=1) as memory:
        await memory.count_sessions()
    for statement in _EARLIER_RELEASE:
        await fetchval(pg_dsn, statement)
    path = tmp_path / "memory.db"
    long_user = _incompressible(10_000)
    _app_db(path, [("s1", long_user, "{}")])
    with sqlite3.connect(path) as db:  # two more messages in the same tick, ids in reverse
        stamp = "2024-03-01T10:00:00+00:00"
        for message_id in ("zz", "aa"):
            db.execute(
                "INSERT INTO messages VALUES (?, 's1', 'user', ?, '{}', ?)",
                (message_id, message_id, stamp),
            )
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == done.returncode, done.stderr
    async with PostgresMemory(pg_dsn, min_size=1, max_size=1) as memory:
        assert ["s1"] == [s["id"] for s in await memory.get_sessions(user_id=long_user)]
        assert ["s1-m", "zz", "aa"] == [m["id"] for m in await memory.get_history("s1")]
