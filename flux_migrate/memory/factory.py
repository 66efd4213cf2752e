"""Pick the memory backend from settings: the environment, as the app names it, or explicit.

The app's environment: ``DATABASE_BACKEND`` (sqlite | postgres, default sqlite),
``POSTGRES_DSN``, ``MAX_HISTORY`` (default 5; ``get_history`` returns ``2 * MAX_HISTORY``
messages by default), ``POSTGRES_READ_DSN`` (optional standby for reads), ``POSTGRES_POOL_MIN``
and ``POSTGRES_POOL_MAX`` (default 2 and 10; ``MEMORY_POOL_MIN`` / ``MEMORY_POOL_MAX`` are
accepted too), ``POSTGRES_ACQUIRE_TIMEOUT`` (seconds, default 10) and ``SQLITE_PATH``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flux_migrate.core.errors import ConfigError
from flux_migrate.memory.base import DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_MAX_HISTORY, check_pool_bounds
from flux_migrate.memory.postgres import PostgresMemory
from flux_migrate.memory.sqlite import SQLiteMemory

BACKENDS = ("sqlite", "postgres")


@dataclass(frozen=True)
class MemorySettings:
    """Which backend the app's memory uses and how to reach it."""

    backend: str = "sqlite"
    postgres_dsn: str | None = None
    postgres_read_dsn: str | None = None
    sqlite_path: Path | None = None
    schema: str = "public"
    pool_min: int = 2
    pool_max: int = 10
    max_history: int = DEFAULT_MAX_HISTORY
    acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT

    @property
    def history_limit(self) -> int:
        """get_history's default limit: the app's ``settings.max_history * 2``."""
        return self.max_history * 2

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MemorySettings:
        """Read the app's variables (module docstring); unset values keep their defaults."""
        env = os.environ if environ is None else environ
        sqlite_path = env.get("SQLITE_PATH")
        return cls(
            backend=env.get("DATABASE_BACKEND", "").strip().lower() or cls.backend,
            postgres_dsn=env.get("POSTGRES_DSN") or None,
            postgres_read_dsn=env.get("POSTGRES_READ_DSN") or None,
            sqlite_path=Path(sqlite_path) if sqlite_path else None,
            pool_min=_int_env(env, ("POSTGRES_POOL_MIN", "MEMORY_POOL_MIN"), cls.pool_min),
            pool_max=_int_env(env, ("POSTGRES_POOL_MAX", "MEMORY_POOL_MAX"), cls.pool_max),
            max_history=_int_env(env, ("MAX_HISTORY",), cls.max_history),
            acquire_timeout=_float_env(env, "POSTGRES_ACQUIRE_TIMEOUT", cls.acquire_timeout),
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
        pool_bounds(self.pool_min, self.pool_max, "POSTGRES_POOL_MIN and POSTGRES_POOL_MAX")
        if self.max_history < 0:
            raise ConfigError(f"MAX_HISTORY must be 0 or more, not {self.max_history}.")
        if not (math.isfinite(self.acquire_timeout) and self.acquire_timeout > 0):
            raise ConfigError(
                f"POSTGRES_ACQUIRE_TIMEOUT must be a positive number, not {self.acquire_timeout}."
            )


def pool_bounds(pool_min: int, pool_max: int, what: str) -> tuple[int, int]:
    """The pool bounds, or ConfigError (exit 2) naming ``what`` when they are impossible."""
    try:
        check_pool_bounds(pool_min, pool_max, what)
    except ValueError as exc:
        raise ConfigError(f"{exc}.") from None
    return pool_min, pool_max


def _int_env(env: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        raw = env.get(name, "").strip()
        if not raw:
            continue
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, not {raw!r}.") from None
    return default


def _float_env(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {raw!r}.") from None


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
            read_dsn=settings.postgres_read_dsn,
            acquire_timeout=settings.acquire_timeout,
        )
    assert settings.sqlite_path is not None
    return SQLiteMemory(
        settings.sqlite_path,
        default_history_limit=settings.history_limit,
        acquire_timeout=settings.acquire_timeout,
    )
