"""Settings: one frozen object built from the config file, the environment and the CLI."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from datetime import UTC, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from core.errors import ConfigError
from core.schema import TargetNames

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"
# 10k rows per batch: not the fastest measured (50k was about 5% faster) but within 5% of it
# with about a quarter of the memory; see docs/benchmark.md.
DEFAULT_BATCH_SIZE = 10_000
ON_CONFLICT = ("error", "skip", "update")


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
    # Benchmark only: one transaction per table instead of one commit per batch (no resume).
    single_transaction: bool = False

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
        return self.postgres_dsn

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
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"The config file {path} is not valid TOML: {exc}.") from None
    values: dict[str, Any] = {}
    target = data.get("target", {})
    tables = data.get("tables", {})
    try:
        values["names"] = TargetNames(
            schema=str(target.get("schema", "public")),
            sessions=str(tables.get("sessions", {}).get("target", "sessions")),
            messages=str(tables.get("messages", {}).get("target", "messages")),
        )
        transform = data.get("transform", {})
        if "naive_timezone" in transform:
            values["naive_timezone"] = str(transform["naive_timezone"])
        if "strip_nul" in transform:
            values["strip_nul"] = bool(transform["strip_nul"])
        source = data.get("source", {})
        if "busy_timeout" in source:
            values["busy_timeout"] = float(source["busy_timeout"])
        load = data.get("load", {})
        for key in ("batch_size", "buffer_batches"):
            if key in load:
                values[key] = int(load[key])
        if "retry_seconds" in load:
            values["retry_seconds"] = float(load["retry_seconds"])
        if "defer_constraints" in load:
            values["defer_constraints"] = bool(load["defer_constraints"])
        if "single_transaction" in load:
            values["single_transaction"] = bool(load["single_transaction"])
        if "on_conflict" in load:
            values["on_conflict"] = str(load["on_conflict"])
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"The config file {path} has a value of the wrong type: {exc}.") from None
    env_dsn = os.environ.get("POSTGRES_DSN")
    if env_dsn:
        values["postgres_dsn"] = env_dsn
    env_sqlite = os.environ.get("SQLITE_PATH")
    if env_sqlite:
        values["sqlite_path"] = Path(env_sqlite)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("naive_timezone"), str):
        values["naive_timezone"] = parse_zone(values["naive_timezone"])
    if values.get("sqlite_path") is not None:
        values["sqlite_path"] = Path(values["sqlite_path"])
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    if settings.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, not {settings.batch_size}.")
    if not 1 <= settings.buffer_batches <= 16:
        raise ConfigError("buffer_batches must be between 1 and 16.")
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
