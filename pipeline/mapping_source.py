"""The mapping a run uses: read from the config file, or discovered from the SQLite file.

``init`` writes the discovered mapping as TOML; ``run --config FILE`` reads it back from the
same file as the settings; ``run`` without one discovers it. Either way the source is
compared with the mapping first, and a table or column it does not place stops the run before
anything is written (exit 2), naming the table, the column and the line to add.
"""

from __future__ import annotations

import sqlite3
import tomllib
from dataclasses import replace
from pathlib import Path

import asyncpg

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.discover import SourceSchema, discover
from flux_migrate.core.errors import SourceError, source_error
from flux_migrate.core.mapping import (
    Evidence,
    Mapping,
    MappingError,
    app_table,
    map_schema,
    read_mapping,
    unplaced,
)
from flux_migrate.core.schema import TargetNames
from flux_migrate.core.target_rules import schema_problems
from flux_migrate.pipeline.evidence import table_evidence
from flux_migrate.stages.extract import require_source_file
from flux_migrate.stages.extract_sql import source_uri


async def recorded_mapping_of(conn: asyncpg.Connection, schema: str) -> Mapping | None:
    """The mapping the last run into ``schema`` used, as recorded in the target (None when
    there is none, or it no longer reads as a mapping)."""
    text = await ckpt.recorded_mapping(conn, schema)
    if text is None:
        return None
    try:
        return read_mapping(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, MappingError):
        return None


def read_source(
    path: Path, busy_timeout: float = 10.0, *, with_evidence: bool = True
) -> tuple[SourceSchema, dict[str, dict[str, Evidence]]]:
    """The schema of the SQLite file and (``with_evidence``) the evidence of every column of
    every table outside the app profile, read over whole columns (read-only)."""
    require_source_file(path)
    try:
        conn = sqlite3.connect(source_uri(path), uri=True, timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise SourceError(f"The SQLite file {path} cannot be opened ({exc}).") from None
    try:
        conn.text_factory = bytes
        schema = discover(conn)
        evidence = {
            t.name: table_evidence(conn, t)
            for t in schema.tables
            if with_evidence and app_table(t) is None
        }
    except sqlite3.DatabaseError as exc:
        raise source_error(exc, path) from None
    finally:
        conn.close()
    return schema, evidence


def resolve_mapping(
    path: Path,
    configured: Mapping | None,
    busy_timeout: float = 10.0,
    recorded: Mapping | None = None,
) -> tuple[Mapping, SourceSchema]:
    """The mapping for a run (the configured one, else the ``recorded`` one an earlier run
    used when it places this source, else the discovered one) and the source schema it was
    checked against.

    Raises SourceError (exit 2) naming every table or column the mapping does not place.
    """
    if configured is None and recorded is not None:
        schema, _ = read_source(path, busy_timeout, with_evidence=False)
        if schema.tables and not unplaced(schema, recorded):
            return with_row_ids(recorded, schema, path), schema
    schema, evidence = read_source(path, busy_timeout, with_evidence=configured is None)
    if not schema.tables:
        raise SourceError(f"The SQLite file {path} has no tables to migrate.")
    mapping = configured or map_schema(schema, evidence)
    problems = unplaced(schema, mapping)
    if problems:
        listed = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise SourceError(
            f"The mapping does not place everything in {path}, so nothing was written: {listed}."
        )
    return with_row_ids(mapping, schema, path), schema


def check_target_schema(mapping: Mapping, names: TargetNames, path: Path) -> None:
    """Refuse (SourceError, exit 2, before anything is written) a mapping whose target schema
    PostgreSQL would refuse or silently merge: each problem names the table, the column and
    the fix."""
    problems = schema_problems(mapping.tables, [names.table(t.name) for t in mapping.tables])
    if problems:
        listed = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise SourceError(
            f"PostgreSQL cannot hold the tables of {path} as mapped, so nothing was written:"
            f" {listed}."
        )


def with_row_ids(mapping: Mapping, schema: SourceSchema, path: Path) -> Mapping:
    """``mapping`` with each table's name for SQLite's row id (a real column may be called
    rowid). SourceError when a table read by row id has no name left for it."""
    tables = []
    for table in mapping.tables:
        found = next((t for t in schema.tables if t.name == table.name), None)
        if found is None or table.without_rowid or found.without_rowid:
            tables.append(table)
            continue
        if found.rowid_name is None:
            raise SourceError(
                f"Table {table.name} in {path} has ordinary columns named rowid, _rowid_ and"
                " oid, so SQLite's row id cannot be read to page it; rename one of them"
                " (ALTER TABLE ... RENAME COLUMN) in a copy of the file and migrate that."
            )
        tables.append(replace(table, rowid_name=found.rowid_name))
    return replace(mapping, tables=tuple(tables))
