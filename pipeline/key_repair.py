"""Keys of any table that the loaded rows break, repaired by the documented rule, then built.

SQLite keeps ``1``, ``'1'`` and ``x'31'`` apart in an untyped column, one instant written
with two offsets, JSON texts with their keys in another order; once converted they are one
value, and a primary key or unique index over them cannot be built. A foreign key cannot be
built over a child whose parent row was quarantined in the same run (a self-reference, a
cycle). When building such a key fails, the rows that break it are found in PostgreSQL, matched
with their source rows (read and converted again, as the load did), and moved to the
quarantine with their raw values: every arrival of a duplicated key after the first (lowest
source rowid) as ``duplicate_key``, every orphan as ``orphan_row``; in one transaction with the
checkpoint counts (and, for a unique key, the key itself). Orphans are removed round after
round until none is left (a chain of self-references), then the foreign key is built.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import aiosqlite
import asyncpg
import orjson
import structlog

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.errors import (
    FOREIGN_KEY_VIOLATION,
    UNIQUE_VIOLATION,
    RuntimeFailure,
    sqlstate,
)
from flux_migrate.core.schema import (
    Constraint,
    Kind,
    Predicate,
    Table,
    condition_sql,
    quote_ident,
)
from flux_migrate.core.target import Target
from flux_migrate.pipeline.report import RunReport
from flux_migrate.pipeline.settings import Settings
from flux_migrate.stages.convert import raw_to_json
from flux_migrate.stages.extract import extract
from flux_migrate.stages.transform import row_key, transform_batch

log = structlog.get_logger("flux_migrate")
# PostgreSQL refuses these keys whatever is quarantined: program_limit_exceeded (an index row
# too big), invalid_foreign_key (the key it references could not be built).
NOT_BUILDABLE = ("54000", "42830")
FIRST_ROWID = -(2**63)  # below every rowid SQLite gives out
SCAN_BATCH = 5000
MAX_ROUNDS = 10_000  # orphan rounds (one per generation of a self-referencing chain)

Found = list[tuple[int, tuple[Any, ...], tuple[Any, ...]]]  # (rowid, converted row, raw row)


def _frozen(value: Any) -> Any:
    """A hashable value equal for equal values of PostgreSQL's type (JSON parsed, with exact
    numbers and object keys in any order)."""
    if isinstance(value, dict):
        return ("{}", frozenset((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("[]", tuple(_frozen(v) for v in value))
    return value


def comparable(value: Any, column_kind: Kind) -> Any:
    """``value`` (converted by flux-migrate, or read back from PostgreSQL) in a form that is
    equal exactly when PostgreSQL holds them as one key value."""
    if value is None or column_kind not in (Kind.JSON, Kind.JSON_VALUE):
        return value
    text = value.decode() if isinstance(value, bytes) else value
    return _frozen(json.loads(text, parse_float=Decimal, parse_int=Decimal))


def _key(table: Table, columns: Sequence[str], row: Sequence[Any]) -> tuple[Any, ...] | None:
    """The values of ``columns`` in a converted row; None when one is NULL (never a key)."""
    names = table.column_names
    out = []
    for c in columns:
        value = row[names.index(c)]
        if value is None:
            return None
        out.append(comparable(value, table.column(c).kind))
    return tuple(out)


def _bad_keys_sql(c: Constraint, qualified: str, parent_qualified: str | None) -> str:
    """The key values that break ``c``: repeated (a unique key), or naming no parent row."""
    cols = ", ".join(quote_ident(x) for x in c.columns)
    present = " AND ".join(f"t.{quote_ident(x)} IS NOT NULL" for x in c.columns)
    if c.kind == "fk":
        match = " AND ".join(
            f"p.{quote_ident(pc)} = t.{quote_ident(x)}"
            for x, pc in zip(c.columns, c.parent_columns, strict=True)
        )
        orphans = (
            f"SELECT DISTINCT {cols} FROM {qualified} AS t WHERE {present} AND NOT EXISTS"
            f" (SELECT 1 FROM {parent_qualified} AS p WHERE {match})"
        )
        return _descendants_sql(c, qualified, orphans) if c.parent == c.table else orphans
    where = f" AND ({c.where})" if c.where else ""
    return (
        f"SELECT {cols} FROM {qualified} AS t WHERE {present}{where}"
        f" GROUP BY {cols} HAVING count(*) > 1"
    )


def _descendants_sql(c: Constraint, qualified: str, orphans: str) -> str:
    """For a table that references itself: the key values of its orphans and of every row
    below them (a row naming a doomed row is doomed too), in one query instead of one source
    scan per generation. A row's own key is what its children name (``parent_columns``)."""
    n = len(c.columns)
    fk = [f"f{i}" for i in range(n)]
    ref = [f"r{i}" for i in range(n)]
    own = ", ".join(f"t.{quote_ident(x)}" for x in c.parent_columns)
    child = ", ".join(f"t.{quote_ident(x)}" for x in c.columns)
    base_match = " AND ".join(
        f"t.{quote_ident(x)} IS NOT DISTINCT FROM o.{quote_ident(x)}" for x in c.columns
    )
    step = " AND ".join(f"t.{quote_ident(x)} = d.{r}" for x, r in zip(c.columns, ref, strict=True))
    return (
        f"WITH RECURSIVE doomed ({', '.join(fk + ref)}) AS ("
        f" SELECT {child}, {own} FROM {qualified} AS t JOIN ({orphans}) AS o ON {base_match}"
        f" UNION SELECT {child}, {own} FROM {qualified} AS t JOIN doomed AS d ON {step})"
        f" SELECT DISTINCT {', '.join(fk)} FROM doomed"
    )


def _delete_one_sql(table: Table, qualified: str) -> str:
    """Delete one target row holding exactly the converted values $1..$n."""
    tests = " AND ".join(
        f"{quote_ident(c.name)} IS NOT DISTINCT FROM ${i}"
        for i, c in enumerate(table.columns, start=1)
    )
    return (
        f"DELETE FROM {qualified} WHERE ctid = (SELECT ctid FROM {qualified} WHERE {tests} LIMIT 1)"
    )


def _holds(p: Predicate, value: Any) -> bool:
    """Whether a converted value satisfies a partial index's condition (as predicate_sql
    renders it: numbers by value, booleans, text in byte order)."""
    if p.op in ("IS NULL", "IS NOT NULL"):
        return (value is None) == (p.op == "IS NULL")
    if p.op in ("TRUE", "FALSE"):
        return value is not None and (value != 0) == (p.op == "TRUE")
    if value is None or p.value is None:
        return False
    literal: Any
    if isinstance(value, bool):
        literal = p.value.strip() == "1"
    elif isinstance(value, (int, float, Decimal)):
        literal, value = (
            Decimal(p.value.strip()),
            Decimal(repr(value) if isinstance(value, float) else value),
        )
    else:
        text = p.value if p.is_string else str(int(p.value))
        literal, value = text.encode(), str(value).encode()
    result: bool = {
        "=": value == literal, "<>": value != literal, "<": value < literal,
        ">": value > literal, "<=": value <= literal, ">=": value >= literal,
    }[p.op]  # fmt: skip
    return result


def _condition(table: Table, c: Constraint) -> tuple[Predicate, ...]:
    """The partial unique index's condition behind ``c`` (empty for a whole-table key)."""
    if c.where is None:
        return ()
    for ix in table.indexes:
        same = ix.where and ix.unique and ix.columns == c.columns
        if same and condition_sql(ix.where, table) == c.where:
            return ix.where
    return ()


async def _source_rows(
    src: aiosqlite.Connection,
    settings: Settings,
    table: Table,
    columns: Sequence[str],
    bad: set[tuple[Any, ...]],
    upto: int,
    skip: set[int],
    condition: tuple[Predicate, ...] = (),
) -> Found:
    """The loaded source rows (converted as the load converts them) whose ``columns`` hold one
    of the ``bad`` key values, in source order; rows quarantined (``skip``) are not loaded."""
    found: Found = []
    first = 0 if table.without_rowid else FIRST_ROWID
    names = table.column_names
    async for batch in extract(
        src, table, after_rowid=first, upto_rowid=upto, batch_size=SCAN_BATCH
    ):
        converted = transform_batch(
            batch, table, naive_timezone=settings.naive_timezone, strip_nul=settings.strip_nul
        )
        for row, raw in zip(converted.rows, converted.raw, strict=True):
            rowid = int(raw[0])
            if rowid in skip:
                continue
            if not all(_holds(p, row[names.index(p.column)]) for p in condition):
                continue
            if _key(table, columns, row) in bad:
                found.append((rowid, tuple(row), tuple(raw)))
    return found


def _record(
    settings: Settings, run_id: str, table: Table, item: tuple[int, Any, Any], why: str, detail: str
) -> tuple[Any, ...]:
    rowid, _row, raw = item
    values = tuple(raw[1 : len(table.columns) + 1])
    data = orjson.dumps(raw_to_json(values, table.column_names)).decode("utf-8")
    return (
        run_id, settings.names.schema, table.name, row_key(table, values), rowid, why, detail,
        "load", data,
    )  # fmt: skip


def _duplicates(
    settings: Settings, run_id: str, table: Table, c: Constraint, found: Found
) -> tuple[Found, list[tuple[Any, ...]]]:
    """Every arrival of a key after its first (the lowest source rowid), and its records."""
    first: dict[Any, int] = {}
    later: Found = []
    for item in sorted(found, key=lambda x: x[0]):
        key = _key(table, c.columns, item[1])
        if key in first:
            later.append(item)
        else:
            first[key] = item[0]
    records = []
    for item in later:
        detail = (
            f"columns ({', '.join(c.columns)}) convert to the key of an earlier source row"
            f" (rowid {first[_key(table, c.columns, item[1])]}), which was loaded ({c.name})"
        )
        records.append(_record(settings, run_id, table, item, "duplicate_key", detail))
    return later, records


async def _move(
    conn: asyncpg.Connection,
    settings: Settings,
    table: Table,
    rows: Found,
    records: list[tuple[Any, ...]],
    then: str | None,
) -> None:
    """One transaction: delete ``rows`` from the target, quarantine them, move their count
    from loaded to quarantined, and run ``then`` (the key) when given."""
    qualified = settings.names.qualified(table.name)
    async with conn.transaction():
        delete = _delete_one_sql(table, qualified)
        deleted = 0
        for _rowid, row, _raw in rows:
            deleted += int((await conn.execute(delete, *row)).split()[-1])
        if deleted != len(rows):
            raise RuntimeFailure(
                f"Removing the rows that break a key of {qualified} deleted {deleted} rows, not"
                f" {len(rows)}; nothing was changed, please report this."
            )
        await ckpt.write_quarantine(conn, records)
        await ckpt.move_to_quarantined(conn, settings.names.schema, table.name, len(rows))
        if then is not None:
            await conn.execute(then)


async def repair_key(
    src: aiosqlite.Connection,
    target: Target,
    settings: Settings,
    run_id: str,
    report: RunReport,
    constraint: Constraint,
    exc: BaseException,
) -> bool:
    """Quarantine the rows that keep ``constraint`` (of a generic table) from being built, by
    the documented rule, and build it; or, when PostgreSQL cannot build it over these values
    at all (an index entry over 2704 bytes), leave it out with a warning naming it. False when
    ``exc`` is neither."""
    table = next(t for t in settings.tables if t.name == constraint.table)
    state = sqlstate(exc)
    if table.generic and state in NOT_BUILDABLE:
        # A value too long for an index entry (2704 bytes), or a foreign key to a key that
        # could not be built for that reason: the rows are all loaded; the key is named.
        message = str(exc).splitlines()[0] if str(exc) else state
        log.warning(
            "constraint_not_built", table=table.name, constraint=constraint.name, reason=message
        )
        return True
    if not table.generic or (state, constraint.kind) not in (
        (UNIQUE_VIOLATION, "pk"),
        (UNIQUE_VIOLATION, "unique"),
        (FOREIGN_KEY_VIOLATION, "fk"),
    ):
        return False
    if constraint.kind == "fk":
        moved = await _remove_orphans(src, target, settings, run_id, table, constraint)
        await target.retrying(lambda conn: conn.execute(constraint.sql), what="building a key")
    else:
        moved = await _remove_duplicates(src, target, settings, run_id, table, constraint)
    if table.name in report.tables:
        report.tables[table.name].loaded -= moved
        report.tables[table.name].quarantined += moved
    log.warning("key_rows_quarantined", table=table.name, constraint=constraint.name, rows=moved)
    return True


async def _bad_keys(
    target: Target, settings: Settings, table: Table, c: Constraint
) -> tuple[set[tuple[Any, ...]], set[int], int]:
    """The key values that break ``c``, the table's quarantined rowids, and its bound."""
    names = settings.names
    parent = names.qualified(c.parent) if c.parent else None
    sql = _bad_keys_sql(c, names.qualified(table.name), parent)

    async def read(conn: asyncpg.Connection) -> tuple[set[tuple[Any, ...]], set[int], int]:
        rows = await conn.fetch(sql)
        kinds = [table.column(x).kind for x in c.columns]
        bad = {tuple(comparable(v, k) for v, k in zip(r, kinds, strict=True)) for r in rows}
        skip = await ckpt.unresolved_rowids(conn, names.schema, table.name)
        bound = (await ckpt.read_checkpoints(conn, names.schema))[table.name].last_rowid
        return bad, skip, bound

    return await target.retrying(read, what=f"finding the rows that break {c.name}")


def _unmatched(settings: Settings, table: Table, c: Constraint) -> RuntimeFailure:
    return RuntimeFailure(
        f"Building {c.name} on {settings.names.qualified(table.name)} found rows that break it"
        " but no loaded source row holds them; was the table written by another tool too?"
    )


async def _remove_duplicates(
    src: aiosqlite.Connection,
    target: Target,
    settings: Settings,
    run_id: str,
    table: Table,
    c: Constraint,
) -> int:
    bad, skip, bound = await _bad_keys(target, settings, table, c)
    condition = _condition(table, c)
    found = await _source_rows(src, settings, table, c.columns, bad, bound, skip, condition)
    later, records = _duplicates(settings, run_id, table, c, found)
    if not later:
        raise _unmatched(settings, table, c)
    await target.retrying(
        lambda conn: _move(conn, settings, table, later, records, c.sql),
        what=f"quarantining duplicate keys of {table.name}",
    )
    return len(later)


async def _remove_orphans(
    src: aiosqlite.Connection,
    target: Target,
    settings: Settings,
    run_id: str,
    table: Table,
    c: Constraint,
) -> int:
    """Quarantine the rows naming no parent row, round after round (removing one may orphan
    its own children in a self-referencing table); return how many moved."""
    moved = 0
    for _ in range(MAX_ROUNDS):
        bad, skip, bound = await _bad_keys(target, settings, table, c)
        if not bad:
            return moved
        found = await _source_rows(src, settings, table, c.columns, bad, bound, skip)
        if not found:
            raise _unmatched(settings, table, c)
        detail = (
            f"foreign key ({', '.join(c.columns)}) names a row of {c.parent} that is not loaded"
        )
        records = [_record(settings, run_id, table, f, "orphan_row", detail) for f in found]
        await target.retrying(
            functools.partial(
                _move, settings=settings, table=table, rows=found, records=records, then=None
            ),
            what=f"quarantining orphan rows of {table.name}",
        )
        moved += len(found)
    return moved


async def remove_orphans(
    src: aiosqlite.Connection,
    target: Target,
    settings: Settings,
    run_id: str,
    report: RunReport,
    foreign_keys: Sequence[Constraint],
) -> None:
    """Before any of ``foreign_keys`` is built: quarantine the orphans of every one of them,
    pass after pass until a pass finds none (removing a row may orphan rows of another table
    in a cycle), so no delete ever meets a foreign key already built."""
    by_name = {t.name: t for t in settings.tables}
    generic = [c for c in foreign_keys if by_name[c.table].generic and c.parent in by_name]
    for _ in range(MAX_ROUNDS):
        moved = 0
        for c in generic:
            table = by_name[c.table]
            n = await _remove_orphans(src, target, settings, run_id, table, c)
            if n and table.name in report.tables:
                report.tables[table.name].loaded -= n
                report.tables[table.name].quarantined += n
            if n:
                log.warning("key_rows_quarantined", table=table.name, constraint=c.name, rows=n)
            moved += n
        if not moved:
            return
