"""The unit that flows between stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flux_migrate.core.schema import Column
from flux_migrate.stages.convert import Raw


@dataclass(frozen=True)
class Reject:
    """A source row that will not be loaded: where it came from, its raw values, and why."""

    rowid: int
    key: str | None
    raw: tuple[Raw, ...]
    reason: str
    detail: str
    stage: str  # "transform" or "load"


@dataclass(frozen=True)
class Batch:
    """One keyset page of a table.

    ``raw`` holds the source rows as read (rowid first, then the table's columns, then for
    messages a flag saying the session is absent from the source). After transform, ``rows``
    holds COPY-ready tuples in target column order, ``raw`` the source rows they came from
    (same positions, kept so a row the server refuses is quarantined with its raw values), and
    ``rejects`` the rows that were not converted. ``after_rowid`` is the checkpoint the batch
    starts from and ``last_rowid`` the one it moves the table to once committed, recorded
    with ``last_key``.
    """

    table: str
    seq: int
    after_rowid: int
    last_rowid: int
    extracted: int
    last_key: Any = None  # raw primary key of the row at last_rowid (to detect reused rowids)
    raw: list[tuple[Any, ...]] = field(default_factory=list)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    digests: list[int] | None = None  # of ``raw`` (core.digest), when transform computed them
    # The source rowids and digest-pack keys of ``rows`` (transform.digest_ids) of a batch that
    # arrives without ``raw`` (converted in a worker process); None when ``raw`` is there.
    ids: tuple[list[int], list[str]] | None = None
    # A JSONL batch, converted: the target columns of ``rows`` (the table's, as the batches
    # before it and this one left it), the columns this batch added for keys first seen in it,
    # and each row's id (same positions as ``rows``; None for a record without one).
    columns: tuple[str, ...] = ()
    added_columns: tuple[Column, ...] = ()
    record_ids: list[str | None] | None = None
    # The rows as one binary COPY payload (stages/wire.py), built by a converter process in
    # place of ``rows`` (then empty): ``payload_rows`` rows.
    payload: bytes | None = None
    payload_rows: int = 0

    @property
    def row_count(self) -> int:
        """How many converted rows the batch carries, as ``rows`` or as its payload."""
        return self.payload_rows if self.payload is not None else len(self.rows)
