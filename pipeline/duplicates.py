"""Keys that collide only once converted: quarantine all but the first arrival, then build the key.

SQLite keeps ``'A'`` (TEXT) and ``X'41'`` (BLOB) as two rows, and with ``strip_nul`` ``'ab'`` and
``'a\\0b'`` become the same key. The bulk load (keys built after it) loads both, and the primary
key cannot be built. Before each pending primary key is built, the rows that prevent it are
found; the first arrival (lowest source rowid) stays, every later one is moved to the
quarantine as ``duplicate_key`` with its raw source values, in one transaction with the
checkpoint counts and the key itself. Messages naming a duplicated session key stay with the
session that was kept (in PostgreSQL a key names one session).
"""

from __future__ import annotations

import time
from typing import Any

import aiosqlite
import asyncpg
import orjson
import structlog

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.catalog import existing_constraints
from flux_migrate.core.errors import (
    RuntimeFailure,
    constraint_failure,
    is_unique_violation,
    sqlstate,
)
from flux_migrate.core.schema import (
    Kind,
    Table,
    constraints,
    pg_identifier,
    quote_ident,
)
from flux_migrate.core.target import Target
from flux_migrate.pipeline.key_repair import NOT_BUILDABLE, repair_key
from flux_migrate.pipeline.report import RunReport
from flux_migrate.pipeline.settings import Settings
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.convert import raw_to_json
from flux_migrate.stages.extract_sql import select_sql
from flux_migrate.stages.transform import key_of, transform_batch

log = structlog.get_logger("flux_migrate")
KEYS_PER_QUERY = 500  # host parameters per SQLite query, below every SQLite's limit


async def build_primary_keys(
    src: aiosqlite.Connection, target: Target, settings: Settings, run_id: str, report: RunReport
) -> None:
    """Build the pending primary keys; where duplicates prevent one, quarantine all but the
    first arrival of each key (``duplicate_key``) and build it then. Keys already built are
    left alone; the rest of the deferred constraints are built by the runner afterwards."""
    names = settings.names
    started = time.monotonic()
    checkpoints = await target.retrying(
        lambda c: ckpt.pending_key_tables(c, names.schema), what="reading checkpoints"
    )
    for table in settings.tables:
        if table.name not in checkpoints:
            continue
        pk = next(
            (
                c
                for c in constraints(names, settings.tables)
                if c.table == table.name and c.primary_key
            ),
            None,
        )
        if pk is None:
            continue  # a table without a primary key
        have = await target.retrying(
            lambda c: existing_constraints(c, names.schema), what="reading constraints"
        )
        if (pk.name, pg_identifier(names.table(table.name))) in have:
            continue

        async def build(conn: asyncpg.Connection, sql: str = pk.sql) -> None:
            await conn.execute(sql)

        log.debug("constraint_build_started", constraint=pk.name)
        try:
            await target.retrying(build, what=f"building {pk.name}")
            continue
        except Exception as exc:
            if table.generic and sqlstate(exc) in NOT_BUILDABLE:
                continue  # not buildable over these values: named when the keys are built
            if not is_unique_violation(exc):
                raise
            if table.generic:  # any key the conversion made equal: pipeline/key_repair.py
                if await repair_key(src, target, settings, run_id, report, pk, exc):
                    continue
                raise constraint_failure(exc, pk.name) or exc from None
        moved = await _quarantine_duplicates(
            src, target, settings, run_id, table, checkpoints[table.name], pk.sql
        )
        if table.name in report.tables:
            report.tables[table.name].loaded -= moved
            report.tables[table.name].quarantined += moved
        log.warning("duplicate_keys_quarantined", table=table.name, rows=moved)
    if checkpoints:
        report.constraints_seconds = time.monotonic() - started


async def _source_candidates(
    src: aiosqlite.Connection, table: Table, keys: list[str], upto: int, strip_nul: bool
) -> list[tuple[Any, ...]]:
    """Source rows up to ``upto`` whose key bytes are one of ``keys`` (or, with strip_nul, hold
    a NUL), in rowid order; the caller converts them to see which keys they really have."""
    found: list[tuple[Any, ...]] = []
    nul = " OR instr(CAST(t.id AS BLOB), X'00') > 0" if strip_nul else ""
    for start in range(0, len(keys), KEYS_PER_QUERY):
        chunk = keys[start : start + KEYS_PER_QUERY]
        marks = ", ".join("?" for _ in chunk)
        sql = (
            f"{select_sql(table)} WHERE {table.rowid_sql('t')} <= ?"
            f" AND (CAST(t.id AS BLOB) IN ({marks}){nul}) ORDER BY {table.rowid_sql('t')}"
        )
        async with src.execute(sql, [upto, *(k.encode() for k in chunk)]) as cur:
            found += [tuple(row) for row in await cur.fetchall()]
        nul = ""  # rows with a NUL in their key were fetched with the first chunk
    found.sort(key=lambda row: int(row[0]))
    return found


def _match_sql(table: Table, qualified: str) -> str:
    """The physical row (ctid) of the target holding exactly one converted source row."""
    tests = []
    for i, column in enumerate(table.columns, start=1):
        cast = "::jsonb" if column.kind is Kind.JSON else ""
        tests.append(f"{quote_ident(column.name)} IS NOT DISTINCT FROM ${i}{cast}")
    return f"SELECT ctid::text FROM {qualified} WHERE {' AND '.join(tests)} ORDER BY ctid LIMIT 1"


Arrivals = dict[str, list[tuple[tuple[Any, ...], tuple[Any, ...]]]]


async def _quarantine_duplicates(
    src: aiosqlite.Connection,
    target: Target,
    settings: Settings,
    run_id: str,
    table: Table,
    upto: int,
    pk_sql: str,
) -> int:
    """Quarantine every later arrival of a duplicated key, then build the key; return how many
    rows moved. Reads the duplicates, matches them with their source rows, then moves them in
    one transaction with the checkpoint counts and the key."""
    qualified = settings.names.qualified(table.name)
    duplicated, quarantined, missing = await target.retrying(
        lambda c: _read_duplicates(c, settings, table), what="finding duplicate keys"
    )
    raw = await _source_candidates(src, table, sorted(duplicated), upto, settings.strip_nul)
    batch = transform_batch(
        Batch(table=table.name, seq=0, after_rowid=0, last_rowid=0, extracted=len(raw), raw=raw),
        table,
        naive_timezone=settings.naive_timezone,
        strip_nul=settings.strip_nul,
        missing_parents=missing,
    )
    arrivals: Arrivals = {}
    for row, source in zip(batch.rows, batch.raw, strict=True):
        if row[0] in duplicated and int(source[0]) not in quarantined:
            arrivals.setdefault(row[0], []).append((row, source))
    for key, count in duplicated.items():
        if len(arrivals.get(key, ())) != count:
            raise RuntimeFailure(
                f"Building the primary key of {qualified} found key {key!r} {count} times, but"
                f" the source holds {len(arrivals.get(key, ()))} loaded row(s) with it; was the"
                " table written by another tool too?"
            )
    records = _later_arrivals(arrivals, table, settings.names.schema, run_id)
    kept = [rows[0][0] for rows in arrivals.values()]
    await target.retrying(
        lambda c: _move(
            c, settings.names.schema, table, qualified, arrivals, kept, records, pk_sql
        ),
        what=f"quarantining duplicate keys of {table.name}",
    )
    return len(records)


async def _read_duplicates(
    conn: asyncpg.Connection, settings: Settings, table: Table
) -> tuple[dict[str, int], set[int], set[str]]:
    """The keys loaded more than once (with their counts), the rowids quarantined already, and
    the quarantined parent keys (their children are quarantined too)."""
    qualified, schema = settings.names.qualified(table.name), settings.names.schema
    counts = await conn.fetch(
        f"SELECT id, count(*) AS n FROM {qualified} GROUP BY id HAVING count(*) > 1"
    )
    quarantined = await ckpt.unresolved_rowids(conn, schema, table.name)
    parents: set[str] = set()
    if table.parent is not None:
        parents = await ckpt.unresolved_keys(conn, schema, table.parent)
    return {r["id"]: int(r["n"]) for r in counts}, quarantined, parents


def _later_arrivals(
    arrivals: Arrivals, table: Table, schema: str, run_id: str
) -> list[tuple[Any, ...]]:
    """Quarantine records for every arrival of a key after its first, with raw values."""
    ncols = len(table.column_names)
    records = []
    for rows in arrivals.values():
        first_rowid = rows[0][1][0]
        for _row, source in rows[1:]:
            detail = (
                f"column id converts to the key of an earlier source row (rowid {first_rowid}),"
                " which was loaded"
            )
            values = tuple(source[1 : ncols + 1])
            raw = orjson.dumps(raw_to_json(values, table.column_names)).decode("utf-8")
            records.append(
                (run_id, schema, table.name, key_of(values[0]), int(source[0]),
                 "duplicate_key", detail, "load", raw)
            )  # fmt: skip
    return records


async def _move(
    conn: asyncpg.Connection,
    schema: str,
    table: Table,
    qualified: str,
    arrivals: Arrivals,
    kept: list[tuple[Any, ...]],
    records: list[tuple[Any, ...]],
    pk_sql: str,
) -> None:
    """One transaction: delete the later arrivals (keeping the row that matches each first
    arrival), quarantine them, move their count from loaded to quarantined, build the key."""
    async with conn.transaction():
        if await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1::regclass"
            " AND contype = 'p')",
            qualified,
        ):
            return  # an earlier attempt committed; its reply was lost
        keep = []
        for row in kept:
            ctid = await conn.fetchval(_match_sql(table, qualified), *row)
            if ctid is None:
                ctid = await conn.fetchval(
                    f"SELECT ctid::text FROM {qualified} WHERE id = $1 ORDER BY ctid LIMIT 1",
                    row[0],
                )
            keep.append(ctid)
        deleted = await conn.fetchval(
            f"WITH gone AS (DELETE FROM {qualified} WHERE id = ANY($1::text[])"
            " AND NOT ctid = ANY($2::text[]::tid[]) RETURNING 1) SELECT count(*) FROM gone",
            list(arrivals),
            keep,
        )
        if deleted != len(records):
            raise RuntimeFailure(
                f"Removing duplicate keys from {qualified} deleted {deleted} rows, not"
                f" {len(records)}; nothing was changed, please report this."
            )
        await ckpt.write_quarantine(conn, records)
        await ckpt.move_to_quarantined(conn, schema, table.name, len(records))
        await conn.execute(pk_sql)
