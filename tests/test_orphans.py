"""The set-based orphan check (one anti-join per table read) finds exactly the rows the per-row
check finds, whatever the parent key's type, collation or presence."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_migrate.core.schema import MESSAGES, Table, quote_ident
from flux_migrate.pipeline.mapping_source import resolve_mapping
from flux_migrate.stages import extract as extract_module
from flux_migrate.stages.extract import extract, fetch_rows, open_source
from flux_migrate.stages.extract_sql import page_batch
from flux_migrate.stages.transform import transform_batch

pytestmark = pytest.mark.anyio

# Parent keys and the values a child row may name: equal, differing only in case or in
# storage class (1, '1', 1.0, '01'), deleted parents, NULL.
KEYS = st.sampled_from(["a", "A", "b", "1", "01", "1.0", 1, 2, 1.0, 2.5, "x", "ä", "Ä"])
NAMED = st.one_of(st.none(), KEYS)
DECLARED = st.sampled_from(["", "TEXT", "TEXT COLLATE NOCASE", "NUMERIC", "INT", "BLOB"])


def _reference_sql(table: Table) -> str:
    """The per-row orphan flag as extract computed it before the set-based check (written out
    here, independently of stages/extract.py)."""
    cols = ", ".join(f"t.{quote_ident(c)}" for c in table.column_names)
    if table.parent is not None and table.parent_column is not None:
        check = (
            f"NOT EXISTS (SELECT 1 FROM {quote_ident(table.parent)} AS p"
            f" WHERE p.id = t.{quote_ident(table.parent_column)})"
        )
    elif not table.foreign_keys:  # a key the mapping cannot build (types that never match)
        return f"SELECT t.rowid, {cols} FROM {quote_ident(table.name)} AS t ORDER BY t.rowid"
    else:
        (fk,) = table.foreign_keys
        (c,), (pc,) = fk.columns, fk.parent_columns
        check = (
            f"(t.{quote_ident(c)} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM"
            f" {quote_ident(fk.parent)} AS p WHERE p.{quote_ident(pc)} = t.{quote_ident(c)}))"
        )
    return f"SELECT t.rowid, {cols}, {check} FROM {quote_ident(table.name)} AS t ORDER BY t.rowid"


async def _quarantined(path: Path, table: Table, batch_size: int) -> tuple[Any, Any]:
    """(rowid, flag) of every row and (rowid, reason, stage) of every reject, as extract +
    transform produce them and as the per-row reference produces them."""
    async with open_source(path) as src:
        batches = [
            transform_batch(b, table)
            async for b in extract(src, table, after_rowid=0, upto_rowid=10**9, batch_size=7)
        ]
        reference_rows = await fetch_rows(src, _reference_sql(table))
    got = sorted(
        [(r[0], r[-1]) for b in batches for r in b.raw]
        + [(j.rowid, 1 if "orphan" in j.reason else None) for b in batches for j in b.rejects]
    )
    reference = transform_batch(page_batch(table, 1, 0, reference_rows), table)
    want = sorted(
        [(r[0], r[-1]) for r in reference.raw]
        + [(j.rowid, 1 if "orphan" in j.reason else None) for j in reference.rejects]
    )
    rejects = sorted((j.rowid, j.reason, j.stage) for b in batches for j in b.rejects)
    reference_rejects = sorted((j.rowid, j.reason, j.stage) for j in reference.rejects)
    return (got, rejects), (want, reference_rejects)


def _app_db(path: Path, parents: list[Any], deleted: list[Any], named: list[Any]) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, title TEXT, created_at TEXT,"
               " updated_at TEXT, metadata TEXT, user_id TEXT)")  # fmt: skip
    db.execute("CREATE TABLE messages (id TEXT PRIMARY KEY, session_id TEXT, role TEXT,"
               " content TEXT, metadata TEXT, created_at TEXT)")  # fmt: skip
    t = "2024-01-01T00:00:00+00:00"
    for p in parents + deleted:
        db.execute("INSERT OR IGNORE INTO sessions VALUES (?, '', ?, ?, '{}', '')", (p, t, t))
    for p in deleted:
        db.execute("DELETE FROM sessions WHERE id = ?", (p,))
    for n, s in enumerate(named):
        db.execute("INSERT INTO messages VALUES (?, ?, 'user', 'hi', '{}', ?)", (f"m{n}", s, t))
    db.commit()
    db.close()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    parents=st.lists(KEYS, max_size=6),
    deleted=st.lists(KEYS, max_size=3),
    named=st.lists(NAMED, min_size=1, max_size=30),
    per_row=st.booleans(),
)
async def test_app_messages_orphans_are_the_per_row_ones(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    parents: list[Any],
    deleted: list[Any],
    named: list[Any],
    per_row: bool,
) -> None:
    """Messages naming a missing, deleted, NULL, differently cased or differently typed session
    are quarantined exactly as the per-row check quarantines them (also past the set's cap)."""
    path = tmp_path / f"app-{len(list(tmp_path.iterdir()))}.sqlite"
    _app_db(path, parents, deleted, named)
    monkeypatch.setattr(extract_module, "ORPHAN_SET_LIMIT", 0 if per_row else 10**6)
    got, want = await _quarantined(path, MESSAGES, 7)
    assert want == got


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    parent_type=DECLARED,
    child_type=DECLARED,
    parents=st.lists(KEYS, max_size=6),
    deleted=st.lists(KEYS, max_size=3),
    named=st.lists(NAMED, min_size=1, max_size=30),
    index=st.booleans(),
)
async def test_generic_orphans_are_the_per_row_ones(
    tmp_path: Path,
    parent_type: str,
    child_type: str,
    parents: list[Any],
    deleted: list[Any],
    named: list[Any],
    index: bool,
) -> None:
    """A generic child table's orphans (any declared types and collations on either side, with
    or without an index on the child column) are the rows the per-row check names."""
    path = tmp_path / f"g-{len(list(tmp_path.iterdir()))}.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE p (id {parent_type} PRIMARY KEY, v TEXT)")
    db.execute(f"CREATE TABLE c (id INTEGER PRIMARY KEY, pid {child_type} REFERENCES p(id))")
    if index:
        db.execute("CREATE INDEX c_pid ON c (pid)")
    for p in parents + deleted:
        db.execute("INSERT OR IGNORE INTO p VALUES (?, 'x')", (p,))
    for p in deleted:
        db.execute("DELETE FROM p WHERE id = ?", (p,))
    db.executemany("INSERT INTO c (pid) VALUES (?)", [(n,) for n in named])
    db.commit()
    db.close()
    tables = {t.name: t for t in resolve_mapping(path, None, 5.0)[0].tables}
    got, want = await _quarantined(path, tables["c"], 7)
    assert want == got
