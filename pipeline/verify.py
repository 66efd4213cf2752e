"""Verify: compare every source row with its target row.

The source's raw values are read by verification's own reference (pipeline/reference.py), not
by the load's converters, so a converter that changes a value cannot hide it from verify.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import asyncpg

from flux_migrate.core import bookkeeping as ckpt
from flux_migrate.core.catalog import table_exists
from flux_migrate.core.schema import Table, quote_ident
from flux_migrate.core.source import check_source
from flux_migrate.core.target import connect
from flux_migrate.pipeline import reference as ref
from flux_migrate.pipeline import verify_canon as canon
from flux_migrate.pipeline import verify_generic as generic
from flux_migrate.pipeline import verify_hash
from flux_migrate.pipeline import verify_parallel as parallel
from flux_migrate.pipeline import verify_scan as scan
from flux_migrate.pipeline.mapping_source import recorded_mapping_of, resolve_mapping
from flux_migrate.pipeline.settings import Settings
from flux_migrate.stages.extract import fetch_rows, open_source

PAGE = 5000  # rows per source query and per target cursor fetch


@dataclass
class TableVerify:
    table: str
    matched: int = 0
    different: int = 0
    missing: int = 0
    extra: int = 0
    quarantined: int = 0
    skipped: int = 0
    extra_allowed: bool = False  # the table held rows before flux-migrate wrote to it
    samples: list[str] = field(default_factory=list)
    keys_pending: bool = False  # its primary key, foreign keys or indexes are not built yet
    scanned: bool = False  # proved by the parallel scan (else compared by the merge)

    @property
    def ok(self) -> bool:
        wrong = self.different or self.missing or (self.extra and not self.extra_allowed)
        return not (wrong or self.keys_pending)

    @property
    def verdict(self) -> str:
        if self.ok:
            return "ok"
        return "KEYS PENDING" if self.keys_pending and self.rows_ok else "MISMATCH"

    @property
    def rows_ok(self) -> bool:
        return not (self.different or self.missing or (self.extra and not self.extra_allowed))

    def note(self, text: str, limit: int) -> None:
        if len(self.samples) < limit:
            self.samples.append(text)


@dataclass
class QuickVerify:
    """Counts and checksums of one table: ``source_count`` rows of the source are expected in
    the target (``source_rows`` read, less the quarantined and the skipped ones), and
    ``target_count`` rows were found there (skipped keys left out, and, when the table held
    rows before flux-migrate wrote to it, the rows with no source row: full `verify` allows
    them too)."""

    table: str
    source_count: int
    target_count: int
    source_checksum: int
    target_checksum: int
    quarantined: int
    skipped: int
    source_rows: int = 0
    keys_pending: bool = False  # its primary key, foreign keys or indexes are not built yet

    @property
    def ok(self) -> bool:
        return self.rows_ok and not self.keys_pending

    @property
    def rows_ok(self) -> bool:
        return (
            self.source_count == self.target_count and self.source_checksum == self.target_checksum
        )

    @property
    def verdict(self) -> str:
        if self.ok:
            return "ok"
        return "KEYS PENDING" if self.rows_ok else "MISMATCH"


def _range_job(
    settings: Settings, path: str, table: Table, quarantined: set[int], skipped: set[str]
) -> dict[str, Any]:
    """What every range job (verify_scan.RangeJob) of one table shares, as its fields."""
    return {
        "path": path,
        "table": table,
        "quarantined": frozenset(quarantined),
        "skipped": frozenset(skipped),
        "zone": settings.naive_timezone,
        "strip_nul": settings.strip_nul,
        "busy_timeout": settings.busy_timeout,
    }


async def _bookkeeping(
    conn: asyncpg.Connection, schema: str, table: str
) -> tuple[set[int], set[str], bool]:
    """Unresolved quarantined rowids, skipped keys, and whether the table held rows before."""
    if not await ckpt.bookkeeping_exists(conn):
        return set(), set(), False
    quarantined = await ckpt.unresolved_rowids(conn, schema, table)
    skipped = await ckpt.skipped_keys(conn, schema, table)
    found = await ckpt.read_checkpoints(conn, schema)
    pre = found[table].preexisting_rows if table in found else False
    return quarantined, skipped, pre


async def _quarantined_rows(
    conn: asyncpg.Connection, schema: str, table: Table
) -> list[tuple[int, tuple[Any, ...]]]:
    """A WITHOUT ROWID table's unresolved quarantined rows: the position the load read each
    at (its "rowid") and its raw values (two rows can share a key once converted)."""
    if not table.without_rowid or not await ckpt.bookkeeping_exists(conn):
        return []
    found = await ckpt.unresolved_raw(conn, schema, table.name)
    known = ((at, generic.stored_identity(table, raw)) for at, raw in found)
    return [(at, row) for at, row in known if row is not None]


async def _source_pages(
    src: aiosqlite.Connection, table: Table
) -> AsyncIterator[list[tuple[Any, ...]]]:
    """Source rows with a text key (rowid first, text as bytes) in key order, one short query
    per page. Keys stored as NULL, BLOB or numbers sort apart in SQLite: see _odd_key_rows.

    The last key is bound as text (SQLite converts it to the file's encoding); only a key that
    is not UTF-8, which a UTF-8 file alone can hold, is bound as its bytes cast to text: in a
    UTF-16 file that cast would read UTF-8 bytes as UTF-16, and the pages would never end."""
    cols = ", ".join(quote_ident(c) for c in table.column_names)
    name = quote_ident(table.name)
    last: Any = None
    while True:
        if last is None:
            sql = f"SELECT rowid, {cols} FROM {name} WHERE typeof(id) = 'text' ORDER BY id LIMIT ?"
            args: tuple[Any, ...] = (PAGE,)
        else:
            try:
                bound, mark = last.decode("utf-8"), "?"
            except UnicodeDecodeError:
                bound, mark = last, "CAST(? AS TEXT)"
            sql = f"SELECT rowid, {cols} FROM {name} WHERE id > {mark}"
            sql += " AND typeof(id) = 'text' ORDER BY id LIMIT ?"
            args = (bound, PAGE)
        rows = await fetch_rows(src, sql, args)
        if not rows:
            return
        last = rows[-1][1]
        yield rows


async def _odd_key_rows(src: aiosqlite.Connection, table: Table) -> list[tuple[Any, ...]]:
    cols = ", ".join(quote_ident(c) for c in table.column_names)
    return await fetch_rows(
        src, f"SELECT rowid, {cols} FROM {quote_ident(table.name)} WHERE typeof(id) != 'text'"
    )


async def _target_rows(
    conn: asyncpg.Connection, settings: Settings, table: Table
) -> AsyncIterator[asyncpg.Record]:
    """The target table's rows in key order (byte order, like SQLite's), through a cursor, in
    the reference's raw shape (see reference.target_select)."""
    cols = ref.target_select(table)
    sql = f'SELECT {cols} FROM {settings.names.qualified(table.name)} ORDER BY id COLLATE "C"'
    async with conn.transaction(readonly=True):
        async for record in conn.cursor(sql, prefetch=PAGE):
            yield record


async def open_target(settings: Settings) -> asyncpg.Connection:
    """A connection printing instants in UTC and ISO style, as the reference expects them."""
    conn = await connect(settings.require_dsn())
    await conn.execute(ref.SESSION_SETTINGS)
    return conn


def _differing_columns(table: Table, a: tuple[Any, ...], b: tuple[Any, ...]) -> list[str]:
    return [c.name for c, x, y in zip(table.columns, a, b, strict=True) if x != y]


async def verify_table(
    src: aiosqlite.Connection,
    conn: asyncpg.Connection,
    settings: Settings,
    table: Table,
    *,
    limit: int = 10,
) -> TableVerify:
    """Merge-join source and target by key and compare every field of every row (a source not
    in UTF-8 orders its keys otherwise than PostgreSQL: its rows are looked up by key)."""
    quarantined, skipped, preexisting = await _bookkeeping(conn, settings.names.schema, table.name)
    exists = await table_exists(conn, settings.names, table.name)
    check = _TableCheck(settings, table, quarantined, skipped, limit)
    check.result.extra_allowed = preexisting
    await check.odd_keys(src, conn if exists else None)
    if await _encoding(src) == "UTF-8":
        await check.merge(src, _target_rows(conn, settings, table) if exists else _empty())
    else:
        await check.lookup(src, conn if exists else None)
    return check.result


class _TableCheck:
    """One table's comparison: what each source row must become, judged against its target
    row; counts and samples go into ``result``."""

    def __init__(
        self,
        settings: Settings,
        table: Table,
        quarantined: set[int],
        skipped: set[str],
        limit: int,
    ) -> None:
        self.settings, self.table, self.limit = settings, table, limit
        self.quarantined, self.skipped = quarantined, skipped
        self.read = ref.source_row_reader(
            table, zone=settings.naive_timezone, strip_nul=settings.strip_nul
        )
        self.unreadable = ""  # why the reference could not read the last source row
        self.result = TableVerify(table.name)
        self.odd: set[str] = set()  # keys stored as NULL, BLOB or numbers, checked one by one
        self.targets: AsyncIterator[asyncpg.Record] = _empty()
        self.pending: asyncpg.Record | None = None  # the next target row of the merge

    def note(self, text: str) -> None:
        self.result.note(f"{self.table.name} {text}", self.limit)

    def expected_row(self, raw: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The target row a source row must become, or None when it is accounted otherwise
        (quarantined, skipped, or unreadable: ``self.unreadable`` then says why)."""
        rowid, values = raw[0], raw[1:]
        self.unreadable = ""
        if rowid in self.quarantined:
            self.result.quarantined += 1
            return None
        try:
            expected = self.read(values)
        except ref.Unreadable as exc:
            self.unreadable = str(exc)
            return None
        if expected[0] in self.skipped:
            self.result.skipped += 1
            return None
        return expected

    def judge_unreadable(self, rowid: int, key: Any, record: asyncpg.Record | None) -> None:
        """A source row the reference cannot read must have been quarantined: loaded, it is
        different; absent, it is missing."""
        if record is None:
            self.result.missing += 1
            self.note(f"rowid {rowid}: not loaded and not quarantined ({self.unreadable})")
        else:
            self.result.different += 1
            self.note(f"{key}: loaded, but the source value is unreadable ({self.unreadable})")

    def judge(self, expected: tuple[Any, ...], record: asyncpg.Record | None) -> None:
        """Count the target row of ``expected`` as matched, different or missing."""
        key = expected[0]
        if record is None:
            self.result.missing += 1
            self.note(f"{key}: in the source but not in PostgreSQL")
        elif (actual := ref.target_row(self.table, record.values())) == expected:
            self.result.matched += 1
        else:
            self.result.different += 1
            self.note(
                f"{key}: differs in {', '.join(_differing_columns(self.table, expected, actual))}"
            )

    async def odd_keys(self, src: aiosqlite.Connection, conn: asyncpg.Connection | None) -> None:
        """Keys SQLite stores as NULL, BLOB or numbers sort apart from text: look each up
        (``conn`` None: the target table does not exist)."""
        cols = ref.target_select(self.table)
        qualified = self.settings.names.qualified(self.table.name)
        for raw in await _odd_key_rows(src, self.table):
            if (expected := self.expected_row(raw)) is None and not self.unreadable:
                continue
            key = expected[0] if expected is not None else _text_key(raw[1])
            if key is None:
                record = None
            else:
                self.odd.add(key)
                record = None
                if conn is not None:
                    record = await conn.fetchrow(
                        f"SELECT {cols} FROM {qualified} WHERE id = $1", key
                    )
            if expected is None:
                self.judge_unreadable(raw[0], key, record)
            else:
                self.judge(expected, record)

    async def lookup(self, src: aiosqlite.Connection, conn: asyncpg.Connection | None) -> None:
        """Judge each page of source rows against the target rows with their keys, then count
        the target rows whose key the source does not hold (``conn`` None: no target table)."""
        qualified = self.settings.names.qualified(self.table.name)
        select = f"SELECT {ref.target_select(self.table)} FROM {qualified}"
        async for page in _source_pages(src, self.table):
            keys = [_text_key(raw[1]) or "" for raw in page]
            wanted = set(keys) | {k.replace("\x00", "") for k in keys}  # strip_nul keys
            found: dict[str, asyncpg.Record] = {}
            if conn is not None:
                rows = await conn.fetch(f"{select} WHERE id = ANY($1::text[])", list(wanted))
                found = {r["id"]: r for r in rows}
            for raw, key in zip(page, keys, strict=True):
                if (row := self.expected_row(raw)) is not None:
                    self.judge(row, found.get(row[0]))
                elif self.unreadable:
                    self.judge_unreadable(raw[0], key, found.get(key))
        if conn is not None:
            await self.count_extra(src, conn)

    async def count_extra(self, src: aiosqlite.Connection, conn: asyncpg.Connection) -> None:
        """Count target rows, page by page in key order, whose key no source row holds."""
        qualified = self.settings.names.qualified(self.table.name)
        name = quote_ident(self.table.name)
        last = ""
        while keys := [
            r["id"]
            for r in await conn.fetch(
                f'SELECT id FROM {qualified} WHERE id COLLATE "C" > $1'
                f' ORDER BY id COLLATE "C" LIMIT {PAGE}',
                last,
            )
        ]:
            last = keys[-1]
            held: set[str] = set()
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                for (key,) in await fetch_rows(
                    src, f"SELECT id FROM {name} WHERE id IN ({marks})", chunk
                ):
                    held.add(_text_key(key) or "")
            for key in keys:
                if key not in held and key not in self.skipped and key not in self.odd:
                    self.result.extra += 1
                    self.note(f"{key}: in PostgreSQL but not in the source")

    async def merge(
        self, src: aiosqlite.Connection, targets: AsyncIterator[asyncpg.Record]
    ) -> None:
        """Walk the source's text keys and the target rows, both in key order, side by side."""
        self.targets = targets
        self.pending = await anext(targets, None)
        async for page in _source_pages(src, self.table):
            for raw in page:
                await self.compare(raw)
        await self.advance_past(None)

    async def compare(self, raw: tuple[Any, ...]) -> None:
        """Judge one source row against the target row with its key, if any."""
        key = raw[1].decode("utf-8", "surrogateescape") if isinstance(raw[1], bytes) else raw[1]
        expected = self.expected_row(raw)
        await self.advance_past(key if expected is None else expected[0])
        pending = self.pending
        if pending is not None and pending["id"] == key and key in self.skipped:
            await self.next_target()  # a skipped row's target version is not ours
            return
        if pending is not None and pending["id"] == key and raw[0] in self.quarantined:
            await self.next_target()  # a quarantined row's previous version (kept by sync)
            return
        if expected is None:
            if self.unreadable:
                loaded = pending is not None and pending["id"] == key
                if loaded:
                    await self.next_target()
                self.judge_unreadable(raw[0], key, pending if loaded else None)
            return
        if pending is not None and pending["id"] == expected[0]:
            await self.next_target()
            self.judge(expected, pending)
        else:
            self.judge(expected, None)

    async def next_target(self) -> None:
        self.pending = await anext(self.targets, None)

    async def advance_past(self, key: str | None) -> None:
        """Count target rows before ``key`` (all when None) that no source row claims."""
        while self.pending is not None and (key is None or self.pending["id"] < key):
            found = self.pending["id"]
            if found not in self.skipped and found not in self.odd:
                self.result.extra += 1
                self.note(f"{found}: in PostgreSQL but not in the source")
            await self.next_target()


def _text_key(raw: Any) -> str | None:
    """An odd key (NULL, BLOB, number) as the text the target would hold, None for NULL."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "surrogateescape")
    return repr(raw) if isinstance(raw, float) else str(raw)


async def _encoding(src: aiosqlite.Connection) -> str:
    """The source file's text encoding (UTF-8, UTF-16le or UTF-16be)."""
    [(encoding,)] = await fetch_rows(src, "PRAGMA encoding")
    return encoding.decode() if isinstance(encoding, bytes) else str(encoding)


async def _empty() -> AsyncIterator[asyncpg.Record]:
    return
    yield  # pragma: no cover


async def verify_generic_table(
    src: aiosqlite.Connection,
    conn: asyncpg.Connection,
    settings: Settings,
    table: Table,
    *,
    limit: int = 10,
) -> TableVerify:
    """Compare the multisets of canonical rows; rows on one side only that share a key with a
    row on the other side count as different, the rest as missing or extra."""
    quarantined, _, preexisting = await _bookkeeping(conn, settings.names.schema, table.name)
    raws = await _quarantined_rows(conn, settings.names.schema, table)
    want, unaccounted = await generic.source_rows(src, settings, table, quarantined, raws)
    have = await generic.target_rows(conn, settings, table)
    result = TableVerify(table.name, quarantined=len(quarantined), extra_allowed=preexisting)
    result.matched = sum((want & have).values())
    only_source, only_target = want - have, have - want
    if table.primary_key:
        key_of = {generic.describe(table, r): r for r in only_target}
        for row, n in only_source.items():
            name = generic.describe(table, row)
            if name in key_of:
                result.different += n
                only_target.pop(key_of[name], None)
                result.note(f"{table.name} {name}: differs", limit)
            else:
                result.missing += n
                result.note(f"{table.name} {name}: in the source but not in PostgreSQL", limit)
    else:
        result.missing = sum(only_source.values())
        for row in list(only_source)[:limit]:
            result.note(f"{table.name} {generic.describe(table, row)}: not in PostgreSQL", limit)
    result.missing += unaccounted
    for row in _previous_versions(table, only_target, await _open_keys(conn, settings, table)):
        only_target.pop(row)  # a quarantined source row's previous version, kept by sync
    result.extra = sum(only_target.values())
    for row in list(only_target)[:limit]:
        result.note(f"{table.name} {generic.describe(table, row)}: not in the source", limit)
    return result


async def _open_keys(conn: asyncpg.Connection, settings: Settings, table: Table) -> set[str]:
    """The keys of a table's unresolved quarantined rows (as the bookkeeping spells them)."""
    if not await ckpt.bookkeeping_exists(conn):
        return set()
    return await ckpt.unresolved_keys(conn, settings.names.schema, table.name)


def _previous_versions(
    table: Table, rows: Iterable[tuple[Any, ...]], keys: set[str]
) -> list[tuple[Any, ...]]:
    """Those target ``rows`` of a one-column key that is quarantined in the source."""
    if len(table.primary_key) != 1 or not keys:
        return []
    at = table.column_names.index(table.primary_key[0])
    return [r for r in rows if r[at] is not None and str(r[at]) in keys]


async def _tables(settings: Settings, path: Path, conn: asyncpg.Connection) -> tuple[Table, ...]:
    """The tables of the run's mapping (configured, else the one the last run used as
    recorded in the target, else discovered from the source), each with the name SQL reaches
    its row id by in this source."""
    recorded = None
    if settings.mapping is None:
        recorded = await recorded_mapping_of(conn, settings.names.schema)
    mapping, _ = await anyio.to_thread.run_sync(
        resolve_mapping, path, settings.mapping, settings.busy_timeout, recorded
    )
    return mapping.tables


async def verify_rows(
    settings: Settings, *, limit: int = 10, workers: int | None = None
) -> list[TableVerify]:
    """Compare every row of every table; see TableVerify for the counts. The app's large
    tables are read by ``workers`` processes (default: the CPUs it may use, see verify_parallel)."""
    path = settings.require_source()
    scanner = scan.Scanner(workers)
    async with open_source(path, busy_timeout=settings.busy_timeout) as src:
        conn = await open_target(settings)
        try:
            tables = await _tables(settings, path, conn)
            await check_source(src, path, tables)
            results = []
            for t in tables:
                found = await _scan_table(src, conn, settings, t, scanner)
                if found is None:
                    found = await (verify_generic_table if t.generic else verify_table)(
                        src, conn, settings, t, limit=limit
                    )
                results.append(found)
            await _note_pending_keys(conn, settings, results)
            return results
        finally:
            await conn.close()
            scanner.close()


async def _scan_table(
    src: aiosqlite.Connection,
    conn: asyncpg.Connection,
    settings: Settings,
    table: Table,
    scanner: scan.Scanner,
) -> TableVerify | None:
    """The table proved right by the parallel scan, or None: not scanned (small, or see
    _scannable) or something differs (the sequential merge then says what)."""
    if table.without_rowid or not canon.fast(table) or parallel.key_column(table) is None:
        return None
    path = str(settings.require_source())
    ranges = scanner.ranges(path, table, settings.busy_timeout)
    if not ranges or not scanner.parallel(ranges[-1][1] - ranges[0][0] + 1):
        return None
    if not await _scannable(src, conn, settings, table):
        return None
    quarantined, skipped, preexisting = await _bookkeeping(conn, settings.names.schema, table.name)
    if table.generic:
        skipped = set()  # keys only the app's tables skip
    qualified = settings.names.qualified(table.name)
    common = _range_job(settings, path, table, quarantined, skipped)
    jobs = [
        parallel.FullJob(dsn=settings.require_dsn(), qualified=qualified, lo=lo, hi=hi, **common)
        for lo, hi in ranges
    ]
    total = parallel.RangeCheck()
    for part in await anyio.to_thread.run_sync(scanner.map, parallel.full_range, jobs):
        total.add(part)
    if total.differs or total.claimed != await conn.fetchval(f"SELECT count(*) FROM {qualified}"):
        return None
    return TableVerify(
        table.name,
        matched=total.matched,
        quarantined=len(quarantined) if table.generic else total.quarantined,  # as the merge
        skipped=total.skipped,
        extra_allowed=preexisting,
        scanned=True,
    )


async def _scannable(
    src: aiosqlite.Connection, conn: asyncpg.Connection, settings: Settings, table: Table
) -> bool:
    """Whether the scan can prove the table: its columns of kinds the canonical form covers,
    a one-column text primary key stored as text in every row and unique in the source (a
    unique index on it alone), and a target table to look in."""
    if not await table_exists(conn, settings.names, table.name):
        return False
    column = parallel.key_column(table)
    if column is None:
        return False
    name = quote_ident(table.name)
    key = quote_ident(column)
    if await fetch_rows(src, f"SELECT 1 FROM {name} WHERE typeof({key}) != 'text' LIMIT 1"):
        return False
    for index in await fetch_rows(src, f"PRAGMA index_list({name})"):
        if index[2] and not index[4]:  # unique, not partial
            cols = await fetch_rows(src, f"PRAGMA index_info({quote_ident(_text(index[1]))})")
            if [_text(c[2]) for c in cols] == [column]:
                return True
    return False


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


async def _note_pending_keys(
    conn: asyncpg.Connection, settings: Settings, results: Sequence[TableVerify | QuickVerify]
) -> None:
    """Mark the tables whose keys and indexes a run has not built yet (their rows may match,
    but the migration is not finished): verify says so instead of passing."""
    if not await ckpt.bookkeeping_exists(conn):
        return
    found = await ckpt.read_checkpoints(conn, settings.names.schema)
    for result in results:
        c = found.get(result.table)
        if c is not None and c.constraints_pending:
            result.keys_pending = True
            if isinstance(result, QuickVerify):
                continue
            result.samples.append(
                f"{result.table}: its primary key, foreign keys and indexes are not built yet"
                " (the run did not finish); rerun `flux-migrate run` to build them"
            )


# ---------------------------------------------------------------- --quick


async def _quick_generic(
    src: aiosqlite.Connection,
    conn: asyncpg.Connection,
    settings: Settings,
    table: Table,
    quarantined: set[int],
    preexisting: bool,
) -> QuickVerify:
    """Counts and an order-independent checksum of the canonical rows of a generic table."""
    raws = await _quarantined_rows(conn, settings.names.schema, table)
    want, unaccounted = await generic.source_rows(src, settings, table, quarantined, raws)
    have = await generic.target_rows(conn, settings, table)
    if preexisting:  # rows the table held before are not the source's: compare the source's
        have = Counter({row: n for row, n in have.items() if row in want})
    for row in _previous_versions(table, have - want, await _open_keys(conn, settings, table)):
        del have[row]  # a quarantined source row's previous version, kept by sync (as verify)

    def checksum(rows: Counter[tuple[Any, ...]]) -> int:
        total = sum(int(_md5(generic.canonical_text(r))[:15], 16) * n for r, n in rows.items())
        return total % (1 << 60)

    return QuickVerify(
        table.name,
        sum(want.values()) + unaccounted,
        sum(have.values()),
        checksum(want),
        checksum(have),
        len(quarantined),
        0,
        sum(want.values()) + unaccounted + len(quarantined),
    )


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


async def verify_quick(
    settings: Settings, *, workers: int | None = None, row_hash: str | None = None
) -> list[QuickVerify]:
    """Per table: row counts and an order-independent checksum of keys, text and timestamps
    (see verify_canon), the source read by ``workers`` processes (default: the CPUs it may use);
    the tables the canonical form covers are read at the same time, each target aggregate on
    a connection of its own. ``row_hash`` (verify_hash) defaults to the server's best."""
    path = settings.require_source()
    found: dict[str, QuickVerify] = {}
    scanner = scan.Scanner(workers)
    async with open_source(path, busy_timeout=settings.busy_timeout) as src:
        conn = await open_target(settings)
        try:
            tables = await _tables(settings, path, conn)
            await check_source(src, path, tables)
            kind = row_hash or verify_hash.choose(conn.get_server_version().major)
            async with anyio.create_task_group() as tg:
                for table in tables:
                    if canon.fast(table):
                        tg.start_soon(_quick_one, settings, table, scanner, kind, found)
            for table in tables:
                if table.name not in found:
                    quarantined, _, pre = await _bookkeeping(
                        conn, settings.names.schema, table.name
                    )
                    found[table.name] = await _quick_generic(
                        src, conn, settings, table, quarantined, pre
                    )
            out = [found[t.name] for t in tables]
            await _note_pending_keys(conn, settings, out)
        finally:
            await conn.close()
            scanner.close()
    return out


async def _quick_one(
    settings: Settings,
    table: Table,
    scanner: scan.Scanner,
    row_hash: str,
    found: dict[str, QuickVerify],
) -> None:
    """The quick's canonical counts and checksums of one table, on a connection of its own
    (nothing put in ``found`` for a table outside the app that held rows before: see
    _quick_generic)."""
    conn = await open_target(settings)
    try:
        quarantined, skipped, pre = await _bookkeeping(conn, settings.names.schema, table.name)
        if table.generic and (pre or (quarantined and not canon.keyed_by_text(table))):
            return  # compared as verify does it (previous versions of quarantined rows aside)
        skip = set() if table.generic else skipped  # keys only the app's tables skip
        found[table.name] = await _quick_canon(
            conn, settings, table, scanner, row_hash, quarantined, skip, pre
        )
    finally:
        await conn.close()


async def _quick_canon(
    conn: asyncpg.Connection,
    settings: Settings,
    table: Table,
    scanner: scan.Scanner,
    row_hash: str,
    quarantined: set[int],
    skipped: set[str],
    preexisting: bool,
) -> QuickVerify:
    """Counts and checksums of a table's canonical rows: the source's by the parallel scan,
    the target's by one aggregate (run at the same time unless only the source's keys count)."""
    path = str(settings.require_source())
    ranges = scanner.ranges(path, table, settings.busy_timeout)
    common = _range_job(settings, path, table, quarantined, skipped)
    aside = set(skipped)  # target rows left out: those of skipped keys, and of quarantined rows
    if quarantined and len(table.primary_key) == 1:  # (their previous versions, kept by sync)
        aside |= await anyio.to_thread.run_sync(
            scan.quarantined_keys, path, table, quarantined, settings.busy_timeout
        )
    jobs = [
        scan.QuickJob(want_keys=preexisting, row_hash=row_hash, lo=lo, hi=hi, **common)
        for lo, hi in ranges
    ]
    source = scan.QuickSum()
    target: tuple[int, int] = (0, 0)

    async def read_source() -> None:
        for part in await anyio.to_thread.run_sync(scanner.map, scan.quick_range, jobs):
            source.add(part)

    if preexisting:
        await read_source()
        target = await _target_sum(conn, settings, table, row_hash, aside, source.keys)
    else:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_source)
            target = await _target_sum(conn, settings, table, row_hash, aside, None)
    return QuickVerify(
        table.name,
        source.count,
        target[0],
        source.checksum,
        target[1],
        len(quarantined),
        len(skipped),
        source.rows,
    )


async def _target_sum(
    conn: asyncpg.Connection,
    settings: Settings,
    table: Table,
    row_hash: str,
    aside: set[str],
    keys: list[str] | None,
) -> tuple[int, int]:
    """The target table's count and checksum, rows whose key is in ``aside`` left out (only
    the rows with ``keys`` when given)."""
    if not await table_exists(conn, settings.names, table.name):
        return 0, 0
    qualified = settings.names.qualified(table.name)
    sql = canon.target_checksum_sql(table, qualified, row_hash, only_keys=keys is not None)
    rec = await conn.fetchrow(sql, list(aside), *([keys] if keys is not None else []))
    return int(rec[0]), verify_hash.target_value(rec[1:])
