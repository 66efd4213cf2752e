"""A source whose file is damaged past its schema (a page of the messages table overwritten):
preflight passes, the reading fails midway, and every command says so in one sentence with
exit 1: `run` keeps what it committed (a rerun resumes), and no verify ends in an internal
error, whether the source is read by one process or by worker processes."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from flux_migrate.core.errors import EXIT_FAILURE
from tests.support import cli

FORMS = (
    ("run",),
    ("verify",),
    ("verify", "--quick"),
    ("verify", "--workers", "2"),
    ("verify", "--quick", "--workers", "1"),
)


def _damage(path: Path) -> None:
    """Overwrite a leaf page in the middle of the messages table."""
    db = sqlite3.connect(path)
    size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = [
        r[0]
        for r in db.execute(
            "SELECT pageno FROM dbstat WHERE name = 'messages' AND pagetype = 'leaf'"
            " ORDER BY pageno"
        )
    ]
    db.close()
    with path.open("r+b") as f:
        f.seek((pages[len(pages) // 2] - 1) * size)
        f.write(os.urandom(size))


@pytest.mark.parametrize("form", FORMS, ids=" ".join)
def test_a_damaged_page_is_one_sentence_for_every_command(
    tmp_path: Path, sample_db: Path, pg_dsn: str, form: tuple[str, ...]
) -> None:
    source = tmp_path / "chat.sqlite"
    shutil.copy(sample_db, source)
    if form[0] == "verify":  # a target to compare with, loaded from the intact file
        done = cli("run", "--sqlite-path", str(source), "--postgres-dsn", pg_dsn)
        assert 0 == done.returncode, done.stderr
    _damage(source)
    done = cli(*form, "--sqlite-path", str(source), "--postgres-dsn", pg_dsn)
    assert EXIT_FAILURE == done.returncode, done.stdout + done.stderr
    assert "internal error" not in done.stderr
    assert "Traceback" not in done.stderr
    assert "Reading the SQLite file failed (database disk image is malformed)" in done.stderr
