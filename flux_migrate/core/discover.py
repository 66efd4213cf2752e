"""Discovery: what a SQLite file holds, read from its own catalog, never assumed.

Every table (columns with declared type, NOT NULL, DEFAULT, primary key, foreign keys with
their actions, indexes, WITHOUT ROWID, AUTOINCREMENT) and the views, which are listed and not
migrated. Internal tables (``sqlite_%``) are left out. Pure reads on a ``sqlite3`` connection.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Any

from flux_migrate.core.schema import ROWID_NAMES


@dataclass(frozen=True)
class SourceColumn:
    name: str
    declared_type: str  # as written in CREATE TABLE ('' when none)
    not_null: bool
    default: str | None  # the DEFAULT expression's SQL text
    pk_position: int  # 1-based position in the primary key, 0 when not part of it
    generated: bool = False  # a generated column (computed by SQLite, not stored data)


@dataclass(frozen=True)
class SourceForeignKey:
    columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]  # empty in SQLite means the parent's primary key
    on_delete: str  # 'NO ACTION', 'CASCADE', 'SET NULL', 'SET DEFAULT', 'RESTRICT'
    on_update: str


@dataclass(frozen=True)
class SourceIndex:
    name: str
    unique: bool
    columns: tuple[str | None, ...]  # None for an expression term
    where: str | None  # the partial index's WHERE clause (SQLite SQL)
    sql: str | None  # the CREATE INDEX text (None for automatic indexes of UNIQUE / PK)
    collations: tuple[str, ...] = ()  # collations other than BINARY of its terms

    @property
    def has_expression(self) -> bool:
        return any(c is None for c in self.columns)


@dataclass(frozen=True)
class SourceTable:
    name: str
    columns: tuple[SourceColumn, ...]
    foreign_keys: tuple[SourceForeignKey, ...]
    indexes: tuple[SourceIndex, ...]
    without_rowid: bool
    autoincrement: bool
    sql: str
    strict: bool = False  # a STRICT table (its ANY columns keep values verbatim)
    checks: bool = False  # the table declares CHECK constraints
    collations: tuple[str, ...] = ()  # collations other than BINARY its SQL names
    triggers: tuple[str, ...] = ()  # triggers on the table

    @property
    def primary_key(self) -> tuple[str, ...]:
        pk = sorted((c.pk_position, c.name) for c in self.columns if c.pk_position)
        return tuple(name for _, name in pk)

    @property
    def rowid_alias(self) -> str | None:
        """The INTEGER PRIMARY KEY column that is the rowid itself, if any."""
        pk = [c for c in self.columns if c.pk_position]
        if self.without_rowid or len(pk) != 1:
            return None
        return pk[0].name if pk[0].declared_type.strip().upper() == "INTEGER" else None

    @property
    def rowid_name(self) -> str | None:
        """How SQL reaches the row id: the first of rowid, _rowid_, oid that no real column
        is called (SQLite names are case-blind), else the INTEGER PRIMARY KEY that is the row
        id; None for WITHOUT ROWID, or when every name is taken by an ordinary column."""
        if self.without_rowid:
            return None
        taken = {c.name.lower() for c in self.columns}
        free = next((n for n in ROWID_NAMES if n not in taken), None)
        return free or self.rowid_alias


@dataclass(frozen=True)
class SourceSchema:
    tables: tuple[SourceTable, ...]
    views: tuple[str, ...]
    virtual_tables: tuple[str, ...] = ()

    def table(self, name: str) -> SourceTable:
        return next(t for t in self.tables if t.name == name)


_STRICT = re.compile(r"\)\s*(?:WITHOUT\s+ROWID\s*,\s*)?STRICT\b[^)]*$", re.IGNORECASE)
_WITHOUT_ROWID = re.compile(r"\)\s*(?:STRICT\s*,\s*)?WITHOUT\s+ROWID\b", re.IGNORECASE)
_AUTOINCREMENT = re.compile(r"\bAUTOINCREMENT\b", re.IGNORECASE)
_WHERE = re.compile(r"\bWHERE\b(.*)$", re.IGNORECASE | re.DOTALL)
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`(?:[^`]|``)*`|\[[^\]]*\]")
_CHECK = re.compile(r"\bCHECK\s*\(", re.IGNORECASE)
_COLLATE = re.compile(r"\bCOLLATE\s+(\w+)", re.IGNORECASE)


def _constraint_words(sql: str) -> tuple[bool, tuple[str, ...]]:
    """Whether a CREATE TABLE declares CHECK constraints, and the collations (not BINARY) it
    names; string literals and quoted names are left out of the search."""
    bare = _QUOTED.sub(" ", sql)
    collations = sorted({c.upper() for c in _COLLATE.findall(bare)} - {"BINARY"})
    return bool(_CHECK.search(bare)), tuple(collations)


def _triggers(conn: sqlite3.Connection, table: str) -> tuple[str, ...]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ? ORDER BY name",
        (table,),
    ).fetchall()
    return tuple(_text(r[0]) for r in rows)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return "" if value is None else str(value)


def _pragma(conn: sqlite3.Connection, pragma: str, arg: str) -> list[tuple[Any, ...]]:
    # PRAGMA arguments cannot be bound; the table-valued function form can.
    return conn.execute(f"SELECT * FROM pragma_{pragma}(?)", (arg,)).fetchall()


def _columns(conn: sqlite3.Connection, table: str) -> tuple[SourceColumn, ...]:
    out = []
    # table_xinfo: cid, name, type, notnull, dflt_value, pk, hidden (2, 3 = generated)
    for row in _pragma(conn, "table_xinfo", table):
        hidden = int(row[6])
        if hidden == 1:
            continue  # a hidden column of a virtual table
        out.append(
            SourceColumn(
                name=_text(row[1]),
                declared_type=_text(row[2]),
                not_null=bool(row[3]),
                default=None if row[4] is None else _text(row[4]),
                pk_position=int(row[5]),
                generated=hidden in (2, 3),
            )
        )
    return tuple(out)


def _foreign_keys(conn: sqlite3.Connection, table: str) -> tuple[SourceForeignKey, ...]:
    # foreign_key_list: id, seq, table, from, to, on_update, on_delete, match
    groups: dict[int, list[tuple[Any, ...]]] = {}
    for row in _pragma(conn, "foreign_key_list", table):
        groups.setdefault(int(row[0]), []).append(row)
    out = []
    for _, rows in sorted(groups.items()):
        rows.sort(key=lambda r: int(r[1]))
        parents = tuple(_text(r[4]) for r in rows if r[4] is not None)
        out.append(
            SourceForeignKey(
                columns=tuple(_text(r[3]) for r in rows),
                parent=_text(rows[0][2]),
                parent_columns=parents,
                on_delete=_text(rows[0][6]).upper(),
                on_update=_text(rows[0][5]).upper(),
            )
        )
    return tuple(out)


def _indexes(conn: sqlite3.Connection, table: str) -> tuple[SourceIndex, ...]:
    out = []
    # index_list: seq, name, unique, origin ('c' CREATE INDEX, 'u' UNIQUE, 'pk'), partial
    for row in _pragma(conn, "index_list", table):
        name, unique, origin = _text(row[1]), bool(row[2]), _text(row[3])
        if origin == "pk":
            continue  # the primary key is migrated as one
        # index_xinfo: seqno, cid, name, desc, coll, key; cid -2 = expression, -1 = rowid
        terms = [r for r in _pragma(conn, "index_xinfo", name) if r[5]]
        columns = tuple(None if r[1] == -2 else _text(r[2]) for r in terms)
        sql_row = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)
        ).fetchone()
        sql = _text(sql_row[0]) if sql_row and sql_row[0] is not None else None
        where = None
        if sql is not None and int(row[4]):
            match = _WHERE.search(sql)
            where = match.group(1).strip() if match else None
        collations = tuple(sorted({_text(r[4]).upper() for r in terms} - {"BINARY", ""}))
        out.append(SourceIndex(name, unique, columns, where, sql, collations))
    return tuple(out)


def discover(conn: sqlite3.Connection) -> SourceSchema:
    """Read every table and view of the database on ``conn`` (a read-only connection)."""
    rows = conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE type IN ('table', 'view')"
        " AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
    ).fetchall()
    tables: list[SourceTable] = []
    views: list[str] = []
    virtual: list[str] = []
    for kind_raw, name_raw, sql_raw in rows:
        kind, name, sql = _text(kind_raw), _text(name_raw), _text(sql_raw)
        if kind == "view":
            views.append(name)
            continue
        if sql.upper().startswith("CREATE VIRTUAL TABLE"):
            virtual.append(name)  # FTS and the like: derived data, listed and skipped
            continue
        tables.append(
            SourceTable(
                name=name,
                columns=_columns(conn, name),
                foreign_keys=_foreign_keys(conn, name),
                indexes=_indexes(conn, name),
                without_rowid=bool(_WITHOUT_ROWID.search(sql)),
                autoincrement=bool(_AUTOINCREMENT.search(sql)),
                sql=sql,
                strict=bool(_STRICT.search(sql)),
                checks=_constraint_words(sql)[0],
                collations=_constraint_words(sql)[1],
                triggers=_triggers(conn, name),
            )
        )
    shadow = _shadow_tables(conn, rows)
    return SourceSchema(
        tuple(t for t in tables if t.name not in shadow), tuple(views), tuple(virtual)
    )


# The shadow tables each module keeps its data in, by suffix after "<virtual table>_".
_SHADOW_SUFFIXES = {
    "fts3": ("content", "segments", "segdir", "docsize", "stat"),
    "fts4": ("content", "segments", "segdir", "docsize", "stat"),
    "fts5": ("data", "idx", "content", "docsize", "config"),
    "rtree": ("node", "rowid", "parent"),
    "rtree_i32": ("node", "rowid", "parent"),
    "geopoly": ("node", "rowid", "parent"),
}
_USING = re.compile(r"\bUSING\s+(\w+)", re.IGNORECASE)


def _shadow_tables(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> set[str]:
    """The names of virtual tables' shadow tables (derived data, skipped): as SQLite itself
    reports them (PRAGMA table_list, SQLite 3.37+) and by the exact names each known module
    gives them. An ordinary table that merely starts with a virtual table's name is kept."""
    shadow = set()
    try:
        listed = conn.execute("SELECT name, type FROM pragma_table_list WHERE schema = 'main'")
        shadow = {_text(n) for n, kind in listed.fetchall() if _text(kind) == "shadow"}
    except sqlite3.OperationalError:
        pass  # an older SQLite (no table_list), or a module this SQLite lacks
    for kind, name, sql in rows:
        found = _USING.search(_text(sql)) if _text(kind) == "table" else None
        if found is not None and _text(sql).upper().startswith("CREATE VIRTUAL TABLE"):
            suffixes = _SHADOW_SUFFIXES.get(found.group(1).lower(), ())
            shadow.update(f"{_text(name)}_{suffix}" for suffix in suffixes)
    return shadow
