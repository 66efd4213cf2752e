"""Transform: convert raw source rows into COPY-ready tuples, setting aside what cannot load."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Sequence
from datetime import UTC, tzinfo
from operator import itemgetter
from typing import Any

from flux_migrate.core.digest import digests, key_position
from flux_migrate.core.schema import Kind, Table, quote_ident
from flux_migrate.stages.batch import Batch, Reject
from flux_migrate.stages.columns import ascii_texts, batch_converter
from flux_migrate.stages.convert import Raw, Rejected
from flux_migrate.stages.values import row_converter


def key_of(raw_id: Raw) -> str | None:
    """The primary key as text for bookkeeping, whatever its bytes (None when NULL)."""
    if raw_id is None:
        return None
    if isinstance(raw_id, bytes):
        return raw_id.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
    return str(raw_id).replace("\x00", "\\x00")


def row_key(table: Table, values: Sequence[Raw]) -> str | None:
    """The bookkeeping key of one row (its table's columns, raw): the primary key as text, a
    JSON array of texts for a composite key, None for a table without one."""
    positions = table.key_positions
    if len(positions) == 1:
        return key_of(values[positions[0]])
    if not positions:
        return None
    return json.dumps([key_of(values[i]) for i in positions], ensure_ascii=False)


def key_sql(table: Table, alias: str = "") -> str:
    """The same key computed by PostgreSQL on the target table (see row_key)."""
    prefix = f"{alias}." if alias else ""
    cols = [f"{prefix}{quote_ident(c)}::text" for c in table.primary_key]
    if len(cols) == 1:
        return cols[0]
    return f"json_build_array({', '.join(cols)})::text"


def parent_key_entry(fk_index: int, key: str) -> str:
    """How a quarantined parent key of a generic table's foreign key ``fk_index`` is named in
    ``missing_parents`` (a NUL cannot occur in a key: key_of escapes it)."""
    return f"{fk_index}\x00{key}"


def _check_parents(table: Table, raw_row: Sequence[Raw], missing: Collection[str]) -> None:
    """Reject a generic row whose foreign key names a parent absent from the source (the flag
    extract computed) or quarantined (its key in ``missing``)."""
    ncols = len(table.columns)
    if raw_row[ncols + 1]:
        raise Rejected("orphan_row", "a foreign key names a parent row that is not in the source")
    if not missing:
        return
    names = table.column_names
    for n, fk in enumerate(table.foreign_keys):
        parts = [key_of(raw_row[1 + names.index(c)]) for c in fk.columns]
        if any(p is None for p in parts):
            continue
        key = parts[0] if len(parts) == 1 else json.dumps(parts, ensure_ascii=False)
        if parent_key_entry(n, key or "") in missing:
            raise Rejected(
                "orphan_row", f"foreign key ({', '.join(fk.columns)}) names a quarantined row"
            )


def transform_batch(
    batch: Batch,
    table: Table,
    *,
    naive_timezone: tzinfo = UTC,
    strip_nul: bool = False,
    missing_parents: Collection[str] = (),
    text_as_bytes: bool = False,
) -> Batch:
    """Convert one extracted batch; rows that fail a converter become rejects with a reason.

    A batch without a rejected row is converted column by column (the hot path), any other
    row by row: both give the same rows. Rejects already on the batch are kept (a batch
    re-converted strictly after a refused COPY).
    """
    converted, columns = transform_columns(
        batch,
        table,
        naive_timezone=naive_timezone,
        strip_nul=strip_nul,
        missing_parents=missing_parents,
        text_as_bytes=text_as_bytes,
    )
    if columns is None:
        return converted
    return dataclasses.replace(converted, rows=list(zip(*columns, strict=True)))


def transform_columns(
    batch: Batch,
    table: Table,
    *,
    naive_timezone: tzinfo = UTC,
    strip_nul: bool = False,
    missing_parents: Collection[str] = (),
    text_as_bytes: bool = False,
) -> tuple[Batch, list[Sequence[Any]] | None]:
    """transform_batch, but a batch converted column by column comes without its rows: they
    come beside it, column by column (what a COPY payload is built from). A batch with a
    rejected row comes with its rows and None."""
    plain = _plain_columns(
        batch.raw,
        table,
        naive_timezone=naive_timezone,
        strip_nul=strip_nul,
        text_as_bytes=text_as_bytes,
        missing_parents=missing_parents,
    )
    if plain is None:
        converted = transform_rows(
            batch,
            table,
            naive_timezone=naive_timezone,
            strip_nul=strip_nul,
            missing_parents=missing_parents,
            text_as_bytes=text_as_bytes,
        )
        return converted, None
    digested = digests(batch.raw, len(table.column_names))  # in the worker thread
    converted = dataclasses.replace(
        batch, rows=[], rejects=list(batch.rejects), digests=digested, payload=None
    )
    return converted, plain


def transform_rows(
    batch: Batch,
    table: Table,
    *,
    naive_timezone: tzinfo = UTC,
    strip_nul: bool = False,
    missing_parents: Collection[str] = (),
    text_as_bytes: bool = False,
) -> Batch:
    """transform_batch row by row: each rejected row becomes a reject with its reason."""
    convert = row_converter(
        table,
        naive_timezone=naive_timezone,
        strip_nul=strip_nul,
        text_as_bytes=text_as_bytes,
        offset=1,
    )
    ncols = len(table.column_names)
    child = table.parent_column is not None
    parent_at = table.column_names.index(table.parent_column) if child else -1
    generic_child = bool(table.foreign_keys) and not child
    rows = []
    sources = []
    rejects = list(batch.rejects)
    for raw_row in batch.raw:
        try:
            row = convert(raw_row)
            if child and (
                raw_row[ncols + 1] or (missing_parents and row[parent_at] in missing_parents)
            ):
                why = "is not in the source" if raw_row[ncols + 1] else "was quarantined"
                raise Rejected(
                    "orphan_message", f"column {table.parent_column} names a session that {why}"
                )
            if generic_child:
                _check_parents(table, raw_row, missing_parents)
        except Rejected as exc:
            values = tuple(raw_row[1 : ncols + 1])
            key = row_key(table, values)
            rejects.append(Reject(raw_row[0], key, values, exc.reason, exc.detail, "transform"))
            continue
        rows.append(row)
        sources.append(raw_row)
    digested = digests(sources, ncols)  # here, in the worker thread, not in the load loop
    return dataclasses.replace(
        batch, raw=sources, rows=rows, rejects=rejects, digests=digested, payload=None
    )


def _plain_columns(
    raw: list[tuple[Raw, ...]],
    table: Table,
    *,
    naive_timezone: tzinfo,
    strip_nul: bool,
    text_as_bytes: bool,
    missing_parents: Collection[str],
) -> list[Sequence[Any]] | None:
    """The batch's values converted column by column (stages/columns.py) when no row is
    rejected: no value refused, no orphan flagged, no parent quarantined; else None."""
    ncols = len(table.column_names)
    if table.parent_column is None and table.foreign_keys and missing_parents:
        return None  # a generic child's quarantined parents: named row by row
    if (table.parent_column is not None or table.foreign_keys) and any(
        map(itemgetter(ncols + 1), raw)
    ):
        return None
    columns = batch_converter(
        table, naive_timezone=naive_timezone, strip_nul=strip_nul, text_as_bytes=text_as_bytes
    )(raw)
    if columns is None or not raw or table.parent_column is None or not missing_parents:
        return columns
    at = table.column_names.index(table.parent_column)
    return columns if set(missing_parents).isdisjoint(columns[at]) else None


async def transform(
    source: AsyncIterator[Batch],
    table: Table,
    *,
    naive_timezone: tzinfo = UTC,
    strip_nul: bool = False,
    missing_parents: Collection[str] = (),
    text_as_bytes: bool = False,
) -> AsyncGenerator[Batch, None]:
    """Yield each upstream batch converted; closes its upstream when closed or cancelled."""
    from anyio import to_thread  # here: a converter process imports no event loop (memory)

    async with contextlib.aclosing(source):  # type: ignore[type-var]
        async for batch in source:
            # In a worker thread: the event loop keeps feeding COPY while a batch converts
            # (the GIL is handed over every few ms), so PostgreSQL does not sit idle.
            converted = await to_thread.run_sync(
                functools.partial(
                    transform_batch,
                    batch,
                    table,
                    naive_timezone=naive_timezone,
                    strip_nul=strip_nul,
                    missing_parents=missing_parents,
                    text_as_bytes=text_as_bytes,
                )
            )
            yield converted


def digest_ids(
    table: Table, raw: list[tuple[Any, ...]], plain: list[Sequence[Any]] | None = None
) -> tuple[list[int], list[str]]:
    """The rowids of source rows ``raw`` and their keys as a digest pack holds them (no keys
    for a table without a one-column key: it gets no digests). ``plain``: the rows' values
    converted column by column (transform_columns) without stripping NUL: a KEY column's
    converted values are then exactly these keys (text decoded as UTF-8, and no NUL: that
    row would have been rejected), so they are taken as they are."""
    at = key_position(table.column_names, table.primary_key)
    rowids = [r[0] for r in raw]
    if at is None:
        return rowids, []
    if plain is not None and table.columns[at].kind is Kind.KEY:
        return rowids, list(plain[at])
    return rowids, pack_keys([r[at + 1] for r in raw])


def pack_keys(raw_keys: list[Raw]) -> list[str]:
    """Raw one-column keys as a digest pack holds them: key_of of each ("" for NULL), those
    of a list of ASCII bytes without NUL decoded at once (key_of makes their plain decode)."""
    texts = ascii_texts(raw_keys)
    return texts if texts is not None else [key_of(k) or "" for k in raw_keys]
