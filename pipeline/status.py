"""Read-only views of a migration: checkpoints (status) and row-count verification."""

from __future__ import annotations

from core import bookkeeping as ckpt
from core.schema import BOOKKEEPING_SCHEMA, TABLES
from core.target import connect
from pipeline.settings import Settings


async def status(settings: Settings) -> list[ckpt.Checkpoint]:
    """The checkpoints of the configured target schema, parents first."""
    conn = await connect(settings.require_dsn())
    try:
        found = await ckpt.read_checkpoints(conn, settings.names.schema)
    finally:
        await conn.close()
    return [found[t.name] for t in TABLES if t.name in found]


async def list_quarantine(
    settings: Settings, table: str | None, limit: int, include_resolved: bool
) -> tuple[int, list[dict[str, object]]]:
    """The count and the first ``limit`` quarantined rows (table, key, rowid, reason, detail)."""
    conn = await connect(settings.require_dsn())
    try:
        if not await ckpt.bookkeeping_exists(conn):
            return 0, []
        where = "target_schema = $1 AND ($2::text IS NULL OR source_table = $2)"
        if not include_resolved:
            where += " AND resolved_at IS NULL"
        total = await conn.fetchval(
            f"SELECT count(*) FROM {BOOKKEEPING_SCHEMA}.quarantine WHERE {where}",
            settings.names.schema,
            table,
        )
        rows = await conn.fetch(
            f"SELECT source_table, source_key, source_rowid, reason, detail, stage, resolution"
            f" FROM {BOOKKEEPING_SCHEMA}.quarantine WHERE {where}"
            " ORDER BY source_table DESC, source_rowid LIMIT $3",
            settings.names.schema,
            table,
            limit,
        )
    finally:
        await conn.close()
    return int(total), [dict(r) for r in rows]
