"""The chat app's conversation memory on SQLite or PostgreSQL: one API, one factory.

``from memory import create_memory``; see :mod:`memory.base` for the API and its documented
behaviour, :mod:`pipeline.check` and :mod:`pipeline.verify_api` for the health check and the
after-migration comparison.
"""

from __future__ import annotations

from memory.base import Memory, MemoryClosedError, PoolTimeoutError, SessionNotFoundError
from memory.factory import MemorySettings, create_memory
from memory.postgres import PostgresMemory
from memory.sqlite import SQLiteMemory

__all__ = [
    "Memory",
    "MemoryClosedError",
    "MemorySettings",
    "PoolTimeoutError",
    "PostgresMemory",
    "SQLiteMemory",
    "SessionNotFoundError",
    "create_memory",
]
