"""Helpers shared by the integration tests: independent readers of source and target."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from flux_migrate.core.schema import TABLES, TargetNames
from flux_migrate.pipeline.settings import Settings
from flux_migrate.stages.extract_sql import source_uri

ROOT = Path(__file__).resolve().parent.parent


def _instant(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)


def source_rows(path: Path, table: str) -> dict[str, dict[str, Any]]:
    """The source rows as the app means them (instants, parsed JSON), by id; written
    independently of the pipeline's converters."""
    db = sqlite3.connect(source_uri(path), uri=True)
    db.row_factory = sqlite3.Row
    out = {}
    spec = next(t for t in TABLES if t.name == table)
    for row in db.execute(f"SELECT {', '.join(spec.column_names)} FROM {table}"):
        d = dict(row)
        for key in ("created_at", "updated_at"):
            if key in d:
                d[key] = _instant(d[key])
        d["metadata"] = json.loads(d["metadata"]) if d["metadata"] else {}
        out[d["id"]] = d
    db.close()
    return out


async def target_rows(
    dsn: str, table: str, names: TargetNames | None = None
) -> dict[str, dict[str, Any]]:
    """The target rows by id, metadata parsed."""
    names = names or TargetNames()
    spec = next(t for t in TABLES if t.name == table)
    conn = await asyncpg.connect(dsn)
    try:
        cols = ", ".join(spec.column_names)  # the migrated columns (not the target-only ones)
        rows = await conn.fetch(f"SELECT {cols} FROM {names.qualified(table)}")
    finally:
        await conn.close()
    out = {}
    for r in rows:
        d = dict(r)
        d["metadata"] = json.loads(d["metadata"])
        for key in ("created_at", "updated_at"):
            if key in d:
                d[key] = d[key].astimezone(UTC)
        out[d["id"]] = d
    return out


async def fetchval(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `python -m pipeline ARGS` to completion, capturing output."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("POSTGRES_DSN", None) if env is None or "POSTGRES_DSN" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "flux_migrate.pipeline", *args],
        cwd=ROOT,
        env=full_env,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(*args: str, session: bool = False) -> subprocess.Popen[str]:
    """Start `python -m pipeline ARGS` with JSON logs on stderr, for tests that kill it; with
    ``session``, in a process group of its own (one a test may signal as a whole)."""
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_DSN"}
    return subprocess.Popen(
        [sys.executable, "-m", "flux_migrate.pipeline", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=session,
    )


@contextlib.contextmanager
def ignore_asyncpg_orphaned_waiters() -> Iterator[None]:
    """A server that goes away while asyncpg is sending COPY data leaves asyncpg's internal
    waiter future failed and never awaited (the COPY call itself raises, and is retried): the
    event loop reports it, and the test runner would count that report as the test's error.
    Only that report is dropped; every other one still fails the test."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        orphaned = context.get("message") == "Future exception was never retrieved"
        if orphaned and isinstance(exc, asyncpg.ConnectionDoesNotExistError):
            return
        if previous is None:
            loop.default_exception_handler(context)
        else:
            previous(loop, context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)


def kill_after(args: list[str], event: str, count: int) -> int:
    """Start the CLI, SIGKILL it once `count` events named `event` were logged; return the
    number of such events seen (the process may have committed more before dying)."""
    proc = start_cli(*args)
    seen = 0
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == event:
                seen += 1
                if seen >= count:
                    proc.send_signal(signal.SIGKILL)
                    break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return seen


def app_copy(sample_db: Path, tmp_path: Path) -> Path:
    """A copy of the shared sample database that a test may change."""
    path = tmp_path / "app.sqlite"
    shutil.copy(sample_db, path)
    return path


def generated_with(path: Path, sessions: int, seed: int, *changes: str) -> Path:
    """A generated app source at ``path`` with the SQL ``changes`` applied (rows made odd)."""
    from flux_migrate.pipeline.sample import generate

    generate(path, sessions=sessions, seed=seed)
    db = sqlite3.connect(path)
    for change in changes:
        db.execute(change)
    db.commit()
    db.close()
    return path


def app_settings(path: Path, dsn: str, batch_size: int = 10_000) -> Settings:
    return Settings(sqlite_path=path, postgres_dsn=dsn, batch_size=batch_size)


async def assert_app_tables_equal(path: Path, dsn: str) -> None:
    """The app's two tables hold in PostgreSQL exactly what they hold in SQLite."""
    for table in ("sessions", "messages"):
        assert source_rows(path, table) == await target_rows(dsn, table)


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (neither gone nor a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with open(task / "children") as f:
            found |= {int(p) for p in f.read().split()}
    return found


def worker_processes(proc: subprocess.Popen[str], least: int = 2) -> set[int]:
    """The worker processes of a command (its multiprocessing children, not the resource
    tracker), once ``least`` of them are up: past their start and their initializer
    (die_with_parent points their stderr at /dev/null), within 60 s. A worker killed while
    another is still starting meets a race inside the standard library's pool, which prints
    tracebacks of its own; these tests are about a worker dying in its work."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = set()
        for p in _children(proc.pid):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                line = Path(f"/proc/{p}/cmdline").read_bytes()
                ready = os.readlink(f"/proc/{p}/fd/2") == os.devnull
                if b"multiprocessing" in line and b"resource_tracker" not in line and ready:
                    found.add(p)
        if len(found) >= least:
            return found
        assert proc.poll() is None, "the command ended before it started its workers"
        time.sleep(0.005)
    raise AssertionError("no worker processes seen")
