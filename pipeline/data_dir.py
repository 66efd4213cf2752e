"""The app's data directory: which of its files `run --data-dir` migrates, and how."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError

MEMORY_DB = "memory.db"


@dataclass(frozen=True)
class DataDir:
    """The files found: the app's memory database, the JSONL stores, other SQLite files."""

    memory: Path | None
    jsonl: tuple[Path, ...]
    other_dbs: tuple[Path, ...]


def scan_data_dir(path: Path) -> DataDir:
    """The migratable files directly in ``path`` (sorted by name); ConfigError when ``path``
    is not a directory."""
    if not path.is_dir():
        raise ConfigError(f"--data-dir {path} is not a directory; name the app's data directory.")
    files = sorted(p for p in path.iterdir() if p.is_file())
    memory = path / MEMORY_DB
    return DataDir(
        memory=memory if memory.is_file() else None,
        jsonl=tuple(p for p in files if p.suffix == ".jsonl"),
        other_dbs=tuple(p for p in files if p.suffix == ".db" and p.name != MEMORY_DB),
    )
