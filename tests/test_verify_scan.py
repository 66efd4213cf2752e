"""`verify` and `verify --quick` on the parallel scan (issue 23): for a small random table of the
app's shape or of any other shape, an unchanged target passes both, and any single change made
in PostgreSQL (a key, a text, an integer, an instant by one microsecond, a row deleted or
duplicated) fails both, whether the source is read by one process or by two."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from flux_migrate.core.errors import EXIT_FAILURE, EXIT_OK
from flux_migrate.core.schema import SESSIONS, SQLITE_DDL, Kind, TargetNames, quote_ident
from flux_migrate.pipeline import verify_canon as canon
from flux_migrate.pipeline import verify_hash
from flux_migrate.pipeline.reference import Unreadable
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.sample import generate
from flux_migrate.pipeline.settings import Settings, load_settings
from flux_migrate.pipeline.verify import verify_quick, verify_rows
from tests.dirty import app_db
from tests.support import alive, cli, generated_with, start_cli, worker_processes

pytestmark = pytest.mark.anyio

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
INSTANTS = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
CHANGES = ("key", "text", "instant", "delete", "duplicate")
APP_CHANGES = (*CHANGES, "metadata")
METADATA = st.dictionaries(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=4),
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | TEXT,
    max_size=3,
).map(json.dumps)
HASHES = st.sampled_from([None, verify_hash.MD5])  # None: the server's (CRC-32C on 18)


@st.composite
def instant_texts(draw: st.DrawFn) -> str:
    """An instant as stores write it: the canonical shape or another one SQL cannot pass."""
    at = draw(INSTANTS)
    shape = draw(st.sampled_from(["iso", "z", "offset", "space", "zero fraction"]))
    if shape == "iso":
        return at.isoformat()
    if shape == "z":
        return at.isoformat(timespec="microseconds").replace("+00:00", "Z")
    if shape == "offset":
        return at.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()
    if shape == "space":
        return at.isoformat(sep=" ")
    return at.replace(microsecond=0).isoformat(timespec="microseconds")


@st.composite
def app_rows(draw: st.DrawFn) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Sessions (one at least) and their messages, in the app's schema."""
    sessions = [
        (str(uuid.uuid4()), draw(st.none() | TEXT), draw(instant_texts()), draw(instant_texts()))
        for _ in range(draw(st.integers(1, 3)))
    ]
    messages = [
        (
            str(uuid.uuid4()),
            draw(st.sampled_from(sessions))[0],
            draw(st.sampled_from(["user", "assistant"])),
            draw(TEXT),
            draw(instant_texts()),
            draw(METADATA),
        )
        for _ in range(draw(st.integers(1, 5)))
    ]
    return sessions, messages


def _write_app(
    path: Path, sessions: list[tuple[Any, ...]], messages: list[tuple[Any, ...]]
) -> None:
    db = sqlite3.connect(path)
    db.executescript(SQLITE_DDL)
    db.executemany(
        "INSERT INTO sessions (id, title, created_at, updated_at) VALUES (?, ?, ?, ?)", sessions
    )
    db.executemany(
        "INSERT INTO messages (id, session_id, role, content, created_at, metadata)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        messages,
    )
    db.commit()
    db.close()


async def _settings(path: Path, dsn: str) -> Settings:
    config = load_settings(
        None,
        sqlite_path=path,
        postgres_dsn=dsn,
        names=TargetNames(schema=f"v_{uuid.uuid4().hex[:10]}"),
    )
    report = await migrate(config)
    assert "completed" == report.status
    return config


async def _change(dsn: str, qualified: str, key: str, change: str, sets: dict[str, str]) -> None:
    """Make one change to the row with ``key`` in the target table."""
    conn = await asyncpg.connect(dsn)
    where = f" WHERE {key} = (SELECT min({key}) FROM {qualified})"
    try:
        if change == "delete":
            await conn.execute(f"DELETE FROM {qualified}{where}")
        elif change == "duplicate":
            rows = await conn.fetch(
                "SELECT conname FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'p'",
                qualified,
            )
            for row in rows:
                await conn.execute(
                    f"ALTER TABLE {qualified} DROP CONSTRAINT {quote_ident(row[0])} CASCADE"
                )
            cols = await conn.fetch(
                "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0"
                " AND NOT attisdropped AND attidentity = '' AND atthasdef = false",
                qualified,
            )
            names = ", ".join(quote_ident(c[0]) for c in cols)
            await conn.execute(
                f"INSERT INTO {qualified} ({names}) SELECT {names} FROM {qualified}{where}"
            )
        else:
            await conn.execute(f"UPDATE {qualified} SET {sets[change]}{where}")
    finally:
        await conn.close()


async def _both_ok(
    config: Settings, workers: int, row_hash: str | None = None
) -> list[tuple[bool, bool]]:
    """Each table's full and quick verdicts (the quick with ``row_hash``, else the server's);
    with two workers, the full one of a table that passes comes from the parallel scan, and of
    one that fails from the merge."""
    full = await verify_rows(config, workers=workers)
    quick = await verify_quick(config, workers=workers, row_hash=row_hash)
    for f in full:
        assert (workers > 1 and f.ok) == f.scanned, f
    return [(f.ok, q.ok) for f, q in zip(full, quick, strict=True)]


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@example(  # the metadata of one message of two changed, read by the parallel scan
    rows=(
        [("s1", None, "2024-01-01T00:00:00+00:00", "2024-01-01T00:00:00+00:00")],
        [
            ("m1", "s1", "user", "hi", "2024-01-01T00:00:01+00:00", '{"model": "a", "n": 1}'),
            ("m2", "s1", "assistant", "ho", "2024-01-01T00:00:02Z", '{"model": "a", "n": 1}'),
        ],
    ),
    change="metadata",
    workers=2,
    row_hash=None,
)
@given(
    rows=app_rows(),
    change=st.sampled_from(APP_CHANGES),
    workers=st.sampled_from([1, 2]),
    row_hash=HASHES,
)
async def test_one_change_in_an_app_table_fails_verify_and_quick(
    tmp_path_factory: pytest.TempPathFactory,
    pg_dsn: str,
    rows: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]],
    change: str,
    workers: int,
    row_hash: str | None,
) -> None:
    """An unchanged app database passes verify and verify --quick; one changed message (key,
    content, created_at by 1 µs, deleted or duplicated) fails both for messages only (the
    quick with either hash); changed metadata fails the full verify (the quick leaves
    metadata to it), from the parallel scan as from the merge."""
    path = tmp_path_factory.mktemp("app") / "app.sqlite"
    _write_app(path, *rows)
    config = await _settings(path, pg_dsn)
    assert [(True, True), (True, True)] == await _both_ok(config, workers, row_hash)
    sets = {
        "key": "id = left(id, 35) || 'z'",
        "text": "content = content || 'é'",
        "instant": "created_at = created_at + interval '1 microsecond'",
        "metadata": """metadata = metadata || '{"changed": true}'::jsonb""",
    }
    await _change(pg_dsn, config.names.qualified("messages"), "id", change, sets)
    quick = change == "metadata"  # not in the quick's canonical form (verify_canon)
    assert [(True, True), (False, quick)] == await _both_ok(config, workers, row_hash)


GENERIC_DDL = "CREATE TABLE notes (k TEXT PRIMARY KEY, body TEXT, n INTEGER, at DATETIME)"


@st.composite
def generic_rows(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Rows of a table outside the app's profile: text key, nullable text, integer, instant."""
    n = draw(st.integers(1, 5))
    keys = draw(st.lists(TEXT.filter(bool), min_size=n, max_size=n, unique=True))
    return [
        (
            k,
            draw(st.none() | TEXT),
            draw(st.none() | st.integers(-(2**63), 2**63 - 1)),
            draw(st.none() | instant_texts()),
        )
        for k in keys
    ]


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(
    rows=generic_rows(),
    change=st.sampled_from((*CHANGES, "integer")),
    workers=st.sampled_from([1, 2]),
    row_hash=HASHES,
)
async def test_one_change_in_any_table_fails_verify_and_quick(
    tmp_path_factory: pytest.TempPathFactory,
    pg_dsn: str,
    rows: list[tuple[Any, ...]],
    change: str,
    workers: int,
    row_hash: str | None,
) -> None:
    """The same law for a table of any other shape (the quick's canonical form covers it)."""
    path = tmp_path_factory.mktemp("any") / "notes.sqlite"
    db = sqlite3.connect(path)
    db.execute(GENERIC_DDL)
    db.executemany("INSERT INTO notes VALUES (?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    config = await _settings(path, pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        loaded = await conn.fetchval(f"SELECT count(*) FROM {config.names.qualified('notes')}")
    finally:
        await conn.close()
    assert [(True, True)] == await _both_ok(config, workers, row_hash)
    if not loaded:
        return  # every row quarantined: nothing to change
    sets = {
        "key": "k = k || 'x'",
        "text": "body = coalesce(body || 'é', 'é')",
        "integer": "n = CASE WHEN n IS NULL THEN 0 WHEN n > 0 THEN n - 1 ELSE n + 1 END",
        "instant": "at = coalesce(at + interval '1 microsecond', now())",
    }
    await _change(pg_dsn, config.names.qualified("notes"), "k", change, sets)
    assert [(False, False)] == await _both_ok(config, workers, row_hash)


async def test_the_quick_covers_the_app_and_plain_tables(tmp_path: Path, pg_dsn: str) -> None:
    """The app's tables and a table of text, integers and instants take the quick's canonical
    form; a REAL column keeps the full comparison of every row."""
    path = tmp_path / "mixed.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SQLITE_DDL)
    db.execute(GENERIC_DDL)
    db.execute("CREATE TABLE prices (k TEXT PRIMARY KEY, p REAL)")
    db.execute("INSERT INTO prices VALUES ('a', 0.1)")
    db.commit()
    db.close()
    config = await _settings(path, pg_dsn)
    tables = {t.name: canon.fast(t) for t in _mapping(config)}
    assert {"sessions": True, "messages": True, "notes": True, "prices": False} == tables
    assert all(q.ok for q in await verify_quick(config, workers=2))


def _mapping(config: Settings) -> Any:
    from flux_migrate.pipeline.mapping_source import resolve_mapping

    mapping, _ = resolve_mapping(config.require_source(), None, 10.0, None)
    return mapping.tables


async def test_the_scan_agrees_with_the_merge_on_quarantined_rows(
    tmp_path: Path, pg_dsn: str
) -> None:
    """With two workers, a table holding a quarantined row, instants of another shape and a
    NUL the load stripped is proved by the scan with the merge's counts; verify --quick
    agrees."""
    db = app_db(tmp_path / "app.sqlite", good_sessions=3, messages_each=20)
    session = db.session(title="odd rows")
    db.message(session["id"], created_at="yesterday")  # quarantined
    db.message(session["id"], created_at="2024-01-01 10:00:00+05:30")
    db.message(session["id"], content="a\x00b")
    db.write()
    config = load_settings(
        None, sqlite_path=db.path, postgres_dsn=pg_dsn, strip_nul=True, names=TargetNames()
    )
    assert "completed" == (await migrate(config)).status
    before = db.path.read_bytes()
    merged = await verify_rows(config, workers=1)
    scanned = await verify_rows(config, workers=2)
    assert before == db.path.read_bytes()  # read-only: the source is never written
    assert [False, False] == [r.scanned for r in merged]
    assert [True, True] == [r.scanned for r in scanned]
    assert [(r.matched, r.quarantined, r.ok) for r in merged] == [
        (r.matched, r.quarantined, r.ok) for r in scanned
    ]
    assert [1] == [r.quarantined for r in scanned if r.table == "messages"]
    assert [True, True] == [q.ok for q in await verify_quick(config, workers=2)]


async def test_the_scan_agrees_with_the_merge_on_any_table(tmp_path: Path, pg_dsn: str) -> None:
    """A table outside the app, its text key not its first column, with a quarantined row
    and NULLs, is proved by the scan (two workers) with the counts of the multiset merge; a
    table with a REAL column or without a key keeps the merge."""
    path = tmp_path / "any.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (n INTEGER, body TEXT, k TEXT PRIMARY KEY, at DATETIME)")
    rows = [(i, None if i % 3 else f"b{i}", f"k{i}", "2024-01-01T00:00:00Z") for i in range(40)]
    db.executemany("INSERT INTO notes VALUES (?, ?, ?, ?)", rows)
    db.execute("INSERT INTO notes VALUES (99, CAST(x'ff' AS TEXT), 'bad', NULL)")  # not UTF-8
    db.execute("CREATE TABLE prices (k TEXT PRIMARY KEY, p REAL)")
    db.executemany("INSERT INTO prices VALUES (?, ?)", [(f"p{i}", i / 7) for i in range(10)])
    db.execute("CREATE TABLE loose (v TEXT)")
    db.executemany("INSERT INTO loose VALUES (?)", [("same",)] * 5)
    db.commit()
    db.close()
    config = load_settings(None, sqlite_path=path, postgres_dsn=pg_dsn, names=TargetNames())
    assert "completed" == (await migrate(config)).status
    merged = {r.table: r for r in await verify_rows(config, workers=1)}
    scanned = {r.table: r for r in await verify_rows(config, workers=2)}
    assert {"notes": True, "prices": False, "loose": False} == {
        t: r.scanned for t, r in scanned.items()
    }
    counts = {t: (r.matched, r.quarantined, r.ok) for t, r in merged.items()}
    assert counts == {t: (r.matched, r.quarantined, r.ok) for t, r in scanned.items()}
    assert (40, 1, True) == counts["notes"]
    assert all(q.ok for q in await verify_quick(config, workers=2))


SOURCE_VALUES = st.one_of(
    st.none(),
    TEXT,
    st.sampled_from(["", "a\x00b", "2024-01-01T00:00:00+00:00", "2024-01-01T24:00:00+00:00"]),
    instant_texts(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.sampled_from([0.30000000000000004, 1e16, 1.0, -0.0, b"ab", b"\xff", 7]),
    st.binary(max_size=6),
)
CANONICAL = INSTANTS.map(datetime.isoformat)  # the shape SQL passes through


# The app's sessions, and the same with a nullable instant (N, or T and the instant).
CANON_TABLES = (
    SESSIONS,
    dataclasses.replace(
        SESSIONS,
        columns=tuple(
            dataclasses.replace(c, not_null=False) if c.name == "updated_at" else c
            for c in SESSIONS.columns
        ),
    ),
)
ODD_INSTANTS = st.sampled_from(
    [
        "2024-01-01T00:00:00.000000+00:00",  # an all-zero fraction: PostgreSQL prints none
        "2024-01-01T23:59:59.999999+00:00",
        "2024-01-01T20:00:00+00:00",
        "2024-01-01T24:00:00+00:00",  # PostgreSQL prints the next day
        "2024-01-01T19:00:00+00:00\n",
        "2024-01-01T19:00:00+00:00\n2024-01-01T19:00:00+00:00",  # two lines of the right shape
        "2024-01-01T19:00:00+00:00\x00x",
        "2024-01-01\nT19:00:00+00:00",
        "٢٠٢٤-01-01T00:00:00+00:00",  # another script's digits: the reference reads 2024
        "2024-01-01T0é:00:00+00:00",
        "2024-01-01T00:00:00.1234é+00:00",  # 32 bytes, 31 characters
        "2024-01-01T00:00:00.1234567+00:00",
        "2024-01-01T00:00:00.12345+00:00",
        "2024-01-01t00:00:00+00:00",
    ]
)


# The canonical instant shape written as SQLite once checked it (GLOBs over ASCII digits, no
# 24:00, no all-zero fraction): an oracle written another way for the readers' regex.
_SQL_SHAPE = (
    "(({c} GLOB '####-##-##T[01]#:##:##*' OR {c} GLOB '####-##-##T2[0-3]:##:##*')"
    " AND (substr({c}, 20) = '+00:00' OR (length({c}) = 32 AND {c} GLOB '*.######+00:00'"
    " AND substr({c}, 20, 7) != '.000000')))"
).replace("#", "[0-9]")


def _rendered(conn: sqlite3.Connection, table: Any, *, by_sql: bool) -> dict[int, bytes]:
    """The canonical text of each row the scan renders (row id to text): its instants
    checked by instant_checks, a page at once and row by row (which must agree), or, with
    ``by_sql``, by the SQL oracle above."""
    from flux_migrate.pipeline import verify_scan as scan

    page = conn.execute(canon.source_select(table, with_key=False), (-1, 10**9)).fetchall()
    if by_sql:
        tests = []
        for col in canon.compared(table):
            if col.kind in (Kind.TIMESTAMP, Kind.INSTANT):
                c = quote_ident(col.name)
                shaped = f"(typeof({c}) = 'text' AND {_SQL_SHAPE.format(c=c)})"
                nullable = col.nullable and col.null_as is None  # rendered N when NULL
                tests.append(f"({c} IS NULL OR {shaped})" if nullable else shaped)
        where = " AND ".join(tests) or "1"
        sql = f"SELECT rowid FROM {quote_ident(table.name)} WHERE {where}"
        passing = {r[0] for r in conn.execute(sql)}
        page = [row for row in page if row[0] in passing]
    else:
        checks = canon.instant_checks(table, first=1)
        slow: list[int] = []
        kept = scan.shaped(page, checks, slow)
        one_by_one = [r for row in page for r in scan.shaped([row], checks, [])]
        assert kept == one_by_one  # the page at once and row by row keep the same rows
        assert sorted(slow) == sorted({r[0] for r in page} - {r[0] for r in kept})
        page = kept
    return {row[0]: text for row in page if (text := scan.canonical(row[1:])) is not None}


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.tuples(
            st.one_of(TEXT.filter(bool), SOURCE_VALUES),
            SOURCE_VALUES,
            st.one_of(CANONICAL, CANONICAL, instant_texts(), SOURCE_VALUES, ODD_INSTANTS),
            st.one_of(CANONICAL, CANONICAL, CANONICAL, SOURCE_VALUES, ODD_INSTANTS),
        ),
        min_size=1,
        max_size=12,
    ),
    encoding=st.sampled_from(["UTF-8", "UTF-16le"]),
    table=st.sampled_from(CANON_TABLES),
)
@example(  # every odd shape, in both instant columns, a canonical one beside it
    values=[("k", None, "2024-01-01T00:00:00+00:00", odd) for odd in ODD_INSTANTS.elements]
    + [("k", None, odd, None) for odd in ODD_INSTANTS.elements],
    encoding="UTF-8",
    table=CANON_TABLES[1],
)
def test_what_sql_renders_is_what_the_reference_reads(
    tmp_path_factory: pytest.TempPathFactory,
    values: list[tuple[Any, ...]],
    encoding: str,
    table: Any,
) -> None:
    """For any stored values (numbers, blobs, NULL, NUL, any instant shape, a UTF-16 file), a
    row the scan renders in the canonical form has exactly the reference reader's canonical
    text, or one no target row can have (not UTF-8, where the reference refuses); the same
    rows and texts whether the instants' shape is checked by the readers' regex, a page at
    once or row by row, or by SQL GLOBs written independently."""
    from flux_migrate.pipeline import verify_scan as scan

    path = tmp_path_factory.mktemp("canon") / "s.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA encoding = '{encoding}'")
    db.execute("CREATE TABLE sessions (id, title, created_at, updated_at, metadata)")
    db.executemany(
        "INSERT INTO sessions (id, title, created_at, updated_at) VALUES (?, ?, ?, ?)", values
    )
    db.commit()
    db.close()
    read = canon.reference_canon(table)
    conn = scan.open_reader(str(path))
    try:
        by_sql = _rendered(conn, table, by_sql=True)
        quick = _rendered(conn, table, by_sql=False)
        for rowid, text in {**by_sql, **quick}.items():
            raw = conn.execute(canon.raw_select(table), (rowid,)).fetchone()
            try:
                expected = read(raw)
            except Unreadable:
                with pytest.raises(UnicodeDecodeError):
                    text.decode("utf-8")
                continue
            assert expected == text, raw
        assert quick == by_sql
    finally:
        conn.close()


def test_verify_takes_one_or_more_workers(tmp_path: Path) -> None:
    """`verify --workers 0` is refused with one sentence and exit 2, before anything is read."""
    done = cli("verify", "--workers", "0", "--sqlite-path", str(tmp_path / "none.sqlite"))
    assert 2 == done.returncode
    assert "--workers: give 1 or more workers" in done.stderr


@pytest.mark.parametrize("killed", ["a_worker", "verify"])
def test_verify_workers_die_with_it_and_a_lost_one_is_a_sentence(
    tmp_path: Path, pg_dsn: str, killed: str
) -> None:
    """verify's reader processes share sync's and run's rules: verify killed -9, they are gone
    within seconds; one of them killed on its own, verify exits 1 with one sentence (nothing
    was written, run it again), no traceback, and none is left behind."""
    path = tmp_path / "chat.sqlite"
    generate(path, sessions=300, seed=7)
    args = ["--sqlite-path", str(path), "--postgres-dsn", pg_dsn]
    assert EXIT_OK == cli("run", *args).returncode
    proc = start_cli("verify", *args, "--workers", "2")
    workers = worker_processes(proc)
    os.kill(proc.pid if killed == "verify" else min(workers), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    if killed == "a_worker":
        assert EXIT_FAILURE == proc.returncode, err[-2000:]
        assert "ended abruptly (killed, or out of memory); nothing was written" in err, err
        assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [] == [p for p in workers if alive(p)]


@pytest.fixture(scope="module")
def odd_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated app source (~1,000 messages) where every 37th message needs the reference
    reader (an instant in another shape, text stored as an integer)."""
    return generated_with(
        tmp_path_factory.mktemp("pages") / "chat.sqlite",
        100,
        3,
        "UPDATE messages SET created_at = replace(created_at, '+00:00', 'Z') WHERE rowid % 37 = 0",
        "UPDATE messages SET content = 12345 WHERE rowid % 37 = 1",
    )


@settings(max_examples=30, deadline=None)
@given(
    page=st.integers(1, 700),
    lo=st.integers(-5, 1100),
    span=st.integers(0, 1200),
    keys=st.booleans(),
)
def test_the_quicks_pages_add_up_to_the_whole_range(
    odd_source: Path, page: int, lo: int, span: int, keys: bool
) -> None:
    """However the quick's reader pages a range (a row, a few, more than the range holds),
    it counts every row of the range once and sums the same checksum and keys as reading the
    range in one page: no row lost or counted twice at a page's edge."""
    from flux_migrate.core.schema import MESSAGES
    from flux_migrate.pipeline import verify_scan as vs

    job = vs.QuickJob(
        path=str(odd_source),
        table=MESSAGES,
        lo=lo,
        hi=lo + span,
        want_keys=keys,
        row_hash=verify_hash.choose(18),
    )
    held = vs.PAGE
    try:
        vs.PAGE = 10**9
        whole = vs.quick_range(job)
        vs.PAGE = page
        paged = vs.quick_range(job)
    finally:
        vs.PAGE = held
    db = sqlite3.connect(odd_source)
    (rows,) = db.execute(
        "SELECT count(*) FROM messages WHERE rowid BETWEEN ? AND ?", (lo, lo + span)
    ).fetchone()
    db.close()
    assert paged.rows == whole.rows == rows
    assert paged.count == whole.count == rows  # nothing quarantined or skipped here
    assert paged.checksum == whole.checksum
    assert paged.keys == whole.keys and len(paged.keys) == (rows if keys else 0)
