"""The live-writer law on every key shape: while a writer changes a table keyed by an untyped
column holding integers, a parent referenced through a UNIQUE non-key column, and a
self-referencing tree (inserts, updates, subtree deletes), syncs report no conflict (nobody
touches PostgreSQL) and never fail; once the writer stops, one final sync makes every table
equal to its source, with nothing left over (real PostgreSQL, real threads)."""

from __future__ import annotations

import random
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import load_settings
from flux_migrate.pipeline.sync import sync
from tests.generic_db import compare_table

DDL = """
CREATE TABLE parent (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, name TEXT);
CREATE TABLE child (id PRIMARY KEY, pcode TEXT REFERENCES parent(code) ON DELETE CASCADE,
    body TEXT);
CREATE TABLE node (id INTEGER PRIMARY KEY, up INTEGER REFERENCES node(id) ON DELETE CASCADE,
    name TEXT);
"""
TABLES = ("parent", "child", "node")

OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "parent+",
                "parent~",
                "parent-",
                "child+",
                "child~",
                "child-",
                "node+",
                "node~",
                "subtree-",
            ]
        ),  # fmt: skip
        st.integers(0, 10**6),
    ),
    min_size=5,
    max_size=40,
)


def _seed(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(DDL)
    db.execute("INSERT INTO parent VALUES (1, 'keep', 'first')")  # the source's identity
    db.executemany(
        "INSERT INTO parent VALUES (?, ?, ?)", [(i, f"c{i}", f"p{i}") for i in range(2, 12)]
    )
    db.executemany(
        "INSERT INTO child VALUES (?, ?, ?)", [(i, f"c{2 + i % 10}", f"b{i}") for i in range(60)]
    )
    db.execute("INSERT INTO node VALUES (1, NULL, 'root')")
    db.executemany(
        "INSERT INTO node VALUES (?, ?, ?)", [(i, 1 + (i - 2) // 2, f"n{i}") for i in range(2, 40)]
    )
    db.commit()
    db.close()


def _step(db: sqlite3.Connection, op: str, n: int) -> None:
    """One change as an app would make it (children deleted with their parent, a subtree
    with its root), keeping the source's own references whole."""
    pick = random.Random(n)
    parents = [r[0] for r in db.execute("SELECT code FROM parent WHERE code != 'keep'")]
    children = [r[0] for r in db.execute("SELECT id FROM child")]
    nodes = [r[0] for r in db.execute("SELECT id FROM node WHERE id != 1")]
    if op == "parent+":
        db.execute(
            "INSERT INTO parent (code, name) VALUES (?, ?)", (f"n{uuid.uuid4().hex[:8]}", "new")
        )
    elif op == "parent~" and parents:
        db.execute("UPDATE parent SET name = ? WHERE code = ?", (f"r{n}", pick.choice(parents)))
    elif op == "parent-" and parents:
        code = pick.choice(parents)
        db.execute("DELETE FROM child WHERE pcode = ?", (code,))
        db.execute("DELETE FROM parent WHERE code = ?", (code,))
    elif op == "child+" and parents:
        top = db.execute("SELECT coalesce(max(id), 0) FROM child").fetchone()[0]
        db.execute("INSERT INTO child VALUES (?, ?, 'new')", (top + 1, pick.choice(parents)))
    elif op == "child~" and children:
        db.execute("UPDATE child SET body = ? WHERE id = ?", (f"e{n}", pick.choice(children)))
    elif op == "child-" and children:
        db.execute("DELETE FROM child WHERE id = ?", (pick.choice(children),))
    elif op == "node+":
        db.execute("INSERT INTO node (up, name) VALUES (?, 'new')", (pick.choice(nodes + [1]),))
    elif op == "node~" and nodes:
        db.execute("UPDATE node SET name = ? WHERE id = ?", (f"m{n}", pick.choice(nodes)))
    elif op == "subtree-" and nodes:
        db.execute(
            "WITH RECURSIVE sub(id) AS (SELECT ? UNION SELECT node.id FROM node JOIN sub"
            " ON node.up = sub.id) DELETE FROM node WHERE id IN sub",
            (pick.choice(nodes),),
        )


@pytest.mark.anyio
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, batch=st.sampled_from([3, 50]))
async def test_syncs_during_writes_on_every_key_shape_then_a_final_one(
    pg_dsn: str, tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]], batch: int
) -> None:
    """Any sequence of app changes made while syncs run: no sync fails or reports a conflict;
    after the writes, a final sync leaves nothing waiting and every table equal."""
    path = tmp_path_factory.mktemp("shapes") / "app.sqlite"
    _seed(path)
    schema = f"s_{uuid.uuid4().hex[:8]}"
    cfg = path.parent / "c.toml"
    cfg.write_text(f'[target]\nschema = "{schema}"\n')
    s = load_settings(cfg, sqlite_path=path, postgres_dsn=pg_dsn, batch_size=batch)
    await migrate(s)
    done = threading.Event()

    def write() -> None:
        db = sqlite3.connect(path, timeout=30)
        for op, n in ops:
            _step(db, op, n)
            db.commit()
            done.wait(0.002)
        db.close()
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while not done.is_set():
            live = await sync(s)
            assert [] == live.conflicts
    finally:
        writer.join()
    final = await sync(s)
    assert ([], 0) == (final.conflicts, sum(t.deferred for t in final.tables.values()))
    for table in TABLES:
        await compare_table(path, pg_dsn, table, schema=schema)
