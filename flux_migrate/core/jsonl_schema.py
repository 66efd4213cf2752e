"""The one definition of the JSONL tables: the app's built-in profiles and their DDL.

A JSONL file becomes a :class:`core.schema.Table` with ``profile="jsonl"``: one column per key
of its records (the profile's for the app's ``feedback``, ``error_reports``, ``corrections``
and ``governance_changes``; any other key typed from its values), every column nullable except
the primary key ``id`` (always text) where records have one. A profile's keys have their type
whatever the first lines hold (``reviewed_by`` is null until a correction is reviewed); keys
a profile does not name are added like those of any other file.
Its checkpoint's ``last_rowid`` is the byte offset after the last complete line committed and
``last_key`` the fingerprint of the bytes before it (see docs/bad-data.md, JSONL files).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from flux_migrate.core.schema import BOOKKEEPING_SCHEMA, Column, Kind, Table, qualified, quote_ident

JSONL_PROFILE = "jsonl"


@dataclass(frozen=True)
class JsonlFile:
    """One JSONL file to migrate: its path, the target table (default: the file's stem) and
    whether it is a snapshot (records gone from it are deleted from the table)."""

    path: Path
    table: str
    snapshot: bool = False

    @staticmethod
    def of(path: Path | str, table: str | None = None, *, snapshot: bool = False) -> JsonlFile:
        return JsonlFile(Path(path), table or Path(path).stem, snapshot)


# The target type of each kind a JSONL column can have (text keys have no length limit).
JSONL_PG_TYPES = {
    Kind.TEXT: "text",
    Kind.NULLABLE_TEXT: "text",
    Kind.INTEGER: "bigint",
    Kind.REAL: "double precision",
    Kind.NUMERIC: "numeric",
    Kind.BOOLEAN: "boolean",
    Kind.INSTANT: "timestamptz",
    Kind.JSON_VALUE: "jsonb",
}

# Existing column types read back from the catalog, and the kind that converts into them.
KIND_OF_PG_TYPE = {
    "text": Kind.NULLABLE_TEXT,
    "character varying": Kind.NULLABLE_TEXT,
    "bigint": Kind.INTEGER,
    "integer": Kind.INTEGER,
    "smallint": Kind.INTEGER,
    "double precision": Kind.REAL,
    "numeric": Kind.NUMERIC,
    "boolean": Kind.BOOLEAN,
    "timestamp with time zone": Kind.INSTANT,
    "jsonb": Kind.JSON_VALUE,
}


def _text(name: str, note: str = "") -> Column:
    return Column(name, Kind.NULLABLE_TEXT, type="text", note=note)


def _key() -> Column:
    return Column("id", Kind.TEXT, type="text", not_null=True, note="uuid4 text, primary key")


_CREATED_AT = Column(
    "created_at",
    Kind.INSTANT,
    type="timestamptz",
    note="utcnow().isoformat() without offset (taken as UTC), or with +00:00",
)

# feedback.jsonl, all four record formats of the app in one table (keys a format lacks: NULL).
FEEDBACK = Table(
    name="feedback",
    columns=(
        _key(),
        _text("message_id", "no foreign key: may name messages that do not exist"),
        _text("session_id", "no foreign key: may name sessions that do not exist"),
        Column("rating", Kind.INTEGER, type="bigint", note="-1, 0 or 1"),
        _text("comment"),
        _text("corrected_answer", "string or null"),
        _CREATED_AT,
        _text("rating_label", "format 3+: accurate / partial / inaccurate / unknown"),
        _text("query", "format 4"),
        _text("answer", "format 4"),
        _text("username", "format 4; anonymous when not logged in"),
    ),
    primary_key=("id",),
    profile=JSONL_PROFILE,
)

ERROR_REPORTS = Table(
    name="error_reports",
    columns=(
        _key(),
        _text("message_id", "no foreign key"),
        _text("session_id", "no foreign key"),
        _text("error_type"),
        _text("description"),
        _text("expected_answer"),
        _text("reporter"),
        _CREATED_AT,
        _text("status", "pending, ..."),
    ),
    primary_key=("id",),
    profile=JSONL_PROFILE,
)

# corrections.jsonl: rewritten in place when a correction is reviewed (reviewed_by and
# reviewed_at are null until then, so the first lines never say their type).
CORRECTIONS = Table(
    name="corrections",
    columns=(
        _key(),
        _text("message_id", "no foreign key"),
        Column("original", Kind.JSON_VALUE, type="jsonb", note="the corrected text or object"),
        _text("status", "pending, approved, rejected, ..."),
        _text("reviewed_by", "null until reviewed"),
        Column("reviewed_at", Kind.INSTANT, type="timestamptz", note="null until reviewed"),
        _CREATED_AT,
    ),
    primary_key=("id",),
    profile=JSONL_PROFILE,
)

# governance_changes.jsonl: one record per change of a governance setting.
GOVERNANCE_CHANGES = Table(
    name="governance_changes",
    columns=(
        _key(),
        Column("change", Kind.JSON_VALUE, type="jsonb", note="what changed (object)"),
        _CREATED_AT,
    ),
    primary_key=("id",),
    profile=JSONL_PROFILE,
)

PROFILES: dict[str, Table] = {
    t.name: t for t in (FEEDBACK, ERROR_REPORTS, CORRECTIONS, GOVERNANCE_CHANGES)
}


def profile_for(stem: str, target_table: str) -> Table | None:
    """The built-in profile of a file named ``stem``.jsonl, named ``target_table``; or None."""
    found = PROFILES.get(stem)
    return None if found is None else replace(found, name=target_table)


def column_sql(column: Column) -> str:
    null = " NOT NULL" if not column.nullable else ""
    pg_type = column.type or JSONL_PG_TYPES[column.kind]
    return f"{quote_ident(column.name)} {pg_type}{null}"


def create_jsonl_table_sql(schema: str, table: Table) -> str:
    """CREATE TABLE IF NOT EXISTS with the primary key (built up front: rows are upserted)."""
    cols = [column_sql(c) for c in table.columns]
    if table.primary_key:
        cols.append(f"PRIMARY KEY ({', '.join(quote_ident(c) for c in table.primary_key)})")
    return f"CREATE TABLE IF NOT EXISTS {qualified(schema, table.name)} ({', '.join(cols)})"


def add_column_sql(schema: str, table: str, column: Column) -> str:
    return f"ALTER TABLE {qualified(schema, table)} ADD COLUMN IF NOT EXISTS {column_sql(column)}"


# The ids a reconcile pass has met so far, committed with each batch (resumable after a kill):
# an id loaded twice is a duplicate, an id of the table never met is gone from the file, and an
# id met only on quarantined lines (``loaded`` false) keeps its row as it was.
JSONL_SEEN = f"{BOOKKEEPING_SCHEMA}.jsonl_seen"
# One row per (sub)transaction that wrote rows of a JSONL table, written in it: its xmin is the
# rows' xmin for as long as nobody else writes them (the rule the SQLite tables' digest packs
# follow). ``adopted`` holds the xmins of rows written before this table existed.
JSONL_WRITES = f"{BOOKKEEPING_SCHEMA}.jsonl_writes"
JSONL_DDL = f"""
CREATE TABLE IF NOT EXISTS {JSONL_SEEN} (
    target_schema text NOT NULL,
    source_table text NOT NULL,
    id text NOT NULL,
    PRIMARY KEY (target_schema, source_table, id)
);
ALTER TABLE {JSONL_SEEN} ADD COLUMN IF NOT EXISTS loaded boolean NOT NULL DEFAULT true;
CREATE TABLE IF NOT EXISTS {JSONL_WRITES} (
    target_schema text NOT NULL,
    source_table text NOT NULL,
    adopted xid,
    written_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS jsonl_writes_table ON {JSONL_WRITES} (target_schema, source_table);
"""
