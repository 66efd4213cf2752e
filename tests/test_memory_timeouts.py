"""Bounded waits (issue 21, cases 3 and 12): a PostgreSQL that stops answering, a saturated
pool and a close() during a hung connect each cost at most their bound, and fail with the
documented error class, never a raw driver exception or an endless wait."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
import asyncpg
import pytest

from flux_migrate.memory import (
    MemoryClosedError,
    MemoryUnavailableError,
    PoolTimeoutError,
    PostgresMemory,
    Timeouts,
)
from tests.proxy import FlakyProxy

pytestmark = pytest.mark.anyio

FAST = Timeouts(connect=0.5, acquire=0.5, command=0.5, statement=0.4, replica=0.3, health=0.3)


@pytest.fixture
def proxy(pg_dsn: str) -> Iterator[FlakyProxy]:
    """A TCP proxy in front of the test database, closed after the test."""
    flaky = FlakyProxy(pg_dsn)
    try:
        yield flaky
    finally:
        flaky.close()


async def _timed(call: Any) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        await call
    except Exception as exc:  # noqa: BLE001 - the error is what the test inspects
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


async def test_a_silent_primary_costs_the_command_timeout_then_a_clear_error(
    proxy: FlakyProxy,
) -> None:
    """Once the primary stops answering (no RST), every call fails within its bound with
    MemoryUnavailableError, and health() answers within its own bound, ok False."""
    async with PostgresMemory(proxy.proxied_dsn, min_size=1, max_size=2, timeouts=FAST) as mem:
        session_id = await mem.create_session("before")
        proxy.silence()
        for call in (
            mem.get_history(session_id),
            mem.add_message(session_id, "user", "lost?"),
            mem.get_sessions(),
            mem.count_sessions(),
        ):
            error, took = await _timed(call)
            assert isinstance(error, MemoryUnavailableError), repr(error)
            assert took < 2.0
        started = time.monotonic()
        health = await mem.health()
        assert time.monotonic() - started < 3.0
        assert health["ok"] is False
        assert "did not answer within" in health["error"]
        assert not health["error"].endswith("rerun to resume.")
        proxy.restore()
        await mem.close(timeout=1)


async def test_a_silent_server_at_connect_costs_the_connect_timeout(proxy: FlakyProxy) -> None:
    """A server that accepts the TCP connection and never answers the login: the first call
    fails with MemoryUnavailableError after the connect timeout, not after minutes."""
    proxy.silence()
    mem = PostgresMemory(proxy.proxied_dsn, min_size=1, max_size=2, timeouts=FAST)
    error, took = await _timed(mem.create_session("never"))
    assert isinstance(error, MemoryUnavailableError), repr(error)
    assert not error.maybe_written
    assert took < 1.5
    await mem.close(timeout=1)


async def test_close_during_a_hung_connect_keeps_its_timeout(proxy: FlakyProxy) -> None:
    """close(timeout=0.5) while a call is opening the pool against a silent server returns
    within about its timeout; the call gets MemoryClosedError."""
    proxy.silence()
    slow = Timeouts(connect=20, acquire=20, command=20, statement=19, replica=1, health=1)
    mem = PostgresMemory(proxy.proxied_dsn, min_size=1, max_size=2, timeouts=slow)
    errors: list[BaseException | None] = []

    async def call() -> None:
        errors.append((await _timed(mem.count_sessions()))[0])

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await anyio.sleep(0.3)
        started = time.monotonic()
        await mem.close(timeout=0.5)
        took = time.monotonic() - started
    assert took < 1.5
    assert [MemoryClosedError] == [type(e) for e in errors]


async def test_health_reports_a_saturated_pool_without_waiting_it_out(pg_dsn: str) -> None:
    """Callers that found no free connection are counted and their waits are in the p99;
    health() itself waits only its own short bound and says the pool is saturated."""
    timeouts = Timeouts(acquire=0.3, health=0.2)
    async with PostgresMemory(pg_dsn, min_size=1, max_size=1, timeouts=timeouts) as mem:
        session_id = await mem.create_session("locked")
        holder = await asyncpg.connect(pg_dsn)
        await holder.execute("BEGIN; SELECT * FROM sessions FOR UPDATE")
        outcomes: list[type[BaseException] | None] = []
        health: dict[str, Any] = {}

        async def blocked_writer() -> None:
            outcomes.append(type((await _timed(mem.add_message(session_id, "user", "x")))[0]))

        async def reader() -> None:
            outcomes.append(type((await _timed(mem.count_sessions()))[0]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked_writer)
            await anyio.sleep(0.1)
            for _ in range(5):
                tg.start_soon(reader)
            await anyio.sleep(0.5)
            started = time.monotonic()
            health = await mem.health()
            health_took = time.monotonic() - started
            await holder.execute("ROLLBACK")
        await holder.close()
    assert 5 == outcomes.count(PoolTimeoutError)
    assert health_took < 1.0
    assert health["ok"] is False and health["saturated"] is True
    waits = health["pool"]["acquire_wait"]
    assert waits["failed"] >= 5
    assert waits["p99_ms"] >= 250


async def test_a_cut_connection_surfaces_as_the_one_error_class(proxy: FlakyProxy) -> None:
    """When the network drops every connection, each call raises MemoryUnavailableError (a
    ConnectionError), whatever the driver raised underneath."""
    async with PostgresMemory(proxy.proxied_dsn, min_size=2, max_size=2, timeouts=FAST) as mem:
        session_id = await mem.create_session("before")
        proxy.cut()
        kinds = set()
        for call in (
            mem.get_history(session_id),
            mem.add_message(session_id, "user", "x"),
            mem.get_session(session_id),
            mem.update_session_title(session_id, "y"),
            mem.create_session("z"),
        ):
            error, _ = await _timed(call)
            kinds.add(type(error))
        assert kinds <= {MemoryUnavailableError, PoolTimeoutError}
        proxy.restore()
        assert "before" == (await mem.get_session(session_id) or {}).get("title")
