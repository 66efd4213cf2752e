"""The health check and the after-migration API comparison, against the real test PostgreSQL."""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import structlog

from flux_migrate.core.errors import ConfigError, TargetError
from flux_migrate.core.schema import SQLITE_DDL
from flux_migrate.memory import PostgresMemory, SQLiteMemory
from flux_migrate.pipeline.check import check
from flux_migrate.pipeline.cli_check import add_commands, add_verify_api_arguments, cmd_verify_api
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import load_settings
from flux_migrate.pipeline.verify_api import compare_api
from tests.support import cli

UNREACHABLE = "postgresql://alice:s3cret-pw@127.0.0.1:1/app"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI handlers configure structlog for the process; put it back for later tests."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


async def snapshot(dsn: str) -> dict[str, Any]:
    """Everything a check could leave behind: user schemas, tables, their rows, advisory locks."""
    conn = await asyncpg.connect(dsn)
    try:
        schemas = {
            r[0]
            for r in await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'"
                " AND nspname <> 'information_schema'"
            )
        }
        tables = [
            (r[0], r[1])
            for r in await conn.fetch(
                "SELECT schemaname, tablename FROM pg_tables"
                " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
            )
        ]
        rows = {
            f"{s}.{t}": await conn.fetchval(f'SELECT count(*) FROM "{s}"."{t}"') for s, t in tables
        }
        locks = await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
    finally:
        await conn.close()
    return {"schemas": schemas, "tables": tables, "rows": rows, "advisory_locks": locks}


# ------------------------------------------------------------------ check


@pytest.mark.anyio
async def test_full_check_on_empty_database_is_healthy_and_leaves_nothing(pg_dsn: str) -> None:
    """A full check on an empty database passes CRUD and leaves no schema, table or lock."""
    before = await snapshot(pg_dsn)
    result = await check(pg_dsn, schema="probe", pool_min=2, pool_max=4)
    assert result.healthy, result.lines()
    assert (result.crud_ok, result.pool_min, result.pool_max) == (True, 2, 4)
    assert result.pool_opened is not None and result.pool_opened >= 2
    assert result.server_version and result.latency_ms is not None and result.latency_ms > 0
    assert all(state.startswith("absent") for state in result.tables.values())
    assert before == await snapshot(pg_dsn)
    assert result.lines()[-1] == "healthy"


@pytest.mark.anyio
async def test_full_check_on_live_tables_keeps_their_rows(pg_dsn: str) -> None:
    """With the app's tables in use, the check reports them ok and changes no row."""
    async with PostgresMemory(pg_dsn) as memory:
        session_id = await memory.create_session("real", {"keep": True})
        await memory.add_message(session_id, "user", "hello")
    before = await snapshot(pg_dsn)
    result = await check(pg_dsn)
    assert result.healthy, result.lines()
    assert result.tables == {'"public"."sessions"': "ok", '"public"."messages"': "ok"}
    assert before == await snapshot(pg_dsn)


@pytest.mark.anyio
async def test_quick_check_only_connects(pg_dsn: str) -> None:
    """--quick reports version and latency, and neither inspects tables nor writes."""
    before = await snapshot(pg_dsn)
    result = await check(pg_dsn, quick=True)
    assert result.healthy
    assert result.server_version and result.latency_ms is not None
    assert (result.tables, result.crud_ok, result.pool_opened) == ({}, None, None)
    assert before == await snapshot(pg_dsn)


@pytest.mark.anyio
async def test_check_reports_a_table_that_does_not_match(pg_dsn: str) -> None:
    """A sessions table with text timestamps makes the check unhealthy, naming the column."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            "CREATE TABLE sessions (id text, title text, created_at text, updated_at text,"
            " metadata jsonb)"
        )
    finally:
        await conn.close()
    result = await check(pg_dsn)
    assert not result.healthy
    assert "created_at" in result.tables['"public"."sessions"']
    assert "MISMATCH" in result.tables['"public"."sessions"']


@pytest.mark.anyio
@pytest.mark.parametrize("quick", [True, False])
async def test_unreachable_server_is_unhealthy_without_password(quick: bool) -> None:
    """An unreachable server is an unhealthy result, not an exception, and shows no password."""
    result = await check(UNREACHABLE, quick=quick, timeout=3)
    text = "\n".join(result.lines()) + repr(result)
    assert (result.healthy, result.connected) == (False, False)
    assert "127.0.0.1:1/app" in text
    assert "s3cret" not in text and "alice" not in result.location


def run_check_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    handlers = add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return handlers[args.command](args)


@pytest.mark.usefixtures("restore_logging")
def test_check_cli_exit_codes(
    pg_dsn: str,
    anyio_backend: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`check` exits 0 healthy, 1 unreachable, and raises ConfigError (exit 2) without a DSN."""
    assert (
        run_check_cli(["check", "--postgres-dsn", pg_dsn, "--pool-min", "1", "--pool-max", "2"])
        == 0
    )
    healthy = capsys.readouterr().out
    assert "round-trip latency" in healthy and "pool: min 1, max 2" in healthy
    assert run_check_cli(["check", "--postgres-dsn", UNREACHABLE, "--quick"]) == 1
    assert "s3cret" not in capsys.readouterr().out
    monkeypatch.delenv("POSTGRES_DSN", raising=False)
    with pytest.raises(ConfigError) as info:
        run_check_cli(["check"])
    assert info.value.exit_code == 2
    with pytest.raises(ConfigError):
        run_check_cli(["check", "--postgres-dsn", pg_dsn, "--pool-min", "5", "--pool-max", "2"])


# ------------------------------------------------------------------ compare_api


async def fill_through_api(path: Path) -> dict[str, list[str]]:
    """Sessions and messages written by the SQLite backend, as the app writes them."""
    ids: dict[str, list[str]] = {}
    async with SQLiteMemory(path) as memory:
        for i in range(12):
            session_id = await memory.create_session(
                f"chat {i} 東京 🙂", {"n": i, "tags": ["a", None]}
            )
            ids[session_id] = [
                await memory.add_message(
                    session_id,
                    "user" if j % 2 == 0 else "assistant",
                    f"message {j} مرحبا e\u0301",
                    {"j": j, "nested": {"ok": True, "x": 1.5}},
                )
                for j in range(i % 4)
            ]
        await memory.update_session_title(next(iter(ids)), "renamed")
    return ids


@pytest.mark.anyio
async def test_compare_api_agrees_after_migration(tmp_path: Path, pg_dsn: str) -> None:
    """Data written through the SQLite API and migrated answers every call alike in PostgreSQL."""
    path = tmp_path / "app.sqlite"
    ids = await fill_through_api(path)
    session_id = next(iter(ids))
    with sqlite3.connect(path) as conn:  # one row the migration must quarantine
        conn.execute(
            "INSERT INTO messages VALUES ('bad-stamp', ?, 'user', 'x', '{}', 'yesterday')",
            (session_id,),
        )
    report = await migrate(load_settings(None, sqlite_path=path, postgres_dsn=pg_dsn))
    assert report.quarantined == 1
    result = await compare_api(path, pg_dsn, page_size=5)
    assert result.ok, result.lines()
    assert (12, sum(len(m) for m in ids.values())) == (
        result.sessions_compared,
        result.messages_compared,
    )
    assert (result.expected_differences, result.quarantined) == (1, 1)
    assert result.pages_compared == 2 * 3  # 12 sessions in pages of 5, 5, 2 on each side


@pytest.mark.anyio
async def test_compare_api_detects_changed_content(tmp_path: Path, pg_dsn: str) -> None:
    """A message whose content changed in PostgreSQL after the migration is a mismatch, by key."""
    path = tmp_path / "app.sqlite"
    ids = await fill_through_api(path)
    await migrate(load_settings(None, sqlite_path=path, postgres_dsn=pg_dsn))
    changed = next(m for messages in ids.values() for m in messages)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE messages SET content = content || '!' WHERE id = $1", changed)
    finally:
        await conn.close()
    result = await compare_api(path, pg_dsn)
    assert not result.ok
    assert result.mismatches == 1
    assert [(f"messages/{changed}", "get_history differs in content")] == [
        (m.key, m.what) for m in result.first_mismatches
    ]
    assert result.lines()[-1] == "MISMATCH"


@pytest.mark.anyio
async def test_compare_api_refuses_unmigrated_target(tmp_path: Path, pg_dsn: str) -> None:
    """Comparing before anything was migrated says so instead of creating tables."""
    path = tmp_path / "app.sqlite"
    await fill_through_api(path)
    with pytest.raises(TargetError) as info:
        await compare_api(path, pg_dsn)
    assert "migrate first" in str(info.value)
    assert (await snapshot(pg_dsn))["tables"] == []


@pytest.mark.usefixtures("restore_logging")
def test_verify_api_cli_exit_codes(
    tmp_path: Path, pg_dsn: str, anyio_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`verify --api` exits 0 when both backends agree and 1 after a session vanished."""
    path = tmp_path / "app.sqlite"
    ids = anyio.run(fill_through_api, path)
    anyio.run(migrate, load_settings(None, sqlite_path=path, postgres_dsn=pg_dsn))
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path)
    parser.add_argument("--sqlite-path", type=Path)
    parser.add_argument("--postgres-dsn")
    parser.add_argument("--log-format")
    add_verify_api_arguments(parser)
    args = parser.parse_args(["--api", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn])
    assert cmd_verify_api(args) == 0
    assert "mismatches: 0" in capsys.readouterr().out

    async def drop_one() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("DELETE FROM sessions WHERE id = $1", next(iter(ids)))
        finally:
            await conn.close()

    anyio.run(drop_one)
    assert cmd_verify_api(args) == 1
    assert f"sessions/{next(iter(ids))}: missing in PostgreSQL" in capsys.readouterr().out


def mix_spellings(path: Path, ids: dict[str, list[str]]) -> None:
    """Respell timestamps (offsets, Z, a space) so SQLite's text order differs from instants."""
    sessions = [s for s, messages in ids.items() if len(messages) == 3][:2]
    with sqlite3.connect(path) as conn:
        stamps = ["2024-05-01T10:00:00+05:30", "2024-05-01T05:00:00Z", "2024-05-01 06:00:00+00:00"]
        for message_id, stamp in zip(ids[sessions[0]], stamps, strict=True):
            conn.execute("UPDATE messages SET created_at = ? WHERE id = ?", (stamp, message_id))
        for session_id, stamp in zip(
            sessions, ["2030-01-01T10:00:00+05:30", "2030-01-01T05:00:00Z"], strict=True
        ):
            conn.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (stamp, session_id))


@pytest.mark.usefixtures("restore_logging")
def test_verify_api_explains_mixed_timestamp_spellings(
    tmp_path: Path, pg_dsn: str, anyio_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Order differences from SQLite's text order of mixed spellings exit 0, counted and shown;
    one changed title still exits 1."""
    path = tmp_path / "app.sqlite"
    ids = anyio.run(fill_through_api, path)
    mix_spellings(path, ids)
    anyio.run(migrate, load_settings(None, sqlite_path=path, postgres_dsn=pg_dsn))
    result = anyio.run(compare_api, path, pg_dsn)
    assert (True, 0, 2) == (result.ok, result.mismatches, result.explained)
    assert ["get_sessions", f"sessions/{next(s for s, m in ids.items() if len(m) == 3)}"] == [
        m.key for m in result.first_explained
    ]
    args = argparse.Namespace(
        config=None, sqlite_path=path, postgres_dsn=pg_dsn, log_format=None, page_size=50
    )
    assert 0 == cmd_verify_api(args)
    out = capsys.readouterr().out
    assert "explained order differences (SQLite orders mixed timestamp spellings as text): 2" in out
    assert "mismatches: 0" in out

    async def rename_one() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(
                "UPDATE sessions SET title = 'changed' WHERE id = $1", next(iter(ids))
            )
        finally:
            await conn.close()

    anyio.run(rename_one)
    assert 1 == cmd_verify_api(args)
    out = capsys.readouterr().out
    assert f"sessions/{next(iter(ids))}: get_session differs in title" in out
    assert "explained order differences (SQLite orders mixed timestamp spellings as text): 2" in out


@pytest.mark.anyio
async def test_verify_api_still_fails_on_an_order_spellings_do_not_explain(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A history order that sorting by instant does not produce is a mismatch, not explained."""
    path = tmp_path / "app.sqlite"
    ids = await fill_through_api(path)
    await migrate(load_settings(None, sqlite_path=path, postgres_dsn=pg_dsn))
    session_id, messages = next((s, m) for s, m in ids.items() if len(m) == 3)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            "UPDATE messages SET created_at = created_at - interval '1 day' WHERE id = $1",
            messages[-1],
        )
    finally:
        await conn.close()
    result = await compare_api(path, pg_dsn)
    assert (False, 0) == (result.ok, result.explained)
    assert (f"sessions/{session_id}", "get_history returns other messages or another order") == (
        result.first_mismatches[0].key,
        result.first_mismatches[0].what,
    )


@pytest.mark.anyio
async def test_check_prints_memory_health(pg_dsn: str) -> None:
    """A full check prints the memory's health: role, pool figures and acquire waits."""
    result = await check(pg_dsn, pool_min=1, pool_max=3)
    text = "\n".join(result.lines())
    assert result.healthy, text
    assert result.health is not None
    assert ("primary", 3) == (result.health["role"], result.health["pool"]["max"])
    assert "memory health: ok, role primary" in text
    assert "probe pool: size" in text and "acquire waits: 1, p50" in text
    pools = [line for line in text.splitlines() if line.strip().startswith("pool:")]
    assert ["  pool: min 1, max 3, opened 1"] == pools  # one line about the app's pool


def _app_file_in_the_old_shape(path: Path, metadata: str) -> None:
    """An app database from before user_id (no column, no user index), one session with one
    message, both carrying ``metadata``."""
    with sqlite3.connect(path) as conn:
        conn.executescript(
            SQLITE_DDL.replace(",\n    user_id TEXT DEFAULT ''", "").split("CREATE INDEX")[0]
        )
        stamp = "2024-05-01T10:00:00+00:00"
        conn.execute("INSERT INTO sessions VALUES ('s1', 't', ?, ?, ?)", (stamp, stamp, metadata))
        conn.execute(
            "INSERT INTO messages VALUES ('m1', 's1', 'user', 'x', ?, ?)", (metadata, stamp)
        )


def _schema_and_digest(path: Path) -> tuple[list[Any], str]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    return schema, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.anyio
async def test_verify_api_never_writes_to_its_source(tmp_path: Path, pg_dsn: str) -> None:
    """verify --api on a file in the app's older shape leaves it byte for byte as it was: no
    user_id column, no index added (case 9); sync then still accepts the target."""
    path = tmp_path / "memory.db"
    _app_file_in_the_old_shape(path, '{"a": 1}')
    await migrate(load_settings(None, sqlite_path=path, postgres_dsn=pg_dsn))
    before = _schema_and_digest(path)
    result = await compare_api(path, pg_dsn)
    assert result.ok, result.lines()
    assert before == _schema_and_digest(path)
    synced = cli("sync", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == synced.returncode, synced.stdout + synced.stderr


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("source", "stored", "verdict"),
    [
        ('{"a": 1e16}', '{"a": 10000000000000000}', "mismatch"),
        ('{"a": 1.0}', '{"a": 1}', "mismatch"),
        ('{"a": 2}', '{"a": 2.0}', "mismatch"),
        ('{"a": [1e300]}', '{"a": [1e300]}', "mismatch"),  # jsonb: a 301-digit int
        ('{"a": -0.0}', None, "-0.0 reads as 0.0"),
        ('{"b": 1, "a": 2}', None, "keys in jsonb's order"),
        ('{"a": 1e16, "b": 1.5e300}', None, "same"),
    ],
)
async def test_verify_api_compares_values_with_their_types(
    tmp_path: Path, pg_dsn: str, source: str, stored: str | None, verdict: str
) -> None:
    """verify --api compares by value and type (1e16 is not 10**16): a changed type is a
    mismatch; jsonb's canonical forms are documented differences, counted, not failures."""
    path = tmp_path / "memory.db"
    _app_file_in_the_old_shape(path, source)
    await migrate(load_settings(None, sqlite_path=path, postgres_dsn=pg_dsn))
    if stored is not None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("UPDATE messages SET metadata = $1::text::jsonb", stored)
        finally:
            await conn.close()
    result = await compare_api(path, pg_dsn)
    if verdict == "mismatch":
        assert (False, 1) == (result.ok, result.mismatches)
        assert "get_history differs in metadata" == result.first_mismatches[0].what
    elif verdict == "same":
        assert (True, 0, 0) == (result.ok, result.mismatches, result.documented)
    else:
        assert (True, 2) == (result.ok, result.documented)  # the session's and the message's
        assert [f"metadata: {verdict}"] * 2 == [m.what for m in result.first_documented]
