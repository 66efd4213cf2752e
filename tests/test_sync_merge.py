"""The sync plan's merge of one window (galloping over runs of equal rows) against a plain
reference: the same updates and the same rows set aside, for any source and stored digests."""

from __future__ import annotations

from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from core.schema import Column, Kind, Table
from pipeline.sync_plan import TablePlan, Window, _merge_window

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
    """Give every row a unique key (the rowid's) and a digest that covers the key."""
    return {r: (f"{k}{r}", hash((k, r, d)) % 1000) for r, (k, d) in rows.items()}


@settings(max_examples=300, deadline=None)
@given(source=rows, stored=rows, same=st.integers(0, 400))
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
