"""The app's ConversationMemory table call by call, and the 13.12 gaps, on both backends."""

from __future__ import annotations

import inspect
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from flux_migrate.core.schema import SQLITE_DDL
from flux_migrate.memory import (
    MemoryClosedError,
    MemorySettings,
    PoolTimeoutError,
    PostgresMemory,
    SessionNotFoundError,
    SQLiteMemory,
    create_memory,
)

pytestmark = pytest.mark.anyio

AnyMemory = SQLiteMemory | PostgresMemory

# The app's table: method -> (parameters with defaults, return annotation).
APP_SIGNATURES = {
    "create_session": ("(title='', metadata=None, user_id='')", "str"),
    "add_message": ("(session_id, role, content, metadata=None)", "str"),
    "get_history": ("(session_id, limit=None)", "list[dict[str, Any]]"),
    "get_sessions": ("(limit=50, offset=0, user_id='')", "list[dict[str, Any]]"),
    "get_session": ("(session_id)", "dict[str, Any] | None"),
    "update_session_title": ("(session_id, title)", "None"),
    "delete_session": ("(session_id)", "None"),
    "count_sessions": ("()", "int"),
    "clear_all": ("()", "None"),
}


def _signature(cls: type, name: str) -> tuple[str, str]:
    sig = inspect.signature(getattr(cls, name))
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    plain = sig.replace(parameters=params[1:], return_annotation=inspect.Signature.empty)
    return str(plain), str(sig.return_annotation)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """Which backend, and where: a SQLite file in tmp_path or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "memory.sqlite")
    return "postgres", request.getfixturevalue("pg_dsn")


def make_memory(backend: tuple[str, str], **kwargs: Any) -> AnyMemory:
    kind, where = backend
    if kind == "sqlite":
        kwargs.pop("max_size", None)  # one connection
        return SQLiteMemory(where, **kwargs)
    return PostgresMemory(where, min_size=1, max_size=kwargs.pop("max_size", 10), **kwargs)


@pytest.fixture
async def mem(backend: tuple[str, str]) -> AsyncIterator[AnyMemory]:
    """A ready memory on the parametrized backend, closed after the test."""
    async with make_memory(backend) as memory:
        yield memory


async def raw_sql(memory: AnyMemory, sql: str, *args: Any) -> Any:
    """Run one statement beside the API (SQLite: ? placeholders; PostgreSQL: $n)."""
    if isinstance(memory, SQLiteMemory):
        with sqlite3.connect(memory.path) as conn:
            return conn.execute(sql, args).fetchall()
    assert memory.pool is not None
    async with memory.pool.acquire() as conn:
        return [tuple(r) for r in await conn.fetch(sql, *args)]


# ------------------------------------------------------------------ the table, call by call


@pytest.mark.parametrize("cls", [SQLiteMemory, PostgresMemory])
@pytest.mark.parametrize("method", sorted(APP_SIGNATURES))
def test_signatures_are_the_apps(cls: type, method: str) -> None:
    """Each method has the app's parameters, defaults and return type, exactly."""
    assert APP_SIGNATURES[method] == _signature(cls, method)


async def test_app_script_gives_the_same_answers(tmp_path: Path, pg_dsn: str) -> None:
    """One script of the app's calls answers identically on both backends (ids and times aside)."""

    async def script(memory: AnyMemory) -> list[Any]:
        out: list[Any] = []
        a = await memory.create_session("alice chat", {"k": [1, 2.5, None]}, user_id="alice")
        b = await memory.create_session(user_id="bob")
        c = await memory.create_session("anon")
        ids = {a: "A", b: "B", c: "C"}
        for i in range(13):
            await memory.add_message(a, "user" if i % 2 else "assistant", f"m{i}", {"i": i})
        await memory.add_message(b, "user", "hi bob")
        out.append(await memory.update_session_title(c, "renamed"))
        out.append(await memory.update_session_title(str(uuid.uuid4()), "ghost"))
        out.append(await memory.delete_session(str(uuid.uuid4())))

        def strip(rows: list[dict[str, Any]]) -> list[Any]:
            return [
                {
                    k: ids.get(v, v) if isinstance(v, str) else v
                    for k, v in r.items()
                    if k not in ("created_at", "updated_at")
                }
                | {"keys": list(r)}
                for r in rows
            ]

        out.append([{"keys": list(m), "c": m["content"]} for m in await memory.get_history(a)])
        out.append(len(await memory.get_history(a, limit=3)))
        out.append(strip(await memory.get_sessions()))
        out.append(strip(await memory.get_sessions(user_id="alice")))
        out.append(strip(await memory.get_sessions(limit=1, offset=1)))
        out.append(strip([s for s in [await memory.get_session(a)] if s]))
        out.append(await memory.get_session(str(uuid.uuid4())))
        out.append(await memory.count_sessions())
        out.append(await memory.delete_session(b))
        out.append(await memory.count_sessions())
        out.append(await memory.clear_all())
        out.append(await memory.count_sessions())
        return out

    async with SQLiteMemory(tmp_path / "app.sqlite") as lite:
        expected = await script(lite)
    async with PostgresMemory(pg_dsn, min_size=1, max_size=2) as pg:
        actual = await script(pg)
    assert expected == actual
    assert [f"m{i}" for i in range(3, 13)] == [m["c"] for m in expected[3]]


async def test_user_isolation_with_and_without_paging(mem: AnyMemory) -> None:
    """Alice never sees Bob's sessions, on any page; an empty user_id lists everyone's."""
    alice = [await mem.create_session(f"a{i}", user_id="alice") for i in range(5)]
    bob = [await mem.create_session(f"b{i}", user_id="bob") for i in range(4)]
    assert list(reversed(alice)) == [s["id"] for s in await mem.get_sessions(user_id="alice")]
    assert list(reversed(bob)) == [s["id"] for s in await mem.get_sessions(user_id="bob")]
    pages = [
        [s["id"] for s in await mem.get_sessions(limit=2, offset=o, user_id="alice")]
        for o in (0, 2, 4, 6)
    ]
    assert [alice[4], alice[3], alice[2], alice[1], alice[0]] == [i for p in pages for i in p]
    assert [2, 2, 1, 0] == [len(p) for p in pages]
    assert [] == await mem.get_sessions(user_id="carol")
    assert 9 == len(await mem.get_sessions()) == await mem.count_sessions()


async def test_user_id_is_stored_and_indexed(mem: AnyMemory) -> None:
    """user_id is stored in the sessions row and indexed: (user_id, updated_at) in SQLite,
    (md5(user_id), updated_at) in PostgreSQL (a btree entry of a long text fails)."""
    session_id = await mem.create_session("t", user_id="alice")
    if isinstance(mem, SQLiteMemory):
        stored = await raw_sql(mem, "SELECT user_id FROM sessions WHERE id = ?", session_id)
        index = await raw_sql(mem, "SELECT name FROM pragma_index_info('idx_sessions_user')")
    else:
        stored = await raw_sql(mem, "SELECT user_id FROM sessions WHERE id = $1", session_id)
        [(definition,)] = await raw_sql(
            mem, "SELECT pg_get_indexdef('idx_sessions_user_md5'::regclass)"
        )
        assert [("alice",)] == stored
        assert definition.endswith("(md5(user_id), updated_at)")
        return
    assert [("alice",)] == stored
    assert [("user_id",), ("updated_at",)] == index


async def test_old_sqlite_file_without_user_id_gets_it(tmp_path: Path) -> None:
    """A file made by the app before user_id existed opens, gains the column, keeps its rows."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            SQLITE_DDL.replace(",\n    user_id TEXT DEFAULT ''", "").split("CREATE INDEX")[0]
        )
        conn.execute(
            "INSERT INTO sessions VALUES ('s1', 'old', '2024-01-01T00:00:00+00:00',"
            " '2024-01-01T00:00:00+00:00', '{}')"
        )
    async with SQLiteMemory(path) as memory:
        assert ["s1"] == [s["id"] for s in await memory.get_sessions(user_id="")]
        assert [] == await memory.get_sessions(user_id="alice")
        await memory.create_session("new", user_id="alice")
        assert 1 == len(await memory.get_sessions(user_id="alice"))


async def test_old_postgres_tables_without_user_id_get_it(pg_dsn: str) -> None:
    """Tables made before user_id existed gain the column (default '') and its index on open."""
    async with PostgresMemory(pg_dsn, min_size=1, max_size=1) as memory:
        old = await memory.create_session("old")
        await raw_sql(memory, "ALTER TABLE sessions DROP COLUMN user_id")  # drops the index too
    async with PostgresMemory(pg_dsn, min_size=1, max_size=1) as memory:
        await memory.create_session("new", user_id="alice")
        assert [old] == [s["id"] for s in await memory.get_sessions(user_id="")][1:]
        assert ["new"] == [s["title"] for s in await memory.get_sessions(user_id="alice")]
        index = await raw_sql(memory, "SELECT to_regclass('idx_sessions_user_md5') IS NOT NULL")
    assert [(True,)] == index


async def test_update_title_moves_updated_at_and_order(mem: AnyMemory) -> None:
    """Renaming a session puts it first in get_sessions, like a new message does."""
    first = await mem.create_session("first")
    second = await mem.create_session("second")
    await mem.update_session_title(first, "renamed")
    assert [first, second] == [s["id"] for s in await mem.get_sessions()]


# ------------------------------------------------------------------ 13.12: values and inputs


@pytest.mark.parametrize(
    "metadata",
    [
        {"big": 2**64 + 1, "neg": -(2**200)},
        {"deep": [[[[[[[[[[]]]]]]]]]]},
        {"level": "x"},
    ],
    ids=["ints-beyond-64-bits", "nested", "plain"],
)
async def test_metadata_values_round_trip_alike(mem: AnyMemory, metadata: dict[str, Any]) -> None:
    """Integers beyond 64 bits and nesting round-trip exactly on both backends."""
    session_id = await mem.create_session("m", metadata)
    await mem.add_message(session_id, "user", "x", metadata)
    session = await mem.get_session(session_id)
    assert session is not None
    assert metadata == session["metadata"] == (await mem.get_history(session_id))[0]["metadata"]


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


@pytest.mark.parametrize("depth", [254, 255, 256, 600])
async def test_deep_nesting_round_trips_on_both(mem: AnyMemory, depth: int) -> None:
    """Metadata nested beyond orjson's 255 levels writes and reads back on both backends."""
    session_id = await mem.create_session("deep", _nested(depth))
    session = await mem.get_session(session_id)
    assert session is not None
    assert _nested(depth) == session["metadata"]


async def test_too_deep_or_too_long_metadata_is_refused_alike(mem: AnyMemory) -> None:
    """Nesting json.dumps cannot write, and ints beyond 4300 digits, are a ValueError on both."""
    with pytest.raises(ValueError):
        await mem.create_session("t", _nested(100_000))
    with pytest.raises(ValueError):
        await mem.create_session("t", {"a": 10**5000})
    with pytest.raises(ValueError):
        await mem.create_session("t", {"a": float("inf")})
    assert 0 == await mem.count_sessions()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1e400", 10**400), ("-1.5e400", -15 * 10**399), ("1e5000", 10**5000), ("1e-400", 0.0)],
    ids=["1e400", "-1.5e400", "1e5000", "1e-400"],
)
async def test_numbers_beyond_a_double_read_alike(
    mem: AnyMemory, text: str, expected: float | int
) -> None:
    """Migrated metadata numbers beyond a double read as the exact value on both backends."""
    session_id = await mem.create_session("n")
    if isinstance(mem, SQLiteMemory):
        await raw_sql(
            mem, "UPDATE sessions SET metadata = ? WHERE id = ?", f'{{"a": {text}}}', session_id
        )
    else:
        await raw_sql(
            mem,
            "UPDATE sessions SET metadata = $1::text::jsonb WHERE id = $2",
            f'{{"a": {text}}}',
            session_id,
        )
    session = await mem.get_session(session_id)
    assert session is not None
    assert {"a": expected} == session["metadata"]
    assert {"a": expected} == (await mem.get_sessions())[0]["metadata"]


@pytest.mark.parametrize("bad", [42, None, b"id", uuid.UUID(int=1)])
async def test_non_str_session_id_is_a_type_error(mem: AnyMemory, bad: Any) -> None:
    """Every call taking a session_id refuses a non-str with TypeError on both backends."""
    for call in (
        mem.get_history(bad),
        mem.get_session(bad),
        mem.add_message(bad, "user", "x"),
        mem.update_session_title(bad, "t"),
        mem.delete_session(bad),
    ):
        with pytest.raises(TypeError):
            await call
    assert 0 == await mem.count_sessions()


@pytest.mark.parametrize("value", [2**63, 2**64])
async def test_limit_and_offset_out_of_range_are_value_errors(mem: AnyMemory, value: int) -> None:
    """limit / offset beyond 2**63-1 raise ValueError on both backends; 2**63-1 works."""
    session_id = await mem.create_session()
    for call in (
        mem.get_sessions(limit=value),
        mem.get_sessions(offset=value),
        mem.get_history(session_id, limit=value),
    ):
        with pytest.raises(ValueError):
            await call
    biggest = 2**63 - 1
    assert 1 == len(await mem.get_sessions(limit=biggest))
    assert [] == await mem.get_sessions(offset=biggest)
    assert [] == await mem.get_history(session_id, limit=biggest)


async def test_postgres_reads_infinity_and_calendar_edges(pg_dsn: str) -> None:
    """±infinity and years 1 / 9999 read back as the edge instants, never `year 0` errors."""
    async with PostgresMemory(pg_dsn, min_size=1, max_size=2) as memory:
        ids = [await memory.create_session(f"s{i}") for i in range(4)]
        stamps = [
            "-infinity",
            "infinity",
            "0001-01-01 00:00:00+00",
            "9999-12-31 23:59:59.999999+00",
        ]
        for session_id, stamp in zip(ids, stamps, strict=True):
            await raw_sql(
                memory,
                "UPDATE sessions SET created_at = $1::text::timestamptz,"
                " updated_at = $1::text::timestamptz"
                " WHERE id = $2",
                stamp,
                session_id,
            )
            await memory.add_message(session_id, "user", "x")
            await raw_sql(
                memory,
                "UPDATE messages SET created_at = $1::text::timestamptz WHERE session_id = $2",
                stamp,
                session_id,
            )
        listed = {s["id"]: s for s in await memory.get_sessions()}
        created = [(await memory.get_session(i) or {}).get("created_at") for i in ids]
        history = [(await memory.get_history(i))[0]["created_at"] for i in ids]
    edges = [
        "0001-01-01T00:00:00+00:00",
        "9999-12-31T23:59:59.999999+00:00",
        "0001-01-01T00:00:00+00:00",
        "9999-12-31T23:59:59.999999+00:00",
    ]
    assert edges == created == history
    assert {ids[0], ids[1], ids[2], ids[3]} == set(listed)


# ------------------------------------------------------------------ 13.12: close and the pool


async def test_close_while_callers_wait_commits_only_what_returned(
    backend: tuple[str, str],
) -> None:
    """close() lets the running call finish; waiting callers get MemoryClosedError, no write."""
    memory = make_memory(backend, max_size=1)
    session_id = await memory.create_session("busy")
    outcomes: list[str] = []

    async def add(i: int) -> None:
        try:
            await memory.add_message(session_id, "user", f"m{i}")
            outcomes.append("ok")
        except MemoryClosedError:
            outcomes.append("closed")

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(add, i)
        await anyio.sleep(0)  # let them queue on the one connection
        await anyio.sleep(0.001)
        await memory.close(timeout=5)
    assert 20 == len(outcomes)
    assert "closed" in outcomes
    async with memory:
        stored = len(await memory.get_history(session_id, limit=100))
    assert outcomes.count("ok") == stored


async def test_call_during_close_does_not_reopen(backend: tuple[str, str]) -> None:
    """A call or health() made while close() drains is refused and leaves the memory closed."""
    memory = make_memory(backend, max_size=1)
    await memory.create_session("x")
    refused: list[type[BaseException]] = []
    health: list[dict[str, Any]] = []
    release = anyio.Event()

    async def running_call() -> None:  # stands for a call still running when close() begins
        async with memory.lifecycle.admit():
            await release.wait()

    async def during() -> None:
        await anyio.sleep(0.01)
        try:
            await memory.create_session("during close")
        except MemoryClosedError as exc:
            refused.append(type(exc))
        health.append(await memory.health())
        release.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(running_call)
        await anyio.sleep(0)
        tg.start_soon(memory.close, 5)
        tg.start_soon(during)
    assert [MemoryClosedError] == refused
    assert [False] == [h["ok"] for h in health]
    assert memory.is_open is False
    async with memory:
        assert 1 == await memory.count_sessions()


async def test_close_terminates_what_is_left_after_the_timeout(pg_dsn: str) -> None:
    """close(timeout) ends a call stuck behind a lock after the timeout; nothing half-written."""
    memory = PostgresMemory(pg_dsn, min_size=1, max_size=2)
    session_id = await memory.create_session("locked")
    holder = await asyncpg.connect(pg_dsn)
    failures: list[BaseException] = []

    async def stuck() -> None:
        try:
            await memory.add_message(session_id, "user", "never")
        except Exception as exc:  # noqa: BLE001 - the terminated call's error is the finding
            failures.append(exc)

    try:
        await holder.execute("BEGIN; SELECT * FROM sessions FOR UPDATE")
        async with anyio.create_task_group() as tg:
            tg.start_soon(stuck)
            await anyio.sleep(0.2)
            started = anyio.current_time()
            await memory.close(timeout=0.5)
            took = anyio.current_time() - started
        await holder.execute("ROLLBACK")
        await anyio.sleep(0.5)  # a backend left waiting on the lock would commit now
        stored = await holder.fetchval("SELECT count(*) FROM messages")
    finally:
        await holder.close()
    assert 0.4 < took < 3
    assert 1 == len(failures)
    assert 0 == stored


async def test_acquire_timeout_is_a_clear_error(pg_dsn: str) -> None:
    """With lock waiters holding every connection, an unrelated read gets PoolTimeoutError."""
    async with PostgresMemory(pg_dsn, min_size=1, max_size=2, acquire_timeout=0.5) as memory:
        session_id = await memory.create_session("locked")
        holder = await asyncpg.connect(pg_dsn)
        try:
            await holder.execute("BEGIN; SELECT * FROM sessions FOR UPDATE")
            async with anyio.create_task_group() as tg:
                for i in range(2):
                    tg.start_soon(memory.add_message, session_id, "user", f"blocked {i}")
                await anyio.sleep(0.2)
                with anyio.fail_after(5), pytest.raises(PoolTimeoutError) as info:
                    await memory.count_sessions()
                await holder.execute("ROLLBACK")
        finally:
            await holder.close()
        assert "within 0.5 s" in str(info.value)
        assert 2 == len(await memory.get_history(session_id))


async def test_health_figures_move_under_load(backend: tuple[str, str]) -> None:
    """health() shows in_use rising under load and records acquire waits with percentiles."""
    async with make_memory(backend, max_size=3) as memory:
        session_id = await memory.create_session("load")
        idle = await memory.health()
        peaks: list[int] = []
        done = anyio.Event()

        async def watch() -> None:
            while not done.is_set():
                peaks.append((await memory.health())["pool"]["in_use"])
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with anyio.create_task_group() as calls:
                for i in range(40):
                    calls.start_soon(memory.add_message, session_id, "user", f"m{i}")
            done.set()
        busy = await memory.health()
    assert (True, "primary", 0) == (idle["ok"], idle["role"], idle["pool"]["in_use"])
    assert {"size", "idle", "min", "max", "in_use", "acquire_wait"} <= set(idle["pool"])
    assert idle["latency_ms"] > 0 and idle["server_version"]
    assert max(peaks) >= 1
    assert busy["pool"]["acquire_wait"]["count"] >= 41
    assert busy["pool"]["acquire_wait"]["p99_ms"] >= busy["pool"]["acquire_wait"]["p50_ms"] >= 0


async def test_health_of_unreachable_server_is_not_ok() -> None:
    """health() on a server that is down reports ok False with a sentence, never raises."""
    memory = PostgresMemory(
        "postgresql://alice:s3cret@127.0.0.1:1/app", min_size=1, max_size=1, connect_timeout=2
    )
    report = await memory.health()
    assert (False, 0) == (report["ok"], report["pool"]["size"])
    assert "s3cret" not in repr(report)
    assert "127.0.0.1:1/app" in report["error"]


# ------------------------------------------------------------------ settings


async def test_settings_as_the_app_names_them(tmp_path: Path) -> None:
    """DATABASE_BACKEND, POSTGRES_DSN, POSTGRES_READ_DSN, MAX_HISTORY and pool bounds are read."""
    env = {
        "DATABASE_BACKEND": "postgres",
        "POSTGRES_DSN": "postgresql://app@db/chat",
        "POSTGRES_READ_DSN": "postgresql://app@standby/chat",
        "MAX_HISTORY": "7",
        "POSTGRES_POOL_MIN": "3",
        "POSTGRES_POOL_MAX": "12",
    }
    memory = create_memory(MemorySettings.from_env(env))
    assert isinstance(memory, PostgresMemory)
    assert memory.replica is not None
    assert (14, 3, 12, "postgresql://app@standby/chat") == (
        memory.default_history_limit,
        memory.min_size,
        memory.max_size,
        memory.replica.dsn,
    )
    defaults = MemorySettings.from_env({"SQLITE_PATH": str(tmp_path / "a.sqlite")})
    assert (5, 10, 2, 10, None) == (
        defaults.max_history,
        defaults.history_limit,
        defaults.pool_min,
        defaults.pool_max,
        defaults.postgres_read_dsn,
    )
    lite = create_memory(defaults)
    assert isinstance(lite, SQLiteMemory)
    assert 10 == lite.default_history_limit


async def test_orphan_message_is_refused_even_without_foreign_key(tmp_path: Path) -> None:
    """The SQLite backend refuses an orphan with SessionNotFoundError, as PostgreSQL's FK does."""
    async with SQLiteMemory(tmp_path / "a.sqlite") as memory:
        await raw_sql(memory, "PRAGMA foreign_keys=OFF")
        with pytest.raises(SessionNotFoundError):
            await memory.add_message("no-such-session", "user", "x")
        assert [(0,)] == await raw_sql(memory, "SELECT count(*) FROM messages")
