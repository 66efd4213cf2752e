"""What people and machines see: quiet readable logs when piped, every event as JSON on request,
-v and -q, the rich tables, the live display and the demo's message excerpts."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from flux_migrate.pipeline.demo import clip
from flux_migrate.pipeline.progress import LiveProgress
from flux_migrate.pipeline.report import print_table
from tests.support import cli


def _run(sample_db: Path, pg_dsn: str, *extra: str) -> tuple[int, str, str]:
    done = cli(
        "run", "--sqlite-path", str(sample_db), "--postgres-dsn", pg_dsn, "--batch-size", "500",
        *extra,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def _json_lines(text: str) -> list[dict[str, object]]:
    """The lines of ``text`` that are JSON objects."""
    found = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            found.append(record)
    return found


def _events(stderr: str) -> list[str]:
    """The event names of readable log lines (the word after the ``[level]`` column)."""
    return [line.split("]", 1)[1].split()[0] for line in stderr.splitlines() if "] " in line]


def _levels(stderr: str) -> set[str]:
    return {line.split("[", 1)[1].split("]", 1)[0].strip() for line in stderr.splitlines()}


def test_piped_default_logs_readable_info_lines_and_no_json(sample_db: Path, pg_dsn: str) -> None:
    """Piped, without options, stderr has one readable line per table and per run, no JSON and
    no per-batch events."""
    code, out, err = _run(sample_db, pg_dsn)
    assert 0 == code, err
    assert [] == _json_lines(err)
    events = _events(err)
    assert ["sessions", "messages"] == [
        line.split("table=")[1].split()[0] for line in err.splitlines() if "table_completed" in line
    ]
    assert {"run_started", "table_started", "table_completed", "run_completed"} <= set(events)
    assert "batch_loaded" not in events
    assert {"info"} == _levels(err)
    assert "rows/s" in out


def test_verbose_adds_the_batch_events(sample_db: Path, pg_dsn: str) -> None:
    """With -v, each committed batch is a readable debug line too (still no JSON)."""
    code, _, err = _run(sample_db, pg_dsn, "-v")
    assert 0 == code, err
    assert [] == _json_lines(err)
    batches = [line for line in err.splitlines() if "batch_loaded" in line]
    assert len(batches) >= 2
    assert all("[debug" in line for line in batches)
    assert "run_completed" in _events(err)


def test_quiet_prints_only_the_summary_and_errors(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """With -q a clean run writes nothing on stderr and the summary on stdout; a run refused
    before it starts still says why, in its one sentence and nothing else."""
    code, out, err = _run(sample_db, pg_dsn, "-q")
    assert (0, "") == (code, err)
    header, *rest = out.splitlines()
    assert ["table", "read", "loaded", "not", "loaded", "seconds", "rows/s"] == header.split()
    assert ["sessions", "messages"] == [line.split()[0] for line in rest[1:3]]
    missing = tmp_path / "missing.sqlite"
    done = cli("run", "--sqlite-path", str(missing), "--postgres-dsn", pg_dsn, "-q")
    assert 2 == done.returncode
    *logged, said = done.stderr.splitlines()
    assert said.startswith("flux-migrate: error: The SQLite file ")
    assert set() == _levels("\n".join(logged))


def test_json_keeps_every_event(sample_db: Path, pg_dsn: str) -> None:
    """With --log-format json every stderr line is a JSON event, the debug batch events too."""
    code, _, err = _run(sample_db, pg_dsn, "--log-format", "json")
    assert 0 == code, err
    records = _json_lines(err)
    assert len(err.splitlines()) == len(records)
    events = [r["event"] for r in records]
    assert "run_started" == events[0] and "run_completed" == events[-1]
    batches = [r for r in records if r["event"] == "batch_loaded"]
    assert len(batches) >= 2
    assert {"debug"} == {r["level"] for r in batches}
    assert {"sessions", "messages"} == {r["table"] for r in batches}


def test_print_table_renders_the_rows_under_a_rule() -> None:
    """print_table prints the header, a rule and each row's cells, aligned per column; cells
    are text, never markup, and control characters are escaped."""
    out = io.StringIO()
    rows = [("table", "read", "note"), ("sessions", "1,000", "[bold]x"), ("m", "5", "a\x1bb")]
    print_table(rows, out, align="lrl")
    lines = out.getvalue().splitlines()
    assert ["table", "read", "note"] == lines[0].split()
    assert set(lines[1]) == {"─"}
    assert ["sessions", "1,000", "[bold]x"] == lines[2].split()
    assert ["m", "5", "a\\x1bb"] == lines[3].split()
    assert lines[2].index("1,000") + len("1,000") == lines[3].index("5") + 1  # right-aligned
    assert 4 == len(lines)


def test_print_table_keeps_long_cells_whole_when_not_a_terminal() -> None:
    """Piped, a cell wider than any terminal prints on one line, whole."""
    out = io.StringIO()
    detail = "word " * 60
    print_table([("table", "detail"), ("messages", detail.strip())], out, align="ll")
    assert detail.strip() == out.getvalue().splitlines()[2].split(None, 1)[1]


def test_live_progress_shows_rows_rate_and_quarantined() -> None:
    """The live display has a line per table with rows done of total and rows quarantined."""
    screen = Console(file=io.StringIO(), force_terminal=True, width=80, record=True)
    with LiveProgress(screen) as progress:
        progress.start("sessions", 1_000)
        progress.advance("sessions", 600, 2)
        progress.advance("sessions", 400, 1)
        progress.finish("sessions")
        progress.start("messages", 9_500_000)
        progress.advance("messages", 2_000_000, 12_345)
        progress.start("audit.events", 41)
        progress.advance("audit.events", 41)
        frame = Console(file=io.StringIO(), width=80, record=True)
        frame.print(progress._bars.get_renderable())  # the display as an 80-column screen shows it
    text = frame.export_text()
    last = text.split("sessions")[-1]
    assert "1,000/1,000" in last and "3 quarantined" in last and "rows/s" in last
    assert "2.00M/9.50M" in text.split("messages")[-1]
    assert "12,345 quarantined" in text.split("messages")[-1]  # nothing cut on 80 columns
    assert 3 == len(text.splitlines())  # a line per table, none wrapped or cut


@pytest.mark.parametrize(
    ("text", "width", "shown"),
    [
        ("a short message", 20, "a short message"),
        ("the quick brown fox jumps", 12, "the quick…"),
        ("thequickbrownfox", 8, "thequic…"),
        ("ends with a comma, then more", 19, "ends with a comma…"),
    ],
)
def test_clip_keeps_whole_words(text: str, width: int, shown: str) -> None:
    """A message is shown whole when it fits, else as whole words and an ellipsis."""
    assert shown == clip(text, width)
    assert len(clip(text, width)) <= width


def test_a_piped_run_of_the_app_database_prints_at_most_8_stderr_lines(
    sample_db: Path, pg_dsn: str
) -> None:
    """Piped at the default level, a run of the app's memory.db prints a handful of lines:
    keys and indexes are one line, counts of 0 and the run id's noise are not repeated."""
    code, _, err = _run(sample_db, pg_dsn)
    assert 0 == code, err
    lines = err.splitlines()
    assert len(lines) <= 8, err
    assert 1 == sum("constraint" in line for line in lines), err
    assert not any("=0 " in f"{line} " for line in lines), err


def test_an_unfinished_run_says_so_above_its_summary() -> None:
    """A failed or interrupted run's summary starts by saying so; a completed one does not."""
    from flux_migrate.pipeline.report import RunReport, TableReport, print_summary

    for status, word in (("failed", "FAILED"), ("interrupted", "INTERRUPTED"), ("completed", "")):
        report = RunReport(run_id="r", status=status)
        report.tables["messages"] = TableReport(extracted=10, loaded=10, seconds=1.0)
        out = io.StringIO()
        print_summary(report, out)
        first = out.getvalue().splitlines()[0]
        assert word in first if word else first.startswith("table"), first


def test_a_resumed_run_shows_what_every_run_loaded(
    sample_db: Path, pg_dsn: str, tmp_path: Path
) -> None:
    """A rerun that loads the rows added since shows, beside this run's counts, the total
    every run loaded per table."""
    import shutil
    import sqlite3

    source = tmp_path / "memory.db"
    shutil.copyfile(sample_db, source)
    assert 0 == _run(source, pg_dsn)[0]
    db = sqlite3.connect(source)
    total = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    db.execute(
        "INSERT INTO messages (id, session_id, role, content, metadata, created_at)"
        " SELECT 'n' || substr(id, 2), session_id, role, content, metadata, created_at"
        " FROM messages LIMIT 5"
    )
    db.commit()
    db.close()
    code, out, err = _run(source, pg_dsn)
    assert 0 == code, err
    header, _, *rows = out.splitlines()[-4:]
    assert header.split()[-2:] == ["total", "loaded"], out
    messages = next(r for r in out.splitlines() if r.startswith("messages"))
    assert ["5", "5", f"{total + 5:,}"] == [messages.split()[i] for i in (1, 2, -1)], out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    "header",
    [
        ("table", "scanned", "insert", "update", "delete", "conflicts", "quarantined", "seconds"),
        ("table", "matched", "different", "missing", "extra", "quarantined", "skipped", "result"),
    ],
    ids=["sync", "verify"],
)
def test_wide_tables_fit_an_80_column_terminal_unwrapped(
    monkeypatch: pytest.MonkeyPatch, header: tuple[str, ...]
) -> None:
    """sync's and verify's tables on an 80-column terminal: every line within 80 columns and
    every header name whole on the header line (none folded onto a second line)."""
    monkeypatch.setenv("COLUMNS", "80")
    out = _Terminal()
    row = ("messages", "1,050,274", *("12,345" for _ in header[2:-1]), "MISMATCH")
    print_table([header, row], out, align="l" + "r" * (len(header) - 2) + "l")
    lines = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue()).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[0].split() == list(header), lines
