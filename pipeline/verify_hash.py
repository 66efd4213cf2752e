"""The hash `verify --quick` sums over the rows' canonical texts (verify_canon), on both sides.

Two kinds, each computed in C on both sides:

- ``crc32c``: CRC-32C, which PostgreSQL 18 computes in hardware (``crc32c()``) and
  google-crc32c here. A table's checksum is two sums over the rows' CRCs c: of c, and of
  (c - 2**31)**2, packed into one integer (the second times 2**64). The square breaks CRC's
  linearity: rows changed in a way whose CRCs still XOR alike (two texts swapped between
  rows of equal length) change the sum of squares, so a change goes unseen only where the
  changed rows' CRCs are the old ones (about 2**-32 a row; one changed byte never).
- ``md5``: the first 64 bits of each row's MD5, a signed big-endian integer, summed: on any
  server, and where google-crc32c has no C implementation here.

The CRC costs a seventh of MD5's CPU on either side (docs/benchmark.md, "verify and verify
--quick"). The full `verify` compares every value and never hashes.
"""

from __future__ import annotations

import hashlib
import operator
import sys
from array import array
from collections.abc import Sequence
from typing import Any

CRC32C = "crc32c"
MD5 = "md5"
_MID = 1 << 31  # CRCs are centred on it before squaring: the square fits a signed bigint
_DIGEST = operator.methodcaller("digest")

try:
    import google_crc32c

    _crc = google_crc32c.value
    _CRC_IN_C = google_crc32c.implementation == "c"
except ImportError:  # pragma: no cover - a dependency; md5 then
    _CRC_IN_C = False


def choose(server_major: int) -> str:
    """The hash for a server of that major version."""
    return CRC32C if server_major >= 18 and _CRC_IN_C else MD5


def page_sum(kind: str, texts: Sequence[bytes]) -> int:
    """The checksum of rows with these canonical texts (a sum: pages add up)."""
    if kind == CRC32C:
        crcs: list[int] = list(map(_crc, texts))
        total = sum(crcs)
        squares: int = sum(map(operator.mul, crcs, crcs))  # of c; centred below, exactly
        centred = squares - 2 * _MID * total + len(crcs) * _MID * _MID
        return total + (centred << 64)
    values = array("q", b"".join(map(_DIGEST, map(hashlib.md5, texts))))[::2]
    if sys.byteorder == "little":
        values.byteswap()
    return sum(values)


def target_sql(kind: str, joined: str, relation: str, where: str) -> str:
    """PostgreSQL's count and checksum parts of the rows of ``relation`` matching ``where``,
    ``joined`` being the SQL of each row's canonical bytes; target_value makes one number."""
    if kind == CRC32C:
        row, parts = f"crc32c({joined})", f"sum(h), sum((h - {_MID}) * (h - {_MID}))"
    else:
        row, parts = f"('x' || substr(md5({joined}), 1, 16))::bit(64)::bigint", "sum(h), 0"
    # OFFSET 0 keeps the subquery: pulled up, PostgreSQL would hash each row once per use of h
    inner = f"SELECT {row} AS h FROM {relation}{where} OFFSET 0"
    return f"SELECT count(*), {parts} FROM ({inner}) AS rows"


def target_value(parts: Sequence[Any]) -> int:
    """The checksum from target_sql's parts (after the count; NULL sums of no rows are 0)."""
    total, centred = (int(p or 0) for p in parts)
    return total + (centred << 64)
