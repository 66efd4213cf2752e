"""Benchmark: the app's call mix on the memory, 20 concurrent callers.

    .venv/bin/python -m bench.memory [--callers 20] [--seconds 5] [--rounds 3] [--sessions 200]

Each caller repeats one request of the app: ``get_history(session)``, ``get_sessions(20)``,
``add_message(session, ...)``, on a session of its own among ``--sessions`` prefilled ones (10
messages each). Reported per contender: calls per second and the p50 / p99 latency of single
calls. Contenders: our PostgreSQL memory (default pool 2..10, the default timeouts in place)
and a model of the app's own SQLite class (``AppSQLiteMemory`` below: a new
aiosqlite connection per call in WAL mode, the app's statements); ``--flux-sqlite`` adds our
SQLite memory. Uses POSTGRES_DSN when set
(a database ``flux_bench_memory`` is created on it and dropped), else a throwaway embedded
server under .bench/. The contenders take turns, round by round. Not part of ``make test``;
``make bench-memory`` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiosqlite
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
SESSIONS_PAGE = 20  # the app lists 20 sessions per request
BENCH_DB = "flux_bench_memory"


class CallMix(Protocol):
    async def create_session(self, title: str = "") -> str: ...
    async def add_message(self, session_id: str, role: str, content: str) -> str: ...
    async def get_history(self, session_id: str) -> list[dict[str, Any]]: ...
    async def get_sessions(self, limit: int = 50) -> list[dict[str, Any]]: ...


class AppSQLiteMemory:
    """A model of the app's own SQLite class for this benchmark: one new aiosqlite connection
    per call (WAL mode), its statements (history newest first then reversed, sessions with a
    LEFT JOIN count), ``json.dumps`` metadata and ``isoformat()`` stamps."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def setup(self) -> None:
        from flux_migrate.core.schema import SQLITE_DDL

        async with aiosqlite.connect(self.path) as db:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.executescript(SQLITE_DDL)
            await db.commit()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[aiosqlite.Connection]:
        async with aiosqlite.connect(self.path) as db:
            yield db

    async def create_session(self, title: str = "") -> str:
        session_id, stamp = str(uuid.uuid4()), datetime.now(UTC).isoformat()
        async with self._connection() as db:
            await db.execute(
                "INSERT INTO sessions (id, title, created_at, updated_at, metadata)"
                " VALUES (?, ?, ?, ?, ?)",
                (session_id, title, stamp, stamp, json.dumps({})),
            )
            await db.commit()
        return session_id

    async def add_message(self, session_id: str, role: str, content: str) -> str:
        message_id, stamp = str(uuid.uuid4()), datetime.now(UTC).isoformat()
        async with self._connection() as db:
            await db.execute(
                "INSERT INTO messages (id, session_id, role, content, metadata, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (message_id, session_id, role, content, json.dumps({}), stamp),
            )
            await db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (stamp, session_id))
            await db.commit()
        return message_id

    async def get_history(self, session_id: str) -> list[dict[str, Any]]:
        async with self._connection() as db:
            cursor = await db.execute(
                "SELECT id, role, content, metadata, created_at FROM messages"
                " WHERE session_id = ? ORDER BY created_at DESC LIMIT ?",
                (session_id, 10),
            )
            rows = await cursor.fetchall()
        keys = ("id", "role", "content", "metadata", "created_at")
        out = [dict(zip(keys, r, strict=True)) for r in reversed(list(rows))]
        for message in out:
            message["metadata"] = json.loads(message["metadata"]) if message["metadata"] else {}
        return out

    async def get_sessions(self, limit: int = 50) -> list[dict[str, Any]]:
        async with self._connection() as db:
            cursor = await db.execute(
                "SELECT s.id, s.title, s.created_at, s.updated_at, s.metadata,"
                " COUNT(m.id) AS message_count FROM sessions s"
                " LEFT JOIN messages m ON m.session_id = s.id"
                " GROUP BY s.id ORDER BY s.updated_at DESC LIMIT ? OFFSET ?",
                (limit, 0),
            )
            rows = await cursor.fetchall()
        keys = ("id", "title", "created_at", "updated_at", "metadata", "message_count")
        out = [dict(zip(keys, r, strict=True)) for r in rows]
        for session in out:
            session["metadata"] = json.loads(session["metadata"]) if session["metadata"] else {}
        return out


@dataclass
class Figures:
    name: str
    calls: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds

    def percentile(self, q: float) -> float:
        values = sorted(self.latencies_ms)
        return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)] if values else 0.0

    def line(self) -> str:
        p50, p99 = self.percentile(0.5), self.percentile(0.99)
        return (
            f"{self.name:<32} {self.calls_per_s:>7,.0f} calls/s   p50 {p50:6.2f} ms"
            f"   p99 {p99:6.2f} ms   errors {self.errors}"
        )


async def prefill(memory: CallMix, sessions: int) -> list[str]:
    """``sessions`` sessions of 10 messages each; their ids."""
    ids = []
    for i in range(sessions):
        session_id = await memory.create_session(f"chat {i}")
        for m in range(10):
            role = "user" if m % 2 == 0 else "assistant"
            await memory.add_message(session_id, role, f"message {m} of chat {i} " * 8)
        ids.append(session_id)
    return ids


async def drive(
    name: str, memory: CallMix, ids: list[str], *, callers: int, seconds: float, warmup: float
) -> Figures:
    """``callers`` tasks each repeating the app's request for ``warmup + seconds``; only calls
    that start after the warm-up are counted."""
    latencies: list[float] = []
    errors = 0
    calls = 0
    started = time.perf_counter()
    measuring_from = started + warmup
    stop_at = measuring_from + seconds

    async def timed(call: Callable[[], Awaitable[Any]]) -> None:
        nonlocal errors, calls
        begin = time.perf_counter()
        try:
            await call()
        except Exception:  # noqa: BLE001 - counted: a benchmark reports errors, never hides them
            errors += 1
        end = time.perf_counter()
        if begin >= measuring_from:
            calls += 1
            latencies.append((end - begin) * 1000)

    async def request(session_id: str) -> None:
        await timed(lambda: memory.get_history(session_id))
        await timed(lambda: memory.get_sessions(SESSIONS_PAGE))
        await timed(lambda: memory.add_message(session_id, "user", "how about tomorrow?"))

    async def caller(i: int) -> None:
        rng = random.Random(i)
        mine = ids[i::callers] or ids
        while time.perf_counter() < stop_at:
            await request(rng.choice(mine))

    await asyncio.gather(*(caller(i) for i in range(callers)))
    return Figures(name, calls, errors, seconds, latencies)


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def _admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def run(args: argparse.Namespace, admin_dsn: str) -> dict[str, list[Figures]]:
    """Each contender prefilled once, then measured ``--rounds`` times, interleaved, so that
    every contender sees the same machine (other work on it changes figures run to run)."""
    from flux_migrate.memory import PostgresMemory, SQLiteMemory

    await _admin(
        admin_dsn,
        f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)",
        f"CREATE DATABASE {BENCH_DB}",
    )
    work = args.workdir / "bench-memory"
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("*.db*"):
        stale.unlink()
    pg = PostgresMemory(_with_database(admin_dsn, BENCH_DB))  # defaults: pool 2..10, timeouts
    lite = SQLiteMemory(work / "ours.db")
    app = AppSQLiteMemory(work / "app.db")
    await app.setup()
    contenders: list[tuple[str, CallMix]] = [
        ("flux PostgreSQL memory", pg),
        ("the app's SQLite class (model)", app),
    ]
    if args.flux_sqlite:
        contenders.append(("flux SQLite memory", lite))
    results: dict[str, list[Figures]] = {name: [] for name, _ in contenders}
    try:
        ids = {name: await prefill(memory, args.sessions) for name, memory in contenders}
        for _ in range(args.rounds):
            for name, memory in contenders:
                figures = await drive(name, memory, ids[name], **_knobs(args))
                results[name].append(figures)
    finally:
        await pg.close()
        await lite.close()
        await _admin(admin_dsn, f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
    return results


def _knobs(args: argparse.Namespace) -> dict[str, Any]:
    return {"callers": args.callers, "seconds": args.seconds, "warmup": args.warmup}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--callers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flux-sqlite", action="store_true", help="also measure our SQLite memory")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    server = None
    dsn = os.environ.get("POSTGRES_DSN")
    if not dsn:
        from flux_migrate.pipeline.embedded import dsn_for, start_server

        server = start_server(args.workdir / "pgdata-memory", cleanup_mode="stop")
        dsn = dsn_for(server)
    results = asyncio.run(run(args, dsn))
    print(
        f"the app's call mix (get_history + get_sessions({SESSIONS_PAGE}) + add_message),"
        f" {args.callers} concurrent callers, {args.rounds} rounds of {args.seconds:g} s:"
    )
    for runs in zip(*results.values(), strict=True):
        for figures in runs:
            print("  " + figures.line())
    ours, app = results["flux PostgreSQL memory"], results["the app's SQLite class (model)"]
    ratios = sorted(o.calls_per_s / a.calls_per_s for o, a in zip(ours, app, strict=True))
    p99s = sorted(o.percentile(0.99) for o in ours)
    print(
        f"  PostgreSQL / the app's class, median of {args.rounds}: {ratios[len(ratios) // 2]:.1f}x"
        f" calls/s (goal >= 4x); PostgreSQL p99 median {p99s[len(p99s) // 2]:.1f} ms (goal <= 25)"
    )
    return 0 if not any(f.errors for runs in results.values() for f in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
