"""Verify JSONL tables: every complete line of the file, through the same converters, against
the table's rows by id (first arrival of an id, as the load keeps it)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anyio
import asyncpg
import orjson

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.jsonl_bookkeeping import JsonlMeta, read_jsonl_columns
from flux_migrate.core.jsonl_schema import JsonlFile
from flux_migrate.core.schema import Kind, Table, qualified, quote_ident
from flux_migrate.core.target import connect
from flux_migrate.pipeline.jsonl_run import table_from_catalog
from flux_migrate.pipeline.settings import Settings
from flux_migrate.pipeline.verify import TableVerify
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.jsonl import convert_jsonl_batch, file_size, read_complete_lines

LINES_PER_READ = 10_000


def _norm(kind: Kind, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if kind is Kind.JSON_VALUE:
        return orjson.dumps(json.loads(value), option=orjson.OPT_SORT_KEYS).decode()
    if isinstance(value, Decimal):
        return str(value.normalize())
    if isinstance(value, float):
        return repr(value)
    return value


def row_digest(table: Table, row: tuple[Any, ...]) -> bytes:
    """A digest of a row's meaning: instants in UTC, JSON parsed, numbers exact."""
    values = [_norm(c.kind, v) for c, v in zip(table.columns, row, strict=False)]
    return hashlib.md5(orjson.dumps(values, default=str)).digest()


def expected_rows(
    jf: JsonlFile, table: Table, settings: Settings, result: TableVerify, limit: int
) -> tuple[dict[str, bytes], Counter[bytes]]:
    """The digests of the file's rows by id (first arrival), or as a multiset for a table
    without id; lines that do not convert or repeat an id count as quarantined."""
    by_id: dict[str, bytes] = {}
    unkeyed: Counter[bytes] = Counter()
    size = file_size(jf.path)
    offset, ncols = 0, len(table.columns)
    while True:
        span, lines = read_complete_lines(jf.path, offset, limit=size, max_lines=LINES_PER_READ)
        if not span:
            break
        batch = Batch(jf.table, 0, offset, offset + len(span), len(lines), raw=lines)
        offset += len(span)
        converted = convert_jsonl_batch(batch, table, naive_timezone=settings.naive_timezone)
        result.quarantined += len(converted.batch.rejects)
        for column in converted.added:
            result.note(f"key {column.name} of {jf.path.name} is not a column of the table", limit)
        for row, key in zip(converted.batch.rows, converted.ids, strict=True):
            if any(v is not None for v in row[ncols:]):
                result.different += 1
                continue
            digest = row_digest(table, row[:ncols])
            if key is None:
                unkeyed[digest] += 1
            elif key in by_id:
                result.quarantined += 1  # duplicate_key
            else:
                by_id[key] = digest
    return by_id, unkeyed


async def verify_jsonl_table(
    conn: asyncpg.Connection, settings: Settings, jf: JsonlFile, *, limit: int
) -> TableVerify:
    """Compare one JSONL file with its table; see TableVerify for the counts."""
    schema = settings.names.schema
    result = TableVerify(table=jf.table)
    checkpoint = (await ckpt.read_checkpoints(conn, schema)).get(jf.table)
    if checkpoint is None:
        result.missing = 1
        result.note(f"{jf.table}: not migrated yet (no checkpoint)", limit)
        return result
    meta = JsonlMeta.loads(checkpoint.fingerprint) or JsonlMeta(file=jf.path.name)
    columns, pk = await read_jsonl_columns(conn, schema, jf.table)
    table = table_from_catalog(jf.table, columns, pk)
    by_id, unkeyed = await anyio.to_thread.run_sync(
        lambda: expected_rows(jf, table, settings, result, limit)
    )
    cols = ", ".join(quote_ident(c) for c in table.column_names)
    async with conn.transaction():
        cursor = conn.cursor(f"SELECT {cols} FROM {qualified(schema, jf.table)}")
        async for record in cursor:
            row = tuple(record)
            digest = row_digest(table, row)
            if "id" in table.primary_key:
                key = str(record["id"])
                want = by_id.pop(key, None)
                if want is None:
                    result.extra += 1
                    if result.extra > meta.retained:
                        result.note(f"{jf.table}/{key}: in PostgreSQL, not in the file", limit)
                elif want == digest:
                    result.matched += 1
                else:
                    result.different += 1
                    result.note(f"{jf.table}/{key}: differs from the file", limit)
            elif unkeyed[digest] > 0:
                unkeyed[digest] -= 1
                result.matched += 1
            else:
                result.extra += 1
    result.missing += len(by_id) + sum(unkeyed.values())
    for key in list(by_id)[:limit]:
        result.note(f"{jf.table}/{key}: in the file, not in PostgreSQL", limit)
    # Records gone from a rewritten file that the table keeps (not a snapshot) are expected.
    result.extra_allowed = result.extra <= meta.retained
    return result


async def verify_jsonl(settings: Settings, *, limit: int = 10) -> list[TableVerify]:
    """Compare every JSONL file of the settings with its table."""
    conn = await connect(settings.require_dsn())
    try:
        return [await verify_jsonl_table(conn, settings, jf, limit=limit) for jf in settings.jsonl]
    finally:
        await conn.close()
