"""One memory per process, any event loop (issue 21, cases 4, 5 and 14): the app calls its
factory per request and may run each request in its own ``asyncio.run``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncpg
import pytest

from flux_migrate.memory import (
    MemorySettings,
    PostgresMemory,
    SQLiteMemory,
    create_memory,
    new_memory,
)


def _connections(dsn: str) -> int:
    """Sessions of the memory open on the test database now (seen from another connection)."""

    async def count() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'flux-migrate memory'"
                )
            )
        finally:
            await conn.close()

    return asyncio.run(count())


def test_one_memory_works_across_asyncio_run_calls(pg_dsn: str) -> None:
    """The same PostgresMemory serves a call in each of five asyncio.run() loops, and the
    pools of ended loops are closed, not left open on the server."""
    memory = PostgresMemory(pg_dsn, min_size=1, max_size=3)
    session_id = asyncio.run(memory.create_session("loops"))
    for i in range(5):
        asyncio.run(memory.add_message(session_id, "user", f"m{i}"))
    history = asyncio.run(memory.get_history(session_id))
    assert [f"m{i}" for i in range(5)] == [m["content"] for m in history]
    assert _connections(pg_dsn) <= 3
    asyncio.run(memory.close())


def test_create_memory_per_request_keeps_one_pool(pg_dsn: str) -> None:
    """create_memory() called per request (30 requests, each in its own loop) returns one
    memory with one pool: the server never sees more than the pool's maximum."""
    settings = MemorySettings(backend="postgres", postgres_dsn=pg_dsn, pool_min=1, pool_max=4)
    seen = set()

    async def request(i: int) -> None:
        memory = create_memory(settings)
        seen.add(id(memory))
        await memory.create_session(f"r{i}")

    peak = 0
    for i in range(30):
        asyncio.run(request(i))
        peak = max(peak, _connections(pg_dsn))
    assert 1 == len(seen)
    assert peak <= 4
    assert 30 == asyncio.run(create_memory(settings).count_sessions())
    asyncio.run(create_memory(settings).close())
    assert create_memory(settings) is not new_memory(settings)


APP_FACTORY = """
# The app's agent/memory.py after the switch: its factory hands out our per-process memory.
from flux_migrate.memory import get_memory  # noqa: F401
"""

APP_REQUESTS = """
import asyncio
from agent.memory import get_memory

async def request(i):
    memory = get_memory()
    sid = await memory.create_session(f"request {i}")
    await memory.add_message(sid, "user", "hello")
    await memory.get_history(sid)
    await memory.get_sessions(20)
    return id(memory)

ids = {asyncio.run(request(i)) for i in range(30)}
print(len(ids), asyncio.run(get_memory().count_sessions()))
"""


def test_the_apps_factory_module_hands_out_one_memory_closed_at_exit(
    pg_dsn: str, tmp_path: Path
) -> None:
    """An app whose agent/memory.py re-exports our get_memory serves 30 requests, each in its
    own asyncio.run, with one memory; once the process exits its connections are gone."""
    app = tmp_path / "app"
    (app / "agent").mkdir(parents=True)
    (app / "agent" / "__init__.py").write_text("")
    (app / "agent" / "memory.py").write_text(APP_FACTORY)
    (app / "serve.py").write_text(textwrap.dedent(APP_REQUESTS))
    env = {
        **os.environ,
        "DATABASE_BACKEND": "postgres",
        "POSTGRES_DSN": pg_dsn,
        "POSTGRES_POOL_MIN": "1",
        "POSTGRES_POOL_MAX": "3",
    }
    done = subprocess.run(
        [sys.executable, "serve.py"],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "" == done.stderr
    assert "1 30" == done.stdout.strip()
    deadline = time.monotonic() + 5  # the server notices closed sockets within moments
    while _connections(pg_dsn) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert 0 == _connections(pg_dsn)


def test_without_database_backend_the_apps_data_dir_memory_db(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATABASE_BACKEND and SQLITE_PATH unset: SQLite at DATA_DIR/memory.db, by default
    ./data/memory.db, as the app's class does; the directory is created."""
    monkeypatch.chdir(tmp_path)
    memory = new_memory(MemorySettings.from_env({}))
    assert isinstance(memory, SQLiteMemory)
    assert Path("data") / "memory.db" == memory.path
    assert (tmp_path / "data").is_dir()
    elsewhere = new_memory(MemorySettings.from_env({"DATA_DIR": str(tmp_path / "d")}))
    assert isinstance(elsewhere, SQLiteMemory)
    assert tmp_path / "d" / "memory.db" == elsewhere.path
    asyncio.run(_one_session(elsewhere))
    assert (tmp_path / "d" / "memory.db").is_file()


async def _one_session(memory: SQLiteMemory) -> str:
    async with memory:
        return await memory.create_session("default path")


def test_the_apps_factory_on_sqlite_exits_and_uses_the_data_dir(tmp_path: Path) -> None:
    """Without DATABASE_BACKEND the same app runs on SQLite in ./data/memory.db (case 14),
    one memory across 30 asyncio.run requests, and the process exits at the end (its
    connection's thread is stopped at exit instead of keeping the process alive)."""
    app = tmp_path / "app"
    (app / "agent").mkdir(parents=True)
    (app / "agent" / "__init__.py").write_text("")
    (app / "agent" / "memory.py").write_text(APP_FACTORY)
    (app / "serve.py").write_text(textwrap.dedent(APP_REQUESTS))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_BACKEND", "SQLITE_PATH")}
    done = subprocess.run(
        [sys.executable, "serve.py"],
        cwd=app,
        env={**env, "DATA_DIR": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ("", "1 30") == (done.stderr, done.stdout.strip())
    assert (app / "data" / "memory.db").is_file()
