"""Settings: one frozen object built from the config file, the environment and the CLI."""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, replace
from datetime import UTC, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flux_migrate.core.dsn import normalize_dsn
from flux_migrate.core.errors import ConfigError
from flux_migrate.core.jsonl_schema import JsonlFile
from flux_migrate.core.mapping import Mapping, MappingError, ignored_yet_mapped, read_mapping
from flux_migrate.core.schema import TABLES, Table, TargetNames
from flux_migrate.pipeline.config_names import check_names

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"
# 10k rows per batch: not the fastest measured (50k was about 5% faster) but within 5% of it
# with about a quarter of the memory; see docs/benchmark.md.
DEFAULT_BATCH_SIZE = 10_000
ON_CONFLICT = ("error", "skip", "update")
MAX_WORKERS = 64
DEFAULT_MAX_WORKERS = 2


def default_workers() -> int:
    """The converter processes of a run when neither the config nor --workers says: the
    FLUX_MIGRATE_WORKERS environment variable, else the CPUs this process may use, from 1 to
    DEFAULT_MAX_WORKERS: two converters keep one loader busy and stay under 300 MB with it;
    on 2 cores they finish a 1M run about an eighth sooner for a sixth more CPU, and on a
    machine the app keeps busy `--workers 1` can be the faster (docs/benchmark.md, "Workers")."""
    named = os.environ.get("FLUX_MIGRATE_WORKERS", "").strip()
    if named:
        try:
            return int(named)
        except ValueError:
            raise ConfigError(
                f"FLUX_MIGRATE_WORKERS must be a whole number, not {named!r}."
            ) from None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, DEFAULT_MAX_WORKERS))


@dataclass(frozen=True)
class DatabaseConfig:
    """What a config file says about one other database of --data-dir ([databases.<stem>]):
    its mapping (a mapping file, or [[databases.<stem>.table]] inline) and the tables sync
    leaves alone."""

    mapping: Mapping | None = None
    sync_skip: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    sqlite_path: Path | None = None
    postgres_dsn: str | None = None
    names: TargetNames = field(default_factory=TargetNames)  # the target schema and tables
    batch_size: int = DEFAULT_BATCH_SIZE
    buffer_batches: int = 2
    naive_timezone: tzinfo = UTC  # the zone of timestamps written without an offset
    strip_nul: bool = False
    on_conflict: str = "error"
    retry_seconds: float = 60.0
    defer_constraints: bool = True
    busy_timeout: float = 10.0  # seconds to wait for a lock the app holds on the SQLite file
    # Converter processes of `run` ([load] workers, --workers; 1: convert in the run's process).
    workers: int = field(default_factory=default_workers)
    # Benchmark only: one transaction per table instead of one commit per batch (no resume).
    single_transaction: bool = False
    # The tables to load: from the config file's [[table]]s, or discovered when the run starts.
    mapping: Mapping | None = None

    @property
    def tables(self) -> tuple[Table, ...]:
        """The tables of the mapping in load order (the app's two before one is resolved)."""
        return self.mapping.tables if self.mapping is not None else TABLES

    jsonl: tuple[JsonlFile, ...] = ()  # JSONL files, each into a table (issue 12)
    sync_skip: tuple[str, ...] = ()  # tables `sync` leaves alone ([sync] skip_tables)
    # [databases.<file stem>] of the config file: the other databases of --data-dir
    databases: tuple[tuple[str, DatabaseConfig], ...] = ()
    config_path: Path | None = None  # the config file read (None: the default)

    def database(self, stem: str) -> DatabaseConfig:
        """The config of the data directory's database ``stem`` (defaults when none)."""
        return dict(self.databases).get(stem, DatabaseConfig())

    # run --final: a JSONL file's last line without newline is a record (the app no longer
    # writes the file); else it waits for its newline.
    jsonl_final: bool = False

    def require_source(self) -> Path:
        if self.sqlite_path is None:
            raise ConfigError("No SQLite file given; pass --sqlite-path PATH.")
        return self.sqlite_path

    def require_dsn(self) -> str:
        if not self.postgres_dsn:
            raise ConfigError(
                "No PostgreSQL given; pass --postgres-dsn or set POSTGRES_DSN"
                " (e.g. postgresql://user@host:5432/dbname, password via PGPASSWORD or ~/.pgpass)."
            )
        try:
            return normalize_dsn(self.postgres_dsn)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build settings: defaults < config file < environment < explicit overrides (CLI)."""
    path = config or DEFAULT_CONFIG
    data: dict[str, Any] = {}
    if config is not None or path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"The config file {path} does not exist.") from None
        except IsADirectoryError:
            raise ConfigError(f"The config file {path} is a directory; name a TOML file.") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise ConfigError(f"The config file {path} cannot be read ({reason}).") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"The config file {path} is not valid TOML: {exc}.") from None
        check_names(data, path.read_text(encoding="utf-8"), path)
    get = _TypedConfig(path, data)
    values: dict[str, Any] = {}
    if "table" in data:
        values["mapping"] = _mapping_of(data, path, "")
    values["sync_skip"] = _names(get, "sync", "skip_tables")
    values["databases"] = tuple(
        (stem, _database_config(get, stem)) for stem in get.data.get("databases", {})
    )
    values["config_path"] = config
    values["names"] = TargetNames(
        schema=get.text("target", "schema", "public"),
        sessions=get.text("tables.sessions", "target", "sessions"),
        messages=get.text("tables.messages", "target", "messages"),
    )
    for section, key, name, read in (
        ("transform", "naive_timezone", "naive_timezone", get.text),
        ("transform", "strip_nul", "strip_nul", get.flag),
        ("source", "busy_timeout", "busy_timeout", get.seconds),
        ("load", "batch_size", "batch_size", get.integer),
        ("load", "buffer_batches", "buffer_batches", get.integer),
        ("load", "workers", "workers", get.integer),
        ("load", "retry_seconds", "retry_seconds", get.seconds),
        ("load", "defer_constraints", "defer_constraints", get.flag),
        ("load", "single_transaction", "single_transaction", get.flag),
        ("load", "on_conflict", "on_conflict", get.text),
    ):
        if get.has(section, key):
            values[name] = read(section, key, None)
    env_dsn = os.environ.get("POSTGRES_DSN")
    if env_dsn:
        values["postgres_dsn"] = env_dsn
    env_sqlite = os.environ.get("SQLITE_PATH")
    if env_sqlite:
        values["sqlite_path"] = Path(env_sqlite)
    jsonl_paths = overrides.pop("jsonl", None)
    values["jsonl"] = jsonl_settings(get, jsonl_paths)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("naive_timezone"), str):
        values["naive_timezone"] = parse_zone(values["naive_timezone"])
    if values.get("sqlite_path") is not None:
        values["sqlite_path"] = Path(values["sqlite_path"])
    settings = Settings(**values)
    validate(settings)
    return settings


def jsonl_settings(get: _TypedConfig, paths: list[Path] | None) -> tuple[JsonlFile, ...]:
    """The JSONL files of a run: ``--jsonl`` paths (else ``files`` under [jsonl]), each named
    and flagged by its ``[jsonl.<file stem>]`` table (``table = "name"``, ``snapshot = true``)."""
    if paths is None:
        listed = get.data.get("jsonl", {}).get("files", []) if get.has("jsonl", "files") else []
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise ConfigError(f"files in [jsonl] of the config file {get.path} must be paths.")
        paths = [Path(p) for p in listed]
    out = []
    for path in paths:
        section = f"jsonl.{Path(path).stem}"
        table = get.text(section, "table", Path(path).stem)
        out.append(JsonlFile(Path(path), table, get.flag(section, "snapshot", False)))
    names = [f.table for f in out]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"Two JSONL files go to the same table {name!r}; name one otherwise.")
        if not name or len(name.encode()) > 63:
            raise ConfigError(f"The JSONL table name {name!r} must be 1 to 63 bytes long.")
    return tuple(out)


def _mapping_of(data: dict[str, Any], path: Path, where: str) -> Mapping:
    """The mapping in a parsed TOML table (``where``: its section, for the message)."""
    try:
        mapping = read_mapping(data)
    except MappingError as exc:
        raise ConfigError(f"The mapping{where} in {path} is not usable: {exc}.") from None
    both = ignored_yet_mapped(mapping)
    if both:
        raise ConfigError(
            f"The mapping{where} in {path} both places and ignores {', '.join(both)}; remove"
            " its [[table]] entry or column to leave it out, or its [ignore] entry to load it."
        )
    return mapping


def _names(get: _TypedConfig, section: str, key: str) -> tuple[str, ...]:
    value: Any = get.data
    for part in section.split("."):
        value = value.get(part, {}) if isinstance(value, dict) else None
    value = value.get(key, []) if isinstance(value, dict) else None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} in [{section}] of the config file {get.path} must be names.")
    return tuple(value)


def _database_config(get: _TypedConfig, stem: str) -> DatabaseConfig:
    """[databases.<stem>]: ``mapping = "file.toml"`` (relative to the config file) or an
    inline mapping, and ``[databases.<stem>.sync] skip_tables``."""
    section = get._section(f"databases.{stem}")
    mapping = None
    if "mapping" in section:
        if "table" in section:
            raise ConfigError(
                f"[databases.{stem}] of {get.path} has both a mapping file and [[table]]s;"
                " keep one."
            )
        file = get.path.parent / get.text(f"databases.{stem}", "mapping", None)
        try:
            text = file.read_text(encoding="utf-8")
            data = tomllib.loads(text)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(
                f"The mapping file {file} of [databases.{stem}] cannot be read ({exc})."
            ) from None
        check_names(data, text, file)
        mapping = _mapping_of(data, file, "")
    elif "table" in section:
        mapping = _mapping_of(section, get.path, f" of [databases.{stem}]")
    return DatabaseConfig(mapping, _names(get, f"databases.{stem}.sync", "skip_tables"))


class _TypedConfig:
    """Values of a parsed config file, each checked for its TOML type (``"false"`` is text, not
    a boolean); a wrong type is a ConfigError naming the key."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    def _section(self, section: str) -> dict[str, Any]:
        found: Any = self.data
        for part in section.split("."):
            found = found.get(part, {}) if isinstance(found, dict) else None
            if not isinstance(found, dict):
                raise ConfigError(f"[{section}] in the config file {self.path} must be a table.")
        return found  # type: ignore[no-any-return]

    def has(self, section: str, key: str) -> bool:
        return key in self._section(section)

    def _wrong(self, section: str, key: str, value: Any, wanted: str) -> ConfigError:
        return ConfigError(
            f"{key} in [{section}] of the config file {self.path} must be {wanted}, not {value!r}."
        )

    def _value(self, section: str, key: str, default: Any) -> Any:
        return self._section(section).get(key, default)

    def text(self, section: str, key: str, default: str | None) -> str:
        value = self._value(section, key, default)
        if not isinstance(value, str):
            raise self._wrong(section, key, value, "a quoted string")
        return value

    def flag(self, section: str, key: str, default: bool | None) -> bool:
        value = self._value(section, key, default)
        if not isinstance(value, bool):
            raise self._wrong(section, key, value, "true or false (unquoted)")
        return value

    def integer(self, section: str, key: str, default: int | None) -> int:
        value = self._value(section, key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(section, key, value, "a whole number")
        return value

    def seconds(self, section: str, key: str, default: float | None) -> float:
        value = self._value(section, key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong(section, key, value, "a number of seconds")
        return float(value)


MAX_BATCH_SIZE = 1_000_000


def validate(settings: Settings) -> None:
    if not 1 <= settings.batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(
            f"--batch-size must be between 1 and {MAX_BATCH_SIZE:,}, not {settings.batch_size}."
        )
    for what, seconds in (
        ("retry_seconds", settings.retry_seconds),
        ("busy_timeout", settings.busy_timeout),
    ):
        if not (math.isfinite(seconds) and 0 <= seconds <= 86_400):
            raise ConfigError(f"{what} must be a number of seconds from 0 to 86400, not {seconds}.")
    if not 1 <= settings.buffer_batches <= 16:
        raise ConfigError("buffer_batches must be between 1 and 16.")
    if not 1 <= settings.workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be between 1 and {MAX_WORKERS}, not {settings.workers}.")
    if settings.on_conflict not in ON_CONFLICT:
        raise ConfigError(f"--on-conflict must be one of {', '.join(ON_CONFLICT)}.")
    for name in (settings.names.schema, settings.names.sessions, settings.names.messages):
        if not name or len(name.encode()) > 63:
            raise ConfigError(f"The target name {name!r} must be 1 to 63 bytes long.")
    if settings.names.sessions == settings.names.messages:
        raise ConfigError("The sessions and messages target tables must have different names.")


def parse_zone(name: str) -> tzinfo:
    """The zone named ``name``: UTC (any case) or an IANA name; ConfigError when unknown."""
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"The time zone {name!r} is unknown; use an IANA name like Europe/Berlin."
        ) from None


def zone_name(zone: tzinfo) -> str:
    """The name a zone was configured by (as parse_zone reads it)."""
    return zone.key if isinstance(zone, ZoneInfo) else str(zone)
