"""Verify JSONL tables, independently of the loader: the file read line by line with Python's
own reader (no batch, no cap on a line), parsed with the standard json module (numbers as
decimals, exact), each record compared with its row by meaning, column by column as the
table's type holds it; every line must be in the table or open in the quarantine.

Shares nothing with the load but the catalog and the bookkeeping it reads: not its reader, not
its parser, not its converters.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.jsonl_bookkeeping import JsonlMeta, read_jsonl_columns
from flux_migrate.core.jsonl_schema import JsonlFile
from flux_migrate.core.schema import qualified, quote_ident
from flux_migrate.core.target import connect
from flux_migrate.pipeline import reference as ref
from flux_migrate.pipeline.settings import Settings
from flux_migrate.pipeline.verify import TableVerify

_BOM = b"\xef\xbb\xbf"
_INTEGER_TYPES = ("bigint", "integer", "smallint")


# ---------------------------------------------------------------- the file, read on its own


def file_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """Every line of the file that holds more than whitespace: its offset, its bytes without
    the newline, and whether it has its newline."""
    offset = 0
    with path.open("rb") as f:
        for raw in f:
            complete = raw.endswith(b"\n")
            line = raw[:-1] if complete else raw
            if offset == 0 and line.startswith(_BOM):
                line = line[len(_BOM) :]
            if line.strip():
                yield offset, line, complete
            offset += len(raw)


def read_record(line: bytes) -> dict[str, Any] | None:
    """A line as a JSON object with exact numbers, or None when it is not one (not JSON, not
    an object, or an object in it holds a key twice)."""
    try:
        value = json.loads(
            line.decode("utf-8"),
            parse_float=Decimal,
            parse_constant=ref.refuse_constant,
            object_pairs_hook=ref.unique_object,
        )
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------- values by meaning


def _number(value: Any) -> str:
    d = Decimal(value)
    return "0" if d == 0 else str(d.normalize())


def _json_meaning(value: Any) -> Any:
    if isinstance(value, dict):
        return ("o", tuple(sorted((k, _json_meaning(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("a", tuple(_json_meaning(v) for v in value))
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return ("n", _number(value))


def _instant(value: Any, tz: tzinfo) -> Any:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return ("unparsed", value)
        value = parsed if parsed.tzinfo else parsed.replace(tzinfo=tz)
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return ("not a timestamp", repr(value))


def meaning(value: Any, pg_type: str, *, from_file: bool, tz: tzinfo = UTC) -> Any:
    """What a value means in a column of ``pg_type``, the same for the file's value and the
    value PostgreSQL returns when they agree (jsonb text parsed, numbers exact, instants in
    UTC)."""
    if value is None:
        return None
    base = pg_type.split("(")[0]
    try:
        if base == "jsonb":
            if not from_file:
                value = json.loads(value, parse_float=Decimal)
            return ("json", _json_meaning(value))
        if isinstance(value, bool) or base == "boolean":
            return ("bool", value)
        if base in _INTEGER_TYPES or base == "numeric":
            return ("num", _number(value)) if isinstance(value, int | Decimal) else repr(value)
        if base == "double precision":
            if isinstance(value, int | float | Decimal):
                return ("double", repr(float(value)))
            return repr(value)
        if base == "timestamp with time zone":
            return ("instant", _instant(value, tz))
    except (InvalidOperation, ValueError, OverflowError, TypeError):
        return ("unreadable", repr(value))
    return ("text", value) if isinstance(value, str) else ("not text", repr(value))


def _digest(items: Any) -> bytes:
    return hashlib.md5(repr(items).encode("utf-8", "backslashreplace")).digest()


# ---------------------------------------------------------------- comparing


@dataclass
class Expected:
    """What the file says the table holds: row meanings by id (first arrival), or as a
    multiset for a table without id."""

    by_id: dict[str, bytes] = field(default_factory=dict)
    unkeyed: Counter[bytes] = field(default_factory=Counter)


def expected_rows(
    path: Path,
    columns: list[tuple[str, str, bool]],
    keyed: bool,
    quarantined: set[int],
    loaded_upto: int,
    tz: tzinfo,
    result: TableVerify,
    limit: int,
) -> Expected:
    """Read the file: a line open in the quarantine counts as quarantined; any other line must
    be a record the table holds (a last line without newline only once a run took it)."""
    expected = Expected()
    names = {name for name, _, _ in columns}
    for offset, line, complete in file_lines(path):
        if offset in quarantined:
            result.quarantined += 1
            continue
        if not complete and loaded_upto <= offset:
            result.missing += 1
            result.note(
                f"{path.name}: the last line (offset {offset:,}) has no newline yet and is not"
                " loaded (run --final takes it)",
                limit,
            )
            continue
        record = read_record(line)
        if record is None:
            result.missing += 1
            result.note(f"{path.name}: line at offset {offset:,} is neither loaded nor in the"
                        " quarantine", limit)  # fmt: skip
            continue
        key = record.get("id")
        if type(key) is int:  # ids are text: 7 and "7" are the same id
            record["id"] = key = str(key)
        extra = [k for k, v in record.items() if k not in names and v is not None]
        if extra:
            result.different += 1
            result.note(f"{path.name}: key {extra[0]} at offset {offset:,} has no column", limit)
            continue
        row = tuple(meaning(record.get(n), t, from_file=True, tz=tz) for n, t, _ in columns)
        if not keyed:
            expected.unkeyed[_digest(row)] += 1
            continue
        key_text = key if isinstance(key, str) else None
        if key_text is None or key_text in expected.by_id:
            result.missing += 1
            result.note(f"{path.name}: line at offset {offset:,} (id {key_text}) is neither"
                        " loaded nor in the quarantine", limit)  # fmt: skip
            continue
        expected.by_id[key_text] = _digest(row)
    return expected


async def verify_jsonl_table(
    conn: asyncpg.Connection, settings: Settings, jf: JsonlFile, *, limit: int
) -> TableVerify:
    """Compare one JSONL file with its table; see TableVerify for the counts."""
    schema = settings.names.schema
    result = TableVerify(table=jf.table)
    checkpoint = (await ckpt.read_checkpoints(conn, schema)).get(jf.table)
    if checkpoint is None:
        pending = await anyio.to_thread.run_sync(lambda: sum(1 for _ in file_lines(jf.path)))
        if pending:
            result.missing = pending
            result.note(f"{jf.table}: not migrated yet (no checkpoint)", limit)
        return result
    meta = JsonlMeta.loads(checkpoint.fingerprint) or JsonlMeta(file=jf.path.name)
    columns, pk = await read_jsonl_columns(conn, schema, jf.table)
    keyed = pk == ("id",)
    quarantined = {
        r["source_rowid"]
        for r in await conn.fetch(
            f"SELECT source_rowid FROM {ckpt.QUARANTINE} WHERE target_schema = $1"
            " AND source_table = $2 AND resolved_at IS NULL",
            schema,
            jf.table,
        )
    }
    tz = settings.naive_timezone
    expected = await anyio.to_thread.run_sync(
        lambda: expected_rows(
            jf.path, columns, keyed, quarantined, checkpoint.last_rowid, tz, result, limit
        )
    )
    await _compare_table(conn, schema, jf.table, columns, keyed, expected, result, limit)
    # Records gone from a rewritten file that the table keeps (not a snapshot) are expected.
    result.extra_allowed = result.extra <= meta.retained
    return result


async def _compare_table(
    conn: asyncpg.Connection,
    schema: str,
    table: str,
    columns: list[tuple[str, str, bool]],
    keyed: bool,
    expected: Expected,
    result: TableVerify,
    limit: int,
) -> None:
    cols = ", ".join(quote_ident(n) for n, _, _ in columns)
    async with conn.transaction():
        cursor = conn.cursor(f"SELECT {cols} FROM {qualified(schema, table)}")
        async for record in cursor:
            row = tuple(
                meaning(record[i], t, from_file=False) for i, (_, t, _) in enumerate(columns)
            )
            digest = _digest(row)
            if keyed:
                key = str(record["id"])
                want = expected.by_id.pop(key, None)
                if want is None:
                    result.extra += 1
                    result.note(f"{table}/{key}: in PostgreSQL, not in the file", limit)
                elif want == digest:
                    result.matched += 1
                else:
                    result.different += 1
                    result.note(f"{table}/{key}: differs from the file", limit)
            elif expected.unkeyed[digest] > 0:
                expected.unkeyed[digest] -= 1
                result.matched += 1
            else:
                result.extra += 1
    result.missing += len(expected.by_id) + sum(expected.unkeyed.values())
    for key in list(expected.by_id)[:limit]:
        result.note(f"{table}/{key}: in the file, not in PostgreSQL", limit)


async def verify_jsonl(settings: Settings, *, limit: int = 10) -> list[TableVerify]:
    """Compare every JSONL file of the settings with its table."""
    conn = await connect(settings.require_dsn())
    try:
        return [await verify_jsonl_table(conn, settings, jf, limit=limit) for jf in settings.jsonl]
    finally:
        await conn.close()
