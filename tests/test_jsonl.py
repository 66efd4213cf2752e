"""JSONL files into PostgreSQL: formats, bad lines, torn lines, appends, rewrites (real server)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from flux_migrate.core.schema import Column, Kind
from flux_migrate.pipeline.jsonl_run import JsonlFile, JsonlOutcome, migrate_jsonl
from flux_migrate.pipeline.report import RunReport
from flux_migrate.pipeline.settings import Settings
from flux_migrate.stages.convert import Rejected
from flux_migrate.stages.jsonl import json_converter, parse_line
from tests.support import fetchval

LINE_CASES = [
    (b'{"id": "a", ', "invalid_json_line"),
    (b'{"rating": NaN}', "invalid_json_line"),
    (b"[1, 2]", "not_an_object"),
    (b'"text"', "not_an_object"),
    (b"null", "not_an_object"),
    (b'{"id": "\xed\x95"}', "invalid_utf8"),
    (b'{"": 1}', "unusable_key_name"),
    (b'{"' + b"k" * 64 + b'": 1}', "unusable_key_name"),
    (b'{"a\\u0000b": 1}', "unusable_key_name"),
    (b'{"\\ud800": 1}', "invalid_utf8"),
    (b'{"id": "a", "n": 1, "n": 2}', "json_duplicate_key"),
    (b'{"id": "a", "d": {"k": [{"z": 1, "z": 1}]}}', "json_duplicate_key"),
    (b'{"id": "a", "\\u006e": 1, "n": 2}', "json_duplicate_key"),
    (b'{"id": "a" ,"n" :1,\t"n"\t: 1}', "json_duplicate_key"),
]


@pytest.mark.parametrize(("raw", "reason"), LINE_CASES)
def test_a_line_that_is_not_a_usable_object_is_rejected_with_its_reason(
    raw: bytes, reason: str
) -> None:
    """Each kind of bad JSONL line gets its stable reason code."""
    with pytest.raises(Rejected) as caught:
        parse_line(raw)
    assert reason == caught.value.reason


@pytest.mark.parametrize(
    ("kind", "value", "reason"),
    [
        (Kind.INTEGER, "very good", "type_mismatch"),
        (Kind.INTEGER, True, "type_mismatch"),
        (Kind.INTEGER, 2**63, "number_out_of_range"),
        (Kind.REAL, float("inf"), "number_out_of_range"),
        (Kind.NULLABLE_TEXT, {"a": 1}, "type_mismatch"),
        (Kind.NULLABLE_TEXT, "a\x00b", "nul_character"),
        (Kind.INSTANT, "yesterday", "invalid_timestamp"),
        (Kind.BOOLEAN, 1, "type_mismatch"),
        (Kind.JSON_VALUE, {"k": "a\x00"}, "json_nul_character"),
    ],
)
def test_a_value_that_does_not_fit_its_column_is_rejected(
    kind: Kind, value: Any, reason: str
) -> None:
    """A JSON value is converted into its column's type or rejected, never coerced."""
    with pytest.raises(Rejected) as caught:
        json_converter(Column("c", kind))(value)
    assert reason == caught.value.reason


pytestmark = pytest.mark.anyio


def feedback_record(n: int, fmt: int) -> dict[str, Any]:
    """A feedback record in one of the app's four formats."""
    record: dict[str, Any] = {
        "id": str(uuid.UUID(int=n + 1)),
        "message_id": f"m{n}",
        "session_id": f"s{n % 7}",
        "rating": (n % 3) - 1,
        "comment": f"코멘트 {n}",
        "corrected_answer": None if n % 2 else f"정답 {n}",
        "created_at": datetime(2024, 5, 1, 12, 0, n % 60, 123456).isoformat(),
    }
    if fmt >= 2:
        record["created_at"] = datetime(2024, 5, 1, 12, 0, n % 60, tzinfo=UTC).isoformat()
    if fmt >= 3:
        record["rating_label"] = ("inaccurate", "partial", "accurate")[record["rating"] + 1]
    if fmt >= 4:
        record.update(query=f"질문 {n}", answer=f"답 {n}", username="anonymous")
    return record


def line(record: dict[str, Any]) -> bytes:
    """A line as the app writes it."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


async def run(
    dsn: str, *files: JsonlFile, batch_size: int = 100
) -> tuple[RunReport, dict[str, JsonlOutcome]]:
    settings = Settings(postgres_dsn=dsn, batch_size=batch_size)
    return await migrate_jsonl(settings, files)


async def rows(dsn: str, table: str) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetch(f'SELECT * FROM public."{table}"')
    finally:
        await conn.close()
    return {r["id"]: dict(r) for r in found}


def expected_feedback(record: dict[str, Any]) -> dict[str, Any]:
    """A feedback record as the table should hold it (absent keys NULL, instants in UTC)."""
    created = datetime.fromisoformat(record["created_at"])
    keys = ("id", "message_id", "session_id", "rating", "comment", "corrected_answer")
    out = {k: record[k] for k in keys}
    out["created_at"] = created if created.tzinfo else created.replace(tzinfo=UTC)
    for key in ("rating_label", "query", "answer", "username"):
        out[key] = record.get(key)
    return out


async def test_all_four_feedback_formats_load_into_one_table(tmp_path: Path, pg_dsn: str) -> None:
    """A feedback file mixing the four formats loads every record, keys a format lacks NULL."""
    records = [feedback_record(n, 1 + n % 4) for n in range(40)]
    path = tmp_path / "feedback.jsonl"
    path.write_bytes(b"".join(line(r) for r in records))
    report, _ = await run(pg_dsn, JsonlFile.of(path), batch_size=7)
    assert {"feedback": (40, 40, 0)} == {
        k: (t.extracted, t.loaded, t.quarantined) for k, t in report.tables.items()
    }
    actual = await rows(pg_dsn, "feedback")
    for value in actual.values():
        value["created_at"] = value["created_at"].astimezone(UTC)
    assert {r["id"]: expected_feedback(r) for r in records} == actual
    types = await fetchval(
        pg_dsn,
        "SELECT json_object_agg(column_name, data_type) FROM information_schema.columns"
        " WHERE table_name = 'feedback'",
    )
    assert {
        "id": "text",
        "message_id": "text",
        "session_id": "text",
        "rating": "bigint",
        "comment": "text",
        "corrected_answer": "text",
        "created_at": "timestamp with time zone",
        "rating_label": "text",
        "query": "text",
        "answer": "text",
        "username": "text",
    } == json.loads(types)


async def test_bad_lines_are_quarantined_with_their_bytes_and_offset(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Invalid JSON, a non-object, invalid UTF-8 and a value that does not fit its column are
    quarantined with the raw line and its byte offset; the good lines load."""
    good = [feedback_record(n, 4) for n in range(3)]
    very_good = {**feedback_record(9, 4), "rating": "very good"}
    bad = [b'{"id": "x", "rating": \n', b"[1, 2]\n", b'{"id": "\xff\xfe"}\n', line(very_good)]
    content = line(good[0]) + bad[0] + line(good[1]) + bad[1] + bad[2] + line(good[2]) + bad[3]
    path = tmp_path / "feedback.jsonl"
    path.write_bytes(content)
    report, _ = await run(pg_dsn, JsonlFile.of(path))
    assert (7, 3, 4) == (
        report.tables["feedback"].extracted,
        report.tables["feedback"].loaded,
        report.tables["feedback"].quarantined,
    )
    conn = await asyncpg.connect(pg_dsn)
    try:
        found = await conn.fetch(
            "SELECT source_rowid, source_key, reason, raw FROM flux_migrate.quarantine"
            " ORDER BY source_rowid"
        )
    finally:
        await conn.close()
    offsets = [content.index(b) for b in bad]
    assert [
        (offsets[0], None, "invalid_json_line", {"line": bad[0][:-1].decode()}),
        (offsets[1], None, "not_an_object", {"line": "[1, 2]"}),
        (offsets[2], None, "invalid_utf8", {"line": {"base64": "eyJpZCI6ICL//iJ9"}}),
        (offsets[3], very_good["id"], "type_mismatch", {"line": bad[3][:-1].decode()}),
    ] == [(r[0], r[1], r[2], json.loads(r[3])) for r in found]
    assert {r["id"] for r in good} == set(await rows(pg_dsn, "feedback"))


async def test_half_written_line_is_read_once_the_app_finishes_it(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A last line without its newline is not consumed; completed later, it loads once."""
    first, torn = feedback_record(1, 2), line(feedback_record(2, 2))
    path = tmp_path / "feedback.jsonl"
    path.write_bytes(line(first) + torn[:25])
    report, _ = await run(pg_dsn, JsonlFile.of(path))
    assert 1 == report.tables["feedback"].loaded
    assert len(line(first)) == await fetchval(
        pg_dsn, "SELECT last_rowid FROM flux_migrate.checkpoints"
    )
    with path.open("ab") as f:
        f.write(torn[25:])
    report, _ = await run(pg_dsn, JsonlFile.of(path))
    assert (1, 1, 0) == (
        report.tables["feedback"].extracted,
        report.tables["feedback"].loaded,
        report.tables["feedback"].quarantined,
    )
    again, _ = await run(pg_dsn, JsonlFile.of(path))
    assert again.tables["feedback"].up_to_date
    assert 2 == await fetchval(pg_dsn, "SELECT count(*) FROM feedback")


async def test_a_key_first_seen_in_a_later_run_becomes_a_column(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A file without a profile gets its columns from the values; a later key is added."""
    path = tmp_path / "audit_trail.jsonl"
    path.write_bytes(line({"id": "a", "n": 1, "ok": True, "at": "2024-01-01T00:00:00"}))
    await run(pg_dsn, JsonlFile.of(path))
    with path.open("ab") as f:
        f.write(line({"id": "b", "n": 2, "change": {"field": "status", "to": ["x"]}}))
    _, outcomes = await run(pg_dsn, JsonlFile.of(path))
    assert ["change"] == outcomes["audit_trail"].columns_added
    types = await fetchval(
        pg_dsn,
        "SELECT json_object_agg(column_name, data_type) FROM information_schema.columns"
        " WHERE table_name = 'audit_trail'",
    )
    assert {
        "id": "text",
        "n": "bigint",
        "ok": "boolean",
        "at": "timestamp with time zone",
        "change": "jsonb",
    } == json.loads(types)
    change = await fetchval(pg_dsn, "SELECT change FROM audit_trail WHERE id = 'b'")
    assert {"field": "status", "to": ["x"]} == json.loads(change)


def correction(n: int, status: str = "pending", **extra: Any) -> dict[str, Any]:
    return {
        "id": f"c{n}",
        "message_id": f"m{n}",
        "original": {"text": f"원문 {n}", "tags": [n]},
        "status": status,
        "reviewed_by": None,
        "created_at": (datetime(2024, 6, 1, 10) + timedelta(seconds=n)).isoformat(),
        **extra,
    }


async def test_rewritten_corrections_file_is_reconciled_by_id(tmp_path: Path, pg_dsn: str) -> None:
    """A rewrite (a record reviewed in place, one removed, one added) updates, inserts and
    reports the gone record without deleting it; a rerun changes nothing."""
    path = tmp_path / "corrections.jsonl"
    path.write_bytes(b"".join(line(correction(n)) for n in range(5)))
    await run(pg_dsn, JsonlFile.of(path), batch_size=2)
    reviewed = correction(1, "approved", reviewed_by="admin", reviewed_at="2024-06-02T09:00:00")
    rewritten = [correction(0), reviewed, correction(3), correction(4), correction(5)]
    path.write_bytes(b"".join(line(r) for r in rewritten))
    report, outcomes = await run(pg_dsn, JsonlFile.of(path), batch_size=2)
    o = outcomes["corrections"]
    assert (True, 1, 1, 3, 1, ["c2"], 0) == (
        o.rewritten,
        o.inserted,
        o.updated,
        o.unchanged,
        o.gone,
        o.gone_sample,
        o.deleted,
    )
    assert [] == o.columns_added
    actual = await rows(pg_dsn, "corrections")
    assert ["c0", "c1", "c2", "c3", "c4", "c5"] == sorted(actual)
    # reviewed_by held only nulls when the table was made: the profile still makes it text
    assert ("approved", "admin", datetime(2024, 6, 2, 9, tzinfo=UTC)) == (
        actual["c1"]["status"],
        actual["c1"]["reviewed_by"],
        actual["c1"]["reviewed_at"],
    )
    again, outcomes = await run(pg_dsn, JsonlFile.of(path), batch_size=2)
    assert (True, False) == (
        again.tables["corrections"].up_to_date,
        outcomes["corrections"].rewritten,
    )
    assert 6 == await fetchval(pg_dsn, "SELECT count(*) FROM corrections")


async def test_rewritten_snapshot_deletes_records_gone_from_it(tmp_path: Path, pg_dsn: str) -> None:
    """A file configured as a snapshot loses from its table the records it no longer holds."""
    path = tmp_path / "corrections.jsonl"
    path.write_bytes(b"".join(line(correction(n)) for n in range(4)))
    await run(pg_dsn, JsonlFile.of(path, snapshot=True))
    path.write_bytes(line(correction(3)) + line(correction(0, "rejected")))
    _, outcomes = await run(pg_dsn, JsonlFile.of(path, snapshot=True))
    assert (2, 2) == (outcomes["corrections"].gone, outcomes["corrections"].deleted)
    actual = await rows(pg_dsn, "corrections")
    assert {"c0": "rejected", "c3": "pending"} == {k: v["status"] for k, v in actual.items()}


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (', "status": "pending"}', "json_duplicate_key"),
        (', "": 1}', "unusable_key_name"),
        (', "xmin": 1}', "unusable_key_name"),
        (', "\\ud800": 1}', "invalid_utf8"),
    ],
)
async def test_a_snapshot_line_rejected_whole_keeps_its_record_and_its_id(
    tmp_path: Path, pg_dsn: str, tail: str, reason: str
) -> None:
    """A rewritten snapshot whose line for c1 is now rejected whole (a key twice, a key that
    cannot be a column): the line is quarantined with its id, c1 stays as it was (its record
    is still in the file), and the records truly gone are deleted all the same; a line whose
    id itself repeats is quarantined without an id, and then nothing is deleted (it may be
    any record)."""
    path = tmp_path / "corrections.jsonl"
    path.write_bytes(b"".join(line(correction(n)) for n in range(4)))
    await run(pg_dsn, JsonlFile.of(path, snapshot=True))
    bad = json.dumps(correction(1, "rejected"))[:-1] + tail + "\n"
    path.write_bytes(line(correction(3)) + bad.encode())
    _, outcomes = await run(pg_dsn, JsonlFile.of(path, snapshot=True))
    assert (2, 2) == (outcomes["corrections"].gone, outcomes["corrections"].deleted)
    actual = await rows(pg_dsn, "corrections")
    assert {"c1": "pending", "c3": "pending"} == {k: v["status"] for k, v in actual.items()}
    quarantined = await fetchval(
        pg_dsn,
        "SELECT string_agg(source_key || ':' || reason, ',') FROM flux_migrate.quarantine"
        " WHERE resolved_at IS NULL",
    )
    assert f"c1:{reason}" == quarantined
    both_ids = json.dumps(correction(2))[:-1] + ', "id": "c9"}\n'
    path.write_bytes(line(correction(3)) + both_ids.encode())
    _, outcomes = await run(pg_dsn, JsonlFile.of(path, snapshot=True))
    assert 0 == outcomes["corrections"].deleted
    assert {"c1", "c3"} == set(await rows(pg_dsn, "corrections"))


async def test_duplicate_id_is_quarantined_and_the_first_arrival_kept(
    tmp_path: Path, pg_dsn: str
) -> None:
    """The same id on two lines loads the first and quarantines the second as duplicate_key,
    on append and in a reconcile pass alike."""
    path = tmp_path / "error_reports.jsonl"
    first = {"id": "e1", "status": "pending", "created_at": "2024-01-01T00:00:00+00:00"}
    second = {**first, "status": "done"}
    path.write_bytes(line(first) + line(second))
    report, _ = await run(pg_dsn, JsonlFile.of(path))
    assert (1, 1) == (
        report.tables["error_reports"].loaded,
        report.tables["error_reports"].quarantined,
    )
    path.write_bytes(line({**first, "reporter": "kim"}) + line(second))
    report, _ = await run(pg_dsn, JsonlFile.of(path))
    assert (1, 1) == (
        report.tables["error_reports"].loaded,
        report.tables["error_reports"].quarantined,
    )
    actual = await rows(pg_dsn, "error_reports")
    assert ("pending", "kim") == (actual["e1"]["status"], actual["e1"]["reporter"])
    reasons = await fetchval(
        pg_dsn,
        "SELECT array_agg(reason || ':' || coalesce(resolution, 'open') ORDER BY id)"
        " FROM flux_migrate.quarantine",
    )
    assert ["duplicate_key:file_rewritten", "duplicate_key:open"] == reasons


async def test_a_jsonl_batch_without_its_records_ids_is_refused_before_writing(pg_dsn: str) -> None:
    """A JSONL batch that lost its records' ids (only convert_jsonl_batch builds them today) is
    refused with a sentence before a row is written: a reconcile could not record or skip ids."""
    from flux_migrate.core.errors import RuntimeFailure
    from flux_migrate.stages.batch import Batch
    from flux_migrate.stages.jsonl_load import JsonlLoadContext, _write_rows

    ctx = JsonlLoadContext(schema="public", table="feedback", run_id="r")
    raw = [(0, b'{"id": "a"}'), (12, b'{"id": "b"}')]
    conn = await asyncpg.connect(pg_dsn)
    try:
        for ids in (None, ["a"]):  # none, or not one per row
            batch = Batch(
                table="feedback", seq=1, after_rowid=0, last_rowid=24, extracted=2, raw=raw,
                rows=[("a",), ("b",)], columns=("id",), record_ids=ids,
            )  # fmt: skip
            with pytest.raises(RuntimeFailure, match="arrived without its records' ids"):
                await _write_rows(conn, ctx, batch)
    finally:
        await conn.close()
