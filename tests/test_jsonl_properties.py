"""The law of JSONL appends: whatever the appends and runs, every complete valid line loads once."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_migrate.core.schema import TargetNames
from flux_migrate.pipeline.jsonl_run import JsonlFile, migrate_jsonl
from flux_migrate.pipeline.jsonl_verify import verify_jsonl
from flux_migrate.pipeline.settings import Settings
from tests.support import start_cli
from tests.test_jsonl import correction, feedback_record, line

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


# ---------------------------------------------------------------- appends, rewrites, kills

Op = tuple[str, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 8)),
        st.tuples(st.just("torn"), st.integers(1, 40)),
        st.tuples(st.just("bad"), st.just(0)),
        st.tuples(st.just("rewrite"), st.integers(0, 2**16)),
        st.tuples(st.just("run"), st.just(0)),
        st.tuples(st.just("kill"), st.integers(1, 4)),
    ),
    min_size=1,
    max_size=7,
)


class FileModel:
    """What the corrections file holds: its complete lines (valid records by id, bad lines
    with an id) and a torn tail the app is still writing."""

    def __init__(self, path: Path) -> None:
        self.path, self.next = path, 0
        self.lines: list[tuple[str, str, bytes]] = []  # (kind, id, line)
        self.tail = b""
        self.pending = b""  # the rest of the torn line

    def _new(self, status: str = "pending") -> tuple[str, bytes]:
        self.next += 1
        return f"c{self.next}", line(correction(self.next, status))

    def _finish_tail(self, f: Any) -> None:
        if self.tail:
            f.write(self.pending)
            record = json.loads(self.tail + self.pending)
            self.lines.append(("ok", record["id"], self.tail + self.pending))
            self.tail = self.pending = b""

    def append(self, count: int) -> None:
        with self.path.open("ab") as f:
            self._finish_tail(f)
            for _ in range(count):
                key, raw = self._new()
                self.lines.append(("ok", key, raw))
                f.write(raw)

    def bad(self) -> None:
        with self.path.open("ab") as f:
            self._finish_tail(f)
            self.next += 1
            raw = line({"id": f"c{self.next}", "status": 5})  # status is text: type_mismatch
            self.lines.append(("bad", f"c{self.next}", raw))
            f.write(raw)

    def torn(self, cut: int) -> None:
        with self.path.open("ab") as f:
            self._finish_tail(f)
            _, raw = self._new()
            cut = min(cut, len(raw) - 1)
            self.tail, self.pending = raw[:cut], raw[cut:]
            f.write(self.tail)

    def rewrite(self, seed: int) -> None:
        """Keep some records, review some, drop the torn tail (the app rewrites whole lines)."""
        kept = []
        for n, (kind, key, old) in enumerate(self.lines):
            if (seed >> (n % 16)) & 1 and n % 3 == 0:
                continue  # dropped
            reviewed = kind == "ok" and (seed >> ((n + 5) % 16)) & 1
            raw = line(correction(int(key[1:]), "approved", reviewed_by="lee")) if reviewed else old
            kept.append((kind, key, raw))
        self.lines, self.tail, self.pending = kept, b"", b""
        self.path.write_bytes(b"".join(raw for _, _, raw in kept))

    def expected(self) -> tuple[dict[str, str], set[str], int]:
        valid = {key: json.loads(raw)["status"] for kind, key, raw in self.lines if kind == "ok"}
        bad = {key for kind, key, _ in self.lines if kind == "bad"}
        return valid, bad, len(bad)


def _kill_run(args: list[str], batches: int) -> None:
    """Start a run and SIGKILL it after ``batches`` committed batches (or let it finish)."""
    proc = start_cli(*args)
    assert proc.stderr is not None
    try:
        seen = 0
        for raw in proc.stderr:
            if '"batch_loaded"' in raw:
                seen += 1
                if seen >= batches:
                    proc.send_signal(signal.SIGKILL)
                    break
    finally:
        proc.wait(timeout=60)


async def _table_state(dsn: str, table: str) -> tuple[dict[str, str], int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f'SELECT id, status FROM public."{table}"')
        quarantined = await conn.fetchval(
            "SELECT count(*) FROM flux_migrate.quarantine WHERE source_table = $1"
            " AND resolved_at IS NULL",
            table,
        )
    finally:
        await conn.close()
    return {r["id"]: r["status"] for r in rows}, quarantined


@pytest.mark.slow
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=ops)
def test_appends_rewrites_torn_lines_and_kills_leave_the_table_equal_to_the_file(
    tmp_path: Path, pg_dsn: str, script: list[Op]
) -> None:
    """Whatever appends, rewrites, torn lines, bad lines, SIGKILLed runs and reruns come in
    any order, after every clean rerun the snapshot table holds exactly the file's valid
    records with their values, plus at most the old rows of records whose new line is
    quarantined, and the quarantine holds exactly the file's bad lines."""
    table = f"c_{uuid.uuid4().hex[:10]}"
    folder = tmp_path / table
    folder.mkdir()
    path = folder / "corrections.jsonl"
    path.write_bytes(b"")
    config = folder / "flux.toml"
    config.write_text(f'[jsonl.corrections]\ntable = "{table}"\nsnapshot = true\n')
    model = FileModel(path)
    jf = JsonlFile(path, table, snapshot=True)
    args = ["run", "--config", str(config), "--jsonl", str(path), "--postgres-dsn", pg_dsn]
    args += ["--batch-size", "2", "--log-format", "json", "--no-progress"]

    async def clean_run_and_check() -> None:
        s = Settings(postgres_dsn=pg_dsn, batch_size=3)
        await migrate_jsonl(s, [jf])
        valid, bad_ids, bad = model.expected()
        rows, quarantined = await _table_state(pg_dsn, table)
        assert valid == {k: v for k, v in rows.items() if k in valid}
        assert set(valid) <= set(rows) <= set(valid) | bad_ids
        assert bad == quarantined

    for op, arg in script:
        if op == "append":
            model.append(arg)
        elif op == "torn":
            model.torn(arg)
        elif op == "bad":
            model.bad()
        elif op == "rewrite":
            model.rewrite(arg)
        elif op == "kill":
            _kill_run(args, arg)
        else:
            anyio.run(clean_run_and_check, backend="asyncio")
    anyio.run(clean_run_and_check, backend="asyncio")


# ---------------------------------------------------------------- types do not depend on batches

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["2024-05-01T10:00:00", "2024-05-01T10:00:00+05:30", "lee", "", "1"]),
    st.lists(st.integers(0, 3), max_size=2),
)
records = st.lists(
    st.dictionaries(st.sampled_from(["a", "b", "c"]), values, max_size=3), min_size=1, max_size=12
)


async def _load_and_describe(dsn: str, schema: str, path: Path, batch_size: int) -> Any:
    s = Settings(postgres_dsn=dsn, batch_size=batch_size, names=TargetNames(schema=schema))
    report, _ = await migrate_jsonl(s, [JsonlFile.of(path)])
    conn = await asyncpg.connect(dsn)
    try:
        types = await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = $1 ORDER BY column_name",
            schema,
        )
        rows = await conn.fetch(f'SELECT to_jsonb(t)::text AS r FROM "{schema}".things t')
        quarantined = await conn.fetch(
            "SELECT source_rowid, reason FROM flux_migrate.quarantine WHERE target_schema = $1"
            " ORDER BY 1",
            schema,
        )
    finally:
        await conn.close()
    (verified,) = await verify_jsonl(
        Settings(postgres_dsn=dsn, names=TargetNames(schema=schema), jsonl=(JsonlFile.of(path),))
    )
    return (
        [tuple(t) for t in types],
        sorted(r["r"] for r in rows),
        [tuple(q) for q in quarantined],
        report.tables["things"].loaded + report.tables["things"].quarantined,
        verified.ok,
    )


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=records, small=st.integers(1, 3))
def test_types_rows_and_quarantine_do_not_depend_on_the_batch_size(
    tmp_path: Path, pg_dsn: str, batch: list[dict[str, Any]], small: int
) -> None:
    """A file without a profile gives the same column types, rows and quarantine whatever the
    batch size, every line is loaded or quarantined, and verify agrees."""
    name = uuid.uuid4().hex[:10]
    path = tmp_path / name / "things.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"".join(line(r) for r in batch))

    async def both() -> tuple[Any, Any]:
        one = await _load_and_describe(pg_dsn, f"s_{name}", path, small)
        many = await _load_and_describe(pg_dsn, f"m_{name}", path, 100)
        return one, many

    one, many = anyio.run(both, backend="asyncio")
    assert one == many
    assert (len(batch), True) == (one[3], one[4])
