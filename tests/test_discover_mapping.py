"""Discovery reads any SQLite schema as it is, and the mapping places every table and column."""

from __future__ import annotations

import sqlite3
import tomllib

import pytest

from flux_migrate.core.discover import discover
from flux_migrate.core.mapping import (
    app_table,
    map_schema,
    read_mapping,
    to_toml,
    unplaced,
)
from flux_migrate.core.schema import Kind
from flux_migrate.pipeline.evidence import table_evidence

# The app's database as its code creates it today, and as releases before user_id did.
APP_TODAY = """
CREATE TABLE sessions (id TEXT PRIMARY KEY, user_id TEXT DEFAULT '', title TEXT DEFAULT '',
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, metadata TEXT DEFAULT '{}');
CREATE INDEX idx_sessions_user ON sessions(user_id, updated_at);
CREATE TABLE messages (id TEXT PRIMARY KEY, session_id TEXT NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, metadata TEXT DEFAULT '{}', created_at TEXT NOT NULL,
    FOREIGN KEY (session_id) REFERENCES sessions(id) ON DELETE CASCADE);
"""
APP_BEFORE = APP_TODAY.replace("user_id TEXT DEFAULT '', ", "").replace(
    "CREATE INDEX idx_sessions_user ON sessions(user_id, updated_at);", ""
)

VARIED = """
CREATE TABLE "we""ird table" ("select" INTEGER PRIMARY KEY AUTOINCREMENT,
    "naïve col" REAL NOT NULL DEFAULT 1.5, b BLOB, untyped, flag BOOLEAN DEFAULT 0);
CREATE TABLE pairs (a TEXT, b INT, v NUMERIC, PRIMARY KEY (b, a)) WITHOUT ROWID;
CREATE TABLE child (id INTEGER PRIMARY KEY, pa TEXT, pb INT, seen DATETIME, doc JSON,
    FOREIGN KEY (pb, pa) REFERENCES pairs(b, a) ON DELETE SET NULL);
CREATE UNIQUE INDEX u1 ON child(pa, pb) WHERE pa IS NOT NULL;
CREATE INDEX e1 ON child(lower(pa));
CREATE TABLE events (at TEXT, payload TEXT, n);
CREATE VIEW v AS SELECT * FROM child;
CREATE TABLE a (id INTEGER PRIMARY KEY, b_id INT REFERENCES b(id));
CREATE TABLE b (id INTEGER PRIMARY KEY, a_id INT REFERENCES a(id));
"""


def _mapping(ddl: str, rows: str = "") -> tuple[object, object]:
    conn = sqlite3.connect(":memory:")
    conn.executescript(ddl + rows)
    schema = discover(conn)
    evidence = {t.name: table_evidence(conn, t) for t in schema.tables if app_table(t) is None}
    return schema, map_schema(schema, evidence)


def test_discovery_reads_keys_types_and_flags_of_any_schema() -> None:
    """Composite keys, WITHOUT ROWID, AUTOINCREMENT, FK actions, partial and expression indexes,
    quoted and non-ASCII identifiers and reserved words are all read; views are listed."""
    schema, _ = _mapping(VARIED)
    weird = schema.table('we"ird table')
    assert ("select",) == weird.primary_key
    assert weird.autoincrement and not weird.without_rowid
    assert ["select", "naïve col", "b", "untyped", "flag"] == [c.name for c in weird.columns]
    assert "1.5" == weird.columns[1].default
    pairs = schema.table("pairs")
    assert ("b", "a") == pairs.primary_key
    assert pairs.without_rowid
    child = schema.table("child")
    (fk,) = child.foreign_keys
    assert (("pb", "pa"), "pairs", ("b", "a"), "SET NULL") == (
        fk.columns, fk.parent, fk.parent_columns, fk.on_delete,
    )  # fmt: skip
    by_name = {i.name: i for i in child.indexes}
    assert "pa IS NOT NULL" == by_name["u1"].where
    assert by_name["e1"].has_expression
    assert ("v",) == schema.views


def test_affinity_rules_choose_the_target_types() -> None:
    """Each declared type maps as documented: REAL is never float4, no type is text."""
    _, mapping = _mapping(VARIED)
    weird = mapping.table('we"ird table')
    assert ["bigint", "double precision", "bytea", "text", "boolean"] == [
        c.pg_type for c in weird.columns
    ]
    assert weird.column("naïve col").not_null and "1.5" == weird.column("naïve col").default
    assert "false" == weird.column("flag").default
    child = mapping.table("child")
    assert Kind.INSTANT is child.column("seen").kind
    assert Kind.JSON_VALUE is child.column("doc").kind
    assert Kind.NUMERIC is mapping.table("pairs").column("v").kind
    assert [("pa", "pb")] == [i.columns for i in child.indexes]  # the expression index: noted
    assert any("e1" in n and "expression" in n for n in mapping.notes)


def test_text_is_promoted_only_on_unanimous_evidence() -> None:
    """A TEXT column whose every value is an ISO instant becomes timestamptz, one of JSON
    objects jsonb; a single other value keeps it text; numbers are never read as epoch: a
    DATETIME column of numbers and text stays text, one of numbers stays numbers."""
    rows = """
    INSERT INTO events VALUES ('2024-01-01T00:00:00+00:00', '{"a": 1}', 1);
    INSERT INTO events VALUES ('2024-01-02 10:00:00', '[1, 2]', 2);
    CREATE TABLE mixed (at TEXT, payload TEXT);
    INSERT INTO mixed VALUES ('2024-01-01T00:00:00Z', '{"a": 1}'), ('soon', 'plain');
    CREATE TABLE stamps (s DATETIME, ms TIMESTAMP);
    INSERT INTO stamps VALUES (1700000000, 1700000000123), ('2024-01-01T00:00:00Z', NULL);
    """
    _, mapping = _mapping(VARIED, rows)
    events = mapping.table("events")
    assert (Kind.INSTANT, Kind.JSON_VALUE) == (
        events.column("at").kind,
        events.column("payload").kind,
    )
    mixed = mapping.table("mixed")
    assert (Kind.NULLABLE_TEXT, Kind.NULLABLE_TEXT) == (
        mixed.column("at").kind,
        mixed.column("payload").kind,
    )
    stamps = mapping.table("stamps")
    assert (None, None) == (stamps.column("s").epoch, stamps.column("ms").epoch)
    assert (Kind.NULLABLE_TEXT, Kind.INTEGER) == (
        stamps.column("s").kind,
        stamps.column("ms").kind,
    )


def test_load_order_puts_parents_first_and_names_a_cycle() -> None:
    """pairs loads before child; a and b reference each other and are reported as a cycle."""
    _, mapping = _mapping(VARIED)
    names = list(mapping.names)
    assert names.index("pairs") < names.index("child")
    assert any("a, b" in n and "cycle" in n for n in mapping.notes)


@pytest.mark.parametrize("with_user_id", [True, False])
def test_the_app_database_gets_the_app_profile_in_both_shapes(with_user_id: bool) -> None:
    """sessions with or without user_id, and messages, keep the app profile; user_id is always
    a target column, read from the source when it has one."""
    ddl = APP_TODAY if with_user_id else APP_BEFORE
    schema, mapping = _mapping(ddl)
    sessions = mapping.table("sessions")
    assert ("app", "app") == (sessions.profile, mapping.table("messages").profile)
    copied = "user_id" in sessions.column_names
    defaulted = "user_id" in [c.name for c in sessions.target_only]
    assert (with_user_id, not with_user_id) == (copied, defaulted)
    assert [] == unplaced(schema, mapping)


def test_init_toml_reads_back_to_the_same_mapping() -> None:
    """What init writes loads back and reproduces the mapping (and its fingerprint)."""
    schema, mapping = _mapping(
        VARIED, "INSERT INTO events VALUES ('2024-01-01T00:00:00Z', 'x', 1);"
    )
    text = to_toml(mapping)
    again = read_mapping(tomllib.loads(text))
    assert [t.name for t in mapping.tables] == [t.name for t in again.tables]
    for a, b in zip(mapping.tables, again.tables, strict=True):
        assert [(c.name, c.kind, c.pg_type, c.nullable, c.default, c.epoch) for c in a.columns] == [
            (c.name, c.kind, c.pg_type, c.nullable, c.default, c.epoch) for c in b.columns
        ]
        assert (a.primary_key, a.foreign_keys, a.indexes, a.without_rowid) == (
            b.primary_key, b.foreign_keys, b.indexes, b.without_rowid,
        )  # fmt: skip
    assert mapping.fingerprint() == again.fingerprint()
    assert [] == unplaced(schema, again)


def test_a_mapping_missing_a_table_or_column_names_it_and_the_line_to_add() -> None:
    """Dropping a table and a column from the file: unplaced names both; [ignore] silences."""
    schema, mapping = _mapping(VARIED)
    doc = tomllib.loads(to_toml(mapping))
    doc["table"] = [t for t in doc["table"] if t["name"] != "events"]
    child = next(t for t in doc["table"] if t["name"] == "child")
    child["column"] = [c for c in child["column"] if c["name"] != "doc"]
    problems = sorted(unplaced(schema, read_mapping(doc)))
    assert 2 == len(problems)
    assert problems[0].startswith("column doc of source table child is not in the mapping: add {")
    assert problems[1].startswith("source table events is not in the mapping: add a [[table]]")
    doc["ignore"] = {"tables": ["events"], "columns": ["child.doc"]}
    assert [] == unplaced(schema, read_mapping(doc))
