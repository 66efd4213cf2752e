"""Pick the memory backend from settings: the environment, or an explicit MemorySettings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError
from memory.base import DEFAULT_HISTORY_LIMIT
from memory.postgres import PostgresMemory
from memory.sqlite import SQLiteMemory

BACKENDS = ("sqlite", "postgres")


@dataclass(frozen=True)
class MemorySettings:
    """Which backend the app's memory uses and how to reach it."""

    backend: str = "sqlite"
    postgres_dsn: str | None = None
    sqlite_path: Path | None = None
    schema: str = "public"
    pool_min: int = 2
    pool_max: int = 10
    history_limit: int = DEFAULT_HISTORY_LIMIT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MemorySettings:
        """Read ``DATABASE_BACKEND`` (default sqlite), ``POSTGRES_DSN``, ``SQLITE_PATH``,
        ``MEMORY_POOL_MIN`` and ``MEMORY_POOL_MAX``; unset values keep their defaults."""
        env = os.environ if environ is None else environ
        sqlite_path = env.get("SQLITE_PATH")
        return cls(
            backend=env.get("DATABASE_BACKEND", "").strip().lower() or cls.backend,
            postgres_dsn=env.get("POSTGRES_DSN") or None,
            sqlite_path=Path(sqlite_path) if sqlite_path else None,
            pool_min=_int_env(env, "MEMORY_POOL_MIN", cls.pool_min),
            pool_max=_int_env(env, "MEMORY_POOL_MAX", cls.pool_max),
        )

    def validate(self) -> None:
        """Raise ConfigError with one sentence if these settings cannot make a memory."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"DATABASE_BACKEND must be sqlite or postgres, not {self.backend!r}.")
        if self.backend == "sqlite" and self.sqlite_path is None:
            raise ConfigError(
                "The sqlite memory backend needs SQLITE_PATH set to the app's database file."
            )
        if self.backend == "postgres" and not self.postgres_dsn:
            raise ConfigError(
                "The postgres memory backend needs POSTGRES_DSN"
                " (e.g. postgresql://user@host:5432/dbname, password via PGPASSWORD or ~/.pgpass)."
            )
        if not 0 <= self.pool_min <= self.pool_max or self.pool_max < 1:
            raise ConfigError(
                f"MEMORY_POOL_MIN ({self.pool_min}) and MEMORY_POOL_MAX ({self.pool_max}) need"
                " 0 <= min <= max and max >= 1."
            )
        if self.history_limit < 0:
            raise ConfigError(f"The history limit must be 0 or more, not {self.history_limit}.")


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}.") from None


def create_memory(settings: MemorySettings | None = None) -> SQLiteMemory | PostgresMemory:
    """The memory the settings (default: the environment) ask for, opened on first use."""
    settings = settings or MemorySettings.from_env()
    settings.validate()
    if settings.backend == "postgres":
        assert settings.postgres_dsn is not None
        return PostgresMemory(
            settings.postgres_dsn,
            schema=settings.schema,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            default_history_limit=settings.history_limit,
        )
    assert settings.sqlite_path is not None
    return SQLiteMemory(settings.sqlite_path, default_history_limit=settings.history_limit)
