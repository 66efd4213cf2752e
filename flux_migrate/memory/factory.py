"""Pick the memory backend from settings: the environment, as the app names it, or explicit;
and the one memory per process the app's ``get_memory()`` hands out.

The app's environment: ``DATABASE_BACKEND`` (sqlite | postgres, default sqlite),
``POSTGRES_DSN``, ``MAX_HISTORY`` (default 5; ``get_history`` returns ``2 * MAX_HISTORY``
messages by default), ``POSTGRES_READ_DSN`` (optional standby for reads),
``POSTGRES_READ_CONSISTENCY`` (bounded | strong), ``POSTGRES_MAX_REPLICA_LAG`` (seconds, 5),
``POSTGRES_POOL_MIN`` and ``POSTGRES_POOL_MAX`` (default 2 and 10; ``MEMORY_POOL_MIN`` /
``MEMORY_POOL_MAX`` are accepted too), the timeouts ``POSTGRES_CONNECT_TIMEOUT`` (5),
``POSTGRES_ACQUIRE_TIMEOUT`` (10), ``POSTGRES_COMMAND_TIMEOUT`` (10),
``POSTGRES_STATEMENT_TIMEOUT`` (9), ``POSTGRES_REPLICA_TIMEOUT`` (1), and ``SQLITE_PATH``
(default: ``memory.db`` in ``DATA_DIR``, default ``./data``, as the app's own class).
"""

from __future__ import annotations

import atexit
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flux_migrate.core.errors import ConfigError
from flux_migrate.memory.base import DEFAULT_MAX_HISTORY, Timeouts, check_pool_bounds
from flux_migrate.memory.postgres import READ_CONSISTENCIES, PostgresMemory, abandon_pool
from flux_migrate.memory.sqlite import SQLiteMemory

BACKENDS = ("sqlite", "postgres")
DEFAULT_DATA_DIR = Path("data")  # the app's settings.data_dir, relative to where it runs
_TIMEOUT_VARIABLES = {
    "connect": "POSTGRES_CONNECT_TIMEOUT",
    "acquire": "POSTGRES_ACQUIRE_TIMEOUT",
    "command": "POSTGRES_COMMAND_TIMEOUT",
    "statement": "POSTGRES_STATEMENT_TIMEOUT",
    "replica": "POSTGRES_REPLICA_TIMEOUT",
}


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
    timeouts: Timeouts = field(default_factory=Timeouts)
    read_consistency: str = "bounded"
    max_replica_lag: float = 5.0
    data_dir: Path = DEFAULT_DATA_DIR

    @property
    def history_limit(self) -> int:
        """get_history's default limit: the app's ``settings.max_history * 2``."""
        return self.max_history * 2

    @property
    def acquire_timeout(self) -> float:
        return self.timeouts.acquire

    @property
    def sqlite_file(self) -> Path:
        """SQLITE_PATH, else the app's default: ``memory.db`` in its data directory."""
        return self.sqlite_path or self.data_dir / "memory.db"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MemorySettings:
        """Read the app's variables (module docstring); unset values keep their defaults."""
        env = os.environ if environ is None else environ
        sqlite_path = env.get("SQLITE_PATH")
        defaults = Timeouts()
        timeouts = Timeouts(
            **{
                name: _float_env(env, variable, getattr(defaults, name))
                for name, variable in _TIMEOUT_VARIABLES.items()
            }
        )
        return cls(
            backend=env.get("DATABASE_BACKEND", "").strip().lower() or cls.backend,
            postgres_dsn=env.get("POSTGRES_DSN") or None,
            postgres_read_dsn=env.get("POSTGRES_READ_DSN") or None,
            sqlite_path=Path(sqlite_path) if sqlite_path else None,
            pool_min=_int_env(env, ("POSTGRES_POOL_MIN", "MEMORY_POOL_MIN"), cls.pool_min),
            pool_max=_int_env(env, ("POSTGRES_POOL_MAX", "MEMORY_POOL_MAX"), cls.pool_max),
            max_history=_int_env(env, ("MAX_HISTORY",), cls.max_history),
            timeouts=timeouts,
            read_consistency=env.get("POSTGRES_READ_CONSISTENCY", "").strip().lower()
            or cls.read_consistency,
            max_replica_lag=_float_env(env, "POSTGRES_MAX_REPLICA_LAG", cls.max_replica_lag),
            data_dir=Path(env.get("DATA_DIR") or DEFAULT_DATA_DIR),
        )

    def validate(self) -> None:
        """Raise ConfigError with one sentence if these settings cannot make a memory."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"DATABASE_BACKEND must be sqlite or postgres, not {self.backend!r}.")
        if self.backend == "postgres" and not self.postgres_dsn:
            raise ConfigError(
                "The postgres memory backend needs POSTGRES_DSN"
                " (e.g. postgresql://user@host:5432/dbname, password via PGPASSWORD or ~/.pgpass)."
            )
        pool_bounds(self.pool_min, self.pool_max, "POSTGRES_POOL_MIN and POSTGRES_POOL_MAX")
        if self.max_history < 0:
            raise ConfigError(f"MAX_HISTORY must be 0 or more, not {self.max_history}.")
        for name, variable in _TIMEOUT_VARIABLES.items():
            value = getattr(self.timeouts, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{variable} must be a positive number, not {value}.")
        if self.read_consistency not in READ_CONSISTENCIES:
            raise ConfigError(
                "POSTGRES_READ_CONSISTENCY must be bounded or strong,"
                f" not {self.read_consistency!r}."
            )
        if not (math.isfinite(self.max_replica_lag) and self.max_replica_lag > 0):
            raise ConfigError(
                f"POSTGRES_MAX_REPLICA_LAG must be a positive number, not {self.max_replica_lag}."
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


def new_memory(settings: MemorySettings | None = None) -> SQLiteMemory | PostgresMemory:
    """A memory of its own (its own pool) for the settings (default: the environment); the
    caller closes it. Most callers want :func:`create_memory`, one per process."""
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
            timeouts=settings.timeouts,
            read_consistency=settings.read_consistency,
            max_replica_lag=settings.max_replica_lag,
        )
    path = settings.sqlite_file
    if settings.sqlite_path is None:
        path.parent.mkdir(parents=True, exist_ok=True)  # the app creates its data dir too
    return SQLiteMemory(
        path, default_history_limit=settings.history_limit, acquire_timeout=settings.acquire_timeout
    )


class _Shared:
    """The memories of this process, one per settings: created on first use, replaced in a
    forked child (a child never shares its parent's sockets), their sockets closed at exit."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.memories: dict[MemorySettings, SQLiteMemory | PostgresMemory] = {}
        self.lock = threading.Lock()
        # Before the interpreter waits for non-daemon threads (an open aiosqlite connection is
        # one, and would keep the process alive); plain atexit runs only after that wait.
        register = getattr(threading, "_register_atexit", atexit.register)
        register(self.close_all)

    def get(self, settings: MemorySettings) -> SQLiteMemory | PostgresMemory:
        with self.lock:
            if os.getpid() != self.pid:  # forked: the parent's connections are not ours
                self.pid, self.memories = os.getpid(), {}
            memory = self.memories.get(settings)
            if memory is None:
                memory = self.memories[settings] = new_memory(settings)
            return memory

    def close_all(self) -> None:
        """At exit, with no event loop left: close every pool's sockets (the server ends the
        sessions) and every SQLite connection."""
        with self.lock:
            memories, self.memories = list(self.memories.values()), {}
        for memory in memories:
            if isinstance(memory, PostgresMemory):
                for node in memory._nodes():
                    pool, node.pool = node.pool, None
                    if pool is not None:
                        abandon_pool(pool)
            elif memory._conn is not None:
                _close_sqlite(memory)


def _close_sqlite(memory: SQLiteMemory) -> None:
    """Close the connection and stop its thread without an event loop (none is left)."""
    conn, memory._conn = memory._conn, None
    if conn is not None:
        conn.stop()


_SHARED = _Shared()


def create_memory(settings: MemorySettings | None = None) -> SQLiteMemory | PostgresMemory:
    """The process's memory for these settings (default: the environment), as the app's
    ``get_memory()``: created on first call, the same object (one pool) on every later call in
    this process, following whatever event loop runs each call, closed at exit.

    Calling it per request is what the app does and costs nothing. ``async with
    create_memory()`` closes that shared memory at the end of the block; the next call reopens
    it. For a memory of your own, use :func:`new_memory`.
    """
    settings = settings or MemorySettings.from_env()
    settings.validate()
    return _SHARED.get(settings)


def get_memory() -> SQLiteMemory | PostgresMemory:
    """The app's factory, by its own name: :func:`create_memory` from the environment."""
    return create_memory()
