"""The app's activity between the bulk run and the final sync, as the benchmark applies it.

1,000 sessions renamed, 1,000 messages appended to old sessions (each moving its session's
updated_at), 100 sessions deleted with their messages, 1,000 new sessions (with one message
each); the first sessions (the source's identity) are left alone.
"""

from __future__ import annotations

import random
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

RENAMED = 1_000
APPENDED = 1_000
DELETED = 100
NEW = 1_000
NEW_SESSION = "INSERT INTO sessions (id, title, created_at, updated_at, metadata) VALUES"


def app_changes(path: Path, *, seed: int = 11) -> dict[str, int]:
    """Apply the stated changes to the SQLite file at ``path``; return their counts."""
    rng = random.Random(seed)
    now = datetime.now(UTC).isoformat()
    db = sqlite3.connect(path)
    try:
        keys = [r[0] for r in db.execute("SELECT id FROM sessions ORDER BY rowid")][16:]
        picked = rng.sample(keys, RENAMED + APPENDED + DELETED)
        renamed = picked[:RENAMED]
        appended = picked[RENAMED : RENAMED + APPENDED]
        deleted = picked[RENAMED + APPENDED :]
        db.executemany(
            "UPDATE sessions SET title = ?, updated_at = ? WHERE id = ?",
            [(f"renamed {i}", now, k) for i, k in enumerate(renamed)],
        )
        for k in appended:
            db.execute(
                "INSERT INTO messages VALUES (?, ?, 'user', 'one more question', '{}', ?)",
                (str(uuid.uuid4()), k, now),
            )
            db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, k))
        gone = 0
        for k in deleted:
            gone += db.execute("DELETE FROM messages WHERE session_id = ?", (k,)).rowcount
            db.execute("DELETE FROM sessions WHERE id = ?", (k,))
        for i in range(NEW):
            k = str(uuid.uuid4())
            db.execute(NEW_SESSION + " (?, ?, ?, ?, '{}')", (k, f"new {i}", now, now))
            db.execute(
                "INSERT INTO messages VALUES (?, ?, 'user', 'hello', '{}', ?)",
                (str(uuid.uuid4()), k, now),
            )
        db.commit()
    finally:
        db.close()
    return {
        "sessions_renamed": RENAMED,
        "messages_appended": APPENDED,
        "sessions_deleted": DELETED,
        "messages_deleted_with_them": gone,
        "sessions_new": NEW,
    }


def sync_cmd(py: str, source: Path, dsn: str, *extra: str) -> list[str]:
    """`flux-migrate sync` as the benchmark runs it."""
    return [
        py,
        "-m",
        "pipeline",
        "sync",
        "--sqlite-path",
        str(source),
        "--postgres-dsn",
        dsn,
        "--log-format",
        "json",
        *extra,
    ]
