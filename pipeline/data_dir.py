"""The app's data directory: which of its files `run --data-dir` migrates, and how.

``memory.db`` and every ``*.jsonl`` go to the main target schema (one migration, as with
``--sqlite-path`` and ``--jsonl``); every other ``*.db`` is a migration of its own into the
schema named after its file (``audit.db`` -> schema ``audit``), under its own checkpoints and
lock. One report holds them all, the extra databases' tables named ``schema.table``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flux_migrate.core.errors import ConfigError, Interrupted, MigrateError
from flux_migrate.core.schema import BOOKKEEPING_SCHEMA, TargetNames
from flux_migrate.pipeline.progress import NoProgress, Progress
from flux_migrate.pipeline.report import RunReport
from flux_migrate.pipeline.settings import Settings
from flux_migrate.pipeline.stop import StopFlag
from flux_migrate.pipeline.verify import QuickVerify, TableVerify

if TYPE_CHECKING:
    from flux_migrate.pipeline.sync import SyncReport

MEMORY_DB = "memory.db"
# A schema name usable unquoted: lower-case letters, digits and underscores, not a digit first.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]*")


SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")  # compared case-insensitively
JSONL_SUFFIX = ".jsonl"
_SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass(frozen=True)
class DataDir:
    """The files found: the app's memory database, the JSONL stores, other SQLite files, and
    every other entry of the directory with the reason it is left alone."""

    memory: Path | None
    jsonl: tuple[Path, ...]
    other_dbs: tuple[Path, ...]
    ignored: tuple[tuple[str, str], ...] = ()
    path: Path = Path()


def scan_data_dir(path: Path) -> DataDir:
    """The migratable files directly in ``path`` (sorted by name: ``memory.db``, ``*.jsonl``,
    other ``*.db``, ``*.sqlite``, ``*.sqlite3``, suffixes in any case) and what is ignored and
    why; ConfigError when ``path`` is not a directory."""
    if not path.is_dir():
        raise ConfigError(f"--data-dir {path} is not a directory; name the app's data directory.")
    entries = sorted(path.iterdir(), key=lambda p: p.name)
    files = [p for p in entries if p.is_file()]
    memory = path / MEMORY_DB
    taken = [p for p in files if _kind(p) is not None]
    return DataDir(
        memory=memory if memory.is_file() else None,
        jsonl=tuple(p for p in taken if _kind(p) == "jsonl"),
        other_dbs=tuple(p for p in taken if _kind(p) == "sqlite" and p.name != MEMORY_DB),
        ignored=tuple((p.name, _why_ignored(p)) for p in entries if p not in taken),
        path=path,
    )


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == JSONL_SUFFIX:
        return "jsonl"
    return "sqlite" if suffix in SQLITE_SUFFIXES else None


def _why_ignored(path: Path) -> str:
    """Why an entry of the data directory is not migrated, in a few words."""
    if path.is_dir():
        return "a folder: not searched"
    for tail, what in (("-wal", "write-ahead log"), ("-shm", "shared memory"),
                       ("-journal", "journal")):  # fmt: skip
        if path.name.endswith(tail) and _kind(path.with_name(path.name[: -len(tail)])):
            return f"SQLite's {what}, read with its database"
    if not path.is_file():
        return "not a regular file"
    if path.name.startswith("."):
        return "hidden"
    try:
        with path.open("rb") as f:
            header = f.read(16)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if header == _SQLITE_HEADER:
        return "SQLite, but not *.db/*.sqlite/*.sqlite3: rename it to take it"
    return "not *.db, *.sqlite, *.sqlite3 or *.jsonl"


def inventory_lines(found: DataDir, main: Settings, databases: Sequence[Database]) -> list[str]:
    """What --data-dir takes (each file and where it goes) and what it leaves (and why)."""
    out = [f"Data directory {found.path}:"]
    schema = main.names.schema
    if found.memory is not None and main.sqlite_path == found.memory:
        out.append(f"  {MEMORY_DB} -> schema {schema} (the app's memory)")
    out += [f"  {p.name} -> table {schema}.{_table_of(p, main)}" for p in found.jsonl]
    out += [f"  {db.path.name} -> schema {db.schema}" for db in databases]
    if found.memory is not None and main.sqlite_path != found.memory:
        out.append(f"  ignored: {MEMORY_DB} (--sqlite-path names another file)")
    out += [f"  ignored: {name} ({why})" for name, why in found.ignored]
    return out


def _table_of(path: Path, main: Settings) -> str:
    return next((f.table for f in main.jsonl if f.path == path), path.stem)


@dataclass(frozen=True)
class Database:
    """One more SQLite file of the data directory and the settings of its own migration."""

    path: Path
    settings: Settings

    @property
    def schema(self) -> str:
        return self.settings.names.schema


def other_databases(found: DataDir, main: Settings) -> tuple[Database, ...]:
    """The data directory's other ``*.db`` files (not the main source), each with the settings
    that migrate it into the schema named after its stem (discovered mapping, no JSONL).

    ConfigError, before anything runs, when a stem is no usable schema name or names a schema
    already taken (the main schema, the bookkeeping schema, another file's)."""
    main_source = main.sqlite_path.resolve() if main.sqlite_path is not None else None
    taken = {main.names.schema: "the main target schema", BOOKKEEPING_SCHEMA: "flux-migrate's"}
    out = []
    for path in found.other_dbs:
        if path.resolve() == main_source:
            continue
        schema = path.stem
        if not _SCHEMA_NAME.fullmatch(schema) or len(schema.encode()) > 63:
            raise ConfigError(
                f"{path.name} in --data-dir would go to schema {schema!r}, which is not a plain"
                " PostgreSQL name (lower-case letters, digits and _, not a digit first, at most"
                " 63 bytes); rename the file or migrate it with --sqlite-path and a [target]"
                " schema in --config. Nothing was migrated."
            )
        if schema.startswith("pg_") or schema == "information_schema" or schema in taken:
            owner = taken.get(schema, "a PostgreSQL system schema")
            raise ConfigError(
                f"{path.name} in --data-dir would go to schema {schema!r}, which is {owner};"
                " rename the file or migrate it with --sqlite-path and a [target] schema in"
                " --config. Nothing was migrated."
            )
        taken[schema] = f"the schema of {path.name}"
        names = TargetNames(schema=schema)
        own = main.database(schema)  # [databases.<stem>] of --config: mapping, sync skips
        settings = main.with_(
            sqlite_path=path, names=names, mapping=own.mapping, jsonl=(), sync_skip=own.sync_skip
        )
        out.append(Database(path, settings))
    _refuse_unknown_databases(main, [db.schema for db in out], found)
    return tuple(out)


def _refuse_unknown_databases(main: Settings, schemas: list[str], found: DataDir) -> None:
    """A [databases.<stem>] of the config naming no database of the directory is a typo or a
    missing file: refused (ConfigError) naming the nearest database, never ignored."""
    import difflib

    for stem, _ in main.databases:
        if stem not in schemas:
            near = difflib.get_close_matches(stem, schemas, n=1)
            hint = f"; did you mean [databases.{near[0]}]?" if near else "."
            raise ConfigError(
                f"[databases.{stem}] of {main.config_path} names no database of --data-dir"
                f" {found.path} (it holds {', '.join(schemas) or 'none'}){hint} Nothing was done."
            )


def has_main(settings: Settings) -> bool:
    """Whether the main migration has a source: a SQLite file or JSONL files."""
    return settings.sqlite_path is not None or bool(settings.jsonl)


class _Prefixed:
    """A progress display that shows an extra database's tables as ``schema.table``."""

    def __init__(self, inner: Progress, schema: str) -> None:
        self.inner, self.schema = inner, schema

    def start(self, table: str, total: int) -> None:
        self.inner.start(f"{self.schema}.{table}", total)

    def advance(self, table: str, rows: int, quarantined: int = 0) -> None:
        self.inner.advance(f"{self.schema}.{table}", rows, quarantined)

    def finish(self, table: str) -> None:
        self.inner.finish(f"{self.schema}.{table}")


async def preflight_all(
    command: str, main: Settings, databases: Sequence[Database], *, dry_run: bool = False
) -> None:
    """Before any database starts: every source file exists and the role holds every grant
    ``command`` needs on every schema it will read or fill (exit 2, one sentence)."""
    from flux_migrate.pipeline.grants import check_sources, require_grants

    parts = ([main] if has_main(main) else []) + [db.settings for db in databases]
    for settings in parts:
        check_sources(settings)
    schemas = list(dict.fromkeys(s.names.schema for s in parts or [main]))
    await require_grants(command, main, schemas, dry_run=dry_run)


async def migrate_all(
    main: Settings,
    databases: Sequence[Database],
    *,
    report: RunReport,
    progress: Progress | None = None,
    stop: StopFlag | None = None,
    restart: bool = False,
    show_mapping: Callable[..., None] | None = None,
) -> RunReport:
    """The main migration (when it has a source), then each other database into its schema;
    ``report`` gets every table (``schema.table`` for the other databases).

    A database that fails does not keep the others from running; at the end the first failure
    is raised, naming its file. Interrupted (``stop`` set by a signal: at the next batch
    boundary) is raised at once, and no further database starts.
    """
    from flux_migrate.pipeline.runner import migrate

    progress = progress or NoProgress()
    stop = stop or StopFlag()
    failures: list[MigrateError] = []
    await preflight_all("run", main, databases)
    if has_main(main):
        try:
            await migrate(
                main, progress=progress, stop=stop, restart=restart, report=report,
                show_mapping=show_mapping,
            )  # fmt: skip
        except Interrupted:
            raise
        except MigrateError as exc:
            failures.append(exc)
    for db in databases:
        stop.check()
        part = RunReport(run_id=report.run_id)
        shown = None
        if show_mapping is not None:
            shown = _titled(show_mapping, f"{db.path.name} into schema {db.schema}")
        try:
            await migrate(
                db.settings, progress=_Prefixed(progress, db.schema), stop=stop,
                restart=restart, report=part, show_mapping=shown,
            )  # fmt: skip
        except Interrupted:
            raise
        except MigrateError as exc:
            failures.append(type(exc)(f"{db.path.name}: {exc.message}"))
        finally:
            _merge(report, part, db.schema)
    if failures:
        report.status = "failed"
        report.message = " ".join(f.message for f in failures)
        raise failures[0]
    report.status = "completed"
    return report


async def sync_all(
    main: Settings,
    databases: Sequence[Database],
    *,
    dry_run: bool = False,
    stop: StopFlag | None = None,
    progress: Progress | None = None,
) -> tuple[SyncReport, RunReport | None]:
    """Sync the main SQLite source (when there is one), then each other database into its
    schema (their tables named ``schema.table`` in the one report); then, unless ``dry_run``,
    catch up the JSONL files as `run` does (new lines loaded, rewritten files reconciled),
    returning that run's report too (None without JSONL files). Stops at the first failure."""
    from flux_migrate.pipeline.runner import migrate
    from flux_migrate.pipeline.sync import SyncReport, sync

    report = SyncReport(run_id=uuid.uuid4().hex[:12], dry_run=dry_run)
    await preflight_all("sync", main, databases, dry_run=dry_run)
    if main.sqlite_path is not None:
        report = await sync(main, dry_run=dry_run, stop=stop, progress=progress)
    for db in databases:
        try:
            shown = None if progress is None else _Prefixed(progress, db.schema)
            part = await sync(db.settings, dry_run=dry_run, stop=stop, progress=shown)
        except Interrupted:
            raise
        except MigrateError as exc:
            raise type(exc)(f"{db.path.name}: {exc.message}{_applied(report)}") from None
        for name in part.tables:
            report.tables[f"{db.schema}.{name}"] = part.tables[name]
            report.plans[f"{db.schema}.{name}"] = part.plans[name]
        report.quarantined_open += part.quarantined_open
        report.not_synced += part.not_synced
    if dry_run or not main.jsonl:
        return report, None
    jsonl = RunReport(run_id=report.run_id)
    await migrate(main.with_(sqlite_path=None), report=jsonl, stop=stop, progress=progress)
    return report, jsonl


def _applied(report: SyncReport) -> str:
    """What the databases synced before a failure applied, as a sentence (they stay applied)."""
    if not report.tables:
        return ""
    done = ", ".join(
        f"{name} {t.inserted:,}/{t.updated:,}/{t.deleted:,}" for name, t in report.tables.items()
    )
    verb = "would have applied" if report.dry_run else "applied and committed"
    return f" Before it, sync {verb} (inserted/updated/deleted): {done}."


def _titled(show: Callable[..., None], where: str) -> Callable[..., None]:
    def show_titled(*args: Any) -> None:
        show(*args, where=where)

    return show_titled


def _merge(report: RunReport, part: RunReport, schema: str) -> None:
    """Add an extra database's run to the report: its tables as ``schema.table``."""
    for name, table in part.tables.items():
        report.tables[f"{schema}.{name}"] = table
    report.quarantined_open += part.quarantined_open
    report.constraints_seconds += part.constraints_seconds
    report.notes += [f"{schema}: {note}" for note in part.notes]
    if part.status in ("failed", "interrupted"):
        report.status = part.status
        report.message = f"{schema}: {part.message}"


async def verify_all(databases: Sequence[Database], *, limit: int) -> list[TableVerify]:
    """The full comparison of every other database, its tables named ``schema.table``."""
    from flux_migrate.pipeline.verify import verify_rows

    out = []
    for db in databases:
        for t in await verify_rows(db.settings, limit=limit):
            t.table = f"{db.schema}.{t.table}"
            out.append(t)
    return out


async def verify_all_quick(databases: Sequence[Database]) -> list[QuickVerify]:
    """Counts and checksums of every other database, its tables named ``schema.table``."""
    from flux_migrate.pipeline.verify import verify_quick

    out = []
    for db in databases:
        out += [replace(q, table=f"{db.schema}.{q.table}") for q in await verify_quick(db.settings)]
    return out
