"""Read-only views of a migration: its checkpoints (status) and its quarantine."""

from __future__ import annotations

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.jsonl_bookkeeping import is_jsonl_fingerprint
from flux_migrate.core.target import connect
from flux_migrate.pipeline.settings import Settings


async def status(settings: Settings) -> list[ckpt.Checkpoint]:
    """The checkpoints of the configured target schema, parents first, then the JSONL tables
    (whose ``last_rowid`` is a byte offset)."""
    conn = await connect(settings.require_dsn())
    try:
        found = await ckpt.read_checkpoints(conn, settings.names.schema)
    finally:
        await conn.close()
    jsonl = [c for name, c in sorted(found.items()) if is_jsonl_fingerprint(c.fingerprint)]
    return [c for c in found.values() if not is_jsonl_fingerprint(c.fingerprint)] + jsonl


async def list_quarantine(
    settings: Settings, table: str | None, limit: int, include_resolved: bool
) -> tuple[int, list[dict[str, object]]]:
    """The count and the first ``limit`` quarantined rows (table, key, rowid, reason, detail)."""
    conn = await connect(settings.require_dsn())
    try:
        if not await ckpt.bookkeeping_exists(conn):
            return 0, []
        total, rows = await ckpt.list_quarantine(
            conn, settings.names.schema, table, limit=limit, include_resolved=include_resolved
        )
    finally:
        await conn.close()
    return total, [dict(r) for r in rows]
