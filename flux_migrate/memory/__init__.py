"""The chat app's conversation memory on SQLite or PostgreSQL: one API, one factory.

``from flux_migrate.memory import create_memory``; see :mod:`flux_migrate.memory.base` for
the API and its documented behaviour, :mod:`flux_migrate.pipeline.check` and
:mod:`flux_migrate.pipeline.verify_api` for the health check and the after-migration comparison.
"""

from __future__ import annotations

from flux_migrate.memory.base import (
    Memory,
    MemoryClosedError,
    MemoryUnavailableError,
    PoolTimeoutError,
    SessionNotFoundError,
    Timeouts,
)
from flux_migrate.memory.factory import MemorySettings, create_memory, get_memory, new_memory
from flux_migrate.memory.postgres import PostgresMemory
from flux_migrate.memory.sqlite import SQLiteMemory

__all__ = [
    "Memory",
    "MemoryClosedError",
    "MemorySettings",
    "MemoryUnavailableError",
    "PoolTimeoutError",
    "PostgresMemory",
    "SQLiteMemory",
    "SessionNotFoundError",
    "Timeouts",
    "create_memory",
    "get_memory",
    "new_memory",
]
