"""After a migration: does PostgreSQL answer every API call the way SQLite does?

For every session it compares ``get_session`` and the full ``get_history`` (timestamps as
instants, metadata as dicts), and the order ``get_sessions`` pages through. Rows the migration
quarantined (``flux_migrate.quarantine``) are expected differences, counted, not failures.

An order difference is *explained*, counted and shown but not a failure, when it comes only from
SQLite ordering timestamps as text: source rows that spell instants differently (``+05:30``,
``Z``, a space for ``T``) sort by their spelling in SQLite and by the instant in PostgreSQL. It
is explained when sorting the SQLite answer by instant (ties by id, as both backends break
them) gives exactly PostgreSQL's answer.

Values are compared by value *and type*: ``1e16`` (a float) is not ``10**16`` (an int), ``1.0``
is not ``1``. Where jsonb's normal form cannot give back what the app's class returns, the
difference is a *documented* one (docs/memory-api.md), counted and shown, not a failure:
``-0.0`` reads as ``0.0``, and an object's keys come back in jsonb's order. Any other
difference is a mismatch. The SQLite file is read the way the app's class reads it, through a
read-only connection: nothing is ever written to it (no column, no index).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from flux_migrate.core import bookkeeping
from flux_migrate.core.errors import ConfigError
from flux_migrate.core.schema import TargetNames
from flux_migrate.core.source import check_source
from flux_migrate.core.target import connect
from flux_migrate.memory.base import Memory
from flux_migrate.memory.postgres import PostgresMemory
from flux_migrate.memory.sqlite import SQLiteMemory, decode_lenient
from flux_migrate.pipeline.verify_scan import open_reader, rows_in
from flux_migrate.stages.extract import open_source

_COMPARED_SESSION_FIELDS = ("id", "title", "metadata", "created_at", "updated_at", "message_count")
_COMPARED_MESSAGE_FIELDS = ("id", "role", "content", "metadata", "created_at")


@dataclass(frozen=True)
class Mismatch:
    """One disagreement: where (``sessions/<id>``, ``messages/<id>``, ``get_sessions``), what."""

    key: str
    what: str


@dataclass
class ApiComparison:
    """Counts of what was compared, the mismatches, and the first ones found."""

    sessions_compared: int = 0
    messages_compared: int = 0
    pages_compared: int = 0
    mismatches: int = 0
    expected_differences: int = 0  # quarantined rows met while comparing
    quarantined: int = 0  # rows quarantined (unresolved) or skipped in this schema
    explained: int = 0  # order differences due only to SQLite's text order of timestamps
    documented: int = 0  # values jsonb returns in its documented canonical form
    first_mismatches: list[Mismatch] = field(default_factory=list)
    first_explained: list[Mismatch] = field(default_factory=list)
    first_documented: list[Mismatch] = field(default_factory=list)
    max_reported: int = 20

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def add(self, key: str, what: str) -> None:
        self.mismatches += 1
        if len(self.first_mismatches) < self.max_reported:
            self.first_mismatches.append(Mismatch(key, what))

    def document(self, key: str, what: str) -> None:
        self.documented += 1
        if len(self.first_documented) < self.max_reported:
            self.first_documented.append(Mismatch(key, what))

    def explain(self, key: str, what: str) -> None:
        self.explained += 1
        if len(self.first_explained) < self.max_reported:
            self.first_explained.append(Mismatch(key, what))

    def lines(self) -> list[str]:
        """The comparison for people; mentions keys and fields, never chat content."""
        out = [
            f"sessions compared: {self.sessions_compared:,}",
            f"messages compared: {self.messages_compared:,}",
            f"get_sessions pages compared: {self.pages_compared:,}",
            (
                f"quarantined or skipped (expected to differ): {self.expected_differences:,}"
                f" met, {self.quarantined:,} recorded"
            ),
            (
                f"explained order differences (SQLite orders mixed timestamp spellings as"
                f" text): {self.explained:,}"
            ),
        ]
        out += [f"  {m.key}: {m.what}" for m in self.first_explained]
        if self.explained > len(self.first_explained):
            out.append(f"  ... and {self.explained - len(self.first_explained):,} more")
        out.append(
            "documented differences (jsonb's canonical form, docs/memory-api.md):"
            f" {self.documented:,}"
        )
        out += [f"  {m.key}: {m.what}" for m in self.first_documented]
        if self.documented > len(self.first_documented):
            out.append(f"  ... and {self.documented - len(self.first_documented):,} more")
        out.append(f"mismatches: {self.mismatches:,}")
        out += [f"  {m.key}: {m.what}" for m in self.first_mismatches]
        if self.mismatches > len(self.first_mismatches):
            out.append(f"  ... and {self.mismatches - len(self.first_mismatches):,} more")
        out.append("the API answers the same on both backends" if self.ok else "MISMATCH")
        return out


async def compare_api(
    sqlite_path: str | Path,
    dsn: str,
    *,
    schema: str = "public",
    page_size: int = 50,
    names: TargetNames | None = None,
    max_reported: int = 20,
) -> ApiComparison:
    """Compare what both backends answer for every session; read-only on both sides.

    Raises SourceError when the SQLite file is missing or not the app's, TargetError when the
    PostgreSQL tables are missing, and other MigrateError subclasses when a backend cannot be
    reached. Blocks for a few queries per session.
    """
    if page_size < 1:
        raise ConfigError(f"The page size must be at least 1, not {page_size}.")
    path = Path(sqlite_path)
    async with open_source(path) as src:  # refuses a missing file or another app's database
        await check_source(src, path)
    names = names or TargetNames(schema=schema)
    result = ApiComparison(max_reported=max_reported)
    quarantined, rowids = await _quarantined_keys(dsn, names)
    result.quarantined = sum(len(keys) for keys in quarantined.values())
    for table, ids in rowids.items():  # the keys as the SQLite backend spells them too
        quarantined[table] |= await anyio.to_thread.run_sync(_keys_at, path, table, ids)
    async with (
        SQLiteMemory(path, read_only=True) as lite,
        PostgresMemory(dsn, names=names, min_size=1, max_size=2, create_tables=False) as pg,
    ):
        lite_listed = await _page_all(lite, page_size, result, "SQLite")
        pg_listed = await _page_all(pg, page_size, result, "PostgreSQL")
        differ = quarantined["sessions"]
        expected = [s for s in lite_listed.values() if s["id"] not in differ]
        actual = [
            s for s in pg_listed.values()
            if s["id"] not in differ and (HELD_BEFORE not in quarantined or s["id"] in lite_listed)
        ]  # fmt: skip
        _compare_order(expected, actual, result)
        for session_id, listed in lite_listed.items():
            await _compare_session(lite, pg, listed, pg_listed.get(session_id), quarantined, result)
    return result


HELD_BEFORE = "held before"  # a marker: the sessions table held rows before flux-migrate wrote


async def _quarantined_keys(
    dsn: str, names: TargetNames
) -> tuple[dict[str, set[str | None]], dict[str, list[int]]]:
    """The source keys whose target rows are expected to differ, by source table, as `verify`
    counts them: quarantined and not loaded since, or skipped (`--on-conflict skip` left the
    target's own row); and the row ids of the quarantined ones (a key that is not UTF-8 or
    holds NUL is kept escaped in the quarantine: see _keys_at)."""
    out: dict[str, set[str | None]] = {"sessions": set(), "messages": set()}
    rowids: dict[str, list[int]] = {"sessions": [], "messages": []}
    conn = await connect(dsn)
    try:
        if not await bookkeeping.bookkeeping_exists(conn):
            return out, rowids
        rows = await bookkeeping.quarantined_keys(conn, names.schema)
        for table in ("sessions", "messages"):
            skipped = await bookkeeping.skipped_keys(conn, names.schema, table)
            out[table].update(skipped)
        found = await bookkeeping.read_checkpoints(conn, names.schema)
        if "sessions" in found and found["sessions"].preexisting_rows:
            out[HELD_BEFORE] = set()  # sessions not from SQLite are allowed, as verify allows them
    finally:
        await conn.close()
    for r in rows:
        keys = out.setdefault(r["source_table"], set())
        keys.add(r["source_key"])
        if r["source_key"] in (None, ""):
            keys.update((None, ""))  # a row without a key: whichever way SQLite shows it
        if r["source_table"] in rowids:
            rowids[r["source_table"]].append(r["source_rowid"])
    return out, rowids


def _keys_at(path: Path, table: str, rowids: list[int]) -> set[str | None]:
    """The keys of the source rows at ``rowids`` as the SQLite backend reads them (bytes that
    are not UTF-8 replaced, NUL kept), read-only."""
    conn = open_reader(str(path))
    try:
        conn.text_factory = decode_lenient
        sql = f"SELECT id FROM {table} WHERE rowid IN ({{marks}})"  # noqa: S608 - our names
        return {row[0] for row in rows_in(conn, sql, rowids)}
    finally:
        conn.close()


PAGES_CHECKED = 10  # pages of get_sessions compared with the full order, plus the last page


async def _page_all(
    memory: Memory, page_size: int, result: ApiComparison, side: str
) -> dict[str, dict[str, Any]]:
    """Every session in ``get_sessions`` order (one call) by id, paging checked against it.

    The full order comes from one ``get_sessions`` call; the first PAGES_CHECKED pages and the
    last page must be exactly its slices. (Paging through all of them would cost a full sort
    per page: hours at 100k sessions.) Repeated ids are mismatches.
    """
    total = await memory.count_sessions()
    full = await memory.get_sessions(limit=max(total, 1), offset=0)
    order = [s["id"] for s in full]
    seen: set[str] = set()
    for key in order:
        if key in seen:
            result.add("get_sessions", f"{side} returns session {key} twice")
        seen.add(key)
    last = max(0, (len(order) - 1) // page_size * page_size)
    offsets = sorted({*range(0, min(len(order), PAGES_CHECKED * page_size), page_size), last})
    for offset in offsets:
        page = await memory.get_sessions(limit=page_size, offset=offset)
        result.pages_compared += 1
        if [s["id"] for s in page] != order[offset : offset + page_size]:
            result.add(
                "get_sessions", f"{side} page at offset {offset} disagrees with the full order"
            )
    return {s["id"]: s for s in full}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _micros(value: Any) -> int:
    """A timestamp string as integer microseconds since the epoch (naive taken as UTC)."""
    instant = _instant(value)
    if not isinstance(instant, datetime):
        raise ValueError(f"not a timestamp: {value!r}")
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return (instant - _EPOCH) // _MICROSECOND


def _by_instant(rows: list[dict[str, Any]], column: str, *, newest_first: bool) -> list[str]:
    """Ids ordered by the instant in ``column`` (ties by id), as PostgreSQL orders them;
    an empty list when a value is not a timestamp (then nothing is explained)."""
    try:
        sign = -1 if newest_first else 1
        return [r["id"] for r in sorted(rows, key=lambda r: (sign * _micros(r[column]), r["id"]))]
    except ValueError:
        return []


def _compare_order(
    expected_rows: list[dict[str, Any]], actual_rows: list[dict[str, Any]], result: ApiComparison
) -> None:
    expected = [s["id"] for s in expected_rows]
    actual = [s["id"] for s in actual_rows]
    expected_set, actual_set = set(expected), set(actual)
    for key in expected:
        if key not in actual_set:
            result.add(f"sessions/{key}", "missing in PostgreSQL")
    for key in actual:
        if key not in expected_set:
            result.add(f"sessions/{key}", "in PostgreSQL but not in SQLite")
    if expected_set == actual_set and expected != actual:
        at = next(i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b)
        if _by_instant(expected_rows, "updated_at", newest_first=True) == actual:
            result.explain(
                "get_sessions",
                f"the order differs from position {at}: SQLite orders updated_at spellings as text",
            )
        else:
            result.add("get_sessions", f"the order differs from position {at}")


def _instant(value: Any) -> Any:
    """A timestamp string as an aware datetime, so offsets do not matter; else as is."""
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return value


def _differences(
    left: dict[str, Any], right: dict[str, Any], fields: tuple[str, ...]
) -> tuple[list[str], list[str]]:
    """The fields that differ, and those that differ only by jsonb's documented canonical form
    (described). Timestamps compare as instants; everything else by value and type."""
    differ, documented = [], []
    for name in fields:
        a, b = left.get(name), right.get(name)
        if name.endswith("_at"):
            a, b = _instant(a), _instant(b)
            if a != b or type(a) is not type(b):
                differ.append(name)
            continue
        verdict = compare_values(a, b)
        if verdict is DIFFERENT:
            differ.append(name)
        elif verdict is not SAME:
            documented.append(f"{name}: {verdict}")
    return differ, documented


SAME = "same"
DIFFERENT = "different"
KEY_ORDER = "keys in jsonb's order"
NEGATIVE_ZERO = "-0.0 reads as 0.0"


def compare_values(expected: Any, actual: Any) -> str:
    """SAME, DIFFERENT, or the documented canonical difference (KEY_ORDER, NEGATIVE_ZERO) that
    alone separates ``actual`` from ``expected``: by value and type, floats by their bits."""
    if type(expected) is not type(actual):
        return DIFFERENT
    if isinstance(expected, float):
        if expected.hex() == actual.hex():
            return SAME
        return NEGATIVE_ZERO if expected == actual == 0.0 else DIFFERENT
    if isinstance(expected, dict):
        if expected.keys() != actual.keys():
            return DIFFERENT
        verdicts = {compare_values(v, actual[k]) for k, v in expected.items()}
        if list(expected) != list(actual):
            verdicts.add(KEY_ORDER)
        return _combined(verdicts)
    if isinstance(expected, list):
        if len(expected) != len(actual):
            return DIFFERENT
        return _combined({compare_values(a, b) for a, b in zip(expected, actual, strict=True)})
    return SAME if expected == actual else DIFFERENT


def _combined(verdicts: set[str]) -> str:
    if DIFFERENT in verdicts:
        return DIFFERENT
    documented = sorted(verdicts - {SAME})
    return ", ".join(documented) if documented else SAME


async def _compare_session(
    lite: SQLiteMemory,
    pg: PostgresMemory,
    listed: dict[str, Any],
    pg_listed: dict[str, Any] | None,
    quarantined: dict[str, set[str | None]],
    result: ApiComparison,
) -> None:
    session_id = listed["id"]
    mine = await lite.get_session(session_id)
    if mine is None:
        return  # deleted while comparing; nothing to compare
    count = int(listed["message_count"])
    if session_id in quarantined["sessions"]:
        result.expected_differences += 1 + count
        return
    theirs = await pg.get_session(session_id)
    if theirs is None or pg_listed is None:
        return  # already counted as missing by the paging comparison
    result.sessions_compared += 1
    history = await lite.get_history(session_id, limit=count)
    expected = [m for m in history if m["id"] not in quarantined["messages"]]
    result.expected_differences += len(history) - len(expected)
    held = int(pg_listed["message_count"])
    fetched = await pg.get_history(session_id, limit=max(held, len(expected)))
    # A quarantined message's previous version, which sync keeps, is set aside (as verify does).
    actual = [m for m in fetched if m["id"] not in quarantined["messages"]]
    mine = {**mine, "message_count": len(expected)}
    theirs = {**theirs, "message_count": held - (len(fetched) - len(actual))}
    fields, documented = _differences(mine, theirs, _COMPARED_SESSION_FIELDS)
    if fields:
        result.add(f"sessions/{session_id}", f"get_session differs in {', '.join(fields)}")
    if documented:
        result.document(f"sessions/{session_id}", "; ".join(documented))
    expected_ids, actual_ids = [m["id"] for m in expected], [m["id"] for m in actual]
    if expected_ids != actual_ids:
        if _by_instant(expected, "created_at", newest_first=False) == actual_ids:
            result.explain(
                f"sessions/{session_id}",
                "get_history order differs: SQLite orders created_at spellings as text",
            )
        else:
            result.add(
                f"sessions/{session_id}", "get_history returns other messages or another order"
            )
    by_id = {m["id"]: m for m in actual}
    for message in expected:
        other = by_id.get(message["id"])
        if other is None:
            result.add(f"messages/{message['id']}", "missing in PostgreSQL")
            continue
        result.messages_compared += 1
        fields, documented = _differences(message, other, _COMPARED_MESSAGE_FIELDS)
        if fields:
            result.add(f"messages/{message['id']}", f"get_history differs in {', '.join(fields)}")
        if documented:
            result.document(f"messages/{message['id']}", "; ".join(documented))
