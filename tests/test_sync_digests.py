"""The row digests sync relies on: the load writes one pack per batch (no per-row bookkeeping
rows), and what sync writes, moves or deletes afterwards overrides the pack entries, keeping
ownership (whose write a PostgreSQL row is) exact across many syncs (real PostgreSQL)."""

from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.sync import sync
from flux_migrate.pipeline.sync_apply import TableSync
from flux_migrate.stages.transform import key_of
from tests.support import app_copy, app_settings, assert_app_tables_equal, source_rows, target_rows


async def _fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def _source(path: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(path)
    db.execute(sql, args)
    db.commit()
    db.close()


@pytest.mark.anyio
async def test_bulk_run_writes_one_pack_per_batch_holding_every_row(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """Each committed batch leaves one pack; together they name every loaded row exactly once,
    with its source rowid; nothing is written per row."""
    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn, batch_size=100))
    db = sqlite3.connect(path)
    for table in ("sessions", "messages"):
        packs = await _fetch(
            pg_dsn,
            "SELECT rowids, keys, digests FROM flux_migrate.digest_packs"
            " WHERE target_schema = 'public' AND source_table = $1",
            table,
        )
        source = dict(db.execute(f"SELECT id, rowid FROM {table}").fetchall())
        assert len(packs) == -(-len(source) // 100)
        entries = []
        for p in packs:  # int64 little-endian rowids and digests, keys a JSON array
            keys = json.loads(p["keys"])
            rowids = struct.unpack(f"<{len(keys)}q", p["rowids"])
            assert len(p["digests"]) == 8 * len(keys)
            entries += zip(keys, rowids, strict=True)
        assert sorted(entries) == sorted(source.items())
    db.close()
    assert [] == await _fetch(pg_dsn, "SELECT key FROM flux_migrate.digest_rows")


@pytest.mark.anyio
async def test_rows_sync_wrote_stay_its_own_and_others_writes_stay_theirs(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """A row sync updated is updated by the next sync too; once the app changes it in
    PostgreSQL it is left alone (a conflict when the source changes it as well); a key sync
    deleted and the source inserts again is loaded again."""
    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    db = sqlite3.connect(path)
    a, b, c = [r[0] for r in db.execute("SELECT id FROM sessions ORDER BY rowid LIMIT 3 OFFSET 7")]
    c_row = db.execute("SELECT * FROM sessions WHERE id = ?", (c,)).fetchone()
    db.close()
    for key in (a, b):
        _source(path, "UPDATE sessions SET title = 'first' WHERE id = ?", key)
    _source(path, "DELETE FROM messages WHERE session_id = ?", c)
    _source(path, "DELETE FROM sessions WHERE id = ?", c)
    first = await sync(app_settings(path, pg_dsn))
    assert (2, 1, []) == (
        first.tables["sessions"].updated,
        first.tables["sessions"].deleted,
        first.conflicts,
    )
    overrides = await _fetch(pg_dsn, "SELECT key, digest FROM flux_migrate.digest_rows")
    assert {a, b, c} <= {r["key"] for r in overrides}
    assert [None] == [r["digest"] for r in overrides if r["key"] == c]

    _source(path, "UPDATE sessions SET title = 'second' WHERE id = ?", a)  # sync's row again
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("UPDATE sessions SET title = 'app wrote' WHERE id = $1", b)
    await conn.close()
    second = await sync(app_settings(path, pg_dsn))
    assert (1, []) == (second.tables["sessions"].updated, second.conflicts)
    rows = await target_rows(pg_dsn, "sessions")
    assert ("second", "app wrote") == (rows[a]["title"], rows[b]["title"])

    _source(path, "UPDATE sessions SET title = 'source too' WHERE id = ?", b)
    _source(path, "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)", *c_row)
    third = await sync(app_settings(path, pg_dsn))
    assert [(b, "changed_in_both")] == [(k, kind) for _t, k, kind in third.conflicts]
    assert 1 == third.tables["sessions"].inserted
    rows = await target_rows(pg_dsn, "sessions")
    assert "app wrote" == rows[b]["title"]
    assert source_rows(path, "sessions")[c] == rows[c]


def _renumber(db: sqlite3.Connection, table: str) -> None:
    """Give a table's rows compact rowids in their order (same schema text and indexes)."""
    table_sql = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    indexes = [
        r[0]
        for r in db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ?"
            " AND sql IS NOT NULL",
            (table,),
        )
    ]
    db.execute("PRAGMA legacy_alter_table = ON")  # leave the references to it as they are
    db.execute(f"ALTER TABLE {table} RENAME TO old_rows")
    db.execute(table_sql)
    db.execute(f"INSERT INTO {table} SELECT * FROM old_rows ORDER BY rowid")
    db.execute("DROP TABLE old_rows")
    for sql in indexes:
        db.execute(sql)
    db.commit()


@pytest.mark.anyio
async def test_a_moved_row_keeps_the_ownership_of_its_pack(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """A row whose rowid moved (VACUUM) is recorded again without rewriting it and stays
    flux-migrate's to update; the app's later change to one in PostgreSQL is the app's."""
    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    db = sqlite3.connect(path)
    gone = db.execute("SELECT id FROM sessions ORDER BY rowid LIMIT 1 OFFSET 20").fetchone()[0]
    db.execute("DELETE FROM messages WHERE session_id = ?", (gone,))
    db.execute("DELETE FROM sessions WHERE id = ?", (gone,))
    db.commit()
    _renumber(db, "sessions")  # as VACUUM may: sessions has no INTEGER PRIMARY KEY
    moved_id, other_id = [
        r[0] for r in db.execute("SELECT id FROM sessions WHERE rowid IN (30, 31) ORDER BY rowid")
    ]
    db.close()
    report = await sync(app_settings(path, pg_dsn))
    assert report.tables["sessions"].moved > 0
    assert 0 == report.tables["sessions"].updated
    await assert_app_tables_equal(path, pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("UPDATE sessions SET title = 'app wrote' WHERE id = $1", moved_id)
    await conn.close()
    for key in (moved_id, other_id):
        _source(path, "UPDATE sessions SET title = 'source wrote' WHERE id = ?", key)
    later = await sync(app_settings(path, pg_dsn))
    assert [(moved_id, "changed_in_both")] == [(k, kind) for _t, k, kind in later.conflicts]
    assert 1 == later.tables["sessions"].updated  # the moved row only the source changed
    rows = await target_rows(pg_dsn, "sessions")
    assert ("app wrote", "source wrote") == (rows[moved_id]["title"], rows[other_id]["title"])


@pytest.mark.anyio
async def test_a_key_the_plan_never_saw_is_left_for_the_next_sync(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """A row the app rewrites under another key between sync's plan and its apply is neither
    inserted nor deleted on a guess: it is counted as left over, and the next sync (which plans
    it) makes the target equal to the source."""
    from flux_migrate.core.target import Target
    from flux_migrate.pipeline.runner import resolve_run_mapping
    from flux_migrate.pipeline.stop import StopFlag
    from flux_migrate.pipeline.sync import _apply
    from flux_migrate.stages.extract import open_source

    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    db = sqlite3.connect(path)
    old = db.execute("SELECT id FROM sessions ORDER BY rowid LIMIT 1 OFFSET 30").fetchone()[0]
    db.close()
    _source(path, "UPDATE sessions SET title = 'planned' WHERE id = ?", old)
    plan = await sync(app_settings(path, pg_dsn), dry_run=True)
    assert 1 == len(plan.plans["sessions"].updates)
    new = "00000000-0000-4000-8000-000000000001"
    _source(path, "UPDATE sessions SET id = ? WHERE id = ?", new, old)  # after the plan
    _source(path, "UPDATE messages SET session_id = ? WHERE session_id = ?", new, old)
    plan.dry_run = False
    plan.tables = {name: TableSync() for name in plan.tables}  # the dry run's counts
    settings = await resolve_run_mapping(app_settings(path, pg_dsn), path)
    async with open_source(path) as src:
        await _apply(src, Target(pg_dsn), settings, plan, settings.tables, StopFlag())
    assert 1 == plan.tables["sessions"].deferred
    assert (0, 0) == (plan.tables["sessions"].inserted, plan.tables["sessions"].updated)
    rows = await target_rows(pg_dsn, "sessions")
    assert old in rows and new not in rows
    await sync(app_settings(path, pg_dsn))
    await assert_app_tables_equal(path, pg_dsn)


@pytest.mark.anyio
async def test_a_key_loaded_again_after_sync_deleted_it_is_followed_again(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """Sync deletes a session; the app inserts it again and a `run` loads it; the app deletes
    it once more: the next sync deletes it too (the run's pack, not sync's older record of the
    deletion, says what flux-migrate wrote last)."""
    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    db = sqlite3.connect(path)
    key = db.execute("SELECT id FROM sessions ORDER BY rowid LIMIT 1 OFFSET 40").fetchone()[0]
    row = db.execute("SELECT * FROM sessions WHERE id = ?", (key,)).fetchone()
    db.close()
    _source(path, "DELETE FROM messages WHERE session_id = ?", key)
    _source(path, "DELETE FROM sessions WHERE id = ?", key)
    assert 1 == (await sync(app_settings(path, pg_dsn))).tables["sessions"].deleted
    _source(path, "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)", *row)
    rerun = await migrate(app_settings(path, pg_dsn))
    assert 1 == rerun.tables["sessions"].loaded
    assert key in await target_rows(pg_dsn, "sessions")
    idle = await sync(app_settings(path, pg_dsn))  # the older pack entry of the key stays hidden
    assert idle.idle, {n: (len(p.inserts), len(p.deletes)) for n, p in idle.plans.items()}
    _source(path, "DELETE FROM sessions WHERE id = ?", key)
    again = await sync(app_settings(path, pg_dsn))
    assert (1, []) == (again.tables["sessions"].deleted, again.conflicts)
    await assert_app_tables_equal(path, pg_dsn)


@pytest.mark.anyio
async def test_a_new_row_under_a_parent_deleted_in_postgres_is_a_conflict(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """Someone deletes a session and its messages in PostgreSQL; in SQLite the session is
    unchanged, one of its messages is edited and a new one added: both are conflicts (sync
    exits 4 naming them), not rows put off to a next sync that would never load them."""
    import uuid

    from flux_migrate.core.errors import EXIT_CONFLICTS
    from tests.support import cli

    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    db = sqlite3.connect(path)
    key = db.execute("SELECT id FROM sessions ORDER BY rowid LIMIT 1 OFFSET 40").fetchone()[0]
    edited = db.execute("SELECT id FROM messages WHERE session_id = ? LIMIT 1", (key,)).fetchone()
    db.close()
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute("DELETE FROM messages WHERE session_id = $1", key)
    await conn.execute("DELETE FROM sessions WHERE id = $1", key)
    await conn.close()
    _source(path, "UPDATE messages SET content = 'edited' WHERE id = ?", edited[0])
    new = str(uuid.uuid4())
    _source(
        path,
        "INSERT INTO messages VALUES (?, ?, 'user', 'late', '{}', '2026-01-01T00:00:00+00:00')",
        new,
        key,
    )
    for _ in range(2):  # and again: the same, not "left for the next sync"
        done = cli("sync", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
        assert EXIT_CONFLICTS == done.returncode, done.stdout + done.stderr
        assert f"messages {edited[0]}: deleted_in_postgres" in done.stdout
        assert f"messages {new}: parent_deleted_in_postgres" in done.stdout
        assert "left for the next sync" not in done.stdout
    assert key not in await target_rows(pg_dsn, "sessions")


@pytest.mark.anyio
async def test_a_table_with_digests_of_the_old_kind_is_refused_until_reloaded(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """Rows an earlier flux-migrate recorded one per row (flux_migrate.row_digests) have no
    pack: sync refuses (exit 2, naming the table) rather than miss their changes; after
    `run --restart --yes` it syncs."""
    from tests.support import cli

    path = app_copy(sample_db, tmp_path)
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *args).returncode
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute(
        "CREATE TABLE flux_migrate.row_digests (target_schema text, source_table text, key text,"
        " source_rowid bigint, digest bigint, written_xmin xid)"
    )
    await conn.execute(
        "INSERT INTO flux_migrate.row_digests VALUES ('public', 'sessions', 'k', 1, 1, NULL)"
    )
    await conn.close()
    refused = cli("sync", *args)
    assert 2 == refused.returncode, refused.stdout + refused.stderr
    assert "Table sessions was loaded (at least in part) by a flux-migrate" in refused.stderr
    assert 0 == cli("run", *args, "--restart", "--yes").returncode
    assert 0 == cli("sync", *args).returncode


@pytest.mark.anyio
async def test_a_key_stored_twice_leaves_no_phantom_delete(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """A key whose row moved to a new rowid and was recorded again in a newer pack (as a row
    loaded a second time is) keeps a stale entry at its old rowid: sync neither plans nor
    reports a delete for it, and stays idle."""
    from flux_migrate.core import bookkeeping
    from flux_migrate.core.digest import digests
    from flux_migrate.pipeline.runner import resolve_run_mapping

    path = app_copy(sample_db, tmp_path)
    await migrate(app_settings(path, pg_dsn))
    db = sqlite3.connect(path)
    key = db.execute("SELECT id FROM sessions ORDER BY rowid LIMIT 1 OFFSET 50").fetchone()[0]
    row = db.execute("SELECT * FROM sessions WHERE id = ?", (key,)).fetchone()
    db.execute("DELETE FROM sessions WHERE id = ?", (key,))
    db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)", row)  # a new, last rowid
    db.commit()
    settings = await resolve_run_mapping(app_settings(path, pg_dsn), path)
    table = next(t for t in settings.tables if t.name == "sessions")
    db.text_factory = bytes
    cols = ", ".join(table.column_names)
    raw = db.execute(f"SELECT rowid, {cols} FROM sessions WHERE id = ?", (key,)).fetchall()
    db.close()
    conn = await asyncpg.connect(pg_dsn)
    try:  # what a second load of the row records
        await bookkeeping.write_digest_pack(
            conn, "public", "sessions", [raw[0][0]], [key], digests(raw, len(table.column_names))
        )
    finally:
        await conn.close()
    plan = await sync(app_settings(path, pg_dsn), dry_run=True)
    assert ([], []) == (plan.plans["sessions"].deletes, plan.plans["sessions"].inserts)
    report = await sync(app_settings(path, pg_dsn))
    assert report.idle and [] == report.conflicts
    await assert_app_tables_equal(path, pg_dsn)


# A key as the load records it (stages/transform.key_of: text, or any bytes with what is not
# UTF-8 backslash-escaped), and lone low surrogates, which key_of never makes but orjson
# refuses: they take the json module's path. (A high and a low surrogate side by side would
# read back as one character: key_of makes neither.)
_LOW_SURROGATES = st.text(st.characters(min_codepoint=0xDC00, max_codepoint=0xDFFF), min_size=1)
PACK_KEYS = st.text() | st.binary().map(key_of) | _LOW_SURROGATES


@settings(max_examples=200, deadline=None)
@given(st.lists(PACK_KEYS) | st.lists(PACK_KEYS).map(tuple))
def test_a_packs_keys_read_back_as_written(keys: list[str] | tuple[str, ...]) -> None:
    """Any keys a pack holds (NUL, any script, bytes that were not UTF-8, none) come back from
    the pack's JSON, as sync reads them, exactly as the load wrote them."""
    from flux_migrate.core.bookkeeping import keys_json

    assert list(keys) == json.loads(keys_json(keys))


# A one-column key as SQLite hands it to sync's scan: text (as its bytes, ASCII or not, NUL
# and empty included), an integer, a float, NULL.
_RAW_KEYS = (
    st.binary(max_size=6)
    | st.text(alphabet="ab-0\x00", max_size=6).map(str.encode)
    | st.integers()
    | st.floats(allow_nan=False)
    | st.none()
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_RAW_KEYS, max_size=8) | st.lists(st.text("ab-0", max_size=4).map(str.encode)))
def test_a_scans_keys_arrive_as_pack_keys_makes_them(raw: list[object]) -> None:
    """The keys a scan worker sends (one joined text for ASCII keys without NUL, the list
    otherwise) arrive as the pack's own keys of the same raw values: an unchanged row is
    recognised whatever its key, and a list of plain keys takes the joined form."""
    from flux_migrate.pipeline.sync_scan import received_keys, shipped_keys
    from flux_migrate.stages.transform import pack_keys

    sent = shipped_keys(list(raw))
    assert received_keys(sent) == pack_keys(list(raw))
    plain = all(type(k) is bytes and k.isascii() and b"\x00" not in k for k in raw)
    assert isinstance(sent, bytes) == (plain and bool(raw))


@settings(max_examples=30, deadline=None)
@given(page=st.integers(1, 700), lo=st.integers(-5, 3100), span=st.integers(0, 3200))
def test_a_scans_pages_give_the_loads_digests_of_every_row(
    sample_db: Path, page: int, lo: int, span: int
) -> None:
    """However sync's scan pages a range, it sends every row of the range once, in rowid
    order, with the digest and key the load computes from the rows read at once (what it
    stored): a row lost or digested twice at a page's edge would be a phantom change."""
    from array import array

    from flux_migrate.core.digest import digests
    from flux_migrate.pipeline import sync_scan
    from flux_migrate.stages.transform import pack_keys

    sql = (
        "SELECT rowid, id, session_id, role, content, metadata, created_at FROM messages"
        " WHERE rowid >= ? AND rowid <= ? ORDER BY rowid"
    )
    held = sync_scan.PAGE
    try:
        sync_scan.PAGE = page
        rowids_b, values_b, keys = sync_scan.scan_range(
            f"file:{sample_db}?mode=ro", sql, lo, lo + span, 6, 0, 10.0
        )
    finally:
        sync_scan.PAGE = held
    db = sqlite3.connect(sample_db)
    db.text_factory = bytes
    rows = db.execute(sql, (lo, lo + span)).fetchall()
    db.close()
    rowids, values = array("q"), array("q")
    rowids.frombytes(rowids_b)
    values.frombytes(values_b)
    assert list(rowids) == [r[0] for r in rows]
    assert list(values) == digests(rows, 6)
    assert sync_scan.received_keys(keys) == pack_keys([r[1] for r in rows])
