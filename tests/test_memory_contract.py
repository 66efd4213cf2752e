"""One contract for the app's memory, run against SQLite and the real test PostgreSQL."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest

from flux_migrate.core.errors import ConfigError, TargetError
from flux_migrate.core.schema import TargetNames, constraints
from flux_migrate.memory import (
    MemorySettings,
    PostgresMemory,
    SessionNotFoundError,
    SQLiteMemory,
    create_memory,
)

pytestmark = pytest.mark.anyio

AnyMemory = SQLiteMemory | PostgresMemory

UNICODE_TEXTS = [
    "emoji 🙂🚀👍🏽 family 👩‍👩‍👧 flag 🇯🇵",
    "CJK 東京の天気 数据库迁移 한국어",
    "RTL مرحبا بالعالم שלום עולם",
    "combining e\u0301 a\u0308 n\u0303 (not normalized)",
    "mixed\ttabs\nnewlines \u200b zero-width, 'quotes' \"double\" \\backslash; DROP TABLE x;--",
]

NESTED_METADATA: dict[str, Any] = {
    "model": "gpt-4o",
    "tokens": {"prompt": 12, "completion": 340, "ratio": 0.25, "negative": -7},
    "tools": [{"name": "search", "args": {"q": "東京"}}, [], [1, 2.5, None, True, False, "x"]],
    "flags": {"streamed": True, "cached": False, "error": None},
    "empty": {},
    "emoji key 🙂": "value ✓",
    "big": 9007199254740993,
    "small": 1e-7,
}


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """Which backend, and where: a SQLite file in tmp_path or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "memory.sqlite")
    return "postgres", request.getfixturevalue("pg_dsn")


def make_memory(backend: tuple[str, str], **kwargs: Any) -> AnyMemory:
    kind, where = backend
    if kind == "sqlite":
        return SQLiteMemory(where, **kwargs)
    return PostgresMemory(where, min_size=1, max_size=10, **kwargs)


@pytest.fixture
async def mem(backend: tuple[str, str]) -> AsyncIterator[AnyMemory]:
    """A ready memory on the parametrized backend, closed after the test."""
    async with make_memory(backend) as memory:
        yield memory


async def stored_count(memory: AnyMemory, table: str) -> int:
    """Rows in a table, read beside the API (so a cascade is seen in storage, not inferred)."""
    if isinstance(memory, SQLiteMemory):
        with sqlite3.connect(memory.path) as conn:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    assert memory.pool is not None
    async with memory.pool.acquire() as conn:
        return int(await conn.fetchval(f"SELECT count(*) FROM {memory.names.qualified(table)}"))


async def force_updated_at(memory: AnyMemory, session_id: str, when: datetime) -> None:
    """Set a session's updated_at behind the API's back, to make ties."""
    if isinstance(memory, SQLiteMemory):
        with sqlite3.connect(memory.path) as conn:
            conn.execute(
                "UPDATE sessions SET updated_at = ? WHERE id = ?", (when.isoformat(), session_id)
            )
        return
    assert memory.pool is not None
    async with memory.pool.acquire() as conn:
        await conn.execute(
            f"UPDATE {memory.names.qualified('sessions')} SET updated_at = $1 WHERE id = $2",
            when,
            session_id,
        )


def parse(ts: str) -> datetime:
    value = datetime.fromisoformat(ts)
    offset = value.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    return value


# ------------------------------------------------------------------ sessions


async def test_create_session_returns_uuid_and_reads_back(mem: AnyMemory) -> None:
    """A new session reads back with its title, metadata, UTC ISO timestamps and no messages."""
    before = datetime.now(UTC)
    session_id = await mem.create_session("Trip planning", {"lang": "en"})
    after = datetime.now(UTC)
    assert uuid.UUID(session_id).version == 4
    session = await mem.get_session(session_id)
    assert session is not None
    assert {"id": session_id, "title": "Trip planning", "metadata": {"lang": "en"}} == {
        k: session[k] for k in ("id", "title", "metadata")
    }
    assert ["id", "title", "created_at", "updated_at", "metadata"] == list(session)
    assert session["created_at"] == session["updated_at"]
    assert session["created_at"] == parse(session["created_at"]).isoformat()
    assert before <= parse(session["created_at"]) <= after


async def test_create_session_defaults(mem: AnyMemory) -> None:
    """Without arguments a session has an empty title and empty metadata."""
    session = await mem.get_session(await mem.create_session())
    assert session is not None
    assert (session["title"], session["metadata"]) == ("", {})


async def test_get_session_missing_is_none(mem: AnyMemory) -> None:
    """Reading a session that does not exist gives None, and its history is empty."""
    assert await mem.get_session(str(uuid.uuid4())) is None
    assert await mem.get_history(str(uuid.uuid4())) == []


async def test_update_session_title_moves_updated_at(mem: AnyMemory) -> None:
    """Renaming a session changes its title and moves updated_at forward, not created_at."""
    session_id = await mem.create_session("old")
    before = await mem.get_session(session_id)
    await mem.update_session_title(session_id, "new 🙂")
    after = await mem.get_session(session_id)
    assert before is not None and after is not None
    assert after["title"] == "new 🙂"
    assert before["created_at"] == after["created_at"]
    assert parse(after["updated_at"]) > parse(before["updated_at"])


async def test_orphan_add_message_raises_and_writes_nothing(mem: AnyMemory) -> None:
    """add_message on a missing session raises SessionNotFoundError and stores no orphan."""
    ghost = str(uuid.uuid4())
    with pytest.raises(SessionNotFoundError) as info:
        await mem.add_message(ghost, "user", "hello")
    assert ghost == info.value.session_id
    assert isinstance(info.value, LookupError)
    assert (0, 0) == (await stored_count(mem, "messages"), await mem.count_sessions())


async def test_update_title_of_missing_session_does_nothing(mem: AnyMemory) -> None:
    """update_session_title on a missing session returns None and creates nothing, as the app."""
    assert await mem.update_session_title(str(uuid.uuid4()), "title") is None
    assert 0 == await mem.count_sessions()


async def test_delete_session_cascades_to_messages(mem: AnyMemory) -> None:
    """Deleting a session removes its messages from storage and leaves other sessions alone."""
    doomed = await mem.create_session("doomed")
    kept = await mem.create_session("kept")
    for i in range(3):
        await mem.add_message(doomed, "user", f"m{i}")
    await mem.add_message(kept, "user", "stay")
    assert await mem.delete_session(doomed) is None
    assert await mem.get_session(doomed) is None
    assert await stored_count(mem, "messages") == 1
    assert [m["content"] for m in await mem.get_history(kept)] == ["stay"]


async def test_delete_missing_session_returns_none(mem: AnyMemory) -> None:
    """Deleting a session that does not exist is a no-op that returns None, as the app's."""
    session_id = await mem.create_session()
    assert await mem.delete_session(str(uuid.uuid4())) is None
    assert await mem.count_sessions() == 1
    await mem.delete_session(session_id)
    assert await mem.delete_session(session_id) is None
    assert await mem.count_sessions() == 0


async def test_count_and_clear_all(mem: AnyMemory) -> None:
    """count_sessions counts sessions; clear_all removes every session and message."""
    for i in range(4):
        await mem.add_message(await mem.create_session(f"s{i}"), "user", "hi")
    assert await mem.count_sessions() == 4
    await mem.clear_all()
    assert (await mem.count_sessions(), await stored_count(mem, "messages")) == (0, 0)


# ------------------------------------------------------------------ messages and ordering


async def test_add_message_reads_back_and_touches_session(mem: AnyMemory) -> None:
    """A message reads back whole, and the session's updated_at becomes its created_at."""
    session_id = await mem.create_session("chat")
    message_id = await mem.add_message(session_id, "assistant", "Hello!", {"model": "m"})
    assert uuid.UUID(message_id).version == 4
    [message] = await mem.get_history(session_id)
    assert {
        "id": message_id,
        "role": "assistant",
        "content": "Hello!",
        "metadata": {"model": "m"},
    } == {k: v for k, v in message.items() if k != "created_at"}
    assert ["id", "role", "content", "metadata", "created_at"] == list(message)
    [listed] = await mem.get_sessions()
    assert (message["created_at"], 1) == (listed["updated_at"], listed["message_count"])


async def test_history_is_last_n_oldest_first(mem: AnyMemory) -> None:
    """get_history returns the last `limit` messages, oldest first; as the app's class, limit 0
    is the default window and a negative limit every message."""
    session_id = await mem.create_session()
    for i in range(8):
        await mem.add_message(session_id, "user" if i % 2 == 0 else "assistant", f"m{i}")
    assert [m["content"] for m in await mem.get_history(session_id, limit=3)] == ["m5", "m6", "m7"]
    assert [f"m{i}" for i in range(8)] == [
        m["content"] for m in await mem.get_history(session_id, 100)
    ]
    assert await mem.get_history(session_id, limit=0) == await mem.get_history(session_id)
    assert 8 == len(await mem.get_history(session_id, limit=-1))
    history = await mem.get_history(session_id)
    stamps = [parse(m["created_at"]) for m in history]
    assert stamps == sorted(stamps)
    with pytest.raises(ValueError):
        await mem.get_history(session_id, limit=2**63)


async def test_history_default_limit_from_settings(backend: tuple[str, str]) -> None:
    """Without a limit, get_history returns max_history * 2 = 10 messages, the app's default."""
    async with make_memory(backend) as memory:
        assert memory.default_history_limit == 10
        session_id = await memory.create_session()
        for i in range(23):
            await memory.add_message(session_id, "user", f"m{i}")
        assert [f"m{i}" for i in range(13, 23)] == [
            m["content"] for m in await memory.get_history(session_id)
        ]
    async with make_memory(backend, default_history_limit=5) as memory:
        assert [f"m{i}" for i in range(18, 23)] == [
            m["content"] for m in await memory.get_history(session_id)
        ]


async def test_sessions_most_recently_updated_first(mem: AnyMemory) -> None:
    """get_sessions lists the most recently updated session first, with message counts."""
    first = await mem.create_session("first")
    second = await mem.create_session("second")
    third = await mem.create_session("third")
    await mem.add_message(first, "user", "bump")
    await mem.add_message(first, "user", "bump again")
    sessions = await mem.get_sessions()
    assert [first, third, second] == [s["id"] for s in sessions]
    assert [s["message_count"] for s in sessions] == [2, 0, 0]
    assert {"id", "title", "created_at", "updated_at", "metadata", "message_count"} == set(
        sessions[0]
    )


async def test_sessions_paging_with_offset(mem: AnyMemory) -> None:
    """Pages of get_sessions concatenate to the full list without repeats or gaps."""
    ids = [await mem.create_session(f"s{i}") for i in range(7)]
    full = [s["id"] for s in await mem.get_sessions(limit=50)]
    assert list(reversed(ids)) == full
    pages = [[s["id"] for s in await mem.get_sessions(limit=3, offset=o)] for o in (0, 3, 6, 9)]
    assert [len(p) for p in pages] == [3, 3, 1, 0]
    assert full == [i for page in pages for i in page]
    assert await mem.get_sessions(limit=0) == []
    # As the app's SQLite: a negative offset counts as 0, a negative limit means no limit.
    assert full == [s["id"] for s in await mem.get_sessions(offset=-1)]
    assert full == [s["id"] for s in await mem.get_sessions(limit=-1)]


async def test_ties_break_by_id(mem: AnyMemory) -> None:
    """Sessions with the same updated_at come out in id order, the same on both backends."""
    ids = [await mem.create_session() for _ in range(5)]
    same = datetime(2030, 1, 1, tzinfo=UTC)
    for session_id in ids:
        await force_updated_at(mem, session_id, same)
    listed = [s["id"] for s in await mem.get_sessions()]
    assert sorted(ids) == listed
    assert sorted(ids)[2:4] == [s["id"] for s in await mem.get_sessions(limit=2, offset=2)]


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("text", UNICODE_TEXTS)
async def test_unicode_round_trips_exactly(mem: AnyMemory, text: str) -> None:
    """Titles, content and metadata keep every code point, unnormalized."""
    session_id = await mem.create_session(text, {text: text})
    await mem.add_message(session_id, "user", text, {"list": [text]})
    session = await mem.get_session(session_id)
    [message] = await mem.get_history(session_id)
    assert session is not None
    assert (text, {text: text}) == (session["title"], session["metadata"])
    assert (text, {"list": [text]}) == (message["content"], message["metadata"])


async def test_metadata_round_trips_as_dicts(mem: AnyMemory) -> None:
    """Nested dicts, lists, numbers, booleans and null come back equal, as dicts."""
    session_id = await mem.create_session("m", NESTED_METADATA)
    await mem.add_message(session_id, "assistant", "x", NESTED_METADATA)
    session = await mem.get_session(session_id)
    [message] = await mem.get_history(session_id)
    assert session is not None
    assert session["metadata"] == NESTED_METADATA
    assert message["metadata"] == NESTED_METADATA
    assert (await mem.get_sessions())[0]["metadata"] == NESTED_METADATA


@pytest.mark.parametrize("bad", ['{"a": 1}', ["a"], 42])
async def test_metadata_that_is_not_a_dict_is_refused(mem: AnyMemory, bad: Any) -> None:
    """A str (which jsonb would store as a JSON string), a list or a number is a TypeError."""
    session_id = await mem.create_session()
    with pytest.raises(TypeError):
        await mem.create_session("t", bad)
    with pytest.raises(TypeError):
        await mem.add_message(session_id, "user", "x", bad)
    assert (await mem.count_sessions(), await stored_count(mem, "messages")) == (1, 0)


async def test_values_postgres_cannot_store_are_refused_on_both(mem: AnyMemory) -> None:
    """NUL in text or metadata, and NaN in metadata, are a ValueError on both backends."""
    session_id = await mem.create_session()
    with pytest.raises(ValueError):
        await mem.add_message(session_id, "user", "a\x00b")
    with pytest.raises(ValueError):
        await mem.add_message(session_id, "user", "x", {"k": "a\x00b"})
    with pytest.raises(ValueError):
        await mem.create_session("t", {"n": float("nan")})
    with pytest.raises(ValueError):
        await mem.update_session_title(session_id, "a\x00")
    assert await stored_count(mem, "messages") == 0


# ------------------------------------------------------------------ concurrency and lifecycle


async def test_concurrent_add_message_keeps_all_and_latest_updated_at(mem: AnyMemory) -> None:
    """50 concurrent add_message calls on one session store 50 rows; updated_at is the latest."""
    session_id = await mem.create_session("busy")
    ids: list[str] = []

    async def add(i: int) -> None:
        ids.append(await mem.add_message(session_id, "user", f"m{i}", {"i": i}))

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(add, i)
    history = await mem.get_history(session_id, limit=100)
    [session] = await mem.get_sessions()
    assert sorted(ids) == sorted(m["id"] for m in history)
    assert 50 == session["message_count"] == await stored_count(mem, "messages")
    latest = max(parse(m["created_at"]) for m in history)
    assert latest == parse(session["updated_at"])
    assert history[-1]["created_at"] == session["updated_at"]


async def test_close_releases_and_next_call_reopens(backend: tuple[str, str]) -> None:
    """Leaving `async with` closes the connection; the same object opens again on next use."""
    memory = make_memory(backend)
    async with memory:
        session_id = await memory.create_session("kept")
    assert memory.is_open is False
    session = await memory.get_session(session_id)
    await memory.close()
    assert session is not None and session["title"] == "kept"


# ------------------------------------------------------------------ PostgreSQL only


async def test_pool_size_never_exceeds_max(pg_dsn: str) -> None:
    """Under 30 concurrent calls the pool grows to max_size and no further, server-side too."""
    seen: list[int] = []
    async with PostgresMemory(pg_dsn, min_size=1, max_size=3) as memory:
        assert memory.pool is not None
        session_id = await memory.create_session()
        done = anyio.Event()

        async def watch() -> None:
            while not done.is_set():
                seen.append(memory.pool.get_size())  # type: ignore[union-attr]
                await anyio.lowlevel.checkpoint()

        async def call(i: int) -> None:
            await memory.add_message(session_id, "user", f"m{i}")
            await memory.get_history(session_id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with anyio.create_task_group() as calls:
                for i in range(30):
                    calls.start_soon(call, i)
            done.set()
        admin = await asyncpg.connect(pg_dsn)
        try:
            on_server = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'flux-migrate memory'"
            )
        finally:
            await admin.close()
        assert (await memory.get_sessions())[0]["message_count"] == 30
    assert max(seen) == 3  # it grew under load, and never past max_size
    assert 1 <= on_server <= 3


async def test_postgres_creates_schema_with_keys_idempotently(pg_dsn: str) -> None:
    """The backend creates the pipeline's tables, keys and index, and reopening changes nothing."""
    names = TargetNames(schema="app")
    async with PostgresMemory(pg_dsn, names=names) as memory:
        await memory.create_session("one")
    async with PostgresMemory(pg_dsn, schema="app") as memory:
        assert await memory.count_sessions() == 1
    conn = await asyncpg.connect(pg_dsn)
    try:
        found = {
            r[0]
            for r in await conn.fetch(
                "SELECT conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
                " WHERE n.nspname = 'app'"
                " UNION SELECT indexname FROM pg_indexes WHERE schemaname = 'app'"
            )
        }
        types = dict(
            await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = 'app' AND table_name = 'messages'"
            )
        )
    finally:
        await conn.close()
    assert {c.name for c in constraints(names)} <= found
    assert (types["metadata"], types["created_at"]) == ("jsonb", "timestamp with time zone")


async def test_postgres_waits_for_a_running_migration(pg_dsn: str) -> None:
    """While a migration holds the schema's lock, the backend refuses to create tables in it."""
    holder = await asyncpg.connect(pg_dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock(hashtext('flux_migrate:' || 'public'))")
        with pytest.raises(TargetError):
            async with PostgresMemory(pg_dsn):
                pass
    finally:
        await holder.close()
    async with PostgresMemory(pg_dsn) as memory:
        assert await memory.count_sessions() == 0


async def test_postgres_stores_metadata_as_jsonb_object(pg_dsn: str) -> None:
    """Metadata lands as a jsonb object (not a JSON string), with no json.dumps by the caller."""
    async with PostgresMemory(pg_dsn) as memory:
        session_id = await memory.create_session("t", {"a": [1, {"b": None}]})
        assert memory.pool is not None
        async with memory.pool.acquire() as conn:
            kind, value = await conn.fetchrow(
                "SELECT jsonb_typeof(metadata), metadata -> 'a' -> 1 FROM sessions WHERE id = $1",
                session_id,
            )
            with pytest.raises(Exception) as info:  # asyncpg wraps the codec's TypeError
                await conn.execute("UPDATE sessions SET metadata = $1", '{"a": 1}')
    assert isinstance(info.value.__cause__, TypeError)
    assert (kind, value) == ("object", {"b": None})


# ------------------------------------------------------------------ factory


async def test_factory_picks_backend_from_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_dsn: str
) -> None:
    """DATABASE_BACKEND picks SQLite or PostgreSQL, with the path, DSN and pool sizes from env."""
    monkeypatch.setenv("SQLITE_PATH", str(tmp_path / "app.sqlite"))
    monkeypatch.setenv("POSTGRES_DSN", pg_dsn)
    monkeypatch.setenv("DATABASE_BACKEND", "sqlite")
    async with create_memory() as memory:
        assert isinstance(memory, SQLiteMemory)
        await memory.create_session("lite")
    assert (tmp_path / "app.sqlite").is_file()
    monkeypatch.setenv("DATABASE_BACKEND", "Postgres")
    monkeypatch.setenv("MEMORY_POOL_MIN", "1")
    monkeypatch.setenv("MEMORY_POOL_MAX", "4")
    async with create_memory() as memory:
        assert isinstance(memory, PostgresMemory)
        assert (memory.min_size, memory.max_size) == (1, 4)
        assert await memory.count_sessions() == 0


@pytest.mark.parametrize(
    "env",
    [
        {"DATABASE_BACKEND": "mysql", "SQLITE_PATH": "x.sqlite"},
        {"DATABASE_BACKEND": "postgres"},
        {
            "DATABASE_BACKEND": "postgres",
            "POSTGRES_DSN": "postgresql://h/db",
            "MEMORY_POOL_MAX": "0",
        },
        {"MEMORY_POOL_MIN": "two"},
        {"SQLITE_PATH": "x.sqlite", "POSTGRES_POOL_MIN": "5", "POSTGRES_POOL_MAX": "3"},
        {"SQLITE_PATH": "x.sqlite", "MAX_HISTORY": "-1"},
        {"SQLITE_PATH": "x.sqlite", "MAX_HISTORY": "ten"},
        {"SQLITE_PATH": "x.sqlite", "POSTGRES_ACQUIRE_TIMEOUT": "nan"},
    ],
)
async def test_factory_rejects_bad_settings(env: dict[str, str]) -> None:
    """An unknown backend, a missing DSN or path, or bad pool sizes is a ConfigError sentence."""
    with pytest.raises(ConfigError) as info:
        create_memory(MemorySettings.from_env(env))
    assert info.value.message.endswith(".")
    assert info.value.exit_code == 2


async def test_factory_default_is_sqlite(tmp_path: Path) -> None:
    """Without DATABASE_BACKEND the app keeps using SQLite, as before the migration."""
    settings = MemorySettings.from_env({"SQLITE_PATH": str(tmp_path / "a.sqlite")})
    assert (
        settings.backend,
        settings.pool_min,
        settings.pool_max,
        settings.history_limit,
    ) == ("sqlite", 2, 10, 10)
    assert isinstance(create_memory(settings), SQLiteMemory)
