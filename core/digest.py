"""The digest of a source row as flux-migrate read it: what sync compares to find changes.

A row's digest is 64 bits of BLAKE2b over its raw SQLite values (text as the bytes SQLite
stores, integers, floats, NULL), serialised with marshal format 2 (no back-references, so the
same values always give the same bytes). It is computed from the raw values, not the converted
ones, so sync can tell whether a row changed without converting it.
"""

from __future__ import annotations

import hashlib
import marshal
from collections.abc import Iterable, Sequence
from typing import Any

_BLAKE2B = hashlib.blake2b
_DUMPS = marshal.dumps


def row_digest(values: Sequence[Any]) -> int:
    """The signed 64-bit digest of one row's raw values (in the table's column order)."""
    data = _DUMPS(tuple(values), 2)
    return int.from_bytes(_BLAKE2B(data, digest_size=8).digest(), "big", signed=True)


def digests(raw_rows: Iterable[tuple[Any, ...]], ncols: int) -> list[int]:
    """The digests of raw rows laid out as extract reads them (rowid first, then ``ncols``
    column values, then possibly more): one per row, in order."""
    end = ncols + 1
    return [
        int.from_bytes(_BLAKE2B(_DUMPS(r[1:end], 2), digest_size=8).digest(), "big", signed=True)
        for r in raw_rows
    ]


def key_position(columns: Sequence[str], primary_key: Sequence[str]) -> int | None:
    """Where the single-column primary key sits among ``columns`` (None when the table has no
    primary key or a composite one: such tables get no digests and are not synced)."""
    if len(primary_key) != 1 or primary_key[0] not in columns:
        return None
    return list(columns).index(primary_key[0])
