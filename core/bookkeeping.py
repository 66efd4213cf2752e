"""The checkpoint store: per target table, how far the source has been loaded.

Checkpoints live in ``flux_migrate.checkpoints`` in the target database and are updated in the
same transaction as the rows they account for.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from core.schema import BOOKKEEPING_DDL, BOOKKEEPING_SCHEMA

CHECKPOINTS = f"{BOOKKEEPING_SCHEMA}.checkpoints"

LOCK_SQL = (
    f"SELECT last_rowid, last_batch FROM {CHECKPOINTS} WHERE target_schema = $1"
    " AND source_table = $2 FOR UPDATE"
)
# last_batch keeps the counts of the batch that moved the checkpoint, so that a retry after an
# ambiguous commit (reply lost, commit done) can account for the batch it finds committed.
ADVANCE_SQL = (
    f"UPDATE {CHECKPOINTS} SET last_rowid = $3, extracted = extracted + $4, loaded = loaded + $5,"
    " quarantined = quarantined + $6, skipped = skipped + $7, status = 'loading', run_id = $8,"
    " last_key = $9, last_batch = jsonb_build_object('loaded', $5::bigint, 'quarantined',"
    " $6::bigint, 'skipped', $7::bigint), updated_at = now()"
    " WHERE target_schema = $1 AND source_table = $2"
)


@dataclass(frozen=True)
class Checkpoint:
    target_schema: str
    source_table: str
    target_table: str
    last_rowid: int
    last_key: str | None
    extracted: int
    loaded: int
    quarantined: int
    skipped: int
    status: str
    created_table: bool
    preexisting_rows: bool
    constraints_pending: bool
    fingerprint: str
    run_id: str | None
    updated_at: datetime


async def ensure_bookkeeping(conn: asyncpg.Connection) -> None:
    """Create the flux_migrate schema and its tables when absent."""
    async with conn.transaction():
        # Serialize concurrent first runs creating the same objects.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('flux_migrate.ddl'))")
        await conn.execute(BOOKKEEPING_DDL)


async def bookkeeping_exists(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", CHECKPOINTS))


async def read_checkpoints(conn: asyncpg.Connection, target_schema: str) -> dict[str, Checkpoint]:
    """The checkpoints of one target schema by source table (empty when none exist yet)."""
    if not await bookkeeping_exists(conn):
        return {}
    rows = await conn.fetch(
        f"SELECT target_schema, source_table, target_table, last_rowid, last_key, extracted, loaded,"
        f" quarantined, skipped, status, created_table, preexisting_rows, constraints_pending,"
        f" fingerprint,"
        f" run_id, updated_at FROM {CHECKPOINTS} WHERE target_schema = $1",
        target_schema,
    )
    return {r["source_table"]: Checkpoint(**dict(r)) for r in rows}


async def create_checkpoint(
    conn: asyncpg.Connection,
    *,
    target_schema: str,
    source_table: str,
    target_table: str,
    created_table: bool,
    preexisting_rows: bool,
    constraints_pending: bool,
    fingerprint: str,
    run_id: str,
) -> None:
    await conn.execute(
        f"INSERT INTO {CHECKPOINTS} (target_schema, source_table, target_table, created_table,"
        " preexisting_rows, constraints_pending, fingerprint, run_id)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (target_schema, source_table) DO NOTHING",
        target_schema,
        source_table,
        target_table,
        created_table,
        preexisting_rows,
        constraints_pending,
        fingerprint,
        run_id,
    )


async def set_status(
    conn: asyncpg.Connection, target_schema: str, source_table: str, status: str, run_id: str
) -> None:
    await conn.execute(
        f"UPDATE {CHECKPOINTS} SET status = $3, run_id = $4, updated_at = now()"
        " WHERE target_schema = $1 AND source_table = $2",
        target_schema,
        source_table,
        status,
        run_id,
    )


async def clear_constraints_pending(conn: asyncpg.Connection, target_schema: str) -> None:
    await conn.execute(
        f"UPDATE {CHECKPOINTS} SET constraints_pending = false, updated_at = now()"
        " WHERE target_schema = $1",
        target_schema,
    )


async def clear_schema(conn: asyncpg.Connection, target_schema: str) -> None:
    """Forget every checkpoint, quarantined and skipped row of one target schema."""
    for table in ("checkpoints", "quarantine", "skipped"):
        await conn.execute(
            f"DELETE FROM {BOOKKEEPING_SCHEMA}.{table} WHERE target_schema = $1", target_schema
        )


# Rows an earlier run quarantined or skipped, by rowid ($3 = bigint[]), with their keys.
NOTED_ROWS_SQL = (
    f"SELECT source_rowid, source_key FROM {BOOKKEEPING_SCHEMA}.quarantine"
    " WHERE target_schema = $1 AND source_table = $2 AND source_rowid = ANY($3::bigint[])"
    f" UNION ALL SELECT source_rowid, source_key FROM {BOOKKEEPING_SCHEMA}.skipped"
    " WHERE target_schema = $1 AND source_table = $2 AND source_rowid = ANY($3::bigint[])"
)


async def rewind(
    conn: asyncpg.Connection,
    target_schema: str,
    source_table: str,
    last_rowid: int,
    last_key: str | None,
    expected_rowid: int,
) -> None:
    """Move a checkpoint back to ``last_rowid`` (rows above it are to be read again), provided
    it still stands at ``expected_rowid``."""
    await conn.execute(
        f"UPDATE {CHECKPOINTS} SET last_rowid = $3, last_key = $4, last_batch = '{{}}',"
        " updated_at = now() WHERE target_schema = $1 AND source_table = $2 AND last_rowid = $5",
        target_schema,
        source_table,
        last_rowid,
        last_key,
        expected_rowid,
    )


async def rows_written_since(conn: asyncpg.Connection, qualified: str, c: Checkpoint) -> int:
    """How many rows of the target table ``qualified`` someone else inserted or updated after
    flux-migrate last wrote to it: its last write updated the checkpoint in the same
    transaction, so any row whose xmin is newer than the checkpoint row's was written later."""
    return int(
        await conn.fetchval(
            f"SELECT count(*) FROM {qualified} WHERE age(xmin) < (SELECT age(xmin)"
            f" FROM {CHECKPOINTS} WHERE target_schema = $1 AND source_table = $2)",
            c.target_schema,
            c.source_table,
        )
    )
