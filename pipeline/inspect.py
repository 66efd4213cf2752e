"""Read-only views of a migration: checkpoints (status) and row-count verification."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import checkpoints as ckpt
from pipeline.runner import table_exists
from pipeline.source import check_source
from pipeline.schema import BOOKKEEPING_SCHEMA, TABLES, quote_ident
from pipeline.settings import Settings
from pipeline.target import connect
from stages.extract import open_source


async def status(settings: Settings) -> list[ckpt.Checkpoint]:
    """The checkpoints of the configured target schema, parents first."""
    conn = await connect(settings.require_dsn())
    try:
        found = await ckpt.read_checkpoints(conn, settings.target.schema)
    finally:
        await conn.close()
    return [found[t.name] for t in TABLES if t.name in found]


@dataclass(frozen=True)
class CountCheck:
    table: str
    source: int
    target: int
    quarantined: int
    skipped: int

    @property
    def missing(self) -> int:
        return self.source - self.target - self.quarantined - self.skipped

    @property
    def ok(self) -> bool:
        return self.missing == 0


async def verify_counts(settings: Settings) -> list[CountCheck]:
    """Per table: source rows == target rows + quarantined + skipped."""
    path = settings.require_source()
    names = settings.target
    out = []
    async with open_source(path) as src:
        await check_source(src, path)
        conn = await connect(settings.require_dsn())
        try:
            found = await ckpt.read_checkpoints(conn, names.schema)
            for table in TABLES:
                async with src.execute(f"SELECT count(*) FROM {quote_ident(table.name)}") as cur:
                    row = await cur.fetchone()
                source = int(row[0]) if row else 0
                target = 0
                if await table_exists(conn, names, table.name):
                    target = int(await conn.fetchval(f"SELECT count(*) FROM {names.qualified(table.name)}"))
                quarantined = 0
                if found:
                    quarantined = int(
                        await conn.fetchval(
                            f"SELECT count(DISTINCT source_rowid) FROM {BOOKKEEPING_SCHEMA}.quarantine"
                            " WHERE target_schema = $1 AND source_table = $2",
                            names.schema,
                            table.name,
                        )
                    )
                skipped = found[table.name].skipped if table.name in found else 0
                out.append(CountCheck(table.name, source, target, quarantined, skipped))
        finally:
            await conn.close()
    return out


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
            settings.target.schema,
            table,
        )
        rows = await conn.fetch(
            f"SELECT source_table, source_key, source_rowid, reason, detail, stage, resolution"
            f" FROM {BOOKKEEPING_SCHEMA}.quarantine WHERE {where}"
            " ORDER BY source_table DESC, source_rowid LIMIT $3",
            settings.target.schema,
            table,
            limit,
        )
    finally:
        await conn.close()
    return int(total), [dict(r) for r in rows]
