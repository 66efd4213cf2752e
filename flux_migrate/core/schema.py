"""The one definition of the source and target schemas.

Everything that needs a column list, a type or a DDL statement imports it from here: the
pipeline stages, the checkpoint store, verify, and the PostgreSQL memory backend.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import Enum

BOOKKEEPING_SCHEMA = "flux_migrate"
KEY_MAX_LENGTH = 36
# A checkpoint that has read nothing yet: below every rowid SQLite can give a row but the
# smallest, which preflight refuses (a row there could not be told from "nothing read").
BEFORE_FIRST_ROWID = -(2**63)
ROWID_NAMES = ("rowid", "_rowid_", "oid")
# Units a mapping may give numbers in an instant column: seconds or milliseconds since
# 1970-01-01 UTC, or julian days (SQLite's own numeric date form, julianday()).
EPOCH_UNITS = ("s", "ms", "julian")  # SQLite's names of a table's row id


class Kind(Enum):
    """How a source column is converted on its way to PostgreSQL."""

    # The app's own columns (the app profile).
    KEY = "key"  # uuid text, NOT NULL, non-empty, at most KEY_MAX_LENGTH characters
    TEXT = "text"  # text, NOT NULL
    NULLABLE_TEXT = "nullable_text"  # text, NULL stays NULL
    TIMESTAMP = "timestamp"  # ISO-8601 text -> timestamptz, NOT NULL
    JSON = "json"  # JSON object text -> jsonb, NULL or empty -> {}
    # Any other table's columns, by declared type (NULL stays NULL unless not_null).
    INTEGER = "integer"  # SQLite integers -> bigint
    REAL = "real"  # floats (and integers a double holds exactly) -> double precision
    NUMERIC = "numeric"  # integers, floats, decimal text -> numeric
    BOOLEAN = "boolean"  # 0/1, true/false -> boolean
    BLOB = "blob"  # bytes -> bytea
    INSTANT = "instant"  # ISO-8601 text, or epoch numbers where the mapping says -> timestamptz
    JSON_VALUE = "json_value"  # any JSON text -> jsonb, sent as the source's own text


PG_TYPES = {
    Kind.KEY: f"varchar({KEY_MAX_LENGTH})",
    Kind.TEXT: "text",
    Kind.NULLABLE_TEXT: "text",
    Kind.TIMESTAMP: "timestamptz",
    Kind.JSON: "jsonb",
    Kind.INTEGER: "bigint",
    Kind.REAL: "double precision",
    Kind.NUMERIC: "numeric",
    Kind.BOOLEAN: "boolean",
    Kind.BLOB: "bytea",
    Kind.INSTANT: "timestamptz",
    Kind.JSON_VALUE: "jsonb",
}


# The existing target column types each kind loads into without changing a value. varchar(n)
# takes text of any length n: a longer value is refused by PostgreSQL and quarantined.
_INSTANT = ("timestamp with time zone", "timestamp(6) with time zone")
_HOLDS: dict[Kind, tuple[str, ...]] = {
    Kind.KEY: ("character varying", "text"),
    Kind.TEXT: ("character varying", "text"),
    Kind.NULLABLE_TEXT: ("character varying", "text"),
    Kind.TIMESTAMP: _INSTANT,
    Kind.JSON: ("jsonb",),
    Kind.INTEGER: ("bigint", "numeric"),
    Kind.REAL: ("double precision",),
    Kind.NUMERIC: ("numeric",),
    Kind.BOOLEAN: ("boolean",),
    Kind.BLOB: ("bytea",),
    Kind.INSTANT: _INSTANT,
    Kind.JSON_VALUE: ("jsonb",),
}


def holds_losslessly(kind: Kind, existing_type: str) -> bool:
    """Whether an existing column of ``existing_type`` (as format_type prints it) stores every
    value of ``kind`` unchanged: no truncation, rounding, padding or reinterpretation."""
    if existing_type.startswith("character varying(") and kind in _HOLDS:
        return "character varying" in _HOLDS[kind]
    return existing_type in _HOLDS[kind]


@dataclass(frozen=True)
class Column:
    """A column: the same name in SQLite and PostgreSQL, how it converts, and its target type."""

    name: str
    kind: Kind
    type: str | None = None  # the target type; by default the kind's (PG_TYPES)
    not_null: bool | None = None  # by default the kind's (the app's columns); else nullable
    default: str | None = None  # the target column's DEFAULT, as SQL
    # INSTANT columns holding numbers: their unit, one of EPOCH_UNITS (never guessed)
    epoch: str | None = None
    null_as: str | None = None  # a source NULL loads as this value (the app reads them alike)
    note: str = ""  # why this mapping was chosen (shown by init and the run summary)

    @property
    def pg_type(self) -> str:
        return self.type or PG_TYPES[self.kind]

    @property
    def nullable(self) -> bool:
        if self.not_null is not None:
            return not self.not_null
        return self.kind not in (Kind.KEY, Kind.TEXT, Kind.TIMESTAMP, Kind.JSON)


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key of a table: its columns reference the parent's (its primary key if empty)."""

    columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]
    on_delete: str = "NO ACTION"  # as SQLite and PostgreSQL spell it: CASCADE, SET NULL, ...


@dataclass(frozen=True)
class Predicate:
    """A partial index's condition, ``column op literal`` or ``column IS [NOT] NULL``, held as
    parts (never as SQL text) and rendered for PostgreSQL by its column's kind."""

    column: str
    # "IS NULL", "IS NOT NULL", "=", "<>", "<", ">", "<=", ">=", or "TRUE" / "FALSE" (the
    # column itself as a condition, as SQLite reads it: a number other than 0, or 0)
    op: str
    value: str | None = None  # the literal: a number as written, or a string's content
    is_string: bool = False

    def source_text(self) -> str:
        """The condition in SQLite's SQL (what the mapping file holds)."""
        if self.op in ("TRUE", "FALSE"):
            return ("" if self.op == "TRUE" else "NOT ") + quote_ident(self.column)
        if self.value is None:
            return f"{quote_ident(self.column)} {self.op}"
        value = "'" + self.value.replace("'", "''") + "'" if self.is_string else self.value
        return f"{quote_ident(self.column)} {self.op} {value}"


@dataclass(frozen=True)
class Index:
    """An index to build after the load (a partial one with its condition)."""

    name: str
    columns: tuple[str, ...]
    unique: bool = False
    where: tuple[Predicate, ...] = ()  # a partial index's condition: all of these hold


def where_text(parts: tuple[Predicate, ...]) -> str:
    """A partial index's condition in SQLite's SQL."""
    return " AND ".join(p.source_text() for p in parts)


@dataclass(frozen=True)
class Table:
    """A table: the same name and column names in SQLite and PostgreSQL.

    The app's two tables (the app profile) use ``parent``/``parent_column``/``index_columns``;
    any other table states its keys in ``primary_key``, ``foreign_keys`` and ``indexes``.
    """

    name: str
    columns: tuple[Column, ...]
    parent: str | None = None  # table referenced by the foreign key column
    parent_column: str | None = None  # the foreign key column in this table
    index_columns: tuple[str, ...] = ()
    primary_key: tuple[str, ...] = ("id",)  # empty: the table has none
    foreign_keys: tuple[ForeignKey, ...] = ()
    indexes: tuple[Index, ...] = ()
    without_rowid: bool = False  # read in primary-key order instead of rowid order
    profile: str = "app"  # "app" for the app's own tables, "generic" for any other
    # Target columns the migration does not copy yet (issue 9): created with their default.
    target_only: tuple[Column, ...] = ()
    # Target columns PostgreSQL fills itself (a sequence), never copied, compared or synced.
    generated: tuple[Column, ...] = ()
    # How SQL names the row id: "rowid", or "_rowid_"/"oid" when a real column is called
    # rowid, or the INTEGER PRIMARY KEY that is the row id when all three are real columns.
    rowid_name: str = "rowid"

    @property
    def start_rowid(self) -> int:
        """A new checkpoint's rowid: before every row; 0 rows read for a WITHOUT ROWID table
        (whose checkpoint counts positions)."""
        return 0 if self.without_rowid else BEFORE_FIRST_ROWID

    def rowid_sql(self, alias: str = "") -> str:
        """The row id as an SQL expression (``alias.`` before it when given)."""
        prefix = f"{alias}." if alias else ""
        if self.rowid_name in ROWID_NAMES:
            return prefix + self.rowid_name  # bare: quoted, it would mean a column
        return prefix + quote_ident(self.rowid_name)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    @property
    def key_positions(self) -> tuple[int, ...]:
        """Positions of the primary-key columns among ``columns`` (empty without a key)."""
        names = self.column_names
        return tuple(names.index(c) for c in self.primary_key if c in names)

    @property
    def generic(self) -> bool:
        return self.profile != "app"


SESSIONS = Table(
    name="sessions",
    columns=(
        Column("id", Kind.KEY),
        Column("title", Kind.NULLABLE_TEXT),
        Column("created_at", Kind.TIMESTAMP),
        Column("updated_at", Kind.TIMESTAMP),
        Column("metadata", Kind.JSON),
    ),
    # The app reads a NULL user_id as '' in every query (no filter, or never equal to a user).
    target_only=(Column("user_id", Kind.TEXT, default="''", null_as=""),),
)

# The memory lists a user's sessions by (user_id, updated_at). In PostgreSQL the index holds
# md5(user_id): a btree entry of the text itself fails beyond about 2.7 KB, and a user_id has
# no length limit in the app. Queries filter on both md5(user_id) and user_id.
USER_INDEX_COLUMNS = ("user_id", "updated_at")
USER_INDEX_EXPRESSIONS = ("md5(user_id)", '"updated_at"')

MESSAGES = Table(
    name="messages",
    columns=(
        Column("id", Kind.KEY),
        Column("session_id", Kind.KEY),
        Column("role", Kind.TEXT),
        Column("content", Kind.TEXT),
        Column("metadata", Kind.JSON),
        Column("created_at", Kind.TIMESTAMP),
    ),
    parent="sessions",
    parent_column="session_id",
    index_columns=("session_id", "created_at"),
    # The order rows arrived in: the app returns messages stamped in the same tick in
    # insertion order (SQLite's rowid), so history breaks created_at ties by it.
    generated=(Column("seq", Kind.INTEGER, type="bigserial"),),
)

# Load order: parents before children.
TABLES: tuple[Table, ...] = (SESSIONS, MESSAGES)

# The app's SQLite schema, exactly (used by the memory backend and the sample generator).
SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    title TEXT DEFAULT '',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    metadata TEXT DEFAULT '{}',
    user_id TEXT DEFAULT ''
);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    metadata TEXT DEFAULT '{}',
    created_at TEXT NOT NULL,
    FOREIGN KEY (session_id) REFERENCES sessions(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_messages_session ON messages(session_id, created_at);
CREATE INDEX IF NOT EXISTS idx_sessions_user ON sessions(user_id, updated_at);
"""


def quote_ident(name: str) -> str:
    """Quote an SQL identifier so any string is taken literally, never as SQL."""
    return '"' + name.replace('"', '""') + '"'


def sql_string(value: str) -> str:
    """An SQL string literal holding exactly ``value``, whatever standard_conforming_strings
    says (an E'' literal when it holds a backslash)."""
    quoted = value.replace("'", "''")
    if "\\" in value:
        return "E'" + quoted.replace("\\", "\\\\") + "'"
    return "'" + quoted + "'"


_NUMBER_LITERAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_INTEGER_LITERAL = re.compile(r"^[+-]?\d+$")
_NUMBER_KINDS = (Kind.INTEGER, Kind.REAL, Kind.NUMERIC)
_TEXT_KINDS = (Kind.TEXT, Kind.NULLABLE_TEXT, Kind.KEY)


def predicate_sql(p: Predicate, column: Column) -> str | None:
    """``p`` as a PostgreSQL condition that selects the same rows as SQLite's, or None when
    PostgreSQL cannot read it the same way (a literal of another type than the column's).

    SQLite compares by the column's affinity: ``1`` against a TEXT column is the text '1',
    ``'5'`` against an INTEGER column the number 5, and text in byte order (COLLATE "C")."""
    col = quote_ident(p.column)
    if p.op in ("TRUE", "FALSE"):
        if column.kind is Kind.BOOLEAN:
            return col if p.op == "TRUE" else f"NOT {col}"
        if column.kind in _NUMBER_KINDS:
            return f"{col} {'<>' if p.op == 'TRUE' else '='} 0"
        return None  # SQLite reads text as the number it starts with: no PostgreSQL twin
    if p.value is None:
        return f"{col} {p.op}"
    value = p.value.strip()
    if column.kind in _NUMBER_KINDS:
        return f"{col} {p.op} {value}" if _NUMBER_LITERAL.match(value) else None
    if column.kind is Kind.BOOLEAN:
        if p.is_string or p.op not in ("=", "<>") or value not in ("0", "1"):
            return None
        return f"{col} {p.op} {'true' if value == '1' else 'false'}"
    if column.kind in _TEXT_KINDS:
        if not p.is_string and not _INTEGER_LITERAL.match(value):
            return None  # SQLite would compare with the number's own text form
        literal = p.value if p.is_string else str(int(value))
        collate = "" if p.op in ("=", "<>") else ' COLLATE "C"'
        return f"{col}{collate} {p.op} {sql_string(literal)}"
    return None


def qualified(schema: str, table: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(table)}"


@dataclass(frozen=True)
class TargetNames:
    """Where the app's tables live in PostgreSQL: a schema and a name per table."""

    schema: str = "public"
    sessions: str = "sessions"
    messages: str = "messages"

    def table(self, source_table: str) -> str:
        """The target table of a source table: the app's two as configured, others the same."""
        if source_table in ("sessions", "messages"):
            return str(getattr(self, source_table))
        return source_table

    def qualified(self, source_table: str) -> str:
        return qualified(self.schema, self.table(source_table))


def create_table_sql(table: Table, names: TargetNames) -> str:
    """CREATE TABLE IF NOT EXISTS without keys or indexes (built after a bulk load)."""
    cols = []
    for c in table.columns + table.target_only + table.generated:
        null = "" if c.nullable else " NOT NULL"
        default = " DEFAULT '{}'" if c.kind is Kind.JSON else ""
        if c.default is not None:
            default = f" DEFAULT {c.default}"
        cols.append(f"{quote_ident(c.name)} {c.pg_type}{null}{default}")
    return f"CREATE TABLE IF NOT EXISTS {names.qualified(table.name)} ({', '.join(cols)})"


# Autovacuum of a table flux-migrate creates waits until the run has loaded it and built its
# keys: every batch commits, so without this autovacuum vacuums and analyzes the table while
# it grows (on the 1M bench, a vacuum of messages in the middle of the load, 0.9 CPU-s and its
# page writes, beside the COPY; again at each fifth more rows on a larger table), then is
# cancelled by the key build's lock. The run that finishes the tables gives it back.
_AUTOVACUUM = ("autovacuum_enabled", "toast.autovacuum_enabled")
# How the table's options read (pg_class.reloptions) once pause_autovacuum_sql has run:
# PostgreSQL keeps an option as written.
AUTOVACUUM_PAUSED = "autovacuum_enabled=false"


def pause_autovacuum_sql(table: str, names: TargetNames) -> str:
    """ALTER TABLE turning autovacuum off for a table being loaded (and its TOAST table)."""
    settings = ", ".join(f"{o} = false" for o in _AUTOVACUUM)
    return f"ALTER TABLE {names.qualified(table)} SET ({settings})"


def resume_autovacuum_sql(table: str, names: TargetNames) -> str:
    """ALTER TABLE giving a loaded table (and its TOAST table) the server's autovacuum back."""
    return f"ALTER TABLE {names.qualified(table)} RESET ({', '.join(_AUTOVACUUM)})"


def add_column_sql(table: Table, column: Column, names: TargetNames) -> str:
    """ALTER TABLE adding a target-only or generated column to a table created before it."""
    default = "" if column.default is None else f" NOT NULL DEFAULT {column.default}"
    return (
        f"ALTER TABLE {names.qualified(table.name)} ADD COLUMN IF NOT EXISTS"
        f" {quote_ident(column.name)} {column.pg_type}{default}"
    )


@dataclass(frozen=True)
class Constraint:
    """A key or index of the target, created by name so that building it can resume."""

    name: str
    table: str  # source table name
    sql: str
    primary_key: bool = False  # built first (duplicates are quarantined before it)
    kind: str = "index"  # "pk", "unique", "fk" or "index"
    columns: tuple[str, ...] = ()  # the key's columns (of ``table``)
    parent: str | None = None  # a foreign key's parent table (source name)
    parent_columns: tuple[str, ...] = ()
    where: str | None = None  # a partial unique index's PostgreSQL condition


NAME_MAX_BYTES = 63  # PostgreSQL cuts longer identifiers (NAMEDATALEN - 1)


def fitted_name(head: str, tail: str) -> str:
    """``head + tail`` as PostgreSQL will keep it: unchanged when it fits in 63 bytes, else
    ``head`` cut (at a character boundary) and a stable hash of the whole name put before
    ``tail``, so that two long names never collide with each other or with their table."""
    name = head + tail
    if len(name.encode()) <= NAME_MAX_BYTES:
        return name
    digest = "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    room = NAME_MAX_BYTES - len(tail.encode()) - len(digest)
    cut = head.encode()[:room].decode("utf-8", "ignore")
    return cut + digest + tail


def _app_constraints(names: TargetNames, tables: tuple[Table, ...]) -> list[Constraint]:
    """The app profile's keys, foreign key and indexes."""
    out: list[Constraint] = []
    for table in tables:
        target = names.table(table.name)
        pk = fitted_name(target, "_pkey")
        out.append(
            Constraint(
                pk,
                table.name,
                f"ALTER TABLE {names.qualified(table.name)} ADD CONSTRAINT {quote_ident(pk)}"
                " PRIMARY KEY (id)",
                primary_key=True,
                kind="pk",
                columns=("id",),
            )
        )
    for table in tables:
        if table.parent is None or table.parent_column is None:
            continue
        target = names.table(table.name)
        fk = fitted_name(target, f"_{table.parent_column}_fkey")
        out.append(
            Constraint(
                fk,
                table.name,
                f"ALTER TABLE {names.qualified(table.name)} ADD CONSTRAINT {quote_ident(fk)}"
                f" FOREIGN KEY ({quote_ident(table.parent_column)})"
                f" REFERENCES {names.qualified(table.parent)} (id) ON DELETE CASCADE",
                kind="fk",
                columns=(table.parent_column,),
                parent=table.parent,
                parent_columns=("id",),
            )
        )
    for table in tables:
        if not table.index_columns:
            continue
        target = names.table(table.name)
        idx = fitted_name(f"idx_{target}", "_session")
        cols = ", ".join(quote_ident(c) for c in table.index_columns)
        out.append(
            Constraint(
                idx,
                table.name,
                f"CREATE INDEX IF NOT EXISTS {quote_ident(idx)}"
                f" ON {names.qualified(table.name)} ({cols})",
            )
        )
    if any(t.name == SESSIONS.name for t in tables):
        target = names.table(SESSIONS.name)
        idx = fitted_name(f"idx_{target}", "_user_md5")
        cols = ", ".join(USER_INDEX_EXPRESSIONS)
        out.append(
            Constraint(
                idx,
                SESSIONS.name,
                f"CREATE INDEX IF NOT EXISTS {quote_ident(idx)}"
                f" ON {names.qualified(SESSIONS.name)} ({cols})",
            )
        )
    return out


def drop_retired_user_index_sql(names: TargetNames) -> str:
    """DROP of the index earlier releases built on sessions (user_id, updated_at): a btree
    entry of a long user_id fails, so it gave way to the md5 one."""
    retired = fitted_name(f"idx_{names.table(SESSIONS.name)}", "_user")
    return f"DROP INDEX IF EXISTS {qualified(names.schema, retired)}"


def _columns_sql(columns: tuple[str, ...]) -> str:
    return ", ".join(quote_ident(c) for c in columns)


def pg_identifier(name: str) -> str:
    """``name`` as PostgreSQL keeps it: cut to 63 bytes at a character boundary."""
    kept = name.encode("utf-8", "surrogateescape")[:NAME_MAX_BYTES]
    return kept.decode("utf-8", "ignore")


class _Names:
    """Relation and constraint names of one target schema, each given out once: a name that is
    taken (a table ``t_pkey`` beside ``t``, an SQLite index named ``t_pkey`` on another table)
    makes the next one get a number, ``t_pkey1``, the same on every run."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = set(taken)

    def give(self, head: str, tail: str) -> str:
        # An SQLite index name need not be UTF-8; the target's name is (its bytes replaced).
        head = head.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        name, n = fitted_name(head, tail), 0
        while name in self.taken:
            n += 1
            name = fitted_name(head, f"{tail}{n}")
        self.taken.add(name)
        return name


def condition_sql(parts: tuple[Predicate, ...], table: Table) -> str | None:
    """A partial index's condition for PostgreSQL; None when a part has no twin there."""
    rendered = [predicate_sql(p, table.column(p.column)) for p in parts]
    if any(r is None for r in rendered):
        return None
    return " AND ".join(f"({r})" if len(rendered) > 1 else str(r) for r in rendered)


def _index_constraint(table: Table, ix: Index, name: str, where: str) -> Constraint:
    """One SQLite index as a target index (its condition rendered, or left out: the mapping
    only keeps indexes whose condition condition_sql renders)."""
    condition = condition_sql(ix.where, table) if ix.where else None
    unique = "UNIQUE " if ix.unique else ""
    partial = f" WHERE {condition}" if condition else ""
    sql = (
        f"CREATE {unique}INDEX IF NOT EXISTS {quote_ident(name)} ON {where}"
        f" ({_columns_sql(ix.columns)}){partial}"
    )
    kind = "unique" if ix.unique else "index"
    return Constraint(name, table.name, sql, kind=kind, columns=ix.columns, where=condition)


def _generic_constraints(
    names: TargetNames, tables: tuple[Table, ...], given: _Names
) -> tuple[list[Constraint], list[Constraint], list[Constraint], list[Constraint]]:
    """Primary keys, unique indexes, foreign keys and other indexes of generic tables, each
    under a name no other relation or constraint of the schema has."""
    by_name = {t.name: t for t in tables}
    pks: list[Constraint] = []
    uniques: list[Constraint] = []
    fks: list[Constraint] = []
    indexes: list[Constraint] = []
    index_names = {(t.name, ix.name): given.give(ix.name, "") for t in tables for ix in t.indexes}
    for table in tables:
        target, where = names.table(table.name), names.qualified(table.name)
        if table.primary_key:
            pk = given.give(target, "_pkey")
            pks.append(
                Constraint(
                    pk,
                    table.name,
                    f"ALTER TABLE {where} ADD CONSTRAINT {quote_ident(pk)}"
                    f" PRIMARY KEY ({_columns_sql(table.primary_key)})",
                    primary_key=True,
                    kind="pk",
                    columns=table.primary_key,
                )
            )
        for ix in table.indexes:
            c = _index_constraint(table, ix, index_names[(table.name, ix.name)], where)
            (uniques if ix.unique else indexes).append(c)
        for n, fk in enumerate(table.foreign_keys):
            parent = by_name.get(fk.parent)
            if parent is None:
                continue  # the mapping notes a foreign key to a table it does not load
            refs = fk.parent_columns or parent.primary_key
            name = given.give(target, f"_fk{n + 1}" if len(table.foreign_keys) > 1 else "_fkey")
            action = fk.on_delete if fk.on_delete != "NO ACTION" else ""
            fks.append(
                Constraint(
                    name,
                    table.name,
                    f"ALTER TABLE {where} ADD CONSTRAINT {quote_ident(name)}"
                    f" FOREIGN KEY ({_columns_sql(fk.columns)})"
                    f" REFERENCES {names.qualified(fk.parent)} ({_columns_sql(refs)})"
                    + (f" ON DELETE {action}" if action else ""),
                    kind="fk",
                    columns=fk.columns,
                    parent=fk.parent,
                    parent_columns=refs,
                )
            )
    return pks, uniques, fks, indexes


def constraints(
    names: TargetNames, tables: tuple[Table, ...] | None = None
) -> tuple[Constraint, ...]:
    """Keys and indexes in the order they must be built: primary keys, unique indexes, foreign
    keys (which need the keys they reference), then the other indexes."""
    tables = TABLES if tables is None else tables
    app = tuple(t for t in tables if not t.generic)
    out = _app_constraints(names, app) if app else []
    given = _Names({pg_identifier(names.table(t.name)) for t in tables} | {c.name for c in out})
    generic = tuple(t for t in tables if t.generic)
    pks, uniques, fks, indexes = _generic_constraints(names, generic, given)
    app_pks = [c for c in out if c.primary_key]
    return tuple(app_pks + pks + uniques + [c for c in out if not c.primary_key] + fks + indexes)


def target_ddl(names: TargetNames, tables: tuple[Table, ...] | None = None) -> list[str]:
    """Every statement that creates the complete target schema with its keys and indexes."""
    tables = TABLES if tables is None else tables
    stmts = [f"CREATE SCHEMA IF NOT EXISTS {quote_ident(names.schema)}"]
    stmts += [create_table_sql(t, names) for t in tables]
    stmts += [add_column_sql(t, c, names) for t in tables for c in t.target_only]
    stmts += [c.sql for c in constraints(names, tables)]
    return stmts


BOOKKEEPING_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {BOOKKEEPING_SCHEMA};
CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.checkpoints (
    target_schema text NOT NULL,
    source_table text NOT NULL,
    target_table text NOT NULL,
    last_rowid bigint NOT NULL DEFAULT 0,
    last_key text,
    last_batch jsonb NOT NULL DEFAULT '{{}}',
    extracted bigint NOT NULL DEFAULT 0,
    loaded bigint NOT NULL DEFAULT 0,
    quarantined bigint NOT NULL DEFAULT 0,
    skipped bigint NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'pending',
    created_table boolean NOT NULL DEFAULT false,
    preexisting_rows boolean NOT NULL DEFAULT false,
    constraints_pending boolean NOT NULL DEFAULT false,
    fingerprint text NOT NULL DEFAULT '',
    run_id text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target_schema, source_table)
);
CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.quarantine (
    id bigserial PRIMARY KEY,
    run_id text NOT NULL,
    target_schema text NOT NULL,
    source_table text NOT NULL,
    source_key text,
    source_rowid bigint NOT NULL,
    reason text NOT NULL,
    detail text NOT NULL,
    stage text NOT NULL,
    raw jsonb NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    resolution text
);
CREATE INDEX IF NOT EXISTS quarantine_table_rowid
    ON {BOOKKEEPING_SCHEMA}.quarantine (target_schema, source_table, source_rowid);
CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.digest_packs (
    id bigserial PRIMARY KEY,
    target_schema text COLLATE "C" NOT NULL,
    source_table text COLLATE "C" NOT NULL,
    first_rowid bigint NOT NULL,
    last_rowid bigint NOT NULL,
    rowids bytea NOT NULL,
    keys bytea NOT NULL,
    digests bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS digest_packs_range
    ON {BOOKKEEPING_SCHEMA}.digest_packs (target_schema, source_table, first_rowid);
CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.digest_rows (
    target_schema text COLLATE "C" NOT NULL,
    source_table text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    source_rowid bigint,
    digest bigint,
    written_xmin xid,
    PRIMARY KEY (target_schema, source_table, key)
);
CREATE INDEX IF NOT EXISTS digest_rows_rowid
    ON {BOOKKEEPING_SCHEMA}.digest_rows (target_schema, source_table, source_rowid);
CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.conflicts (
    target_schema text NOT NULL,
    source_table text NOT NULL,
    key text NOT NULL,
    kind text NOT NULL,
    run_id text NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target_schema, source_table, key)
);
CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.skipped (
    run_id text NOT NULL,
    target_schema text NOT NULL,
    source_table text NOT NULL,
    source_key text NOT NULL,
    source_rowid bigint NOT NULL,
    skipped_at timestamptz NOT NULL DEFAULT now()
);-- The mapping the last run of a schema used (TOML): without --config, reruns, verify and sync
-- use it, so that new source values cannot change a type already created.
CREATE TABLE IF NOT EXISTS {BOOKKEEPING_SCHEMA}.mappings (
    target_schema text PRIMARY KEY,
    mapping text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
"""

# A pack: ``rowids`` and ``digests`` as int64 little-endian, ``keys`` a JSON array (UTF-8),
# position by position. Bytes, not PostgreSQL arrays, and stored out of line without
# compression: about 6 ms per 10k-row pack against 12 ms as arrays and 30 ms compressed, a
# cost that falls on the bulk load. The storage is set once, when the table is created.
DIGEST_PACKS_STORAGE = f"""
ALTER TABLE {BOOKKEEPING_SCHEMA}.digest_packs ALTER COLUMN rowids SET STORAGE EXTERNAL,
    ALTER COLUMN keys SET STORAGE EXTERNAL, ALTER COLUMN digests SET STORAGE EXTERNAL;
"""

QUARANTINE_COLUMNS = (
    "run_id",
    "target_schema",
    "source_table",
    "source_key",
    "source_rowid",
    "reason",
    "detail",
    "stage",
    "raw",
)
