"""Zero loss: every bad row is quarantined with its raw value and reason; the rest loads exactly."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_migrate.core.schema import TargetNames
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import load_settings
from flux_migrate.pipeline.verify import verify_quick, verify_rows
from flux_migrate.stages.convert import REASONS, raw_value_from_json
from tests.dirty import GOOD_TS, app_db, new_id

pytestmark = pytest.mark.anyio

DEEP = "{" + '"a":' * 1 + "[" * 5000 + "]" * 5000 + "}"

# (table, column, bad value, reason): one case per reason code a value can earn.
CASES: list[tuple[str, str, Any, str]] = [
    ("sessions", "title", b"caf\xe9 latin-1", "invalid_utf8"),
    ("messages", "content", b"\xff\xfe broken", "invalid_utf8"),
    ("sessions", "id", b"\xff\xfe-not-utf8-key", "invalid_utf8"),
    ("messages", "session_id", b"\xc3\x28", "invalid_utf8"),
    ("messages", "content", "nul \x00 inside", "nul_character"),
    ("sessions", "title", "a\x00b", "nul_character"),
    ("messages", "session_id", "", "null_value"),
    ("sessions", "id", None, "missing_key"),
    ("sessions", "id", "", "missing_key"),
    ("messages", "id", "x" * 37, "key_too_long"),
    ("sessions", "created_at", "yesterday at noon", "invalid_timestamp"),
    ("sessions", "updated_at", "", "invalid_timestamp"),
    ("messages", "created_at", "2026-02-30T10:00:00+00:00", "invalid_timestamp"),
    ("messages", "created_at", "2026-11-26t10:00:00z", "invalid_timestamp"),
    ("messages", "created_at", "0001-01-01T00:30:00+01:00", "timestamp_out_of_range"),
    ("sessions", "metadata", "{not json", "invalid_json"),
    ("messages", "metadata", '{"score": NaN}', "invalid_json"),
    ("messages", "metadata", '{"x": Infinity}', "invalid_json"),
    ("sessions", "metadata", "[1, 2, 3]", "json_not_object"),
    ("messages", "metadata", '"just a string"', "json_not_object"),
    ("messages", "metadata", '{"k": "a\\u0000b"}', "json_nul_character"),
    ("messages", "metadata", DEEP, "json_too_deep"),
    ("messages", "metadata", '{"a": 1, "b": {"a": 2, "a": 3}}', "json_duplicate_key"),
    ("sessions", "metadata", '{"k": 1, "\\u006b": 2}', "json_duplicate_key"),
    ("messages", "session_id", "00000000-0000-4000-8000-000000000000", "orphan_message"),
    ("messages", "metadata", '{"n": 1e400000}', "rejected_by_server"),
    ("messages", "metadata", '{"s": "\\ud800"}', "rejected_by_server"),
]


async def _quarantine(dsn: str, schema: str = "public") -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT * FROM flux_migrate.quarantine WHERE target_schema = $1 ORDER BY id", schema
        )
    finally:
        await conn.close()
    return [dict(r) for r in rows]


# Reasons only a table outside the app profile can give: covered end to end by
# tests/test_generic_tables.py, value by value by tests/test_values_properties.py.
GENERIC_ONLY = {"type_mismatch", "number_out_of_range", "orphan_row"}
# Reasons only a line of a JSONL file can give: covered by tests/test_jsonl.py.
JSONL_ONLY = {
    "invalid_json_line",
    "not_an_object",
    "unusable_key_name",
    "line_too_long",
    "gone_from_file",
}


def test_every_reason_code_has_a_case() -> None:
    """The cases below cover every documented reason code the app's tables can give
    (duplicate_key needs two rows: tests/test_hardening.py)."""
    expected = set(REASONS) - GENERIC_ONLY - JSONL_ONLY - {"duplicate_key"}
    assert expected == {c[3] for c in CASES}


@pytest.mark.parametrize(
    ("table", "column", "value", "reason"), CASES, ids=[f"{c[3]}-{c[1]}" for c in CASES]
)
async def test_bad_value_is_quarantined_with_its_raw_value(
    tmp_path: Path, pg_dsn: str, table: str, column: str, value: Any, reason: str
) -> None:
    """A row with one bad value is quarantined with that reason and its raw bytes; every other
    row loads exactly and the accounting holds."""
    db = app_db(tmp_path / "app.sqlite")
    if table == "sessions":
        bad = db.session(**{column: value})
    else:
        bad = db.message(db.sessions[0]["id"])
        bad[column] = value
    db.write()
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn, batch_size=3)
    report = await migrate(settings)
    assert report.quarantined_open == 1
    assert report.tables[table].quarantined == 1
    assert report.tables[table].extracted == report.tables[table].loaded + 1
    [row] = await _quarantine(pg_dsn)
    assert (table, reason) == (row["source_table"], row["reason"])
    assert ("load" if reason == "rejected_by_server" else "transform") == row["stage"]
    assert column in row["detail"] or reason in ("orphan_message", "rejected_by_server")
    raw = json.loads(row["raw"])
    expected = value.encode() if isinstance(value, str) else value
    assert expected == raw_value_from_json(raw[column])
    # every source column's raw value, user_id (which the app's DDL defaults) included
    assert set(raw) == set(bad) | ({"user_id"} if table == "sessions" else set())
    results = await verify_rows(settings)
    assert all(r.ok for r in results), results
    assert sum(r.quarantined for r in results) == 1


async def test_a_quarantined_session_makes_its_messages_orphans(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Messages of a quarantined session are quarantined as orphans, never a failed run."""
    db = app_db(tmp_path / "app.sqlite")
    bad = db.session(created_at="not a date")
    for _ in range(3):
        db.message(bad["id"])
    db.write()
    report = await migrate(load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn))
    assert report.status == "completed"
    reasons = sorted(r["reason"] for r in await _quarantine(pg_dsn))
    assert reasons == ["invalid_timestamp", "orphan_message", "orphan_message", "orphan_message"]
    assert report.quarantined_open == 4


async def test_fixed_rows_are_loaded_by_a_rerun(tmp_path: Path, pg_dsn: str) -> None:
    """Fixing a quarantined session in the source and rerunning loads it and its orphaned
    messages, marks the quarantine resolved, and verify passes with nothing quarantined."""
    db = app_db(tmp_path / "app.sqlite")
    bad = db.session(created_at="not a date")
    db.message(bad["id"])
    bad_msg = db.message(db.sessions[0]["id"], content=b"\xff bad")
    db.write()
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn)
    first = await migrate(settings)
    assert first.quarantined_open == 3
    conn = sqlite3.connect(db.path)
    conn.execute("UPDATE sessions SET created_at = ? WHERE id = ?", (GOOD_TS, bad["id"]))
    conn.execute("UPDATE messages SET content = ? WHERE id = ?", ("good now", bad_msg["id"]))
    conn.commit()
    conn.close()
    second = await migrate(settings)
    assert second.quarantined_open == 0
    assert second.tables["sessions"].requeued == 1
    assert second.tables["messages"].requeued == 2
    assert all(r["resolution"] == "loaded" for r in await _quarantine(pg_dsn))
    results = await verify_rows(settings)
    assert all(r.ok and r.quarantined == 0 for r in results), results


async def test_nul_stripping_option_loads_instead(tmp_path: Path, pg_dsn: str) -> None:
    """With strip_nul on, NUL characters are removed from text and metadata and the row loads."""
    db = app_db(tmp_path / "app.sqlite")
    msg = db.message(db.sessions[0]["id"], content="a\x00b", metadata='{"k": "x\\u0000y"}')
    db.write()
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn, strip_nul=True)
    report = await migrate(settings)
    assert report.quarantined_open == 0
    conn = await asyncpg.connect(pg_dsn)
    try:
        row = await conn.fetchrow("SELECT content, metadata FROM messages WHERE id = $1", msg["id"])
    finally:
        await conn.close()
    assert (row["content"], json.loads(row["metadata"])) == ("ab", {"k": "xy"})


async def test_valid_unicode_and_large_content_load_byte_exact(tmp_path: Path, pg_dsn: str) -> None:
    """Emoji, CJK, RTL, combining marks and a 5 MB message load byte-exact; NULL title stays."""
    db = app_db(tmp_path / "app.sqlite")
    s = db.session(title=None)
    texts = [
        "👩‍💻🚀❤️",
        "東京の天気 数据库",
        "مرحبا بالعالم שלום",
        "e\u0301 a\u0308 \u200d",
        "x" * 5_000_000 + "🙂",
    ]
    ids = [db.message(s["id"], content=t)["id"] for t in texts]
    db.write()
    report = await migrate(load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn))
    assert report.quarantined_open == 0
    conn = await asyncpg.connect(pg_dsn)
    try:
        got = [await conn.fetchval("SELECT content FROM messages WHERE id = $1", i) for i in ids]
        title = await conn.fetchval("SELECT title FROM sessions WHERE id = $1", s["id"])
    finally:
        await conn.close()
    assert texts == got
    assert title is None


GOOD = st.sampled_from(["good"])
BAD = st.sampled_from([c for c in CASES if c[3] not in ("orphan_message",)])


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kinds=st.lists(st.one_of(GOOD, BAD), min_size=1, max_size=25),
    batch_size=st.integers(min_value=1, max_value=8),
)
async def test_any_mix_ends_loaded_or_quarantined_exactly_once(
    tmp_path_factory: pytest.TempPathFactory, pg_dsn: str, kinds: list[Any], batch_size: int
) -> None:
    """For any mix of good and bad rows in any batch size, every source row ends in exactly one
    of loaded or quarantined, and the loaded ones equal their sources."""
    path = tmp_path_factory.mktemp("mix") / "app.sqlite"
    db = app_db(path, good_sessions=1, messages_each=0)
    parent = db.sessions[0]["id"]
    used_keys: set[tuple[str, Any]] = set()
    for kind in kinds:
        if kind == "good":
            db.message(parent)
            continue
        table, column, value, _ = kind
        if column == "id" and value is not None:
            if (table, value) in used_keys:
                continue  # SQLite enforces unique keys: one row per bad key value
            used_keys.add((table, value))
        if table == "sessions":
            db.session(**{column: value})
        else:
            db.message(parent)[column] = value
    db.write()
    schema = f"mix_{new_id()[:8]}"
    settings = load_settings(
        None,
        sqlite_path=path,
        postgres_dsn=pg_dsn,
        batch_size=batch_size,
        names=TargetNames(schema=schema),
    )
    report = await migrate(settings)
    quarantine = await _quarantine(pg_dsn, schema)
    conn = sqlite3.connect(path)
    for table in ("sessions", "messages"):
        n_source = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        t = report.tables[table]
        q_rowids = [r["source_rowid"] for r in quarantine if r["source_table"] == table]
        assert len(q_rowids) == len(set(q_rowids))
        assert n_source == t.extracted == t.loaded + t.quarantined == t.loaded + len(q_rowids)
    conn.close()
    results = await verify_rows(settings)
    assert all(r.ok for r in results), results
    quick = await verify_quick(settings)
    assert all(q.ok for q in quick), quick
