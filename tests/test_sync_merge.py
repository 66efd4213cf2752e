"""The sync plan's merge of one window (galloping over runs of equal rows) against a plain
reference: the same updates and the same rows set aside, for any source and stored digests."""

from __future__ import annotations

from array import array
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flux_migrate.core.bookkeeping import Pack
from flux_migrate.core.schema import Column, Kind, Table
from flux_migrate.pipeline import sync_plan
from flux_migrate.pipeline.sync_plan import TablePlan, Window, _merge_window, assemble_window

TABLE = Table("t", (Column("id", Kind.TEXT),))

rows = st.dictionaries(
    st.integers(1, 400),
    st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 3)),  # key suffix, digest
    max_size=300,
)


def _reference(
    source: dict[int, tuple[str, int]], stored: dict[int, tuple[str, int]]
) -> tuple[set[int], dict[str, int], dict[str, int]]:
    updates, src_odd, stored_odd = set(), {}, {}
    for rowid, (key, digest) in source.items():
        old = stored.get(rowid)
        if old == (key, digest):
            continue
        if old is not None and old[0] == key:
            updates.add(rowid)
        else:
            src_odd[key] = rowid
            if old is not None:
                stored_odd[old[0]] = rowid
    for rowid, (key, _digest) in stored.items():
        if rowid not in source:
            stored_odd[key] = rowid
    return updates, src_odd, stored_odd


def _keyed(rows: dict[int, tuple[str, int]]) -> dict[int, tuple[str, int]]:
    """Give every row a unique key (the rowid's) and a digest that covers the key: one
    digest per (key, digest) pair, as a real digest is (``hash() % 1000`` collided about once
    in a thousand pairs, under a hash seed that changes per run: a flaky test)."""
    return {r: (f"{k}{r}", (ord(k) * 401 + r) * 4 + d) for r, (k, d) in rows.items()}


@settings(max_examples=300, deadline=None)
@given(source=rows, stored=rows, same=st.integers(0, 400))
@example(source={400: ("d", 2)}, stored={400: ("g", 3)}, same=0)  # two keys, one rowid
def test_merge_matches_the_reference(
    source: dict[int, tuple[str, int]], stored: dict[int, tuple[str, int]], same: int
) -> None:
    stored = {**stored, **{r: v for r, v in source.items() if r <= same}}  # long equal runs
    src, old = _keyed(source), _keyed(stored)
    window = Window()
    ordered = sorted(old)
    window.add(ordered, [old[r][1] for r in ordered], [old[r][0] for r in ordered], "x")
    rowids = sorted(src)
    plan = TablePlan(TABLE)
    src_odd: dict[str, tuple[int, int]] = {}
    stored_odd: dict[str, tuple[int, int, str | None]] = {}
    _merge_window(
        array("q", rowids),
        array("q", [src[r][1] for r in rowids]),
        [src[r][0] for r in rowids],
        window,
        plan,
        src_odd,
        stored_odd,
    )
    updates, want_src, want_stored = _reference(src, old)
    assert updates == set(plan.updates)
    assert want_src == {k: v[0] for k, v in src_odd.items()}
    assert want_stored == {k: v[0] for k, v in stored_odd.items()}
    assert {old[r][0] for r in updates} == set(plan.known)


def _pack(pair: str, entries: list[tuple[int, str, int]]) -> Pack:
    entries = sorted(entries)
    return Pack(
        pair,
        entries[0][0],
        entries[-1][0],
        array("q", [r for r, _, _ in entries]),
        [k for _, k, _ in entries],
        array("q", [d for _, _, d in entries]),
    )


packs_of = st.lists(
    st.dictionaries(
        st.integers(1, 300), st.tuples(st.sampled_from("abcdefghij"), st.integers(0, 9)), min_size=1
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(
    packs=packs_of,
    bounds=st.tuples(st.integers(0, 300), st.integers(0, 300)),
    overridden=st.sets(st.sampled_from("abcdefghij")),
    many=st.booleans(),
    few=st.sampled_from([0, 64]),
)
def test_window_assembly_matches_the_reference(
    packs: list[dict[int, tuple[str, int]]],
    bounds: tuple[int, int],
    overridden: set[str],
    many: bool,
    few: int,
) -> None:
    """Pack entries in range whose key has no override, the newest of a key when packs
    overlap, plus the live overrides in range: in rowid order, pack entries before an override
    at the same rowid; the same through the one-by-one and the one-pass paths."""
    after, high = min(bounds), max(bounds)
    built = []
    for n, entries in enumerate(packs):  # keys unique within a pack, as a batch's are
        seen: dict[str, tuple[int, str, int]] = {}
        for rowid, (key, digest) in entries.items():
            seen.setdefault(key, (rowid, key, digest))
        built.append(_pack(f"x{n}", list(seen.values())))
    live = sorted(((3 * i, key, i) for i, key in enumerate(sorted(overridden))), key=lambda e: e[0])
    if many:  # more live overrides than the one-by-one path takes
        live = sorted(live + [(r, f"z{r}", r) for r in range(0, 300, 4)], key=lambda e: e[0])
    was, sync_plan._FEW = sync_plan._FEW, few  # 0: every override through the one-pass paths
    try:
        window = assemble_window(built, after, high, overridden | {e[1] for e in live}, live)
    finally:
        sync_plan._FEW = was

    want: list[tuple[int, str, int, str | None]] = []
    overlap, last = False, None
    for pack in built:
        part = [
            (r, k, d, pack.pair)
            for r, k, d in zip(pack.rowids, pack.keys, pack.digests, strict=True)
            if after < r <= high and k not in overridden and not k.startswith("z")
        ]
        if part and last is not None and part[0][0] <= last:
            overlap = True
        if part:
            last = part[-1][0]
        want += part
    if overlap:
        newest = {e[1]: i for i, e in enumerate(want)}
        want = [e for i, e in enumerate(want) if newest[e[1]] == i]
    want.sort(key=lambda e: e[0])
    want += [(*e, None) for e in live if after < e[0] <= high]
    want.sort(key=lambda e: e[0])
    got = list(zip(window.rowids, window.keys, window.digests, window.pairs, strict=True))
    assert want == got


@pytest.mark.anyio
async def test_ranges_asked_ahead_are_each_tables_own_and_a_failure_is_the_plans(
    tmp_path: Path,
) -> None:
    """The ranges a round asks for ahead are, table by table, those its plan would ask for
    itself (every rowid in one range, no range empty of ids); a table the source cannot
    count raises its own error where its plan asks, the others are unaffected; the scan's
    processes are started for a table of several ranges before its turn; close cancels."""
    import sqlite3

    import aiosqlite

    from flux_migrate.pipeline.sync_scan import ScanPool

    path = tmp_path / "s.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE big (id TEXT PRIMARY KEY)")
    db.execute("CREATE TABLE small (id TEXT PRIMARY KEY)")
    db.execute("CREATE TABLE empty (id TEXT PRIMARY KEY)")
    db.executemany("INSERT INTO big VALUES (?)", [(str(i),) for i in range(250)])
    db.executemany("INSERT INTO small VALUES (?)", [(str(i),) for i in range(7)])
    db.commit()
    db.close()
    tables = [Table(n, (Column("id", Kind.TEXT),)) for n in ("small", "gone", "big", "empty")]
    scanners = ScanPool()
    held = sync_plan.CHUNK
    sync_plan.CHUNK = 100
    try:
        async with aiosqlite.connect(path) as src:
            ahead = sync_plan.RangesAhead(src, tables, scanners, path=path, busy_timeout=5.0)
            try:
                for table in tables:
                    if table.name == "gone":
                        with pytest.raises(sqlite3.OperationalError, match="no such table"):
                            await ahead.of(table)
                        continue
                    mine = await sync_plan._ranges(src, table, sync_plan.CHUNK)
                    assert await ahead.of(table) == mine
                assert (await ahead.of(tables[2]))[0] == 250
                assert len((await ahead.of(tables[2]))[1]) == 3
                assert scanners._pool is not None  # started for "big", before its scan
            finally:
                ahead.close()
                ahead.close()  # twice: nothing left to cancel, no error
    finally:
        sync_plan.CHUNK = held
        scanners.close()


@pytest.mark.anyio
async def test_the_first_table_needing_processes_is_read_from_the_rounds_start(
    tmp_path: Path,
) -> None:
    """The first table of several ranges has its first WORKERS ranges read by the processes
    from the round's start, each exactly what scan_range reads of that range; they are handed
    over once, and its scan yields them rather than reading them again; a table of one range
    and the tables after the first are not read ahead; close drops what was not handed over."""
    import asyncio
    import sqlite3

    import aiosqlite

    from flux_migrate.pipeline.sync_scan import WORKERS, ScanPool, scan_range

    path = tmp_path / "s.sqlite"
    db = sqlite3.connect(path)
    for name, rows in (("small", 7), ("big", 250), ("later", 250)):
        db.execute(f"CREATE TABLE {name} (id TEXT PRIMARY KEY, n INTEGER)")
        db.executemany(f"INSERT INTO {name} VALUES (?, ?)", [(f"k{i}", i) for i in range(rows)])
    db.commit()
    db.close()
    columns = (Column("id", Kind.KEY), Column("n", Kind.INTEGER))
    small, big, later = (Table(n, columns, ("id",)) for n in ("small", "big", "later"))
    args = {t.name: sync_plan.scan_args(t, path, 5.0) for t in (small, big, later)}
    scanners = ScanPool()
    held = sync_plan.CHUNK
    sync_plan.CHUNK = 100
    try:
        async with aiosqlite.connect(path) as src:
            ahead = sync_plan.RangesAhead(
                src, [small, big, later], scanners, path=path, busy_timeout=5.0
            )
            try:
                _, ranges = await ahead.of(big)
                started = ahead.started(big)
                assert sorted(started) == list(range(WORKERS))
                for k, job in started.items():
                    uri, sql, ncols, at, timeout = args["big"]
                    lo, hi = ranges[k]
                    assert await job == scan_range(uri, sql, lo, hi, ncols, at, timeout)
                assert ahead.started(big) == {}  # handed over once
                await ahead.of(later)
                assert ahead.started(later) == {}  # only the first table is read ahead
                assert ahead.started(small) == {}  # one range: read in a thread at its turn
            finally:
                ahead.close()
            dropped = sync_plan.RangesAhead(src, [big], scanners, path=path, busy_timeout=5.0)
            await dropped.of(big)
            dropped.close()  # its jobs never handed over: dropped, nothing reported
            assert dropped.started(big) == {}
            # the scan takes a handed job as that range's result, without reading it again
            handed = asyncio.get_running_loop().create_future()
            handed.set_result((array("q", [-5]).tobytes(), array("q", [-6]).tobytes(), b"mark"))
            scan = sync_plan._scanned(ranges, args["big"], scanners, {0: handed})
            seen = [item async for item in scan]
            assert seen[0] == (0, (array("q", [-5]), array("q", [-6]), ["mark"]))
            assert [n for n, _ in seen] == list(range(len(ranges)))
            first = ranges[0][1] - ranges[0][0] + 1
            assert sum(len(rowids) for _, (rowids, _, _) in seen[1:]) == 250 - first  # the rest
    finally:
        sync_plan.CHUNK = held
        scanners.close()
