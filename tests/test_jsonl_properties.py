"""The law of JSONL appends: whatever the appends and runs, every complete valid line loads once."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_migrate.core.schema import TargetNames
from flux_migrate.pipeline.jsonl_run import JsonlFile, migrate_jsonl
from flux_migrate.pipeline.settings import Settings
from tests.test_jsonl import feedback_record, line

BAD_LINES = (
    b'{"id": "\xff\xfe", "rating": 1}\n',  # not UTF-8
    b"[1, 2, 3]\n",  # not an object
    b'{"id": "half", "rating": \n',  # not JSON
    b'{"id": "00000000-0000-0000-0000-00000000beef", "rating": "very good"}\n',  # not an int
)

# A line is a valid feedback record (its number and format) or one of the bad lines.
lines = st.lists(
    st.one_of(
        st.tuples(st.just("ok"), st.integers(1, 4)),
        st.tuples(st.just("bad"), st.integers(0, len(BAD_LINES) - 1)),
    ),
    min_size=0,
    max_size=25,
)


def _content(spec: list[tuple[str, int]]) -> tuple[bytes, set[str], int]:
    """The file's bytes, the ids of its valid lines and how many lines are bad."""
    out, ids, bad = [], set(), 0
    for n, (what, arg) in enumerate(spec):
        if what == "ok":
            record = feedback_record(n, arg)
            ids.add(record["id"])
            out.append(line(record))
        else:
            out.append(BAD_LINES[arg])
            bad += 1
    return b"".join(out), ids, bad


async def _run(dsn: str, schema: str, path: Path) -> None:
    s = Settings(postgres_dsn=dsn, batch_size=3, names=TargetNames(schema=schema))
    await migrate_jsonl(s, [JsonlFile.of(path)])


async def _state(dsn: str, schema: str) -> tuple[list[str], int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        ids = [r["id"] for r in await conn.fetch(f'SELECT id FROM "{schema}".feedback')]
        quarantined = await conn.fetchval(
            "SELECT count(*) FROM flux_migrate.quarantine WHERE target_schema = $1"
            " AND resolved_at IS NULL",
            schema,
        )
        offset = await conn.fetchval(
            "SELECT last_rowid FROM flux_migrate.checkpoints WHERE target_schema = $1", schema
        )
    finally:
        await conn.close()
    return sorted(ids), quarantined, offset


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=lines, cuts=st.lists(st.floats(0, 1), max_size=4), torn_tail=st.integers(0, 30))
def test_any_appends_then_runs_load_every_complete_valid_line_exactly_once(
    tmp_path: Path, pg_dsn: str, spec: list[tuple[str, int]], cuts: list[float], torn_tail: int
) -> None:
    """Appended in pieces cut anywhere (mid-line, mid-character), with a run after each piece
    and a torn line left at the end, every complete valid line is loaded exactly once, every
    complete bad line is quarantined once, and the checkpoint stops before the torn line."""
    content, ids, bad = _content(spec)
    tail = line(feedback_record(10_000, 4))[:torn_tail] if torn_tail else b""
    whole = content + tail
    positions = sorted({int(c * len(whole)) for c in cuts} | {len(whole)})
    schema = f"p_{uuid.uuid4().hex[:10]}"
    path = tmp_path / schema / "feedback.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"")

    async def scenario() -> tuple[list[str], int, int]:
        written = 0
        for pos in positions:
            with path.open("ab") as f:
                f.write(whole[written:pos])
            written = pos
            await _run(pg_dsn, schema, path)
        await _run(pg_dsn, schema, path)  # a rerun changes nothing
        return await _state(pg_dsn, schema)

    assert (sorted(ids), bad, len(content)) == anyio.run(scenario, backend="asyncio")
