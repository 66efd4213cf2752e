"""Transform: convert raw source rows into COPY-ready tuples, setting aside what cannot load."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from datetime import UTC, tzinfo

import anyio

from core.schema import Table
from stages.batch import Batch, Reject
from stages.convert import Raw, Rejected, row_converter


def key_of(raw_id: Raw) -> str | None:
    """The primary key as text for bookkeeping, whatever its bytes (None when NULL)."""
    if raw_id is None:
        return None
    if isinstance(raw_id, bytes):
        return raw_id.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
    return str(raw_id).replace("\x00", "\\x00")


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

    Rejects already on the batch are kept (a batch re-converted strictly after a refused COPY).
    """
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
        except Rejected as exc:
            values = tuple(raw_row[1 : ncols + 1])
            rejects.append(
                Reject(raw_row[0], key_of(values[0]), values, exc.reason, exc.detail, "transform")
            )
            continue
        rows.append(row)
        sources.append(raw_row)
    return dataclasses.replace(batch, raw=sources, rows=rows, rejects=rejects)


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
    async with contextlib.aclosing(source):  # type: ignore[type-var]
        async for batch in source:
            # In a worker thread: the event loop keeps feeding COPY while a batch converts
            # (the GIL is handed over every few ms), so PostgreSQL does not sit idle.
            converted = await anyio.to_thread.run_sync(
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
