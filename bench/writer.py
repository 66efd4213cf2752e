"""Keep writing to a chat app database as the app does, until stopped: for trying the cut-over
guide (docs/cut-over.md) against the demo database while "the app" runs.

    python -m bench.writer .demo/chat-20000.sqlite            # Ctrl-C to stop
    python -m bench.writer .demo/chat-20000.sqlite --seconds 60

Each step, in its own transaction: a new session with a first message, a message appended to
an old session (moving its updated_at), a session renamed, a message edited, and now and then
a session deleted with its messages. The first 16 sessions (the source's identity) are left
alone. Prints what it did when it stops.
"""

from __future__ import annotations

import argparse
import random
import signal
import sqlite3
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

NEW_SESSION = "INSERT INTO sessions (id, title, created_at, updated_at, metadata) VALUES"
NEW_MESSAGE = (
    "INSERT INTO messages (id, session_id, role, content, metadata, created_at)"
    " VALUES (?, ?, ?, ?, '{}', ?)"
)


def _old_session(db: sqlite3.Connection, rng: random.Random) -> str | None:
    high = db.execute("SELECT max(rowid) FROM sessions").fetchone()[0] or 0
    row = db.execute(
        "SELECT id FROM sessions WHERE rowid >= ? ORDER BY rowid LIMIT 1 OFFSET 16",
        (rng.randint(1, max(high - 16, 1)),),
    ).fetchone()
    return None if row is None else str(row[0])


def step(db: sqlite3.Connection, rng: random.Random, done: Counter[str]) -> None:
    """One round of app-like writes, committed together."""
    now = datetime.now(UTC).isoformat()
    with db:
        new = str(uuid.uuid4())
        db.execute(NEW_SESSION + " (?, ?, ?, ?, '{}')", (new, "a new chat", now, now))
        db.execute(NEW_MESSAGE, (str(uuid.uuid4()), new, "user", "hello", now))
        done["sessions inserted"] += 1
        done["messages inserted"] += 1
        if (old := _old_session(db, rng)) is not None:
            db.execute(NEW_MESSAGE, (str(uuid.uuid4()), old, "assistant", "one more answer", now))
            db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, old))
            done["messages appended to old sessions"] += 1
        if (old := _old_session(db, rng)) is not None:
            db.execute("UPDATE sessions SET title = ? WHERE id = ?", (f"renamed {now}", old))
            done["sessions renamed"] += 1
        if (old := _old_session(db, rng)) is not None:
            db.execute(
                "UPDATE messages SET content = content || ' (edited)' WHERE rowid ="
                " (SELECT rowid FROM messages WHERE session_id = ? LIMIT 1)",
                (old,),
            )
            done["messages edited"] += 1
        if rng.random() < 0.2 and (old := _old_session(db, rng)) is not None:
            gone = db.execute("DELETE FROM messages WHERE session_id = ?", (old,)).rowcount
            db.execute("DELETE FROM sessions WHERE id = ?", (old,))
            done["sessions deleted"] += 1
            done["messages deleted with them"] += gone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sqlite_path", type=Path)
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between steps")
    args = parser.parse_args()
    if not args.sqlite_path.is_file():
        raise SystemExit(f"No such database: {args.sqlite_path}")
    stop = False

    def halt(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, halt)
    signal.signal(signal.SIGTERM, halt)
    db = sqlite3.connect(args.sqlite_path, timeout=30)
    rng, done = random.Random(), Counter[str]()
    started = time.monotonic()
    print(f"writing to {args.sqlite_path} like the app; Ctrl-C to stop", flush=True)
    while not stop and not (args.seconds and time.monotonic() - started > args.seconds):
        step(db, rng, done)
        time.sleep(args.pause)
    db.close()
    took = time.monotonic() - started
    print(f"stopped after {took:.0f} s: " + ", ".join(f"{n:,} {what}" for what, n in done.items()))


if __name__ == "__main__":
    main()
