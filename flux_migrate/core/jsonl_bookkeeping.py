"""Bookkeeping of JSONL tables: their checkpoint's meta, the rewrite reset and the reconcile.

A JSONL table's checkpoint is a row of ``flux_migrate.checkpoints`` like any other:
``last_rowid`` is the byte offset after the last complete line committed, ``last_key`` the
sha256 (hex) of every byte before it, and ``fingerprint`` a JSON object (:class:`JsonlMeta`)
saying it is a JSONL table, until which offset a reconcile pass runs, and how many records gone
from the file the table keeps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg

from flux_migrate.core.bookkeeping import CHECKPOINTS, CONFLICTS, QUARANTINE
from flux_migrate.core.jsonl_schema import JSONL_DDL, JSONL_SEEN, JSONL_WRITES
from flux_migrate.core.schema import qualified

EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class JsonlMeta:
    """What a JSONL checkpoint's ``fingerprint`` holds."""

    file: str
    reconcile_until: int | None = None  # a reconcile pass runs while last_rowid < this
    retained: int = 0  # records gone from the file and kept in the table (not a snapshot)
    rewrites: int = 0
    kind: str = "jsonl"

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def loads(text: str) -> JsonlMeta | None:
        """The meta in a checkpoint's fingerprint; None when it is not a JSONL checkpoint."""
        try:
            data: Any = json.loads(text) if text else {}
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("kind") != "jsonl":
            return None
        return JsonlMeta(**{k: data[k] for k in data if k in JsonlMeta.__dataclass_fields__})


def is_jsonl_fingerprint(text: str) -> bool:
    """Whether a checkpoint's fingerprint is a JSONL table's (the SQLite checks skip those)."""
    return JsonlMeta.loads(text) is not None


async def ensure_jsonl_bookkeeping(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('flux_migrate.ddl'))")
        await conn.execute(JSONL_DDL)


def ours(schema_param: str = "$1", table_param: str = "$2") -> str:
    """SQL: the xmins of the rows flux-migrate wrote in a JSONL table (a row whose xmin is not
    among them was written, or changed, by someone else)."""
    where = f"w.target_schema = {schema_param} AND w.source_table = {table_param}"
    return (
        f"(SELECT w.xmin FROM {JSONL_WRITES} w WHERE {where}"
        f" UNION ALL SELECT w.adopted FROM {JSONL_WRITES} w WHERE {where}"
        " AND w.adopted IS NOT NULL)"
    )


async def record_write(conn: asyncpg.Connection, schema: str, table: str) -> None:
    """Mark the current (sub)transaction as flux-migrate's writing rows of ``table``."""
    await conn.execute(
        f"INSERT INTO {JSONL_WRITES} (target_schema, source_table) VALUES ($1, $2)", schema, table
    )


async def adopt_rows(conn: asyncpg.Connection, schema: str, table: str) -> None:
    """A table loaded before writes were recorded: its rows as they are now are flux-migrate's."""
    if await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM {JSONL_WRITES} WHERE target_schema = $1"
        " AND source_table = $2)",
        schema,
        table,
    ):
        return
    await conn.execute(
        f"INSERT INTO {JSONL_WRITES} (target_schema, source_table, adopted)"
        f" SELECT DISTINCT $1, $2, t.xmin FROM {qualified(schema, table)} t",
        schema,
        table,
    )
    await record_write(conn, schema, table)


async def foreign_rows(conn: asyncpg.Connection, schema: str, table: str) -> int:
    """How many rows of the table someone else wrote or changed."""
    return int(
        await conn.fetchval(
            f"SELECT count(*) FROM {qualified(schema, table)} t WHERE t.xmin NOT IN {ours()}",
            schema,
            table,
        )
    )


async def set_meta(conn: asyncpg.Connection, schema: str, table: str, meta: JsonlMeta) -> None:
    await conn.execute(
        f"UPDATE {CHECKPOINTS} SET fingerprint = $3, updated_at = now()"
        " WHERE target_schema = $1 AND source_table = $2",
        schema,
        table,
        meta.dumps(),
    )


async def begin_reconcile(
    conn: asyncpg.Connection, schema: str, table: str, meta: JsonlMeta
) -> None:
    """The file was rewritten: the checkpoint starts over at offset 0 with zero counts (the
    table keeps its rows, to be reconciled by id), the ids met are forgotten, and open
    quarantined lines of the old file are resolved as ``file_rewritten`` (offsets changed; the
    pass quarantines again whatever is still bad). One transaction."""
    async with conn.transaction():
        await conn.execute(
            f"UPDATE {CHECKPOINTS} SET last_rowid = 0, last_key = $3, extracted = 0, loaded = 0,"
            " quarantined = 0, skipped = 0, last_batch = '{}', fingerprint = $4,"
            " status = 'reconciling', updated_at = now()"
            " WHERE target_schema = $1 AND source_table = $2",
            schema,
            table,
            EMPTY_DIGEST,
            meta.dumps(),
        )
        for sql in (
            f"DELETE FROM {JSONL_SEEN} WHERE target_schema = $1 AND source_table = $2",
            f"DELETE FROM {CONFLICTS} WHERE target_schema = $1 AND source_table = $2",
        ):
            await conn.execute(sql, schema, table)
        await conn.execute(
            f"UPDATE {QUARANTINE} SET resolved_at = now(), resolution = 'file_rewritten'"
            " WHERE target_schema = $1 AND source_table = $2 AND resolved_at IS NULL",
            schema,
            table,
        )


async def seen_before(
    conn: asyncpg.Connection, schema: str, table: str, ids: list[str]
) -> set[str]:
    """Which of ``ids`` the reconcile pass loaded from an earlier batch."""
    rows = await conn.fetch(
        f"SELECT id FROM {JSONL_SEEN} WHERE target_schema = $1 AND source_table = $2"
        " AND id = ANY($3::text[]) AND loaded",
        schema,
        table,
        ids,
    )
    return {r["id"] for r in rows}


async def mark_seen(
    conn: asyncpg.Connection, schema: str, table: str, ids: list[str], *, loaded: bool = True
) -> None:
    """Record ``ids`` as met by the reconcile pass, loaded or only on quarantined lines (in the
    batch's transaction). An id may come more than once (a file's lines repeating it): it is
    recorded once, as ON CONFLICT DO UPDATE cannot touch one row twice in a statement."""
    ids = list(dict.fromkeys(ids))
    await conn.execute(
        f"INSERT INTO {JSONL_SEEN} AS s (target_schema, source_table, id, loaded)"
        " SELECT $1, $2, unnest($3::text[]), $4"
        " ON CONFLICT (target_schema, source_table, id) DO UPDATE SET loaded = s.loaded OR $4",
        schema,
        table,
        ids,
        loaded,
    )


async def read_jsonl_columns(
    conn: asyncpg.Connection, schema: str, table: str
) -> tuple[list[tuple[str, str, bool]], tuple[str, ...]]:
    """The columns of an existing table (name, type as format_type prints it, NOT NULL) in
    order, and its primary key's columns."""
    rel = qualified(schema, table)
    cols = await conn.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS type, attnotnull FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        rel,
    )
    pk = await conn.fetch(
        "SELECT a.attname FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY"
        " AS k(attnum, n) ON true JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = k.attnum WHERE i.indrelid = $1::regclass AND i.indisprimary"
        " ORDER BY k.n",
        rel,
    )
    return [(r["attname"], r["type"], r["attnotnull"]) for r in cols], tuple(
        r["attname"] for r in pk
    )


GONE_SAMPLE = 10


async def finish_reconcile(
    conn: asyncpg.Connection,
    schema: str,
    table: str,
    meta: JsonlMeta,
    *,
    snapshot: bool,
    run_id: str = "",
) -> tuple[int, list[str], int]:
    """End a reconcile pass: the table's records whose id the pass never met (loaded, or
    quarantined with its id) are gone from the file; they are counted, and deleted when the
    file is a snapshot, unless the pass quarantined a line whose id could not be read (it may
    be one of them: nothing is deleted then) or someone else wrote or changed the row in
    PostgreSQL (never deleted). Each deleted row is kept, as it was, in the quarantine as
    resolved (reason ``gone_from_file``, resolution ``deleted (snapshot)``, rowid -1): what was
    deleted stays listed. Returns their count, the first few ids and how many were deleted.
    One transaction, which also clears the pass's ids and its mark in the meta."""
    target = qualified(schema, table)
    gone_where = (
        f"NOT EXISTS (SELECT 1 FROM {JSONL_SEEN} s WHERE s.target_schema = $1"
        " AND s.source_table = $2 AND s.id = t.id::text)"
    )
    async with conn.transaction():
        rows = await conn.fetch(
            f"SELECT t.id::text AS id FROM {target} t WHERE {gone_where} ORDER BY 1",
            schema,
            table,
        )
        gone = [r["id"] for r in rows]
        unreadable = await conn.fetchval(
            f"SELECT count(*) FROM {QUARANTINE} WHERE target_schema = $1 AND source_table = $2"
            " AND resolved_at IS NULL AND source_key IS NULL",
            schema,
            table,
        )
        deleted = 0
        if snapshot and gone and unreadable == 0:
            deleted = await _delete_gone(conn, schema, table, gone_where, run_id)
        stale = await conn.fetchval(  # kept as they were: their new line is quarantined
            f"SELECT count(*) FROM {target} t JOIN {JSONL_SEEN} s ON s.target_schema = $1"
            " AND s.source_table = $2 AND s.id = t.id::text AND NOT s.loaded",
            schema,
            table,
        )
        await conn.execute(
            f"DELETE FROM {JSONL_SEEN} WHERE target_schema = $1 AND source_table = $2",
            schema,
            table,
        )
        done = JsonlMeta(
            file=meta.file,
            reconcile_until=None,
            retained=stale + len(gone) - deleted,
            rewrites=meta.rewrites,
        )
        await set_meta(conn, schema, table, done)
    return len(gone), gone[:GONE_SAMPLE], deleted


async def _delete_gone(
    conn: asyncpg.Connection, schema: str, table: str, gone_where: str, run_id: str
) -> int:
    """Delete the gone rows flux-migrate wrote (never one someone else wrote or changed),
    keeping each, as it was, in the quarantine as resolved; return how many."""
    deleted = await conn.fetch(
        f"WITH gone AS (DELETE FROM {qualified(schema, table)} t WHERE {gone_where}"
        f" AND t.xmin IN {ours()} RETURNING t.id::text AS id, to_jsonb(t) AS row)"
        f" INSERT INTO {QUARANTINE} (run_id, target_schema, source_table, source_key,"
        " source_rowid, reason, detail, stage, raw, resolved_at, resolution)"
        " SELECT $3, $1, $2, id, -1, 'gone_from_file', 'the rewritten snapshot file no longer"
        " holds this id; the row as it was is kept here', 'reconcile',"
        " jsonb_build_object('row', row), now(), 'deleted (snapshot)' FROM gone RETURNING 1",
        schema,
        table,
        run_id,
    )
    return len(deleted)


async def clear_jsonl_table(
    conn: asyncpg.Connection, schema: str, table: str, *, created: bool
) -> None:
    """--restart of one JSONL table: drop it (empty it when flux-migrate did not create it) and
    forget its checkpoint, quarantine and reconcile ids (in the caller's transaction)."""
    await conn.execute(JSONL_DDL)  # a target from before jsonl_writes existed
    if created:
        await conn.execute(f"DROP TABLE IF EXISTS {qualified(schema, table)}")
    elif await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", qualified(schema, table)):
        await conn.execute(f"DELETE FROM {qualified(schema, table)}")
    for sql in (
        f"DELETE FROM {CHECKPOINTS} WHERE target_schema = $1 AND source_table = $2",
        f"DELETE FROM {QUARANTINE} WHERE target_schema = $1 AND source_table = $2",
        f"DELETE FROM {JSONL_SEEN} WHERE target_schema = $1 AND source_table = $2",
        f"DELETE FROM {JSONL_WRITES} WHERE target_schema = $1 AND source_table = $2",
    ):
        await conn.execute(sql, schema, table)


async def clear_jsonl_tables(conn: asyncpg.Connection, schema: str, checkpoints: Any) -> None:
    """--restart of a whole schema: clear every JSONL table among ``checkpoints`` (a mapping of
    source table to Checkpoint), in the caller's transaction."""
    for name, c in checkpoints.items():
        if is_jsonl_fingerprint(c.fingerprint):
            await clear_jsonl_table(conn, schema, name, created=c.created_table)
