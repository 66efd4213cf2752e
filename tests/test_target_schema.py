"""Everything PostgreSQL could refuse about the target schema is found before the first row is
written (exit 2 naming table, column and fix), or carried over so that PostgreSQL takes it:
mapping files checked against a closed vocabulary, names that clash, partial-index conditions,
foreign keys it cannot build."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sqlite3
import tomllib
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flux_migrate.core.discover import discover
from flux_migrate.core.mapping import map_schema, read_mapping, to_toml
from flux_migrate.core.schema import (
    Column,
    Kind,
    Table,
    TargetNames,
    condition_sql,
    create_table_sql,
)
from flux_migrate.core.target_rules import default_sql, schema_problems
from flux_migrate.stages.values import row_converter
from tests.support import cli, fetchval

pytestmark = pytest.mark.anyio


def _db(path: Path, ddl: str, rows: dict[str, list[tuple[object, ...]]] | None = None) -> Path:
    db = sqlite3.connect(path)
    db.executescript(ddl)
    for table, values in (rows or {}).items():
        marks = ", ".join("?" for _ in values[0])
        db.executemany(f'INSERT INTO "{table}" VALUES ({marks})', values)
    db.commit()
    db.close()
    return path


def _error(stderr: str) -> str:
    errors = [json.loads(line)["error"] for line in stderr.splitlines() if '"error"' in line]
    return errors[-1] if errors else stderr


async def _nothing_written(dsn: str) -> None:
    """Neither a target table nor the bookkeeping schema exists."""
    tables = await fetchval(
        dsn, "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
    )
    assert 0 == tables
    assert await fetchval(dsn, "SELECT to_regnamespace('flux_migrate')") is None


LONG = "a" * 63
REFUSED = {
    "empty column name": ('CREATE TABLE t (id INTEGER PRIMARY KEY, "" TEXT);', "empty name"),
    "column names sharing 63 bytes": (
        f'CREATE TABLE t (id INTEGER PRIMARY KEY, "{LONG}x" TEXT, "{LONG}y" TEXT);',
        "share their first 63 bytes",
    ),
    "1700 columns": (
        "CREATE TABLE t (id INTEGER PRIMARY KEY, "
        + ", ".join(f"c{i} INT" for i in range(1699))
        + ");",
        "1700 columns, more than PostgreSQL's 1600",
    ),
    "a system column name": ("CREATE TABLE t (id INTEGER PRIMARY KEY, xmin INT);", "xmin"),
    "table names sharing 63 bytes": (
        f'CREATE TABLE "{LONG}1" (id INT); CREATE TABLE "{LONG}2" (id INT);',
        "share their first 63 bytes",
    ),
    "empty table name": ('CREATE TABLE "" (id INT); CREATE TABLE t (id INT);', "empty name"),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_a_schema_postgresql_refuses_stops_the_run_before_writing(
    case: str, tmp_path: Path, pg_dsn: str
) -> None:
    """Names PostgreSQL refuses or cuts into one, too many columns: exit 2 with the problem
    and its fix, and nothing in PostgreSQL (not even the bookkeeping)."""
    ddl, expected = REFUSED[case]
    path = _db(tmp_path / "s.sqlite", ddl)
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 2 == done.returncode, done.stderr
    message = _error(done.stderr)
    assert expected in message
    assert "nothing was written" in message and "[ignore]" in message
    await _nothing_written(pg_dsn)


async def test_defaults_postgresql_refuses_are_left_out_with_a_note(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A JSON column's DEFAULT 'none' (not JSON) and an integer's DEFAULT 1.5 (which bigint
    would round) are left out with a note: the run loads every row (exit 0)."""
    path = _db(
        tmp_path / "d.sqlite",
        "CREATE TABLE d (id INTEGER PRIMARY KEY, j JSON DEFAULT 'none', n INT DEFAULT 1.5,"
        " s TEXT DEFAULT 'it''s', ok JSON DEFAULT '{\"a\": 1}');",
        {"d": [(1, '{"x": 1}', 2, "a", "[]"), (2, None, None, None, None)]},
    )
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == done.returncode, done.stderr
    assert "DEFAULT 'none'" in done.stdout + done.stderr
    assert 2 == await fetchval(pg_dsn, "SELECT count(*) FROM d")
    defaults = await fetchval(
        pg_dsn,
        "SELECT array_agg(a.attname || '=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '-')"
        " ORDER BY a.attnum) FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid ="
        " a.attrelid AND d.adnum = a.attnum WHERE a.attrelid = 'd'::regclass AND a.attnum > 0",
    )
    assert ["id=-", "j=-", "n=-", "s='it''s'::text", """ok='{"a": 1}'::jsonb"""] == defaults


MAPPING = """
[[table]]
name = "m"
primary_key = [{key}]
{table_extra}

[[table.column]]
name = "id"
convert = "integer"
not_null = true

[[table.column]]
name = "r"
convert = "{r_convert}"
type = "{r_type}"
{r_extra}

[[table.column]]
name = "flag"
convert = "boolean"
{flag_extra}
"""

EDITS = {
    "type real rounds doubles": ({"r_type": "real"}, "type = 'real' cannot hold every value"),
    "numeric(5,2) rounds": ({"r_convert": "numeric", "r_type": "numeric(5,2)"}, "numeric(5,2)"),
    "timestamptz(0) rounds": ({"r_convert": "instant", "r_type": "timestamptz(0)"}, "(0)"),
    "SQL pasted into a type": ({"r_type": "numeric, evil text"}, "evil text"),
    "a converter and a type that disagree": (
        {"r_convert": "nullable_text", "r_type": "bigint"},
        "type = 'bigint' cannot hold every value of convert = 'nullable_text'",
    ),
    "a key column that does not exist": (
        {"key": '"nope"'},
        "names column 'nope'",
    ),
    "SQL pasted into a default": (
        {"flag_extra": 'default = "false); DROP TABLE m; --"'},
        "is not a literal a boolean column holds",
    ),
    "SQL pasted into an index condition": (
        {"table_extra": '[[table.index]]\nname = "i"\ncolumns = ["r"]\nwhere = "1=1) OR (1=1"'},
        "is not a condition PostgreSQL reads as SQLite does",
    ),
    "a JSON default that is not JSON": (
        {"r_convert": "json_value", "r_type": "jsonb", "r_extra": "default = \"'none'\""},
        "default = \"'none'\" is not a literal a jsonb column holds",
    ),
    "an integer default bigint would round": (
        {"r_convert": "integer", "r_type": "bigint", "r_extra": 'default = "1.5"'},
        "default = '1.5' is not a literal a bigint column holds",
    ),
    "an unknown ON DELETE action": (
        {
            "table_extra": '[[table.foreign_key]]\ncolumns = ["id"]\nparent = "m"\n'
            'parent_columns = ["id"]\non_delete = "CASCADE; DROP TABLE m"'
        },
        "is not one of NO ACTION",
    ),
    "a foreign key PostgreSQL cannot build": (
        {
            "table_extra": '[[table.foreign_key]]\ncolumns = ["r"]\nparent = "m"\n'
            'parent_columns = ["id"]'
        },
        "column r is double precision and m.id is bigint",
    ),
    "a rowid table mapped as WITHOUT ROWID": (
        {"table_extra": "without_rowid = true"},
        "table m is not WITHOUT ROWID in the source: set without_rowid = false",
    ),
    "a typo in a key": ({"flag_extra": 'typ = "text"'}, "'typ'"),
}


@pytest.mark.parametrize("case", list(EDITS))
async def test_an_edited_mapping_is_checked_before_anything_is_written(
    case: str, tmp_path: Path, pg_dsn: str
) -> None:
    """A mapping file may only say what flux-migrate can carry out unchanged: a type that
    rounds, SQL text, a converter its type cannot hold, a key column that does not exist, an
    unknown key are refused with exit 2 naming the table and column, before writing."""
    path = _db(
        tmp_path / "m.sqlite",
        "CREATE TABLE m (id INTEGER PRIMARY KEY, r REAL, flag BOOLEAN);",
        {"m": [(1, 0.14285714285714285, 1), (2, 2.5, 0)]},
    )
    fields = {"table_extra": "", "r_convert": "real", "r_type": "double precision", "key": '"id"'}
    fields |= {"flag_extra": "", "r_extra": ""}
    edit, expected = EDITS[case]
    config = tmp_path / "mapping.toml"
    config.write_text(MAPPING.format(**(fields | edit)), encoding="utf-8")
    done = cli("run", "--config", str(config), "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 2 == done.returncode, done.stderr
    message = _error(done.stderr)
    assert expected in message
    assert "internal error" not in message.lower()
    await _nothing_written(pg_dsn)


async def test_an_edited_mapping_in_the_vocabulary_loads(tmp_path: Path, pg_dsn: str) -> None:
    """Type aliases PostgreSQL stores the same (float8), a literal default and a condition
    are accepted and rendered by flux-migrate."""
    path = _db(
        tmp_path / "m.sqlite",
        "CREATE TABLE m (id INTEGER PRIMARY KEY, r REAL, flag BOOLEAN);",
        {"m": [(1, 0.14285714285714285, 1), (2, 2.5, 0)]},
    )
    config = tmp_path / "mapping.toml"
    text = MAPPING.format(
        table_extra='[[table.index]]\nname = "i"\ncolumns = ["r"]\nwhere = "flag = 1"',
        key='"id"',
        r_convert="real",
        r_type="FLOAT8",
        flag_extra='default = "1"',
        r_extra="",
    )
    config.write_text(text, encoding="utf-8")
    done = cli("run", "--config", str(config), "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == done.returncode, done.stderr
    assert 0.14285714285714285 == await fetchval(pg_dsn, "SELECT r FROM m WHERE id = 1")
    index = await fetchval(pg_dsn, "SELECT indexdef FROM pg_indexes WHERE indexname = 'i'")
    assert index.endswith("WHERE (flag = true)")


async def test_partial_index_conditions_are_translated_as_sqlite_reads_them(
    tmp_path: Path, pg_dsn: str
) -> None:
    """`active = 1` on a boolean becomes `= true`, an unquoted `Flag` names column "Flag",
    a number against a text column is text, a string against an integer a number, text order
    is byte order, a column alone is its truth value, TRUE is 1, AND joins them; every index
    is built and keeps the rows SQLite's keeps."""
    path = _db(
        tmp_path / "p.sqlite",
        'CREATE TABLE u (id INTEGER PRIMARY KEY, active BOOLEAN, "Flag" TEXT, code TEXT, n INT);'
        " CREATE UNIQUE INDEX u_active ON u(code) WHERE active = 1;"
        " CREATE INDEX u_flag ON u(n) WHERE Flag IS NOT NULL;"
        " CREATE INDEX u_code ON u(n) WHERE code = 5;"
        " CREATE INDEX u_n ON u(code) WHERE n == '3';"
        " CREATE INDEX u_after ON u(n) WHERE code > 'm';"
        " CREATE INDEX u_both ON u(n) WHERE active AND (Flag IS NOT NULL) AND n <> TRUE;",
        {"u": [(1, 1, "x", "a", 3), (2, 0, None, "a", 4), (3, 0, "y", "5", 3)]},
    )
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == done.returncode, done.stderr
    found = await fetchval(
        pg_dsn,
        "SELECT json_object_agg(indexname, split_part(indexdef, ' WHERE ', 2))"
        " FROM pg_indexes WHERE tablename = 'u' AND indexname <> 'u_pkey'",
    )
    assert {
        "u_active": "(active = true)",
        "u_flag": '("Flag" IS NOT NULL)',
        "u_code": "(code = '5'::text)",
        "u_n": "(n = 3)",
        "u_after": "((code COLLATE \"C\") > 'm'::text)",
        "u_both": '(active AND ("Flag" IS NOT NULL) AND (n <> 1))',
    } == json.loads(found)


async def test_generated_names_never_take_a_name_already_given(tmp_path: Path, pg_dsn: str) -> None:
    """Tables t and t_pkey each get their primary key; an SQLite index named t_pkey on another
    table, or one named like a foreign key, is built beside the key it would have shadowed."""
    path = _db(
        tmp_path / "n.sqlite",
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);"
        " CREATE TABLE t_pkey (id INTEGER PRIMARY KEY, v TEXT);"
        " CREATE TABLE u (id INTEGER PRIMARY KEY, t_id INT REFERENCES t(id));"
        " CREATE INDEX u_fkey ON u(t_id); CREATE INDEX t_pkey1 ON t_pkey(v);",
        {"t": [(1, "a")], "t_pkey": [(1, "b")], "u": [(1, 1)]},
    )
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE w (id INTEGER PRIMARY KEY, v TEXT)")
    db.commit()
    db.close()
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == done.returncode, done.stderr
    keys = await fetchval(
        pg_dsn,
        "SELECT array_agg(conrelid::regclass::text || ':' || contype::text ORDER BY 1)"
        " FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND contype IN ('p', 'f')",
    )
    assert ["t:p", "t_pkey:p", "u:f", "u:p", "w:p"] == sorted(keys)
    indexes = await fetchval(
        pg_dsn,
        "SELECT array_agg(indexname::text ORDER BY 1) FROM pg_indexes"
        " WHERE schemaname = 'public' AND indexname IN ('u_fkey', 't_pkey1')",
    )
    assert ["t_pkey1", "u_fkey"] == indexes


def test_what_postgresql_cannot_keep_is_named_in_a_note() -> None:
    """COLLATE NOCASE, CHECK constraints, triggers, AUTOINCREMENT and a foreign key written
    in another case (`REFERENCES P(ID)`) are noted or resolved, not dropped silently."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(
        "CREATE TABLE p (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT COLLATE NOCASE,"
        " n INT CHECK (n > 0), note TEXT DEFAULT 'CHECK (x)');"
        " CREATE TABLE c (id INTEGER PRIMARY KEY, p_id INT REFERENCES P(ID) ON UPDATE CASCADE);"
        " CREATE INDEX c_ci ON c(p_id COLLATE NOCASE);"
        " CREATE TRIGGER p_touch AFTER UPDATE ON p BEGIN SELECT 1; END;"
    )
    mapping = map_schema(discover(conn), {})
    notes = "\n".join(mapping.notes)
    assert "table p has CHECK constraints" in notes
    assert "table p compares with COLLATE NOCASE" in notes
    assert "index c_ci on c compares with COLLATE NOCASE" in notes
    assert "trigger p_touch on p" in notes
    assert "table p has AUTOINCREMENT" in notes
    assert "foreign key c(p_id) -> P has ON UPDATE CASCADE" in notes
    (fk,) = mapping.table("c").foreign_keys
    assert ("p", ("id",)) == (fk.parent, fk.parent_columns)


async def _reasons(dsn: str) -> list[str]:
    found = await fetchval(
        dsn,
        "SELECT array_agg(source_table || ':' || source_rowid || ':' || reason"
        " ORDER BY source_table, source_rowid) FROM flux_migrate.quarantine"
        " WHERE resolved_at IS NULL",
    )
    return list(found or [])


async def test_keys_that_collide_once_converted_quarantine_the_later_rows(
    tmp_path: Path, pg_dsn: str
) -> None:
    """1, '1' and x'31' in an untyped key, one instant with two offsets, JSON texts with their
    keys in another order, a partial unique index: the first arrival loads, every later one is
    quarantined as duplicate_key (exit 3), the keys are built, verify passes, a rerun too."""
    path = _db(
        tmp_path / "k.sqlite",
        "CREATE TABLE k1 (id PRIMARY KEY, v TEXT);"
        " CREATE TABLE k2 (at TEXT UNIQUE, n INT);"
        " CREATE TABLE k3 (doc TEXT UNIQUE);"
        " CREATE TABLE k4 (code, active BOOLEAN);"
        " CREATE UNIQUE INDEX k4_code ON k4(code) WHERE active = 1;",
        {
            "k1": [(1, "a"), ("1", "b"), (b"1", "c"), (2, "d")],
            "k2": [
                ("2024-01-01T10:00:00+02:00", 1),
                ("2024-01-01T08:00:00Z", 2),
                ("2024-01-02T00:00:00Z", 3),
            ],
            "k3": [('{"a": 1, "b": 2}',), ('{"b": 2, "a": 1}',), ("[1]",)],
            "k4": [(1, 1), ("1", 0), ("1", 1), (2, 1)],
        },
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    done = cli("run", *args)
    assert 3 == done.returncode, done.stderr
    assert [
        "k1:2:duplicate_key",
        "k1:3:duplicate_key",
        "k2:2:duplicate_key",
        "k3:2:duplicate_key",
        "k4:3:duplicate_key",
    ] == await _reasons(pg_dsn)
    counts = await fetchval(
        pg_dsn,
        "SELECT array_agg(n ORDER BY t) FROM (SELECT 'k1' t, count(*) n FROM k1 UNION ALL"
        " SELECT 'k2', count(*) FROM k2 UNION ALL SELECT 'k3', count(*) FROM k3 UNION ALL"
        " SELECT 'k4', count(*) FROM k4) c",
    )
    assert [2, 2, 2, 3] == counts
    assert "a" == await fetchval(pg_dsn, "SELECT v FROM k1 WHERE id = '1'")
    keys = await fetchval(
        pg_dsn,
        "SELECT count(*) FROM pg_index WHERE indisunique AND indrelid IN"
        " ('k1'::regclass, 'k2'::regclass, 'k3'::regclass, 'k4'::regclass)",
    )
    assert 4 == keys
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout + verified.stderr
    quick = cli("verify", "--quick", *args)  # it set the loaded 1 aside with '1' and x'31'
    assert 0 == quick.returncode, quick.stdout + quick.stderr
    again = cli("run", *args)
    assert again.returncode in (0, 3), again.stderr
    assert 5 == len(await _reasons(pg_dsn))


async def test_a_child_of_a_quarantined_row_in_its_own_table_is_an_orphan(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A self-reference whose parent is quarantined: the child, and its own children round
    after round, are quarantined as orphan_row, the foreign key is built, verify passes; once
    the parent is fixed in the source, one rerun loads it, its whole subtree and a new child."""
    path = _db(
        tmp_path / "tree.sqlite",
        "CREATE TABLE node (id INTEGER PRIMARY KEY, parent INT REFERENCES node(id), v REAL);",
        {
            "node": [
                (1, None, 1.0),
                (2, 1, "bad"),
                (3, 2, 1.0),
                (4, 3, 1.0),
                (5, 8, 1.0),
                (8, 1, 2.0),
                (9, 4, 2.0),
            ]
        },
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    done = cli("run", *args)
    assert 3 == done.returncode, done.stderr
    assert "without a loaded session" not in done.stderr
    moved = [line for line in done.stderr.splitlines() if "key_rows_quarantined" in line]
    assert 1 == len(moved) and "rows=3" in moved[0]  # the whole subtree in one pass
    assert [
        "node:2:type_mismatch",
        "node:3:orphan_row",
        "node:4:orphan_row",
        "node:9:orphan_row",
    ] == await _reasons(pg_dsn)
    assert [1, 5, 8] == await fetchval(pg_dsn, "SELECT array_agg(id ORDER BY id) FROM node")
    assert 1 == await fetchval(
        pg_dsn,
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'node'::regclass AND contype = 'f'",
    )
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout + verified.stderr
    db = sqlite3.connect(path)
    db.execute("UPDATE node SET v = 2.5 WHERE id = 2")
    db.execute("INSERT INTO node VALUES (10, 4, 1.0)")
    db.commit()
    db.close()
    again = cli("run", *args)
    assert 0 == again.returncode, again.stderr
    assert [] == await _reasons(pg_dsn)
    loaded = await fetchval(pg_dsn, "SELECT array_agg(id ORDER BY id) FROM node")
    assert [1, 2, 3, 4, 5, 8, 9, 10] == loaded
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout + verified.stderr


async def test_orphans_across_a_foreign_key_cycle_are_quarantined_pass_after_pass(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Two tables referencing each other (ON DELETE CASCADE): a row quarantined in one orphans
    rows of the other, which orphan rows of the first; all are quarantined as orphan_row before
    any foreign key exists (nothing deleted by a cascade), both keys are built, verify passes."""
    path = _db(
        tmp_path / "cycle.sqlite",
        "CREATE TABLE a (id INTEGER PRIMARY KEY, b_id INT REFERENCES b(id) ON DELETE CASCADE);"
        " CREATE TABLE b (id INTEGER PRIMARY KEY, a_id INT REFERENCES a(id) ON DELETE CASCADE,"
        " v REAL);",
        {
            "a": [(1, 1), (2, 2), (3, None)],
            "b": [(1, None, "bad"), (2, 1, 1.0), (3, 2, 1.0), (4, 3, 1.0)],
        },
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    done = cli("run", *args)
    assert 3 == done.returncode, done.stderr
    assert [
        "a:1:orphan_row",
        "a:2:orphan_row",
        "b:1:type_mismatch",
        "b:2:orphan_row",
        "b:3:orphan_row",
    ] == await _reasons(pg_dsn)
    assert [3] == await fetchval(pg_dsn, "SELECT array_agg(id) FROM a")
    assert [4] == await fetchval(pg_dsn, "SELECT array_agg(id) FROM b")
    assert 2 == await fetchval(pg_dsn, "SELECT count(*) FROM pg_constraint WHERE contype = 'f'")
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout + verified.stderr


async def test_foreign_keys_postgresql_cannot_build_are_noted_not_failed(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A text column against an integer key, a column promoted to timestamptz against a text
    key, a reference to a non-unique column: noted and not created, every row loads (exit 0);
    `REFERENCES P(ID)` is table p's key, built, and its orphan quarantined."""
    path = _db(
        tmp_path / "fk.sqlite",
        "CREATE TABLE p (id INTEGER PRIMARY KEY, tag TEXT);"
        " CREATE TABLE k (code TEXT PRIMARY KEY);"
        " CREATE TABLE c1 (id INTEGER PRIMARY KEY, pid TEXT REFERENCES p(id));"
        " CREATE TABLE c2 (id INTEGER PRIMARY KEY, at TEXT REFERENCES k(code));"
        " CREATE TABLE c3 (id INTEGER PRIMARY KEY, tag TEXT REFERENCES p(tag));"
        " CREATE TABLE c4 (id INTEGER PRIMARY KEY, p_id INT REFERENCES P(ID));",
        {
            "p": [(1, "x"), (2, "x")],
            "k": [("2024-01-01T00:00:00Z",)],
            "c1": [(1, "1"), (2, "2")],
            "c2": [(1, "2024-01-01T00:00:00Z")],
            "c3": [(1, "x")],
            "c4": [(1, 1), (2, 99)],
        },
    )
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 3 == done.returncode, done.stderr
    out = done.stdout + done.stderr
    assert "foreign key c1(pid) -> p: column pid is text and p.id is bigint" in out
    assert "foreign key c2(at) -> k: column at is timestamptz and k.code is text" in out
    assert "foreign key c3(tag) -> p: (tag) is not the primary key or a unique index" in out
    assert ["c4:2:orphan_row"] == await _reasons(pg_dsn)
    fks = await fetchval(
        pg_dsn,
        "SELECT array_agg(conrelid::regclass::text) FROM pg_constraint WHERE contype = 'f'",
    )
    assert ["c4"] == fks
    assert 2 == await fetchval(pg_dsn, "SELECT count(*) FROM c1")


async def test_names_longer_than_63_bytes_load_verify_and_rerun(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A table, column, index and foreign key named past 63 bytes (cut by PostgreSQL, unique
    once cut) load and verify; an index of 40 columns is noted, not built; a rerun is up to
    date."""
    long = "é" * 40
    cols = ", ".join(f"c{i} INT" for i in range(40))
    path = _db(
        tmp_path / "long.sqlite",
        f'CREATE TABLE "{long}" (id INTEGER PRIMARY KEY, "{long}x" TEXT, v INT);'
        f' CREATE INDEX "{long}i" ON "{long}"("{long}x");'
        f" CREATE TABLE wide (id INTEGER PRIMARY KEY, {cols});"
        f" CREATE INDEX wide40 ON wide({', '.join(f'c{i}' for i in range(40))});"
        f' CREATE TABLE ch (id INTEGER PRIMARY KEY, pid INT REFERENCES "{long}"(id));',
        {long: [(1, "a", 2)], "ch": [(1, 1), (2, 5)], "wide": [tuple(range(41))]},
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    done = cli("run", *args)
    assert 3 == done.returncode, done.stderr
    assert "index wide40 on wide has 40 columns" in done.stdout + done.stderr
    assert ["ch:2:orphan_row"] == await _reasons(pg_dsn)
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout + verified.stderr
    again = cli("run", *args)
    assert again.returncode in (0, 3), again.stderr
    assert 1 == await fetchval(pg_dsn, "SELECT count(*) FROM ch")


_OPS = ("=", "<>", "<", ">", "<=", ">=", "IS NULL", "IS NOT NULL")
_CONDITION_COLUMNS = {"n": "INTEGER", "x": "REAL", "flag": "BOOLEAN", "Code": "TEXT"}


@st.composite
def _comparison(draw: st.DrawFn) -> str:
    """One comparison in SQLite SQL: any column (its name in any case), any operator, a literal
    of any type, or the column itself as a truth value."""
    column = draw(st.sampled_from(sorted(_CONDITION_COLUMNS)))
    name = draw(st.sampled_from([column, column.upper(), column.lower(), f'"{column}"']))
    op = draw(st.sampled_from((*_OPS, "TRUTH", "NOT")))
    literal = draw(
        st.one_of(
            st.integers(-3, 3).map(str),
            st.sampled_from(["1.5", "-0.5", "2e0", "TRUE", "false"]),
            st.text(alphabet="ab1'\\ ", max_size=3).map(lambda t: "'" + t.replace("'", "''") + "'"),
        )
    )
    if op == "TRUTH":
        return name
    if op == "NOT":
        return f"NOT {name}"
    comparison = f"{name} {op}" if op.startswith("IS") else f"{name} {op} {literal}"
    return f"({comparison})" if draw(st.booleans()) else comparison


@st.composite
def _conditions(draw: st.DrawFn) -> tuple[str, list[tuple[object, ...]]]:
    """A condition of one to three comparisons joined by AND, and rows of values for the four
    columns."""
    condition = " AND ".join(draw(st.lists(_comparison(), min_size=1, max_size=3)))
    texts = st.one_of(st.none(), st.text(alphabet="ab1'\\ ", max_size=3))
    rows = draw(
        st.lists(
            st.tuples(
                st.one_of(st.none(), st.integers(-3, 3)),
                st.one_of(st.none(), st.sampled_from([-0.5, 1.5, 2.0, 0.0])),
                st.one_of(st.none(), st.sampled_from([0, 1])),
                texts,
            ),
            max_size=8,
        )
    )
    return condition, rows


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=_conditions())
def test_a_translated_condition_selects_the_rows_sqlite_selects(
    case: tuple[str, list[tuple[object, ...]]], pg_dsn: str
) -> None:
    """Whatever partial-index condition is carried over selects in PostgreSQL exactly the rows
    it selects in SQLite (those it cannot translate are left out with a note)."""
    condition, rows = case
    db = sqlite3.connect(":memory:")
    db.execute(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, "
        + ", ".join(f'"{c}" {t}' for c, t in _CONDITION_COLUMNS.items())
        + ")"
    )
    db.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)", [(i, *r) for i, r in enumerate(rows)])
    db.execute(f"CREATE INDEX i ON t(id) WHERE {condition}")
    mapping = map_schema(discover(db), {})
    table = mapping.table("t")
    if not table.indexes:
        event("left out with a note")
        assert any("index i on t has WHERE" in n for n in mapping.notes)
        return
    event("translated")
    (index,) = table.indexes
    where = condition_sql(index.where, table)
    assert where is not None
    expected = {r[0] for r in db.execute(f"SELECT id FROM t WHERE {condition}")}
    convert = row_converter(table)
    converted = [convert((i, *r)) for i, r in enumerate(rows)]

    async def selected() -> set[int]:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("DROP TABLE IF EXISTS t")
            await conn.execute(create_table_sql(table, TargetNames()))
            await conn.copy_records_to_table("t", records=converted)
            return {r[0] for r in await conn.fetch(f"SELECT id FROM t WHERE {where}")}
        finally:
            await conn.close()

    assert expected == asyncio.run(selected())


async def test_a_row_too_big_for_a_page_is_quarantined_not_the_run_failed(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A table of 1,100 integer columns loads; its one row whose values do not fit a
    PostgreSQL page (8 kB) is quarantined with the server's reason (exit 3), every rerun too,
    instead of exit 1 on every rerun."""
    cols = ", ".join(f"c{i} INT" for i in range(1100))
    full = (1, *range(1100))
    sparse = (2, *([7] * 10 + [None] * 1090))
    path = _db(
        tmp_path / "wide.sqlite",
        f"CREATE TABLE wide (id INTEGER PRIMARY KEY, {cols});",
        {"wide": [full, sparse]},
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    done = cli("run", *args)
    assert 3 == done.returncode, done.stderr
    assert ["wide:1:rejected_by_server"] == await _reasons(pg_dsn)
    detail = await fetchval(pg_dsn, "SELECT detail FROM flux_migrate.quarantine")
    assert "row is too big" in detail
    assert [2] == await fetchval(pg_dsn, "SELECT array_agg(id) FROM wide")
    again = cli("run", *args)
    assert 3 == again.returncode, again.stderr
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout + verified.stderr


async def test_keys_postgresql_cannot_index_are_named_and_the_run_finishes(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A key value longer than a btree entry holds (2704 bytes) keeps PostgreSQL from building
    that primary key, the unique index over it and the foreign key to it: each is named in a
    warning, every row is loaded (exit 0) and verify passes, instead of exit 1 on every rerun."""
    long = base64.b64encode(random.Random(5).randbytes(6000)).decode()
    path = _db(
        tmp_path / "big.sqlite",
        "CREATE TABLE big (k TEXT PRIMARY KEY, v TEXT UNIQUE);"
        " CREATE TABLE ref (id INTEGER PRIMARY KEY, k TEXT REFERENCES big(k));",
        {"big": [(long, long), ("short", "s")], "ref": [(1, "short"), (2, long)]},
    )
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    done = cli("run", *args)
    assert 0 == done.returncode, done.stderr
    warned = [line for line in done.stderr.splitlines() if "constraint_not_built" in line]
    named = sorted(line.split("constraint=")[1].split()[0] for line in warned)
    assert ["big_pkey", "ref_fkey", "sqlite_autoindex_big_2"] == named
    assert 2 == await fetchval(pg_dsn, "SELECT count(*) FROM big")
    assert 2 == await fetchval(pg_dsn, "SELECT count(*) FROM ref")
    verified = cli("verify", *args)
    assert 0 == verified.returncode, verified.stdout + verified.stderr


@pytest.mark.parametrize(
    ("ddl", "expected"),
    [
        ("CREATE TABLE other (x int); CREATE INDEX t_pkey ON other (x)", "The name t_pkey"),
        ("CREATE VIEW t AS SELECT 1 AS id", '"public"."t" already exists as a view'),
        ("CREATE SEQUENCE u_fkey", "skip"),
        ("CREATE TABLE other (x int); CREATE INDEX t_by_v ON other (x)", "The name t_by_v"),
    ],
)
async def test_names_taken_in_the_target_schema_stop_the_run_before_writing(
    ddl: str, expected: str, tmp_path: Path, pg_dsn: str
) -> None:
    """An index named t_pkey on another table, or a view named like a table to load: exit 2
    naming it, nothing written (not skipped as if built, not refused mid-run); a foreign key's
    name is not a relation and may be anything."""
    path = _db(
        tmp_path / "t.sqlite",
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); CREATE INDEX t_by_v ON t (v);"
        " CREATE TABLE u (id INTEGER PRIMARY KEY, t_id INT REFERENCES t (id));",
        {"t": [(1, "a")], "u": [(1, 1)]},
    )
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(ddl)
    finally:
        await conn.close()
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    if expected == "skip":
        assert 0 == done.returncode, done.stderr
        return
    assert 2 == done.returncode, done.stderr
    assert expected in _error(done.stderr)
    assert await fetchval(pg_dsn, "SELECT to_regnamespace('flux_migrate')") is None


async def test_an_sqlite_index_named_like_a_key_of_another_table_is_built(
    tmp_path: Path, pg_dsn: str
) -> None:
    """An SQLite index named t_pkey on table v keeps its name; t's primary key gets t_pkey1;
    both exist (neither skipped as if built)."""
    path = _db(
        tmp_path / "i.sqlite",
        "CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE TABLE v (id INTEGER PRIMARY KEY, n INT);"
        " CREATE INDEX t_pkey ON v (n);",
        {"t": [(1,)], "v": [(1, 2)]},
    )
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 0 == done.returncode, done.stderr
    found = await fetchval(
        pg_dsn,
        "SELECT array_agg(indexname || ' ON ' || tablename ORDER BY 1) FROM pg_indexes"
        " WHERE schemaname = 'public'",
    )
    assert ["t_pkey ON v", "t_pkey1 ON t", "v_pkey ON v"] == sorted(found)


def test_defaults_and_names_are_checked_as_postgresql_would() -> None:
    """A DEFAULT is rendered only when PostgreSQL holds it as written: no numeric past its
    range, no text that is not UTF-8 or holds NUL, a string with quotes and backslashes exact;
    a name that is not UTF-8 is a problem named before writing."""
    assert default_sql(Kind.NUMERIC, "1e999999") is None
    assert "1e5" == default_sql(Kind.NUMERIC, "1e5")
    assert default_sql(Kind.REAL, "1e999") is None
    assert default_sql(Kind.NULLABLE_TEXT, "'a\udcff'") is None
    assert "E'it''s \\\\ x'" == default_sql(Kind.NULLABLE_TEXT, "'it''s \\ x'")
    assert default_sql(Kind.INTEGER, "9223372036854775808") is None
    assert default_sql(Kind.JSON_VALUE, "'[NaN]'") is None
    table = Table("t", (Column("a\udcff", Kind.NULLABLE_TEXT),), primary_key=(), profile="generic")
    (problem,) = schema_problems([table], ["t"])
    assert "not UTF-8" in problem


def test_the_mapping_file_reads_back_to_the_same_target() -> None:
    """init's TOML of conditions (AND, truth values, quotes, backslashes) and defaults reads
    back to the same mapping, so `run --config` builds what `run` would."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, a BOOLEAN DEFAULT 1, b TEXT DEFAULT 'it''s \\ x',"
        " j JSON DEFAULT '{\"k\": [1]}', n NUMERIC DEFAULT -1.5e3, w TEXT);"
        " CREATE INDEX t_p ON t(w) WHERE a AND b <> 'it''s \\' AND (n >= 2);"
        " CREATE UNIQUE INDEX t_q ON t(b) WHERE NOT a;"
    )
    mapping = map_schema(discover(conn), {})
    assert 2 == len(mapping.table("t").indexes)
    again = read_mapping(tomllib.loads(to_toml(mapping)))
    assert to_toml(mapping, comments=False) == to_toml(again, comments=False)
    assert mapping.table("t").indexes == again.table("t").indexes


def test_foreign_key_type_pairs_are_the_ones_postgresql_builds() -> None:
    """A foreign key is kept for the type pairs PostgreSQL builds (text/varchar either way, a
    bigint child of a numeric key) and noted for the others (numeric child of a bigint key,
    timestamptz against text)."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(
        "CREATE TABLE pn (id NUMERIC PRIMARY KEY); CREATE TABLE pi (id INTEGER PRIMARY KEY);"
        " CREATE TABLE pt (id VARCHAR(9) PRIMARY KEY);"
        " CREATE TABLE c (a INT REFERENCES pn(id), b NUMERIC REFERENCES pi(id),"
        " c TEXT REFERENCES pt(id));"
    )
    mapping = map_schema(discover(conn), {})
    kept = sorted(fk.parent for fk in mapping.table("c").foreign_keys)
    assert ["pn", "pt"] == kept
    assert any("column b is numeric and pi.id is bigint" in n for n in mapping.notes)


async def test_a_deep_chain_under_a_quarantined_row_goes_in_one_pass(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A chain of 2,000 rows each naming the one before, under a root that is quarantined: all
    2,000 are quarantined as orphan_row in one pass (not one source scan per generation), the
    rows beside the chain stay, the key is built."""
    chain = [(1, None, "bad")] + [(i, i - 1, 1.0) for i in range(2, 2002)]
    beside = [(5000 + i, None if i == 0 else 5000 + i - 1, 2.0) for i in range(50)]
    path = _db(
        tmp_path / "chain.sqlite",
        "CREATE TABLE node (id INTEGER PRIMARY KEY, up INT REFERENCES node(id), v REAL);",
        {"node": chain + beside},
    )
    done = cli("run", "--sqlite-path", str(path), "--postgres-dsn", pg_dsn)
    assert 3 == done.returncode, done.stderr
    reasons = await fetchval(
        pg_dsn,
        "SELECT json_object_agg(reason, n) FROM (SELECT reason, count(*) AS n"
        " FROM flux_migrate.quarantine GROUP BY reason) q",
    )
    assert {"type_mismatch": 1, "orphan_row": 2000} == json.loads(reasons)
    assert 50 == await fetchval(pg_dsn, "SELECT count(*) FROM node")
