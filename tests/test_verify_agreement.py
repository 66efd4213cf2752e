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


def _verdicts(db: Path, dsn: str, forms: tuple[tuple[str, ...], ...] = VERIFIES) -> dict[str, int]:
    """The exit code of each verify form."""
    out = {}
    for form in forms:
        done = cli(*form, "--sqlite-path", str(db), "--postgres-dsn", dsn)
        assert done.returncode in (0, 1), done.stdout + done.stderr
        out[" ".join(form)] = done.returncode
    return out


def _all(code: int, forms: tuple[tuple[str, ...], ...] = VERIFIES) -> dict[str, int]:
    return {" ".join(form): code for form in forms}


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


@pytest.mark.parametrize("app", [True, False], ids=["app tables", "another table"])
async def test_the_three_verifies_agree_on_a_row_sync_quarantined(
    tmp_path: Path, pg_dsn: str, app: bool
) -> None:
    """The app changes a loaded row into one that cannot load: sync quarantines it and keeps
    its previous version in PostgreSQL. All three verifies pass (verify --quick counted the
    previous version and said MISMATCH, verify --api compared it with the session's new
    messages); all three fail once another loaded row is changed. (--api is for the app.)"""
    forms = VERIFIES if app else VERIFIES[:2]
    if app:
        db = app_db(tmp_path / "app.sqlite", good_sessions=3)
        db.write()
        path, bad = db.path, "UPDATE messages SET created_at = 'soon' WHERE rowid = 2"
        change = "UPDATE messages SET content = 'changed' WHERE content <> 'changed'"
    else:
        path = tmp_path / "kv.sqlite"
        src = sqlite3.connect(path)
        src.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, n INTEGER, at DATETIME)")
        src.executemany(
            "INSERT INTO kv VALUES (?, ?, ?)", [(f"k{i}", i, GOOD_TS) for i in range(20)]
        )
        src.commit()
        src.close()
        bad, change = "UPDATE kv SET at = 'soon' WHERE k = 'k3'", "UPDATE kv SET n = n + 1"
    args = ("--sqlite-path", str(path), "--postgres-dsn", pg_dsn, "--no-progress")
    assert 0 == cli("run", *args).returncode
    edit = sqlite3.connect(path)
    edit.execute(bad)
    edit.commit()
    edit.close()
    assert 3 == cli("sync", *args[:4]).returncode
    assert _all(0, forms) == _verdicts(path, pg_dsn, forms)
    await _execute(pg_dsn, change)
    assert _all(1, forms) == _verdicts(path, pg_dsn, forms)


async def test_the_three_verifies_agree_on_quarantined_keys_postgresql_cannot_hold(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Rows quarantined under keys that are not UTF-8 or hold NUL (no PostgreSQL text can):
    all three verifies pass, none fails on sending such a key to PostgreSQL, the parallel
    scan of a large table (forced here by --workers 2) neither (it failed on the NUL)."""
    db = app_db(tmp_path / "app.sqlite", good_sessions=2)
    db.session(id=b"\xff\xfe-not-utf8")
    db.message(db.sessions[0]["id"], id="nul\x00key")
    db.message(db.sessions[0]["id"], id=b"\xc3")
    db.write()
    args = ("--sqlite-path", str(db.path), "--postgres-dsn", pg_dsn, "--no-progress")
    assert 3 == cli("run", *args).returncode
    assert _all(0) == _verdicts(db.path, pg_dsn)
    for form in (("verify",), ("verify", "--quick")):
        scanned = cli(*form, "--workers", "2", *args[:4])
        assert 0 == scanned.returncode, scanned.stdout + scanned.stderr
