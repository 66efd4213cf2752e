"""The hash `verify --quick` sums (pipeline/verify_hash.py): PostgreSQL's aggregate and this
process's sum agree for any rows, pages add up, one changed byte always changes the checksum,
and a change CRC-32C's linearity hides from a plain sum of CRCs does not hide from the quick."""

from __future__ import annotations

import random

import asyncpg
import google_crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_migrate.pipeline import verify_hash

pytestmark = pytest.mark.anyio

KINDS = (verify_hash.CRC32C, verify_hash.MD5)
TEXTS = st.lists(st.binary(max_size=80), max_size=12)


async def _target(conn: asyncpg.Connection, kind: str, texts: list[bytes]) -> tuple[int, int]:
    sql = verify_hash.target_sql(kind, "b", "unnest($1::bytea[]) AS t(b)", "")
    rec = await conn.fetchrow(sql, texts)
    return int(rec[0]), verify_hash.target_value(rec[1:])


@settings(max_examples=60, deadline=None)
@given(texts=TEXTS, more=TEXTS)
async def test_postgresql_and_this_process_sum_alike(
    pg_server_dsn: str, texts: list[bytes], more: list[bytes]
) -> None:
    """For any rows' canonical bytes, both hashes: the target's count and checksum equal the
    source's, and the checksum of two pages is the sum of theirs."""
    conn = await asyncpg.connect(pg_server_dsn)
    try:
        for kind in KINDS:
            mine = verify_hash.page_sum(kind, texts)
            assert (len(texts), mine) == await _target(conn, kind, texts)
            both = verify_hash.page_sum(kind, texts + more)
            assert mine + verify_hash.page_sum(kind, more) == both
            assert (len(texts) + len(more), both) == await _target(conn, kind, texts + more)
    finally:
        await conn.close()


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(st.binary(min_size=1, max_size=80), min_size=1, max_size=8),
    kind=st.sampled_from(KINDS),
    data=st.data(),
)
def test_one_changed_byte_changes_the_checksum(
    texts: list[bytes], kind: str, data: st.DataObject
) -> None:
    """CRC-32C sees every change within 32 bits of one row; MD5 every change here."""
    row = data.draw(st.integers(0, len(texts) - 1))
    at = data.draw(st.integers(0, len(texts[row]) - 1))
    flip = data.draw(st.integers(1, 255))
    changed = list(texts)
    value = bytearray(changed[row])
    value[at] ^= flip
    changed[row] = bytes(value)
    assert verify_hash.page_sum(kind, texts) != verify_hash.page_sum(kind, changed)


def test_a_change_a_sum_of_crcs_misses_changes_the_checksum() -> None:
    """The same bytes XORed into two rows of equal length XOR the same into both CRCs (CRC is
    linear); where the two CRCs differ on every bit of that XOR, their sum does not change.
    Such a change (found by search) fails the quick's checksum, which also sums squares."""
    rng = random.Random(2026)
    crc = google_crc32c.value
    size = 24
    zero = crc(bytes(size))
    deltas = [bytes([0] * i + [1 << b] + [0] * (size - 1 - i)) for i in range(size) for b in (0, 7)]
    delta = min(deltas, key=lambda d: bin(crc(d) ^ zero).count("1"))
    spread = crc(delta) ^ zero  # what the delta XORs into any row's CRC
    x = rng.randbytes(size)
    while True:
        y = rng.randbytes(size)
        if (crc(x) ^ crc(y)) & spread == spread:
            break
    x2 = bytes(a ^ b for a, b in zip(x, delta, strict=True))
    y2 = bytes(a ^ b for a, b in zip(y, delta, strict=True))
    assert crc(x) + crc(y) == crc(x2) + crc(y2)  # a plain sum of CRCs would pass the change
    assert {x, y} != {x2, y2}
    before = verify_hash.page_sum(verify_hash.CRC32C, [x, y])
    assert before != verify_hash.page_sum(verify_hash.CRC32C, [x2, y2])


def test_the_server_decides_the_hash() -> None:
    """CRC-32C from PostgreSQL 18 on (its crc32c()), MD5 before."""
    assert verify_hash.MD5 == verify_hash.choose(17)
    assert verify_hash.CRC32C == verify_hash.choose(18)
