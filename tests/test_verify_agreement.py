"""`verify`, `verify --quick` and `verify --api` mean the same by "equal" (issue 22): rows
quarantined and not loaded, or skipped by --on-conflict skip, are expected differences for all
three; rows fixed and loaded since must match; a row changed in PostgreSQL fails all three."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest

from flux_migrate.core.schema import TargetNames, target_ddl
from tests.dirty import GOOD_TS, app_db
from tests.support import cli

pytestmark = pytest.mark.anyio

VERIFIES = (("verify",), ("verify", "--quick"), ("verify", "--api"))


def _verdicts(db: Path, dsn: str) -> dict[str, int]:
    """The exit code of each verify form."""
    out = {}
    for form in VERIFIES:
        done = cli(*form, "--sqlite-path", str(db), "--postgres-dsn", dsn)
        assert done.returncode in (0, 1), done.stdout + done.stderr
        out[" ".join(form)] = done.returncode
    return out


def _all(code: int) -> dict[str, int]:
    return {" ".join(form): code for form in VERIFIES}


async def _execute(dsn: str, *sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in sql:
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_the_three_verifies_agree_on_quarantined_then_fixed_rows(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Quarantined rows are expected differences; once fixed in the source and loaded, they
    match for all three (verify --api counted resolved entries as differences); a changed
    target row fails all three."""
    db = app_db(tmp_path / "app.sqlite", good_sessions=3)
    session = db.session(title="to fix")
    db.message(session["id"], created_at="yesterday")
    db.write()
    args = ("--sqlite-path", str(db.path), "--postgres-dsn", pg_dsn, "--no-progress")
    assert 3 == cli("run", *args).returncode
    assert _all(0) == _verdicts(db.path, pg_dsn)
    fix = sqlite3.connect(db.path)
    fix.execute("UPDATE messages SET created_at = ? WHERE created_at = 'yesterday'", (GOOD_TS,))
    fix.commit()
    fix.close()
    assert 0 == cli("run", *args).returncode
    assert _all(0) == _verdicts(db.path, pg_dsn)
    await _execute(pg_dsn, "UPDATE messages SET content = 'changed' WHERE content <> 'changed'")
    assert _all(1) == _verdicts(db.path, pg_dsn)


async def test_the_three_verifies_agree_after_on_conflict_skip(tmp_path: Path, pg_dsn: str) -> None:
    """After --on-conflict skip into tables holding rows of their own (one with a source key,
    one foreign), all three verifies pass (verify --quick said MISMATCH), and all three fail
    once a loaded row is changed."""
    db = app_db(tmp_path / "app.sqlite", good_sessions=3)
    taken = db.session(title="source title")
    db.write()
    await _execute(
        pg_dsn,
        *target_ddl(TargetNames()),
        "INSERT INTO sessions (id, title, created_at, updated_at, metadata) VALUES"
        f" ('{taken['id']}', 'target title', now(), now(), '{{}}'),"
        " ('foreign', 'not from SQLite', now(), now(), '{}')",
    )
    args = ("--sqlite-path", str(db.path), "--postgres-dsn", pg_dsn, "--no-progress")
    done = cli("run", *args, "--on-conflict", "skip")
    assert 0 == done.returncode, done.stderr
    assert _all(0) == _verdicts(db.path, pg_dsn)
    await _execute(pg_dsn, "UPDATE messages SET role = 'assistant' WHERE role = 'user'")
    assert _all(1) == _verdicts(db.path, pg_dsn)
