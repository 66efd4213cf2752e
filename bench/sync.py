"""The app's activity between the bulk run and the final sync, as the benchmark applies it.

1,000 sessions renamed, 1,000 messages appended to old sessions (each moving its session's
updated_at), 100 sessions deleted with their messages, 1,000 new sessions (with one message
each); the first sessions (the source's identity) are left alone.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
        # a small database (make bench SIZE=2000) changes at most a fifth of its sessions each way
        n_renamed, n_appended, n_deleted = (
            min(n, len(keys) // 5) for n in (RENAMED, APPENDED, DELETED)
        )
        picked = rng.sample(keys, n_renamed + n_appended + n_deleted)
        renamed = picked[:n_renamed]
        appended = picked[n_renamed : n_renamed + n_appended]
        deleted = picked[n_renamed + n_appended :]
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
        "sessions_renamed": len(renamed),
        "messages_appended": len(appended),
        "sessions_deleted": len(deleted),
        "messages_deleted_with_them": gone,
        "sessions_new": NEW,
    }


def sync_cmd(py: str, source: Path, dsn: str, *extra: str) -> list[str]:
    """`flux-migrate sync` as the benchmark runs it."""
    return [
        py,
        "-m",
        "flux_migrate.pipeline",
        "sync",
        "--sqlite-path",
        str(source),
        "--postgres-dsn",
        dsn,
        "--log-format",
        "json",
        *extra,
    ]


def sync_figures(
    source: Path, dsn: str, py: str, measure: Callable[[list[str]], Any], run_cmd: list[str]
) -> dict[str, Any]:
    """In one database: the bulk run of a copy of ``source``, an idle sync, the stated app
    changes, the final sync, then `verify --quick`; wall seconds and peak RSS of each."""
    live = source.with_name(source.stem + "-live.sqlite")
    shutil.copy(source, live)
    try:
        bulk = measure(run_cmd)
        idle = measure(sync_cmd(py, live, dsn))
        changes = app_changes(live)
        final = measure(sync_cmd(py, live, dsn))
        verified = subprocess.run(
            [py, "-m", "flux_migrate.pipeline", "verify", "--quick", "--sqlite-path", str(live)]
            + ["--postgres-dsn", dsn],
            capture_output=True,
            check=False,
        ).returncode
    finally:
        live.unlink(missing_ok=True)
    return {
        "changes": changes,
        "bulk_run_wall_s": round(bulk.wall, 2),
        "bulk_run_rss_mb": round(bulk.rss_mb),
        "idle_sync_wall_s": round(idle.wall, 2),
        "idle_sync_rss_mb": round(idle.rss_mb),
        "final_sync_wall_s": round(final.wall, 2),
        "final_sync_rss_mb": round(final.rss_mb),
        "final_vs_bulk_pct": round(100 * final.wall / bulk.wall, 1),
        "verify_quick_exit": verified,
    }
