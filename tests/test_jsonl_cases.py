"""Issue 19, case by case: every JSONL line arrives or is accounted for, types come from real
values, a reconcile never deletes what the file still holds (real PostgreSQL)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from flux_migrate.core.errors import Interrupted, RuntimeFailure, TargetError
from flux_migrate.pipeline.jsonl_run import JsonlFile, JsonlOutcome, migrate_jsonl
from flux_migrate.pipeline.jsonl_verify import verify_jsonl
from flux_migrate.pipeline.report import RunReport
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import Settings
from flux_migrate.pipeline.stop import StopFlag
from flux_migrate.pipeline.verify import TableVerify
from tests.support import cli, fetchval
from tests.test_jsonl import correction, feedback_record, line

pytestmark = pytest.mark.anyio


async def run(
    dsn: str, jf: JsonlFile, *, batch_size: int = 100, final: bool = False, stop: Any = None
) -> tuple[RunReport, dict[str, JsonlOutcome]]:
    settings = Settings(postgres_dsn=dsn, batch_size=batch_size, jsonl_final=final)
    return await migrate_jsonl(settings, [jf], stop=stop)


async def verify(dsn: str, jf: JsonlFile) -> TableVerify:
    (result,) = await verify_jsonl(Settings(postgres_dsn=dsn, jsonl=(jf,)))
    return result


async def quarantine(dsn: str) -> list[tuple[int, str | None, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetch(
            "SELECT source_rowid, source_key, reason FROM flux_migrate.quarantine"
            " WHERE resolved_at IS NULL ORDER BY source_rowid"
        )
    finally:
        await conn.close()
    return [(r["source_rowid"], r["source_key"], r["reason"]) for r in found]


async def column_types(dsn: str, table: str) -> dict[str, str]:
    found = await fetchval(
        dsn,
        "SELECT json_object_agg(column_name, data_type) FROM information_schema.columns"
        " WHERE table_name = $1",
        table,
    )
    return dict(json.loads(found))


class StopAfter(StopFlag):
    """A stop requested once ``batches`` batches have committed (a stop at a batch boundary,
    which leaves the target as a kill between two batches does)."""

    def __init__(self, batches: int) -> None:
        super().__init__()
        self.left = batches

    def __call__(self) -> bool:
        self.left -= 1
        if self.left <= 0:
            self.request(15)
        return super().__call__()


# ---------------------------------------------------------------- 1: reconcile and appends


@pytest.mark.parametrize("snapshot", [True, False])
async def test_records_appended_during_an_interrupted_reconcile_are_kept(
    tmp_path: Path, pg_dsn: str, snapshot: bool
) -> None:
    """The file is rewritten, the reconcile is interrupted, the app appends 50 records: the
    rerun keeps all 50, deletes (snapshot) or keeps only the record gone, and later runs and
    verify agree."""
    path = tmp_path / "corrections.jsonl"
    jf = JsonlFile.of(path, snapshot=snapshot)
    path.write_bytes(b"".join(line(correction(n)) for n in range(200)))
    await run(pg_dsn, jf, batch_size=20)
    path.write_bytes(b"".join(line(correction(n, "approved")) for n in range(1, 200)))
    with pytest.raises(Interrupted):
        await run(pg_dsn, jf, batch_size=20, stop=StopAfter(3))
    with path.open("ab") as f:
        f.write(b"".join(line(correction(n)) for n in range(200, 250)))
    _, outcomes = await run(pg_dsn, jf, batch_size=20)
    o = outcomes["corrections"]
    assert (1, ["c0"], 1 if snapshot else 0) == (o.gone, o.gone_sample, o.deleted)
    ids = set(await fetchval(pg_dsn, "SELECT array_agg(id) FROM corrections"))
    expected = {f"c{n}" for n in range(1, 250)} | (set() if snapshot else {"c0"})
    assert expected == ids
    deleted = await fetchval(
        pg_dsn,
        "SELECT array_agg(source_key || ':' || (raw->'row'->>'status'))"
        " FROM flux_migrate.quarantine WHERE reason = 'gone_from_file'"
        " AND resolution = 'deleted (snapshot)'",
    )
    assert (["c0:pending"] if snapshot else None) == deleted
    again, _ = await run(pg_dsn, jf, batch_size=20)
    assert "completed" == again.status
    result = await verify(pg_dsn, jf)
    assert (249, True) == (result.matched, result.ok)


async def test_a_snapshot_keeps_a_record_whose_new_line_is_quarantined(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A rewrite whose new version of a record is quarantined (type mismatch) does not delete
    the record's row as gone; a line whose id cannot be read stops the snapshot's deletes."""
    path = tmp_path / "corrections.jsonl"
    jf = JsonlFile.of(path, snapshot=True)
    path.write_bytes(b"".join(line(correction(n)) for n in range(4)))
    await run(pg_dsn, jf)
    bad = correction(1, reviewed_at="not a time")
    path.write_bytes(line(correction(0)) + line(bad) + line(correction(3)))
    _, outcomes = await run(pg_dsn, jf)
    assert (1, 1) == (outcomes["corrections"].gone, outcomes["corrections"].deleted)
    ids = await fetchval(pg_dsn, "SELECT array_agg(id ORDER BY id) FROM corrections")
    assert ["c0", "c1", "c3"] == ids
    path.write_bytes(line(correction(0)) + b'{"id": "c3", torn\n')
    _, outcomes = await run(pg_dsn, jf)
    assert (2, 0, True) == (
        outcomes["corrections"].gone,
        outcomes["corrections"].deleted,
        outcomes["corrections"].kept_unsure,
    )


@pytest.mark.parametrize("snapshot", [True, False])
async def test_a_rewrite_of_a_file_repeating_an_id_in_one_batch_reconciles(
    tmp_path: Path, pg_dsn: str, snapshot: bool
) -> None:
    """A rewritten file whose batch holds an id on several lines (the later ones quarantined
    as duplicates) reconciles, and so does the run after it: the reconcile records each id it
    met once (it failed with PostgreSQL's 21000 on every rerun, the file stuck)."""
    path = tmp_path / "corrections.jsonl"
    jf = JsonlFile.of(path, snapshot=snapshot)
    repeats = [correction(1), correction(0, "b"), correction(0, "c")]
    path.write_bytes(b"".join(line(r) for r in [correction(0, "a"), *repeats]))
    await run(pg_dsn, jf)
    path.write_bytes(b"".join(line(r) for r in [correction(0, "z"), *repeats]))
    for _ in range(2):
        report, _ = await run(pg_dsn, jf)
        assert "completed" == report.status
    rows = await fetchval(pg_dsn, "SELECT json_object_agg(id, status ORDER BY id) FROM corrections")
    assert {"c0": "z", "c1": "pending"} == json.loads(rows)
    found = await quarantine(pg_dsn)
    assert [("c0", "duplicate_key")] * 2 == [(key, reason) for _, key, reason in found]


# ---------------------------------------------------------------- 2: long lines


async def test_a_line_over_16_mib_loads_and_the_lines_after_it_too(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A 17 MiB line loads like any other, the lines after it and later appends too; verify
    (which has no cap) agrees."""
    path = tmp_path / "notes.jsonl"
    jf = JsonlFile.of(path)
    big = {"id": "big", "text": "x" * (17 * 1024 * 1024)}
    path.write_bytes(line({"id": "a", "text": "1"}) + line(big) + line({"id": "b", "text": "2"}))
    await run(pg_dsn, jf)
    with path.open("ab") as f:
        f.write(line({"id": "c", "text": "3"}))
    await run(pg_dsn, jf)
    lengths = await fetchval(pg_dsn, "SELECT json_object_agg(id, length(text)) FROM notes")
    assert {"a": 1, "big": 17 * 1024 * 1024, "b": 1, "c": 1} == json.loads(lengths)
    result = await verify(pg_dsn, jf)
    assert (4, True) == (result.matched, result.ok)


async def test_a_line_over_the_line_limit_is_quarantined_with_its_offset(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line longer than MAX_LINE_BYTES is quarantined as line_too_long at its offset (its
    first bytes kept), and every line after it loads."""
    monkeypatch.setattr("flux_migrate.stages.jsonl.MAX_LINE_BYTES", 1024 * 1024)
    monkeypatch.setattr("flux_migrate.stages.jsonl.MAX_BATCH_BYTES", 256 * 1024)
    path = tmp_path / "notes.jsonl"
    jf = JsonlFile.of(path)
    first = line({"id": "a", "text": "1"})
    path.write_bytes(first + line({"id": "big", "text": "x" * 3_000_000}) + line({"id": "b"}))
    report, _ = await run(pg_dsn, jf)
    assert (2, 1) == (report.tables["notes"].loaded, report.tables["notes"].quarantined)
    assert [(len(first), None, "line_too_long")] == await quarantine(pg_dsn)
    kept = await fetchval(pg_dsn, "SELECT length(raw->>'line') FROM flux_migrate.quarantine")
    assert 64 * 1024 == kept
    assert (await verify(pg_dsn, jf)).ok


# ---------------------------------------------------------------- 3: ids that look like dates


async def test_ids_that_look_like_timestamps_stay_text_and_reconcile(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Ids shaped like ISO date-times (or numbers) are text: a rewritten snapshot deletes
    nothing it still holds, and reruns succeed."""
    path = tmp_path / "events.jsonl"
    jf = JsonlFile.of(path, snapshot=True)
    records = [{"id": f"2024-05-01T10:00:0{n}", "n": n} for n in range(4)] + [{"id": 7, "n": 7}]
    path.write_bytes(b"".join(line(r) for r in records))
    await run(pg_dsn, jf)
    assert "text" == (await column_types(pg_dsn, "events"))["id"]
    records[1]["n"] = 100
    path.write_bytes(b"".join(line(r) for r in records))
    _, outcomes = await run(pg_dsn, jf)
    assert (0, 0, 1) == (
        outcomes["events"].gone,
        outcomes["events"].deleted,
        outcomes["events"].updated,
    )
    ids = await fetchval(pg_dsn, "SELECT array_agg(id ORDER BY id) FROM events")
    assert sorted(str(r["id"]) for r in records) == ids
    again, _ = await run(pg_dsn, jf)
    assert "completed" == again.status
    assert (await verify(pg_dsn, jf)).ok


# ---------------------------------------------------------------- 5: last line without newline


async def test_a_last_line_without_newline_waits_is_said_and_final_takes_it(
    tmp_path: Path, pg_dsn: str
) -> None:
    """The last record without its newline is not loaded but said (run's note, verify's
    missing count); run --final loads it and verify is then ok."""
    path = tmp_path / "feedback.jsonl"
    jf = JsonlFile.of(path)
    last = feedback_record(2, 4)
    path.write_bytes(line(feedback_record(1, 4)) + line(last).rstrip(b"\n"))
    report, outcomes = await run(pg_dsn, jf)
    assert 1 == report.tables["feedback"].loaded
    assert outcomes["feedback"].waiting is not None
    assert any("has no newline yet" in n for n in report.notes)
    waiting = await verify(pg_dsn, jf)
    assert (1, 1, False) == (waiting.matched, waiting.missing, waiting.ok)
    report, _ = await run(pg_dsn, jf, final=True)
    assert 1 == report.tables["feedback"].loaded
    done = await verify(pg_dsn, jf)
    assert (2, 0, True) == (done.matched, done.missing, done.ok)


# ---------------------------------------------------------------- 6: no valid first batch


@pytest.mark.parametrize("batch_size", [1, 2, 100])
async def test_a_file_whose_first_lines_are_all_bad_still_loads_the_rest(
    tmp_path: Path, pg_dsn: str, batch_size: int
) -> None:
    """Bad lines first (no valid object in the first batch): the table is made, the bad lines
    quarantined, the later records loaded."""
    path = tmp_path / "audit_trail.jsonl"
    jf = JsonlFile.of(path)
    good = [{"id": f"r{n}", "n": n} for n in range(3)]
    path.write_bytes(b'not json\n[1]\n"x"\n' + b"".join(line(r) for r in good))
    report, _ = await run(pg_dsn, jf, batch_size=batch_size)
    assert (3, 3) == (report.tables["audit_trail"].loaded, report.tables["audit_trail"].quarantined)
    assert {"r0": 0, "r1": 1, "r2": 2} == json.loads(
        await fetchval(pg_dsn, "SELECT json_object_agg(id, n) FROM audit_trail")
    )


# ---------------------------------------------------------------- 7: types from real values


async def test_corrections_before_any_review_type_reviewed_by_as_text(
    tmp_path: Path, pg_dsn: str
) -> None:
    """corrections.jsonl whose first lines hold reviewed_by/reviewed_at null: text and
    timestamptz all the same, so a later review is queryable as text."""
    path = tmp_path / "corrections.jsonl"
    jf = JsonlFile.of(path)
    path.write_bytes(b"".join(line(correction(n)) for n in range(3)))
    await run(pg_dsn, jf, batch_size=2)
    with path.open("ab") as f:
        f.write(
            line(correction(3, "approved", reviewed_by="lee", reviewed_at="2024-06-02T09:00:00"))
        )
    await run(pg_dsn, jf, batch_size=2)
    types = await column_types(pg_dsn, "corrections")
    assert ("text", "timestamp with time zone") == (types["reviewed_by"], types["reviewed_at"])
    assert "c3" == await fetchval(pg_dsn, "SELECT id FROM corrections WHERE reviewed_by = 'lee'")


MIXED = [
    {"id": "a", "later": None, "n": 1, "t": "2024-01-01T00:00:00"},
    {"id": "b", "later": None, "n": None, "t": "2024-01-02T00:00:00"},
    {"id": "c", "later": "lee", "n": 2.5, "t": "tomorrow"},
    {"id": "d", "later": "kim", "n": 3, "flag": True, "t": None},
]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 100])
async def test_column_types_do_not_depend_on_the_batch_size(
    tmp_path: Path, pg_dsn: str, batch_size: int
) -> None:
    """For a file without a profile, each key's type comes from its values in the file, not
    from the batch it first appears in; a key null so far waits (no jsonb column)."""
    path = tmp_path / "audit_trail.jsonl"
    path.write_bytes(b"".join(line(r) for r in MIXED))
    report, _ = await run(pg_dsn, JsonlFile.of(path), batch_size=batch_size)
    assert 4 == report.tables["audit_trail"].loaded
    assert {
        "id": "text",
        "later": "text",
        "n": "double precision",
        "t": "text",
        "flag": "boolean",
    } == await column_types(pg_dsn, "audit_trail")


async def test_a_key_null_until_a_later_run_gets_its_type_then(tmp_path: Path, pg_dsn: str) -> None:
    """A key holding only nulls is not a column yet; its first values, in a later run, type it."""
    path = tmp_path / "audit_trail.jsonl"
    jf = JsonlFile.of(path)
    path.write_bytes(line({"id": "a", "who": None}))
    await run(pg_dsn, jf)
    assert {"id": "text"} == await column_types(pg_dsn, "audit_trail")
    with path.open("ab") as f:
        f.write(line({"id": "b", "who": "lee"}))
    await run(pg_dsn, jf)
    assert "b" == await fetchval(pg_dsn, "SELECT id FROM audit_trail WHERE who = 'lee'")
    assert (await verify(pg_dsn, jf)).ok


# ---------------------------------------------------------------- 8, 9, 10, 11: values

EXACT = [
    b'{"id": "a", "v": 0.1000000000000000055511151231257827}',
    b'{"id": "b", "v": [1e-400, 12345678901234567.5]}',
    b'{"id": "c", "v": {"x": 123456789012345678901234567890, "y": 1e300}}',
    b'{"id": "d", "v": 1e16}',
    b'{"id": "e", "v": [10000000000000000.0, -0.0, 1E+2]}',
]


async def test_jsonb_keeps_the_files_exact_numbers_and_verify_agrees(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Numbers in jsonb are the file's digits (as PostgreSQL parses the same text), and verify
    neither crashes on big integers and 1e300 nor calls 1e16 different."""
    path = tmp_path / "measures.jsonl"
    jf = JsonlFile.of(path)
    path.write_bytes(b"\n".join(EXACT) + b"\n")
    await run(pg_dsn, jf)
    for raw in EXACT:
        record = json.loads(raw)
        value = raw.decode()
        same = await fetchval(
            pg_dsn,
            "SELECT v = ($2::jsonb -> 'v') FROM measures WHERE id = $1",
            record["id"],
            value,
        )
        assert same, raw
    result = await verify(pg_dsn, jf)
    assert (5, 0, True) == (result.matched, result.different, result.ok)


async def test_a_double_that_underflows_is_quarantined(tmp_path: Path, pg_dsn: str) -> None:
    """1e-400 in a double precision column is number_out_of_range (not 0), as 1e400 is; a real
    zero loads."""
    path = tmp_path / "measures.jsonl"
    jf = JsonlFile.of(path)
    lines = [b'{"id": "a", "x": 1.5}', b'{"id": "b", "x": 1e-400}', b'{"id": "c", "x": 0.0}']
    lines.append(b'{"id": "d", "x": 1e400}')
    path.write_bytes(b"\n".join(lines) + b"\n")
    await run(pg_dsn, jf)
    assert "double precision" == (await column_types(pg_dsn, "measures"))["x"]
    assert ["b", "d"] == [k for _, k, r in await quarantine(pg_dsn) if r == "number_out_of_range"]
    assert {"a": 1.5, "c": 0.0} == json.loads(
        await fetchval(pg_dsn, "SELECT json_object_agg(id, x) FROM measures")
    )
    assert (await verify(pg_dsn, jf)).ok


async def test_an_escaped_backslash_before_u0000_is_not_a_nul(tmp_path: Path, pg_dsn: str) -> None:
    """The text \\u0000 (an escaped backslash, no NUL) loads into jsonb and text; a real
    \\u0000 is still json_nul_character / nul_character."""
    path = tmp_path / "paths.jsonl"
    jf = JsonlFile.of(path)
    path.write_bytes(
        b'{"id": "a", "meta": {"p": "C:\\\\u0000"}, "s": "\\\\u0000"}\n'
        b'{"id": "b", "meta": {"p": "\\\\\\u0000"}}\n'
        b'{"id": "c", "meta": {"p": "x"}, "s": "\\u0000"}\n'
    )
    await run(pg_dsn, jf)
    assert ("C:\\u0000", "\\u0000") == tuple(
        json.loads(await fetchval(pg_dsn, "SELECT json_build_array(meta->>'p', s) FROM paths"))
    )
    reasons = [(k, r) for _, k, r in await quarantine(pg_dsn)]
    assert [("b", "json_nul_character"), ("c", "nul_character")] == reasons
    assert (await verify(pg_dsn, jf)).ok


async def test_a_utf8_bom_does_not_cost_the_first_record(tmp_path: Path, pg_dsn: str) -> None:
    """A file starting with a UTF-8 BOM loads its first record like the others."""
    path = tmp_path / "feedback.jsonl"
    jf = JsonlFile.of(path)
    path.write_bytes(b"\xef\xbb\xbf" + line(feedback_record(1, 4)) + line(feedback_record(2, 4)))
    report, _ = await run(pg_dsn, jf)
    assert (2, 0) == (report.tables["feedback"].loaded, report.tables["feedback"].quarantined)
    assert (await verify(pg_dsn, jf)).ok


# ---------------------------------------------------------------- 12: system column names


@pytest.mark.parametrize("key", ["xmin", "ctid", "xmax", "cmin", "cmax", "tableoid"])
async def test_a_key_named_like_a_system_column_quarantines_its_line_only(
    tmp_path: Path, pg_dsn: str, key: str
) -> None:
    """A key named like a PostgreSQL system column quarantines its line (unusable_key_name);
    the lines after it load, and reruns succeed."""
    path = tmp_path / "audit_trail.jsonl"
    jf = JsonlFile.of(path)
    path.write_bytes(line({"id": "a"}) + line({"id": "b", key: 1}) + line({"id": "c"}))
    report, _ = await run(pg_dsn, jf)
    assert (2, 1) == (report.tables["audit_trail"].loaded, report.tables["audit_trail"].quarantined)
    assert ["unusable_key_name"] == [r for _, _, r in await quarantine(pg_dsn)]
    assert "completed" == (await run(pg_dsn, jf))[0].status


# ---------------------------------------------------------------- 15, 16, 17: through the CLI


@pytest.mark.parametrize("content", [b"", b"\n  \n", b'{"id": "torn'])
async def test_an_empty_or_torn_only_file_is_consistent_in_run_and_verify(
    tmp_path: Path, pg_dsn: str, content: bytes
) -> None:
    """A file with no complete record: run exits 0 and verify does not call it unmigrated
    (a torn line is said as waiting by run, counted by verify)."""
    path = tmp_path / "notes.jsonl"
    path.write_bytes(content)
    args = ["--jsonl", str(path), "--postgres-dsn", pg_dsn]
    assert 0 == cli("run", *args, "--no-progress").returncode
    verified = cli("verify", *args)
    assert (1 if content.startswith(b"{") else 0) == verified.returncode, verified.stdout


async def test_a_jsonl_file_named_like_a_sqlite_table_is_refused_before_anything(
    tmp_path: Path, pg_dsn: str, sample_db: Path
) -> None:
    """memory.db with a table feedback and feedback.jsonl beside it: exit 2 before anything is
    written, naming both."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(sample_db, data / "memory.db")
    conn = sqlite3.connect(data / "memory.db")
    conn.execute("CREATE TABLE feedback (id TEXT PRIMARY KEY, rating INTEGER)")
    conn.execute("INSERT INTO feedback VALUES ('x', 1)")
    conn.commit()
    conn.close()
    (data / "feedback.jsonl").write_bytes(line(feedback_record(1, 4)))
    done = cli("run", "--data-dir", str(data), "--postgres-dsn", pg_dsn, "--no-progress")
    assert 2 == done.returncode, done.stdout + done.stderr
    assert "would go to table feedback, which the SQLite database memory.db fills" in done.stderr
    assert await fetchval(pg_dsn, "SELECT to_regclass('public.sessions')") is None


async def test_one_file_named_by_data_dir_and_jsonl_is_one_file(
    tmp_path: Path, pg_dsn: str
) -> None:
    """--data-dir dd --jsonl dd/feedback.jsonl (also spelled ./dd/...) loads the file once."""
    data = tmp_path / "dd"
    data.mkdir()
    (data / "feedback.jsonl").write_bytes(line(feedback_record(1, 4)) + line(feedback_record(2, 3)))
    done = cli(
        "run",
        "--data-dir",
        str(data),
        "--jsonl",
        str(data / "feedback.jsonl"),
        "--jsonl",
        str(data / ".." / "dd" / "feedback.jsonl"),
        "--postgres-dsn",
        pg_dsn,
        "--no-progress",
    )
    assert 0 == done.returncode, done.stdout + done.stderr
    assert 2 == await fetchval(pg_dsn, "SELECT count(*) FROM feedback")


# ---------------------------------------------------------------- 4: sync keeps PostgreSQL's


async def test_sync_never_overwrites_a_jsonl_row_changed_in_postgresql(
    tmp_path: Path, pg_dsn: str, sample_db: Path
) -> None:
    """After cut-over a corrections row edited in PostgreSQL and a row inserted there survive
    a rewrite of the file and every later sync: the edited row is named as a conflict (exit 4,
    flux_migrate.conflicts), the inserted one is kept, the other records follow the file."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(sample_db, data / "memory.db")
    path = data / "corrections.jsonl"
    path.write_bytes(b"".join(line(correction(n)) for n in range(5)))
    args = ["--data-dir", str(data), "--postgres-dsn", pg_dsn, "--no-progress"]
    assert 0 == cli("run", *args).returncode
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE corrections SET status = 'fixed in pg' WHERE id = 'c1'")
        await conn.execute("INSERT INTO corrections (id, status) VALUES ('pg1', 'made in pg')")
    finally:
        await conn.close()
    rewritten = [correction(0), correction(1), correction(2, "approved"), correction(3)]
    path.write_bytes(b"".join(line(r) for r in rewritten))
    synced = cli("sync", *args)
    assert 4 == synced.returncode, synced.stdout + synced.stderr
    assert "corrections c1: changed_in_both" in synced.stdout
    assert "nothing changed in the source" not in synced.stdout
    statuses = json.loads(
        await fetchval(pg_dsn, "SELECT json_object_agg(id, status) FROM corrections")
    )
    assert {
        "c0": "pending",
        "c1": "fixed in pg",
        "c2": "approved",
        "c3": "pending",
        "c4": "pending",
        "pg1": "made in pg",
    } == statuses
    conflicts = await fetchval(
        pg_dsn, "SELECT array_agg(key || ':' || kind) FROM flux_migrate.conflicts"
    )
    assert ["c1:changed_in_both"] == conflicts
    with path.open("ab") as f:
        f.write(line(correction(9)))
    again = cli("sync", *args)
    assert 0 == again.returncode, again.stdout + again.stderr
    assert "fixed in pg" == await fetchval(pg_dsn, "SELECT status FROM corrections WHERE id = 'c1'")
    assert 7 == await fetchval(pg_dsn, "SELECT count(*) FROM corrections")


async def test_a_snapshot_never_deletes_a_row_someone_else_wrote(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A row inserted or changed in PostgreSQL and gone from a rewritten snapshot file is kept
    (and said), a row flux-migrate wrote and gone is deleted."""
    path = tmp_path / "corrections.jsonl"
    jf = JsonlFile.of(path, snapshot=True)
    path.write_bytes(b"".join(line(correction(n)) for n in range(4)))
    await run(pg_dsn, jf)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE corrections SET status = 'fixed in pg' WHERE id = 'c1'")
        await conn.execute("INSERT INTO corrections (id, status) VALUES ('pg1', 'made in pg')")
    finally:
        await conn.close()
    path.write_bytes(line(correction(0)) + line(correction(3)))
    report, outcomes = await run(pg_dsn, jf)
    o = outcomes["corrections"]
    assert (3, 1, True) == (o.gone, o.deleted, o.kept_unsure)
    ids = await fetchval(pg_dsn, "SELECT array_agg(id ORDER BY id) FROM corrections")
    assert ["c0", "c1", "c3", "pg1"] == ids
    assert "completed" == (await run(pg_dsn, jf))[0].status


async def test_records_without_any_value_load_into_a_table_without_columns_yet(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Records with no id and no non-null value yet ({} and all-null) load as rows; a key's
    first value later adds its column, and verify agrees."""
    path = tmp_path / "pings.jsonl"
    jf = JsonlFile.of(path)
    path.write_bytes(b'{"a": null}\n{}\n{"x": 1}\n{}\n')
    report, _ = await run(pg_dsn, jf, batch_size=1)
    assert (4, 0) == (report.tables["pings"].loaded, report.tables["pings"].quarantined)
    assert [None, None, 1, None] == await fetchval(pg_dsn, "SELECT array_agg(x) FROM pings")
    assert (await verify(pg_dsn, jf)).ok


async def test_an_upper_case_jsonl_suffix_is_migrated_by_data_dir(
    tmp_path: Path, pg_dsn: str
) -> None:
    """feedback.JSONL in --data-dir is a JSONL store like feedback.jsonl (not skipped)."""
    data = tmp_path / "dd"
    data.mkdir()
    (data / "feedback.JSONL").write_bytes(line(feedback_record(1, 4)))
    done = cli("run", "--data-dir", str(data), "--postgres-dsn", pg_dsn, "--no-progress")
    assert 0 == done.returncode, done.stdout + done.stderr
    assert 1 == await fetchval(pg_dsn, "SELECT count(*) FROM feedback")


async def test_an_appended_id_someone_else_inserted_is_a_conflict_not_a_quarantine(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A line appended with an id someone else inserted in PostgreSQL leaves their row as it
    is and is named as conflict inserted_in_both (not loaded, not quarantined); an id the file
    itself repeats is still duplicate_key."""
    path = tmp_path / "corrections.jsonl"
    jf = JsonlFile.of(path)
    path.write_bytes(line(correction(0)))
    await run(pg_dsn, jf)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("INSERT INTO corrections (id, status) VALUES ('c1', 'made in pg')")
    finally:
        await conn.close()
    with path.open("ab") as f:
        f.write(line(correction(1)) + line(correction(0)) + line(correction(2)))
    report, outcomes = await run(pg_dsn, jf)
    assert [("c1", "inserted_in_both")] == outcomes["corrections"].conflicts
    assert [("corrections", "c1", "inserted_in_both")] == report.conflicts
    at = len(line(correction(0))) + len(line(correction(1)))
    assert [(at, "c0", "duplicate_key")] == await quarantine(pg_dsn)
    statuses = json.loads(
        await fetchval(pg_dsn, "SELECT json_object_agg(id, status) FROM corrections")
    )
    assert {"c0": "pending", "c1": "made in pg", "c2": "pending"} == statuses
    assert (1, 1, 1) == (
        report.tables["corrections"].loaded,
        report.tables["corrections"].quarantined,
        report.tables["corrections"].skipped,
    )


async def test_the_accounting_notes_rows_someone_else_wrote_and_fails_on_rows_they_deleted(
    tmp_path: Path, pg_dsn: str
) -> None:
    """At the end of a JSONL run, rows someone else wrote into the table are said in a note and
    left alone; rows flux-migrate loaded that someone else deleted fail the run, saying to
    reload the table."""
    path = tmp_path / "corrections.jsonl"
    jf = JsonlFile.of(path)
    path.write_bytes(b"".join(line(correction(n)) for n in range(3)))
    await run(pg_dsn, jf)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("INSERT INTO corrections (id, status) VALUES ('x1', 'made in pg')")
        report, _ = await run(pg_dsn, jf)
        assert [
            "corrections: 1 row(s) were written or changed by someone else in PostgreSQL;"
            " flux-migrate leaves them as they are."
        ] == [n for n in report.notes if "someone else" in n]
        await conn.execute("DELETE FROM corrections WHERE id IN ('x1', 'c1')")
        with pytest.raises(RuntimeFailure) as failed:
            await run(pg_dsn, jf)
    finally:
        await conn.close()
    assert (
        'Table "public"."corrections" holds 2 rows but flux-migrate loaded 3 (and keeps 0 gone from'
        " the file); rows it wrote were deleted by someone else. Reload it with --restart --yes."
    ) == str(failed.value)


async def test_a_jsonl_table_flux_migrate_does_not_own_is_refused_with_what_to_do(
    tmp_path: Path, pg_dsn: str, sample_db: Path
) -> None:
    """A JSONL file's table that holds rows flux-migrate did not write, that was dropped after
    flux-migrate began filling it, or that a SQLite table fills, is refused with what to do;
    an existing empty table is filled."""
    path = tmp_path / "corrections.jsonl"
    jf = JsonlFile.of(path)
    path.write_bytes(b"".join(line(correction(n)) for n in range(3)))
    hint = 'table = "NAME" under [jsonl.corrections] in the config file'
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("CREATE TABLE corrections (id text PRIMARY KEY, status text)")
        await conn.execute("INSERT INTO corrections VALUES ('theirs', 'made in pg')")
        with pytest.raises(TargetError) as refused:
            await run(pg_dsn, jf)
        assert (
            'Table "public"."corrections" already holds rows that flux-migrate did not write;'
            f" empty it, or name the JSONL table otherwise ({hint})."
        ) == str(refused.value)
        await conn.execute("DELETE FROM corrections")
        report, _ = await run(pg_dsn, jf)
        assert 3 == report.tables["corrections"].loaded
        assert 3 == await conn.fetchval("SELECT count(*) FROM corrections")
        await conn.execute("DROP TABLE corrections")
        with pytest.raises(TargetError) as refused:
            await run(pg_dsn, jf)
        assert (
            'Table "public"."corrections" was dropped after flux-migrate started filling it'
            f" from {path}; rerun with --restart --yes to start over."
        ) == str(refused.value)
    finally:
        await conn.close()
    settings = Settings(sqlite_path=sample_db, postgres_dsn=pg_dsn)
    assert "completed" == (await migrate(settings)).status
    sessions = tmp_path / "sessions.jsonl"
    sessions.write_bytes(line({"id": "s1"}))
    with pytest.raises(TargetError) as refused:
        await run(pg_dsn, JsonlFile.of(sessions))
    assert (
        'Table "public"."sessions" is filled from a SQLite table of the same name; name the'
        ' JSONL table otherwise (table = "NAME" under [jsonl.sessions] in the config file).'
    ) == str(refused.value)
