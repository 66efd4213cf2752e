"""The law for any SQLite table (issue 18): whatever its affinities, keys and rowids (negative
and zero included) and values, `run` then `verify` reproduces every row exactly or quarantines
it with a reason, exactly once; and `verify` reports any row deleted from PostgreSQL."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_migrate.core.schema import TargetNames, quote_ident
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import load_settings
from flux_migrate.pipeline.verify import verify_quick, verify_rows

pytestmark = pytest.mark.anyio

TYPES = ["INTEGER", "REAL", "NUMERIC", "TEXT", "BLOB", "DATE", "DATETIME", "JSON", "BOOLEAN", ""]
KEYS = ["rowid alias", "none", "text key", "without rowid", "untyped without rowid"]
# Keys SQLite holds apart that convert to one text key in PostgreSQL (1 and '1', x'61' and 'a'):
# one loads, the others are quarantined as duplicates, and verify must still judge the one.
COLLIDING_KEYS = [1, "1", b"1", 2.5, "2.5", "a", b"a", 0, "0", -7, "-7", "k"]
NAMES = ["v", "rowid", "oid", "x y", 'q"t', "Ключ"]

TEXTS = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6),
    st.sampled_from(
        [
            "2024-01-01T10:00:00Z", "2024-02-29 23:59:59.123456+05:30", "2024-01-01",
            "2024-01-01T00:00:00.1234567Z", "2024-01-01T10:00:00+05:30:15", "2024-W01-1",
            '{"a": 1}', '{"a":1,"a":2}', "[1, 2.50]", "[NaN]", "1_000", " 7 ", "0123", "1e5",
            "true", "t", "", "soon",
        ]
    ),
)  # fmt: skip
VALUES = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 20240101, 1_700_000_000, 1_700_000_000_123]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([2460310.5, 0.5, -0.0, 1e300]),
    TEXTS,
    st.binary(max_size=4),
)
ROWIDS = st.one_of(
    st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1), st.integers(min_value=-3, max_value=3)
)


@st.composite
def tables(draw: st.DrawFn) -> tuple[str, list[str], list[tuple[Any, ...]], str]:
    """DDL of one table, its column names, its rows (rowid first) and its key kind."""
    key = draw(st.sampled_from(KEYS))
    without_rowid = key.endswith("without rowid")
    strict = not without_rowid and draw(st.booleans())  # STRICT: ANY columns only
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True))
    types = ["ANY" if strict else draw(st.sampled_from(TYPES)) for _ in names]
    cols = [f"{quote_ident(n)} {t}".rstrip() for n, t in zip(names, types, strict=True)]
    if draw(st.booleans()):  # a generated column, computed by SQLite from another
        cols.append(f"g TEXT GENERATED ALWAYS AS (typeof({quote_ident(names[0])})) VIRTUAL")
    if key != "none":
        kind = {"rowid alias": " INTEGER", "untyped without rowid": ""}.get(key, " TEXT")
        cols.insert(0, f"k{kind} PRIMARY KEY")
        names = ["k", *names]
    suffix = " WITHOUT ROWID" if without_rowid else " STRICT" if strict else ""
    ddl = f"CREATE TABLE t ({', '.join(cols)}){suffix}"
    n = draw(st.integers(min_value=0, max_value=8))
    rowids = draw(st.lists(ROWIDS, min_size=n, max_size=n, unique=True))
    untyped = draw(
        st.lists(
            st.sampled_from(COLLIDING_KEYS),
            min_size=n,
            max_size=n,
            unique_by=lambda k: (type(k) is bytes, float(k) if type(k) in (int, float) else k),
        )
        if key == "untyped without rowid"
        else st.just([])
    )
    rows = []
    for i, rowid in enumerate(rowids):
        if key == "none":
            rows.append((rowid, *(draw(VALUES) for _ in names)))
            continue
        values = [draw(VALUES) for _ in names[1:]]
        if key == "rowid alias":
            rows.append((rowid, rowid, *values))
        elif untyped:
            rows.append((rowid, untyped[i], *values))
        else:
            rows.append((rowid, f"k{i}" if i % 3 else f" K{i}é", *values))
    return ddl, names, rows, key


def _write(path: Path, ddl: str, names: list[str], rows: list[tuple[Any, ...]], key: str) -> None:
    db = sqlite3.connect(path)
    db.execute(ddl)
    cols = ", ".join(quote_ident(n) for n in names)
    marks = ", ".join("?" for _ in names)
    for row in rows:
        if key.endswith("without rowid"):
            db.execute(f"INSERT INTO t ({cols}) VALUES ({marks})", row[1:])
        else:  # no column is called _rowid_: it names the row id
            db.execute(f"INSERT INTO t (_rowid_, {cols}) VALUES (?, {marks})", row)
    db.commit()
    db.close()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(table=tables(), batch_size=st.integers(min_value=1, max_value=4))
async def test_any_table_arrives_exactly_or_quarantined_and_verify_sees_a_deleted_row(
    tmp_path_factory: pytest.TempPathFactory,
    pg_dsn: str,
    table: tuple[str, list[str], list[tuple[Any, ...]], str],
    batch_size: int,
) -> None:
    """Every source row is loaded or quarantined with a reason, exactly once; verify matches
    every loaded row; after deleting one loaded row in PostgreSQL, verify reports it."""
    ddl, names, rows, key = table
    path = tmp_path_factory.mktemp("any") / "any.sqlite"
    _write(path, ddl, names, rows, key)
    schema = f"p_{uuid.uuid4().hex[:10]}"
    config = load_settings(
        None,
        sqlite_path=path,
        postgres_dsn=pg_dsn,
        batch_size=batch_size,
        names=TargetNames(schema=schema),
    )
    report = await migrate(config)
    assert "completed" == report.status, (ddl, report)
    conn = await asyncpg.connect(pg_dsn)
    try:
        reasons = await conn.fetch(
            "SELECT source_rowid, reason FROM flux_migrate.quarantine WHERE target_schema = $1",
            schema,
        )
        loaded = await conn.fetchval(f"SELECT count(*) FROM {quote_ident(schema)}.t")
        assert len(rows) == loaded + len(reasons), (ddl, rows, reasons)
        assert all(r["reason"] for r in reasons)
        (result,) = await verify_rows(config)
        assert result.ok and loaded == result.matched, (ddl, rows, result)
        (quick,) = await verify_quick(config)
        assert quick.ok, (ddl, rows, quick)
        if loaded:
            await conn.execute(
                f"DELETE FROM {quote_ident(schema)}.t WHERE ctid = (SELECT min(ctid)"
                f" FROM {quote_ident(schema)}.t)"
            )
            (after,) = await verify_rows(config)
            assert not after.ok and after.missing + after.different >= 1, (ddl, after)
    finally:
        await conn.execute(f"DROP SCHEMA {quote_ident(schema)} CASCADE")
        for book in ("quarantine", "checkpoints", "digest_packs"):
            await conn.execute(f"DELETE FROM flux_migrate.{book} WHERE target_schema = $1", schema)
        await conn.close()
