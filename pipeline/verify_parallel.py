"""Full `verify` of one of the app's tables on the parallel scan (pipeline/verify_scan.py).

Each worker reads a row id range of the source with its own read-only connection and looks up
the target rows with the same keys over its own PostgreSQL connection, a page at a time. A row
matches when its canonical values (verify_canon: keys, text, instants, each exactly) are the
same bytes on both sides and its metadata means the same JSON (verification's own reading,
pipeline/reference.py). Nothing is hashed: the values themselves are compared.

The scan only proves a table right: every source row matched, quarantined or skipped, and as
many target rows found by key as the table holds. At the first difference of any kind the
worker stops, and the table is compared again by the sequential merge (pipeline/verify.py),
which names the rows and columns that differ, so the report does not depend on the scan.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import asyncpg

from flux_migrate.core.schema import Kind, Table, quote_ident
from flux_migrate.core.target import connect
from flux_migrate.pipeline import reference as ref
from flux_migrate.pipeline import verify_canon as canon
from flux_migrate.pipeline import verify_scan as scan

PAGE = 5000  # source rows per target lookup
_CACHE_LIMIT = 50_000  # distinct metadata texts remembered per worker
_FIRST = operator.itemgetter(0)  # an expectation's key; what it wants' canonical bytes
_SECOND = operator.itemgetter(1)  # a source row's raw key; a target row's canonical bytes


@dataclass(frozen=True, kw_only=True)
class FullJob(scan.RangeJob):
    """One range of one table for the full comparison."""

    dsn: str
    qualified: str  # the target table, quoted


@dataclass
class RangeCheck:
    matched: int = 0
    quarantined: int = 0
    skipped: int = 0
    claimed: int = 0  # target rows found by the keys of this range's source rows
    differs: bool = False  # something is not right: the sequential merge will say what

    def add(self, other: RangeCheck) -> None:
        self.matched += other.matched
        self.quarantined += other.quarantined
        self.skipped += other.skipped
        self.claimed += other.claimed
        self.differs = self.differs or other.differs


def key_column(table: Table) -> str | None:
    """The column the scan looks target rows up by: a one-column primary key of text (None:
    the table is not scanned)."""
    if len(table.primary_key) != 1:
        return None
    name = table.primary_key[0]
    kinds = {c.name: c.kind for c in table.columns}
    return name if kinds.get(name) in canon.TEXT_KINDS else None


def _key(table: Table) -> str:
    name = key_column(table)
    assert name is not None
    return name


def json_columns(table: Table) -> list[int]:
    return [i for i, c in enumerate(table.columns) if c.kind is Kind.JSON]


def target_select(table: Table, qualified: str) -> str:
    """Key, canonical bytes and each metadata text of the target rows with the keys $1."""
    joined = " || '\\x00'::bytea || ".join(canon.target_field_sql(c) for c in canon.compared(table))
    meta = "".join(f", {quote_ident(table.columns[i].name)}::text" for i in json_columns(table))
    key = quote_ident(_key(table))
    return f"SELECT {key}::text, {joined}{meta} FROM {qualified} WHERE {key} = ANY($1::text[])"


def source_select(table: Table) -> str:
    """Row id, raw key, canonical values, then raw metadata, over a row id range (the
    instants' shape is left to verify_canon.instant_checks, checked a page at a time)."""
    fields = ", ".join(canon.source_field_sql(c) for c in canon.compared(table))
    meta = "".join(f", {quote_ident(table.columns[i].name)}" for i in json_columns(table))
    rowid = table.rowid_sql()
    return (
        f"SELECT {rowid}, {quote_ident(_key(table))}, {fields}{meta}"
        f" FROM {quote_ident(table.name)} WHERE {rowid} BETWEEN ? AND ?"
    )


def full_range(job: FullJob) -> RangeCheck:
    """Compare one range (runs in a worker process, or in a thread of this one)."""
    return asyncio.run(_check_range(job))


async def _check_range(job: FullJob) -> RangeCheck:
    out = RangeCheck()
    conn = await connect(job.dsn)
    src = scan.open_reader(job.path, job.busy_timeout)
    try:
        await conn.execute(ref.SESSION_SETTINGS)
        rows = _Rows(job)
        lookup = target_select(job.table, job.qualified)
        cursor = src.execute(source_select(job.table), (job.lo, job.hi))
        while not out.differs and (page := cursor.fetchmany(PAGE)):
            expected = rows.expect_page(src, page, out)
            # A key holding NUL cannot be sent, nor can a target row have it (neither can one
            # that is not UTF-8: expect gives it no key).
            keys = [e[0] for e in expected if e is not None and "\x00" not in e[0]]
            found = {} if not keys else await _found(conn, lookup, keys, out)
            rows.judge_page([e for e in expected if e is not None and e[1] is not None], found, out)
    finally:
        src.close()
        await conn.close()
    return out


async def _found(
    conn: asyncpg.Connection, sql: str, keys: list[str], out: RangeCheck
) -> dict[str, asyncpg.Record]:
    records = await conn.fetch(sql, keys)
    out.claimed += len(records)
    found = {r[0]: r for r in records}
    if len(found) != len(records) or len(set(keys)) != len(keys):
        out.differs = True  # a key twice on one side
    return found


Expected = tuple[str, tuple[bytes, list[Any]] | None]


class _Rows:
    """What each source row must be in the target, and the judgement of what is there."""

    def __init__(self, job: FullJob) -> None:
        self.job = job
        self.fields = len(canon.compared(job.table))
        self.render = canon.reference_canon(job.table, zone=job.zone, strip_nul=job.strip_nul)
        self.read = ref.source_row_reader(job.table, zone=job.zone, strip_nul=job.strip_nul)
        self.json_at = json_columns(job.table)
        self.key_at = job.table.column_names.index(_key(job.table))
        self.meta = [
            _Cached(ref.source_reader(job.table.columns[i], zone=job.zone, strip_nul=job.strip_nul))
            for i in self.json_at
        ]
        self.target_meta = _Cached(_target_meta)
        self.checks = canon.instant_checks(job.table, first=2)
        self.values = operator.itemgetter(slice(2, 2 + self.fields))

    def expect_page(self, src: Any, page: list[Any], out: RangeCheck) -> list[Expected | None]:
        """``expect`` of each row of a page, the rows off the instants' canonical shape read by
        the reference; the page's plain rows (UTF-8 keys, values SQL rendered without NUL,
        metadata the reference reads, no skipped key) a column at a time, any other page row
        by row."""
        quarantined = self.job.quarantined
        if quarantined:
            held = [r for r in page if r[0] in quarantined]
            page = [r for r in page if r[0] not in quarantined]
        else:
            held = []
        slow: list[int] = []
        page = scan.shaped(page, self.checks, slow)
        out_rows = [self.expect(src, row, out) for row in held]
        out_rows += [self._referenced(src, rowid, out) for rowid in slow]
        plain = self._plain(page)
        out_rows += plain if plain is not None else [self.expect(src, row, out) for row in page]
        return out_rows

    def _plain(self, page: list[Any]) -> list[Expected | None] | None:
        """The page's expectations a column at a time, or None when a row is not plain."""
        if not page:
            return []
        try:
            keys = list(map(bytes.decode, map(_SECOND, page)))
        except (TypeError, UnicodeDecodeError):  # a number or NULL, a key not UTF-8
            return None
        if "" in keys or not self.job.skipped.isdisjoint(keys):
            return None
        texts = scan.canonical_page(map(self.values, page), self.fields)
        if texts is None:
            return None
        at = 2 + self.fields
        try:
            metas = [read.column([r[at + j] for r in page]) for j, read in enumerate(self.meta)]
        except ref.Unreadable:
            return None
        rows_meta = list(map(list, zip(*metas, strict=True))) if metas else [[]] * len(texts)
        return list(zip(keys, zip(texts, rows_meta, strict=True), strict=True))

    def _referenced(self, src: Any, rowid: int, out: RangeCheck) -> Expected | None:
        try:
            return self._by_reference(src, rowid, out)
        except ref.Unreadable:
            out.differs = True
            return None

    def expect(self, src: Any, row: tuple[Any, ...], out: RangeCheck) -> Expected | None:
        """The key to look up and the expected canonical bytes and metadata (None: the row
        is quarantined or skipped, its target row only claimed)."""
        rowid = row[0]
        try:
            text = row[1].decode("utf-8") if isinstance(row[1], bytes) else str(row[1])
        except UnicodeDecodeError:
            text = ""  # no target row can have it
        if rowid in self.job.quarantined:
            out.quarantined += 1
            return (text, None) if text else None
        fields = row[2 : 2 + self.fields]
        try:
            if (joined := scan.canonical(fields)) is None:
                return self._by_reference(src, rowid, out)
            meta = [read(v) for read, v in zip(self.meta, row[2 + self.fields :], strict=True)]
        except ref.Unreadable:
            out.differs = True
            return None
        if not text:
            out.differs = True
            return None
        if text in self.job.skipped:
            out.skipped += 1
            return text, None
        return text, (joined, meta)

    def _by_reference(self, src: Any, rowid: int, out: RangeCheck) -> Expected | None:
        found = src.execute(canon.raw_select(self.job.table), (rowid,)).fetchone()
        if found is None:
            out.differs = True  # deleted while verify ran: the merge will say
            return None
        values = self.read(found)  # raises Unreadable
        key = values[self.key_at]
        if key is None:
            out.differs = True  # a NULL key: the merge compares such rows
            return None
        if key in self.job.skipped:
            out.skipped += 1
            return str(key), None
        meta = [values[i] for i in self.json_at]
        return str(key), (self.render(found), meta)

    def judge_page(
        self, wanted: list[Expected], found: dict[str, asyncpg.Record], out: RangeCheck
    ) -> None:
        """``judge`` of each expected row, a column at a time: all matched, or differs."""
        try:
            records = list(map(found.__getitem__, map(_FIRST, wanted)))
        except KeyError:  # no target row has the key
            out.differs = True
            return
        wants = [e[1] for e in wanted if e[1] is not None]  # all of them: the caller's filter
        if list(map(_SECOND, records)) != list(map(_FIRST, wants)):
            out.differs = True
            return
        for j in range(len(self.json_at)):
            got = self.target_meta.column([r[2 + j] for r in records])
            if got != [w[1][j] for w in wants]:
                out.differs = True
                return
        out.matched += len(wanted)


def _target_meta(text: Any) -> Any:
    return ref.target_value(Kind.JSON, text)


_MISSING = object()


class _Cached:
    """``read`` remembering its answers for repeated inputs (metadata repeats a lot)."""

    def __init__(self, read: Callable[[Any], Any]) -> None:
        self.read = read
        self.seen: dict[Any, Any] = {}

    def __call__(self, raw: Any) -> Any:
        seen = self.seen
        if raw in seen:
            return seen[raw]
        value = self.read(raw)
        if len(seen) >= _CACHE_LIMIT:
            seen.clear()
        seen[raw] = value
        return value

    def column(self, raws: list[Any]) -> list[Any]:
        """The answers for a column of inputs: those remembered looked up at once, the others
        read one by one."""
        got = list(map(self.seen.get, raws, repeat(_MISSING)))
        for i, value in enumerate(got):
            if value is _MISSING:
                got[i] = self(raws[i])
        return got
