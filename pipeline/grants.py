"""The privileges each command needs, checked before it starts: a missing grant is one sentence
naming it (and the GRANT an administrator runs) with exit 2, never a failure halfway through or
an internal error.

What needs what:

- `run`: CREATE on the database (it runs ``CREATE SCHEMA IF NOT EXISTS`` for its schemas, which
  PostgreSQL checks even when they exist), USAGE and CREATE on every schema it fills and on the
  bookkeeping schema where they exist; TEMPORARY when it may stage rows in a temporary table
  (JSONL files, whose rewrite is reconciled there, or ``--on-conflict skip|update``).
- `sync`: USAGE on the schemas and TEMPORARY (changes are staged in a temporary table); with
  JSONL files also what `run` needs, since it catches them up as `run` does.
- `verify`: USAGE on the schemas it reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from flux_migrate.core.dsn import dsn_location
from flux_migrate.core.errors import TargetError
from flux_migrate.core.schema import BOOKKEEPING_SCHEMA, quote_ident
from flux_migrate.core.target import connect
from flux_migrate.pipeline.settings import Settings
from flux_migrate.stages.extract import require_source_file


@dataclass(frozen=True)
class Grant:
    """One privilege a command needs: on the database (``schema`` empty) or on a schema."""

    privilege: str  # CREATE | TEMPORARY | USAGE
    why: str
    schema: str = ""


def needs(command: str, settings: Settings, schemas: Sequence[str]) -> list[Grant]:
    """The grants ``command`` (run, sync, sync --dry-run, verify, status, quarantine) needs to
    work on ``schemas`` (the target schemas it reads or fills) under ``settings``."""
    every = [*schemas, BOOKKEEPING_SCHEMA]
    if command in ("status", "quarantine"):
        return [Grant("USAGE", "to read its bookkeeping", BOOKKEEPING_SCHEMA)]
    if command == "verify":
        return [Grant("USAGE", "to read it", s) for s in every]
    out = [Grant("USAGE", "to read and write it", s) for s in every]
    if command == "run" or (command == "sync" and settings.jsonl):
        out.insert(0, Grant("CREATE", "to create its schemas (checked even when they exist)"))
        out += [Grant("CREATE", "to create tables in it", s) for s in every]
    if command == "sync":
        out.append(Grant("TEMPORARY", "to stage the changes it applies"))
    elif command == "run" and settings.jsonl:
        out.append(Grant("TEMPORARY", "to reconcile a rewritten JSONL file"))
    elif command == "run" and settings.on_conflict != "error":
        out.append(Grant("TEMPORARY", f"for --on-conflict {settings.on_conflict}"))
    return out


def check_sources(settings: Settings) -> None:
    """The offline part of a preflight: the SQLite file and JSONL files exist (exit 2)."""
    from flux_migrate.pipeline.jsonl_run import check_jsonl_sources

    if settings.sqlite_path is not None:
        require_source_file(settings.sqlite_path)
    check_jsonl_sources(settings)


async def missing(conn: asyncpg.Connection, wanted: Iterable[Grant]) -> tuple[Grant, str, str]:
    """The first grant of ``wanted`` the current role lacks (a schema that does not exist yet
    needs none of its own), with the role and database names; ``Grant("", "")`` when none."""
    row = await conn.fetchrow(
        "SELECT current_user AS role, current_database() AS db,"
        " has_database_privilege(current_database(), 'CREATE') AS create,"
        " has_database_privilege(current_database(), 'TEMPORARY') AS temporary"
    )
    for grant in wanted:
        if not grant.schema:
            held = row[grant.privilege.lower()]
        else:
            held = await conn.fetchval(
                "SELECT coalesce(bool_and(has_schema_privilege(oid, $2)), true)"
                " FROM pg_namespace WHERE nspname = $1",
                grant.schema,
                grant.privilege,
            )
        if not held:
            return grant, row["role"], row["db"]
    return Grant("", ""), row["role"], row["db"]


async def require_grants(
    command: str, settings: Settings, schemas: Sequence[str], *, dry_run: bool = False
) -> None:
    """Refuse (TargetError, exit 2) before anything is done when the role lacks a grant that
    ``command`` needs on ``schemas``, naming the grant and the statement that gives it."""
    dsn = settings.require_dsn()
    label = f"{command} --dry-run" if dry_run else command
    conn = await connect(dsn)  # the first contact: a refusal is one sentence, never retried
    try:
        grant, role, db = await missing(conn, needs(label, settings, schemas))
    finally:
        await conn.close()
    if not grant.privilege:
        return
    on = f"SCHEMA {quote_ident(grant.schema)}" if grant.schema else f"DATABASE {quote_ident(db)}"
    what = f"schema {grant.schema}" if grant.schema else f"database {db}"
    raise TargetError(
        f"PostgreSQL at {dsn_location(dsn)}: role {role} lacks {grant.privilege} on {what}, which"
        f" `{label}` needs {grant.why}; as an administrator run"
        f" `GRANT {grant.privilege} ON {on} TO {quote_ident(role)};`"
        " (a rerun will not fix this). Nothing was done."
    )
