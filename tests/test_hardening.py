"""Hardening (issue 13): values at the edges, hostile paths, secrets, long names, duplicates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
import structlog

from flux_migrate.core.schema import TargetNames
from flux_migrate.pipeline.runner import migrate
from flux_migrate.pipeline.settings import load_settings
from flux_migrate.pipeline.verify import verify_quick, verify_rows
from tests.dirty import app_db

pytestmark = pytest.mark.anyio


async def _fetch(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET timezone = 'UTC'")
        return [dict(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures structlog for the process; put it back for later tests."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


# source text -> the instant PostgreSQL must hold (as its UTC text), or the quarantine reason
EDGE_TIMESTAMPS: list[tuple[Any, str]] = [
    ("0001-01-01T00:00:00Z", "0001-01-01 00:00:00+00"),
    ("0001-01-01T00:00:00", "0001-01-01 00:00:00+00"),
    ("0001-01-01T01:00:00+01:00", "0001-01-01 00:00:00+00"),
    ("0001-01-01T00:00:00+00:00", "0001-01-01 00:00:00+00"),
    ("9999-12-31T23:59:59.999999+00:00", "9999-12-31 23:59:59.999999+00"),
    ("9999-12-31T23:59:59.999999Z", "9999-12-31 23:59:59.999999+00"),
    ("9999-12-31T23:59:59.9999994", "9999-12-31 23:59:59.999999+00"),
    ("2024-01-01T00:00:00.0000015Z", "2024-01-01 00:00:00.000002+00"),
    ("2024-01-01T00:00:00.0000005Z", "2024-01-01 00:00:00+00"),
    ("9999-12-31T23:59:59.9999999", "timestamp_out_of_range"),
    ("9999-12-31T23:59:59.9999995+00:00", "timestamp_out_of_range"),
    ("0001-01-01T00:00:00+01:00", "timestamp_out_of_range"),
    (20240101, "invalid_timestamp"),
    (20240101.5, "invalid_timestamp"),
    ("2024-01-01T05", "invalid_timestamp"),
]


async def test_instants_at_the_calendars_edges_load_as_themselves_or_are_quarantined(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Year 1 and year 9999 instants load as exactly themselves (never +-infinity), fractions
    beyond microseconds round as PostgreSQL rounds, and what cannot load is quarantined."""
    db = app_db(tmp_path / "app.sqlite", good_sessions=1, messages_each=0)
    ids = {
        db.session(created_at=text, updated_at=text)["id"]: want for text, want in EDGE_TIMESTAMPS
    }
    db.write()
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn)
    report = await migrate(settings)
    rows = await _fetch(
        pg_dsn, "SELECT id, created_at::text AS c, updated_at::text AS u FROM sessions"
    )
    loaded = {r["id"]: r["c"] for r in rows if r["id"] in ids}
    assert all(r["c"] == r["u"] for r in rows)
    quarantined = {
        r["source_key"]: r["reason"]
        for r in await _fetch(pg_dsn, "SELECT source_key, reason FROM flux_migrate.quarantine")
    }
    assert ids == {**loaded, **quarantined}
    finite = await _fetch(pg_dsn, "SELECT bool_and(isfinite(created_at)) AS ok FROM sessions")
    expected = (True, "completed")
    assert expected == (finite[0]["ok"], report.status)
    assert all(r.ok for r in await verify_rows(settings))
    assert all(q.ok for q in await verify_quick(settings))


def test_rounding_matches_postgresql_for_long_fractions() -> None:
    """More than six fraction digits round to the microsecond exactly as PostgreSQL does."""
    from flux_migrate.stages.convert import parse_timestamp

    texts = [b".0000015Z", b".00000050001Z", b".99999999Z", b".0000025+00:00"]
    expected = [
        "2024-01-01 00:00:00.000002+00:00",
        "2024-01-01 00:00:00.000001+00:00",
        "2024-01-01 00:00:01+00:00",
        "2024-01-01 00:00:00.000002+00:00",
    ]
    assert expected == [str(parse_timestamp(b"2024-01-01T00:00:00" + t)) for t in texts]


async def test_strip_nul_removes_nul_escapes_without_re_encoding_numbers(
    tmp_path: Path, pg_dsn: str
) -> None:
    """With strip_nul, metadata loses only its \\u0000 escapes: 1e400, long decimals and
    integers beyond 64 bits keep their digits, and an escaped backslash before u0000 stays."""
    source = (
        '{"k\\u0000": "x\\u0000y", "n": 1e400, "p": 3.14159265358979323846,'
        ' "big": 123456789012345678901234567890, "path": "C:\\\\u0000dir", "e": "\\\\\\u0000"}'
    )
    expected_text = (
        '{"k": "xy", "n": 1e400, "p": 3.14159265358979323846,'
        ' "big": 123456789012345678901234567890, "path": "C:\\\\u0000dir", "e": "\\\\"}'
    )
    db = app_db(tmp_path / "app.sqlite", good_sessions=1, messages_each=0)
    session = db.session(metadata=source)
    db.write()
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn, strip_nul=True)
    report = await migrate(settings)
    [row] = await _fetch(
        pg_dsn,
        "SELECT metadata::text AS got, $2::jsonb::text AS want FROM sessions WHERE id = $1",
        session["id"],
        expected_text,
    )
    assert (row["want"], 0) == (row["got"], report.quarantined_open)


CONFIG_ERRORS = [
    ('[transform]\nstrip_nul = "false"\n', "strip_nul in [transform]"),
    ("[transform]\nstrip_nul = 1\n", "strip_nul in [transform]"),
    ("[load]\nretry_seconds = nan\n", "retry_seconds must be"),
    ("[load]\nretry_seconds = -5\n", "retry_seconds must be"),
    ("[source]\nbusy_timeout = -1\n", "busy_timeout must be"),
    ("[source]\nbusy_timeout = inf\n", "busy_timeout must be"),
    ('[source]\nbusy_timeout = "10"\n', "busy_timeout in [source]"),
    ("[load]\nbatch_size = 2.5\n", "batch_size in [load]"),
    ("[load]\nbatch_size = true\n", "batch_size in [load]"),
    ("[target]\nschema = 5\n", "schema in [target]"),
    ("load = 3\n", "[load] in the config file"),
]


@pytest.mark.parametrize(("toml", "message"), CONFIG_ERRORS)
@pytest.mark.usefixtures("restore_logging")
def test_config_values_of_the_wrong_type_exit_2_with_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, message: str
) -> None:
    """A config value of the wrong type or out of range exits 2 with one sentence naming it."""
    from flux_migrate.pipeline.cli import main

    config = tmp_path / "bad.toml"
    config.write_text(toml, encoding="utf-8")
    code = main(["status", "--config", str(config), "--postgres-dsn", "postgresql://h/db"])
    err = capsys.readouterr().err
    expected = (2, True, 1)
    assert expected == (code, message in err, len(err.strip().splitlines())), err
    assert "internal error" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--batch-size", "99999999999999999999"], "--batch-size must be between"),
        (["run", "--batch-size", "0"], "--batch-size must be between"),
        (["status", "--config", "{tmp}"], "is a directory"),
        (["quarantine", "--limit", "-1"], "--limit: -1 is negative"),
        (["verify", "--show", "-3"], "--show: -3 is negative"),
    ],
)
@pytest.mark.usefixtures("restore_logging")
def test_out_of_range_arguments_exit_2_with_a_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """Absurd numbers and a directory as --config exit 2 with a sentence, not an internal error."""
    from flux_migrate.pipeline.cli import main

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    argv += ["--sqlite-path", str(tmp_path / "x.sqlite"), "--postgres-dsn", "postgresql://h/db"]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses the value itself
        code = exc.code
    err = capsys.readouterr().err
    expected = (2, True)
    assert expected == (code, message in err), err
    assert "internal error" not in err


# Every form a DSN reaches flux-migrate in, each with a password starting "S3cr" (a raw #, / or
# ? make the driver quote "S3cr" alone in its parse error); port 9: nobody listens there.
SECRET_DSNS = [
    "host=127.0.0.1 port=9 user=app password=S3crtA dbname=x",
    "host=127.0.0.1 port=9 user=app password='S3cr tB' dbname=x",
    "'postgresql://app:S3crtC@127.0.0.1:9/db'",
    '"postgresql://app:S3crtD@127.0.0.1:9/db"',
    "postgresql:/app:S3crtE@127.0.0.1:9/db",
    "postgresql:app:S3crtF@127.0.0.1:9/db",
    "postgresql://app:S3cr#tG@127.0.0.1:9/db",
    "postgresql://app:S3cr/tH@127.0.0.1:9/db",
    "postgresql://app:S3cr?tI@127.0.0.1:9/db",
    "postgresql://app:S3cr@tJ@127.0.0.1:9/db",
    "postgresql://app@127.0.0.1:9/db?password=S3crtK",
]


def test_redact_and_location_parse_every_dsn_form() -> None:
    """Redaction and the location shown for a DSN remove the password from every form by
    parsing it, without having been told the password."""
    from flux_migrate.core.dsn import dsn_location, redact

    texts = [f"error at {dsn}: refused" for dsn in SECRET_DSNS]
    shown = [redact(t) for t in texts] + [dsn_location(d) for d in SECRET_DSNS]
    nothing: list[str] = []
    assert nothing == [t for t in shown if "S3cr" in t or "tG@" in t or "tH@" in t]
    expected = ["127.0.0.1:9/x", "127.0.0.1:9/db"]
    assert expected == [dsn_location(SECRET_DSNS[0]), dsn_location(SECRET_DSNS[6])]


def _keyword_dsn(dsn: str, password: str) -> str:
    """The test server's DSN as libpq key=value pairs with a password (trust auth ignores it)."""
    parts = urlsplit(dsn)
    host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
    port = f" port={parts.port}" if parts.port else ""
    return f"host={host}{port} user={parts.username} password='{password}' dbname={parts.path[1:]}"


@pytest.mark.usefixtures("restore_logging")
def test_no_command_prints_a_password_in_any_channel(
    tmp_path: Path, sample_db: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every DSN form through run, check, verify, status and quarantine: the password never
    appears on stdout, stderr, the JSON log or the --report-json file, and a key=value DSN
    connects."""
    from flux_migrate.pipeline.cli import main

    report = tmp_path / "report.json"
    live = _keyword_dsn(pg_dsn, "S3crt L")
    codes: dict[str, int] = {}
    seen: list[str] = []
    for dsn in [*SECRET_DSNS, live]:
        for command in ("run", "check", "verify", "status", "quarantine"):
            argv = [command, "--postgres-dsn", dsn, "--log-format", "json"]
            if command in ("run", "verify"):
                argv += ["--sqlite-path", str(sample_db)]
            if command == "run":
                argv += ["--report-json", str(report), "--no-progress"]
            report.unlink(missing_ok=True)
            codes[f"{command} {dsn}"] = main(argv)
            out = capsys.readouterr()
            seen += [out.out, out.err, report.read_text() if report.exists() else ""]
    nothing: list[str] = []
    assert nothing == [text for text in seen if "S3cr" in text]
    commands = ("run", "check", "verify", "status", "quarantine")
    expected = dict.fromkeys(commands, 0)
    assert expected == {c: codes[f"{c} {live}"] for c in commands}
    assert {1, 2} >= {code for key, code in codes.items() if not key.endswith(live)}


async def test_sqlite_path_with_uri_characters_opens_exactly_that_file(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A file name holding #, ? or %xx opens exactly that file, read-only, and creates nothing
    (not the file the unescaped URI would name)."""
    names = ["chat#2024-11.sqlite", "chat?mode=rwc", "chat%41.sqlite", "chat%2523"]
    for n, name in enumerate(names, start=1):
        app_db(tmp_path / name, good_sessions=n, messages_each=0).write()
    (tmp_path / "chatA.sqlite").write_bytes(b"")  # what chat%41.sqlite decodes to
    before = sorted(p.name for p in tmp_path.iterdir())
    loaded = []
    for n, name in enumerate(names):
        settings = load_settings(
            None,
            sqlite_path=tmp_path / name,
            postgres_dsn=pg_dsn,
            names=TargetNames(schema=f"s{n}"),
        )
        report = await migrate(settings)
        loaded.append(report.tables["sessions"].loaded)
    assert [1, 2, 3, 4] == loaded
    assert before == sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.usefixtures("restore_logging")
def test_a_directory_as_sqlite_path_says_it_is_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory given as --sqlite-path exits 2 saying it is a directory."""
    from flux_migrate.pipeline.cli import main

    code = main(["run", "--sqlite-path", str(tmp_path), "--postgres-dsn", "postgresql://h:9/x"])
    err = capsys.readouterr().err
    expected = (2, True)
    assert expected == (code, "is a directory, not a SQLite file" in err), err


async def _execute(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


@pytest.mark.parametrize("length", [58, 63])
async def test_target_names_up_to_63_bytes_work_everywhere(
    tmp_path: Path, pg_dsn: str, length: int
) -> None:
    """Tables named with 58 to 63 bytes get keys whose names fit: run, check, the PostgreSQL
    memory, and a resume with keys pending all work and agree on them."""
    from flux_migrate.core.schema import constraints
    from flux_migrate.memory.postgres import PostgresMemory
    from flux_migrate.pipeline.check import check

    names = TargetNames(
        schema="long", sessions="s" * (length - 2) + "é", messages="m" * (length - 3) + "東"
    )
    assert [length, length] == [len(names.sessions.encode()), len(names.messages.encode())]
    db = app_db(tmp_path / "app.sqlite")
    db.write()
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn, names=names)
    first = await migrate(settings)
    built = await _fetch(
        pg_dsn,
        "SELECT conname AS name FROM pg_constraint WHERE connamespace = 'long'::regnamespace"
        " AND contype <> 'n'"
        " UNION SELECT indexname FROM pg_indexes WHERE schemaname = 'long'",
    )
    expected = {c.name for c in constraints(names)}
    assert (expected, "completed") == ({r["name"] for r in built}, first.status)
    assert all(len(n.encode()) <= 63 for n in expected)
    health = await check(pg_dsn, names=names)
    assert (True, []) == (health.healthy, health.problems)
    async with PostgresMemory(pg_dsn, names=names) as memory:
        listed = await memory.get_sessions()
    assert 2 == len(listed)
    # A run stopped during the key build: the primary keys exist, the rest is pending.
    fk, *indexes = (c.name for c in constraints(names) if not c.name.endswith("_pkey"))
    await _execute(
        pg_dsn,
        f'ALTER TABLE {names.qualified("messages")} DROP CONSTRAINT "{fk}"',
        *(f'DROP INDEX long."{index}"' for index in indexes),
        "UPDATE flux_migrate.checkpoints SET constraints_pending = true",
    )
    db.session()
    db.write()
    second = await migrate(settings)
    rebuilt = await _fetch(
        pg_dsn,
        "SELECT conname AS name FROM pg_constraint WHERE connamespace = 'long'::regnamespace"
        " AND contype <> 'n'"
        " UNION SELECT indexname FROM pg_indexes WHERE schemaname = 'long'",
    )
    assert (expected, 1) == ({r["name"] for r in rebuilt}, second.tables["sessions"].loaded)


def _insert(path: Path, table: str, row: dict[str, Any]) -> None:
    """Insert one row exactly as given (bytes stay BLOBs), as another SQLite writer might."""
    import sqlite3

    db = sqlite3.connect(path)
    db.execute(
        f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
        list(row.values()),
    )
    db.commit()
    db.close()


def _session_row(key: Any, title: str) -> dict[str, Any]:
    ts = "2026-11-26T14:14:34+00:00"
    return {"id": key, "title": title, "created_at": ts, "updated_at": ts, "metadata": "{}"}


@pytest.mark.parametrize(
    ("first", "second", "strip_nul"),
    [("A", b"A", False), ("ab", "a\x00b", True)],
    ids=["text-and-blob", "nul-stripped"],
)
async def test_keys_equal_once_converted_quarantine_the_second_arrival(
    tmp_path: Path, pg_dsn: str, first: Any, second: Any, strip_nul: bool
) -> None:
    """Two source rows whose keys convert to the same key: the first loads, the second is
    quarantined as duplicate_key with its raw values, the key is built, and reruns finish."""
    db = app_db(tmp_path / "app.sqlite", good_sessions=1, messages_each=1)
    db.write()
    _insert(db.path, "sessions", _session_row(first, "first"))
    _insert(db.path, "sessions", _session_row(second, "second"))
    settings = load_settings(
        None, sqlite_path=db.path, postgres_dsn=pg_dsn, strip_nul=strip_nul, batch_size=2
    )
    report = await migrate(settings)
    rerun = await migrate(settings)
    loaded = await _fetch(
        pg_dsn, "SELECT title FROM sessions WHERE id = $1", "A" if first == "A" else "ab"
    )
    [q] = await _fetch(
        pg_dsn, "SELECT source_rowid, reason, raw::text AS raw FROM flux_migrate.quarantine"
    )
    pk = await _fetch(
        pg_dsn,
        "SELECT conname FROM pg_constraint WHERE conrelid = 'sessions'::regclass AND contype = 'p'",
    )
    expected = ([{"title": "first"}], 3, "duplicate_key", 1, 1, 1)
    assert expected == (
        loaded,
        q["source_rowid"],
        q["reason"],
        report.quarantined_open,
        rerun.quarantined_open,
        len(pk),
    )
    assert ("completed", "completed") == (report.status, rerun.status)
    assert '"second"' in q["raw"]
    assert [True, True] == [r.ok for r in await verify_rows(settings)]


async def test_a_key_that_arrives_after_the_keys_are_built_is_quarantined(
    tmp_path: Path, pg_dsn: str
) -> None:
    """A row whose converted key is loaded already (primary key in place) is quarantined as
    duplicate_key instead of failing every rerun."""
    db = app_db(tmp_path / "app.sqlite", good_sessions=1, messages_each=0)
    db.write()
    _insert(db.path, "sessions", _session_row("A", "first"))
    settings = load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn)
    await migrate(settings)
    _insert(db.path, "sessions", _session_row(b"A", "second"))
    second = await migrate(settings)
    third = await migrate(settings)
    reasons = await _fetch(pg_dsn, "SELECT reason FROM flux_migrate.quarantine")
    expected = ([{"reason": "duplicate_key"}], 1, 1, "completed")
    assert expected == (reasons, second.quarantined_open, third.quarantined_open, third.status)


@pytest.mark.usefixtures("restore_logging")
async def test_quarantine_listing_escapes_control_characters(
    tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`quarantine` shows keys with control characters escaped, so source content cannot move
    the cursor, colour the terminal or forge a line."""
    import anyio

    from flux_migrate.pipeline.cli import main

    key = "k\x1b[2J\r\nflux-migrate: ok\u202e"
    db = app_db(tmp_path / "app.sqlite", good_sessions=1, messages_each=0)
    db.session(id=key, created_at="not a time")
    db.write()
    await migrate(load_settings(None, sqlite_path=db.path, postgres_dsn=pg_dsn))
    capsys.readouterr()
    code = await anyio.to_thread.run_sync(main, ["quarantine", "--postgres-dsn", pg_dsn])
    out = capsys.readouterr().out
    [line] = [x for x in out.splitlines() if x.startswith("sessions")]
    expected = (0, False, 5)  # count, header, rule, the row, what to do
    assert expected == (code, any(c in out for c in "\x1b\r\u202e"), len(out.splitlines()))
    assert "k\\x1b[2J\\r\\nflux-migrate: ok\\u202e" in line


@pytest.mark.usefixtures("restore_logging")
async def test_an_unwritable_report_path_is_refused_before_migrating(
    tmp_path: Path, sample_db: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --report-json path that cannot be written exits 2 before anything is migrated."""
    import anyio

    from flux_migrate.pipeline.cli import main

    argv = ["run", "--sqlite-path", str(sample_db), "--postgres-dsn", pg_dsn]
    missing = [*argv, "--report-json", str(tmp_path / "no" / "such" / "dir" / "r.json")]
    directory = [*argv, "--report-json", str(tmp_path)]
    codes = [await anyio.to_thread.run_sync(main, a) for a in (missing, directory)]
    err = capsys.readouterr().err
    bookkeeping = await _fetch(pg_dsn, "SELECT to_regnamespace('flux_migrate') AS ns")
    expected = ([2, 2], None, True, True)
    assert expected == (
        codes,
        bookkeeping[0]["ns"],
        "cannot be written" in err,
        "is a directory" in err,
    )


async def test_two_quick_ctrl_c_exit_130_without_a_traceback(
    sample_db: Path, pg_server_dsn: str
) -> None:
    """Ctrl-C twice in quick succession, at several moments of a run: always exit 130 with
    one sentence, never a traceback ("Event loop is closed") or a death by SIGINT."""
    import signal
    import time
    import uuid

    from tests.conftest import _admin, with_database
    from tests.support import start_cli

    outcomes = []
    for attempt, (batches, pause) in enumerate([(3, 0.0), (8, 0.002), (15, 0.01), (25, 0.03)]):
        name = f"t_ctrlc_{uuid.uuid4().hex[:8]}"
        await _admin(pg_server_dsn, f'CREATE DATABASE "{name}"')
        try:
            proc = start_cli(
                "run",
                "--sqlite-path",
                str(sample_db),
                "--postgres-dsn",
                with_database(pg_server_dsn, name),
                "--batch-size",
                "20",
                "--log-format",
                "json",
                "--no-progress",
            )
            assert proc.stderr is not None
            seen = 0
            for line in proc.stderr:
                seen += '"batch_loaded"' in line
                if seen == batches:
                    break
            proc.send_signal(signal.SIGINT)
            time.sleep(pause)
            proc.send_signal(signal.SIGINT)
            rest = proc.stderr.read()
            proc.wait(timeout=60)
            outcomes.append((attempt, proc.returncode, "Traceback" in rest))
        finally:
            await _admin(pg_server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    expected = [(attempt, 130, False) for attempt in range(4)]
    assert expected == outcomes
