"""Small read-only questions to the target's catalog, shared by the runner, verify and memory."""

from __future__ import annotations

import asyncpg

from flux_migrate.core.schema import TargetNames

# The advisory-lock key that one migration run holds per target schema ($1 = schema name).
MIGRATION_LOCK_KEY = "hashtext('flux_migrate:' || $1)"


async def table_exists(conn: asyncpg.Connection, names: TargetNames, table: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", names.qualified(table)))


async def existing_constraint_names(conn: asyncpg.Connection, schema: str) -> set[str]:
    """Names of the constraints and indexes in ``schema``."""
    rows = await conn.fetch(
        "SELECT conname AS name FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
        " WHERE n.nspname = $1 UNION SELECT indexname FROM pg_indexes WHERE schemaname = $1",
        schema,
    )
    return {r["name"] for r in rows}


async def existing_constraints(conn: asyncpg.Connection, schema: str) -> set[tuple[str, str]]:
    """(name, table) of the constraints and indexes in ``schema``: a name on another table is
    not the key flux-migrate would build."""
    rows = await conn.fetch(
        "SELECT c.conname AS name, r.relname AS tab FROM pg_constraint c JOIN pg_class r"
        " ON r.oid = c.conrelid JOIN pg_namespace n ON n.oid = r.relnamespace"
        " WHERE n.nspname = $1 UNION SELECT indexname, tablename FROM pg_indexes"
        " WHERE schemaname = $1",
        schema,
    )
    return {(r["name"], r["tab"]) for r in rows}


async def relations(conn: asyncpg.Connection, schema: str) -> dict[str, tuple[str, str | None]]:
    """Every relation of ``schema``: name -> (relkind, the table of an index)."""
    rows = await conn.fetch(
        "SELECT c.relname, c.relkind::text AS kind, t.relname AS tab FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_index i"
        " ON i.indexrelid = c.oid LEFT JOIN pg_class t ON t.oid = i.indrelid"
        " WHERE n.nspname = $1",
        schema,
    )
    return {r["relname"]: (r["kind"], r["tab"]) for r in rows}
