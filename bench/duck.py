"""DuckDB with its sqlite and postgres extensions, as a data engineer would use it instead:
one ``INSERT INTO pg.t SELECT ... CAST(...)`` per table into bare tables. The keys and the index
are built afterwards by the bench, the same way as for every other contender. DuckDB keeps no
checkpoint, quarantines nothing and cannot resume.

Needs ``pip install duckdb duckdb-ext-sqlite duckdb-ext-postgres`` (the ``bench`` extra); the
extensions load from those wheels, without network.
"""

from __future__ import annotations

import sqlite3
import sys
from importlib import metadata
from pathlib import Path

from flux_migrate.core.schema import TABLES, Kind


def extension(distribution: str) -> Path:
    """The ``.duckdb_extension`` file shipped in a duckdb-ext-* wheel."""
    for file in metadata.files(distribution) or ():
        if str(file).endswith(".duckdb_extension"):
            return Path(str(file.locate()))
    raise SystemExit(f"bench: {distribution} ships no extension file")


def available() -> bool:
    try:
        import duckdb  # noqa: F401

        extension("duckdb-ext-sqlite")
        extension("duckdb-ext-postgres")
    except (ImportError, metadata.PackageNotFoundError, SystemExit):
        return False
    return True


def select_sql(table_name: str, source_columns: set[str]) -> str:
    """The INSERT ... SELECT of one app table, converting in DuckDB's own casts (a newer app's
    ``sessions.user_id`` included when the source has it)."""
    (table,) = [t for t in TABLES if t.name == table_name]
    names, exprs = [], []
    for c in table.columns + tuple(t for t in table.target_only if t.name in source_columns):
        names.append(f'"{c.name}"')
        if c.kind is Kind.TIMESTAMP:
            exprs.append(f'CAST("{c.name}" AS TIMESTAMPTZ)')
        elif c.kind is Kind.JSON:
            exprs.append(f'CAST("{c.name}" AS JSON)')
        else:
            exprs.append(f'"{c.name}"')
    return (
        f"INSERT INTO pg.public.{table.name} ({', '.join(names)})"
        f" SELECT {', '.join(exprs)} FROM src.{table.name}"
    )


def main(source: str, dsn: str) -> None:
    import duckdb

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"LOAD '{extension('duckdb-ext-sqlite')}'")
    con.execute(f"LOAD '{extension('duckdb-ext-postgres')}'")
    con.execute(f"ATTACH '{source}' AS src (TYPE sqlite, READ_ONLY)")
    con.execute(f"ATTACH '{dsn}' AS pg (TYPE postgres)")
    with sqlite3.connect(f"file:{source}?mode=ro", uri=True) as src:
        for table in TABLES:
            columns = {r[1] for r in src.execute(f'PRAGMA table_info("{table.name}")')}
            con.execute(select_sql(table.name, columns))
    con.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
