"""A mapping file that both places and ignores a table or a column is refused before anything
is written (exit 2, naming each): the column may have been left out on purpose, for what it
holds, and was loaded all the same."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from flux_migrate.core.errors import EXIT_USAGE
from tests.support import cli, fetchval

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("ignore", "named"),
    [
        ('tables = []\ncolumns = ["people.ssn"]', "column people.ssn"),
        ('tables = ["people"]\ncolumns = []', "table people"),
        ('tables = ["people"]\ncolumns = ["people.ssn", "people.name"]', "table people"),
    ],
)
async def test_a_mapping_that_both_places_and_ignores_is_refused(
    tmp_path: Path, pg_dsn: str, ignore: str, named: str
) -> None:
    source = tmp_path / "p.sqlite"
    db = sqlite3.connect(source)
    db.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, ssn TEXT)")
    db.execute("INSERT INTO people VALUES (1, 'ann', '123-45-6789')")
    db.commit()
    db.close()
    config = tmp_path / "mapping.toml"
    done = cli("init", "--sqlite-path", str(source), "--out", str(config))
    assert 0 == done.returncode, done.stderr
    text = config.read_text()
    assert "tables = []\ncolumns = []" in text
    config.write_text(text.replace("tables = []\ncolumns = []", ignore, 1))
    for command in ("run", "verify", "sync"):
        done = cli(command, "--config", str(config), "--sqlite-path", str(source),
                   "--postgres-dsn", pg_dsn)  # fmt: skip
        assert EXIT_USAGE == done.returncode, done.stdout + done.stderr
        assert f"both places and ignores {named}" in done.stderr, done.stderr
    assert 0 == await fetchval(
        pg_dsn,
        "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
        "'information_schema')",
    )
