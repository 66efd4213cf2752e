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
