"""Build small app databases with chosen good and bad rows, written the way SQLite stores them."""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flux_migrate.core.schema import SQLITE_DDL

GOOD_TS = "2026-11-26T14:14:34.123456+00:00"


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass
class AppDB:
    """A SQLite file with the app's schema; values may be str, bytes (stored as TEXT) or None."""

    path: Path
    sessions: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)

    def session(self, **values: Any) -> dict[str, Any]:
        row = {
            "id": new_id(),
            "title": "hello 👋",
            "created_at": GOOD_TS,
            "updated_at": GOOD_TS,
            "metadata": '{"a": 1}',
        }
        row.update(values)
        self.sessions.append(row)
        return row

    def message(self, session_id: Any, **values: Any) -> dict[str, Any]:
        row = {
            "id": new_id(),
            "session_id": session_id,
            "role": "user",
            "content": "héllo wörld 東京 🚀",
            "metadata": "{}",
            "created_at": GOOD_TS,
        }
        row.update(values)
        self.messages.append(row)
        return row

    def write(self) -> Path:
        db = sqlite3.connect(self.path)
        db.executescript(SQLITE_DDL)
        for table, rows in (("sessions", self.sessions), ("messages", self.messages)):
            for row in rows:
                cols = list(row)
                marks = ", ".join(
                    "CAST(? AS TEXT)" if isinstance(row[c], bytes) else "?" for c in cols
                )
                db.execute(
                    f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})",
                    [row[c] for c in cols],
                )
        db.commit()
        db.close()
        self.sessions.clear()
        self.messages.clear()
        return self.path


def app_db(path: Path, good_sessions: int = 2, messages_each: int = 2) -> AppDB:
    """An AppDB pre-filled with good sessions and messages (not yet written)."""
    db = AppDB(path)
    for _ in range(good_sessions):
        s = db.session()
        for _ in range(messages_each):
            db.message(s["id"])
    return db
