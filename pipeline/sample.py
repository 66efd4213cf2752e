"""Generate a realistic, deterministic app database (for the demo, the tests and the bench)."""

from __future__ import annotations

import json
import random
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from flux_migrate.core.schema import SQLITE_DDL

_WORDS = [
    "the",
    "a",
    "to",
    "of",
    "and",
    "in",
    "that",
    "is",
    "for",
    "it",
    "you",
    "with",
    "on",
    "this",
    "be",
    "are",
    "as",
    "can",
    "your",
    "have",
    "not",
    "or",
    "at",
    "what",
    "how",
    "why",
    "when",
    "will",
    "would",
    "could",
    "should",
    "please",
    "thanks",
    "help",
    "migrate",
    "database",
    "table",
    "index",
    "query",
    "python",
    "async",
    "await",
    "message",
    "session",
    "history",
    "context",
    "model",
    "answer",
    "question",
    "error",
    "trace",
    "stack",
    "memory",
    "latency",
    "throughput",
    "batch",
    "commit",
    "checkpoint",
    "resume",
    "server",
    "naïve",
    "café",
    "résumé",
    "Straße",
    "Grüße",
    "façade",
    "señor",
    "déjà-vu",
    "東京",
    "数据库",
    "迁移",
    "会话",
    "消息",
    "сообщение",
    "база",
    "данных",
    "مرحبا",
    "بالعالم",
    "שלום",
    "עולם",
    "नमस्ते",
    "🙂",
    "🚀",
    "👍🏽",
    "🎉",
    "✅",
    "🤖",
    "❤️",
    "👩\u200d💻",
]

_TITLES = (
    "Trip planning",
    "Debugging asyncpg pool",
    "Recette de crêpes",
    "東京の天気",
    "Résumé review",
    "Weekly notes 🚀",
    "",
    "SQL question",
    "Вопрос про базы данных",
    "مساعدة في البرمجة",
)


def _corpus(rng: random.Random, size: int = 1 << 20) -> str:
    words = []
    total = 0
    while total < size:
        w = rng.choice(_WORDS)
        words.append(w)
        total += len(w) + 1
    return " ".join(words)


def _iso(ts: datetime) -> str:
    return ts.isoformat()


def generate(
    path: Path,
    *,
    sessions: int = 20_000,
    messages_per_session: int = 10,
    seed: int = 42,
    mean_content: int = 600,
) -> Path:
    """Write the app's schema and a deterministic chat history to ``path`` (replaced if present).

    Message lengths vary (short user turns, long assistant turns); text mixes ASCII, accents,
    CJK, RTL scripts and emoji; timestamps are written the way the app writes them.
    """
    rng = random.Random(seed)
    corpus = _corpus(rng)
    clen = len(corpus)
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + SQLITE_DDL)
    base = datetime(2025, 1, 1, tzinfo=UTC)
    uid = uuid.UUID
    models = ("gpt-4o", "claude-3", "llama-3-70b", "mistral-large")
    session_rows: list[tuple[str, ...]] = []
    message_rows: list[tuple[str, ...]] = []

    def flush() -> None:
        db.executemany(
            "INSERT INTO sessions (id, title, created_at, updated_at, metadata, user_id)"
            " VALUES (?,?,?,?,?,?)",
            session_rows,
        )
        db.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?)", message_rows)
        session_rows.clear()
        message_rows.clear()

    for s in range(sessions):
        sid = str(uid(int=rng.getrandbits(128), version=4))
        created = base + timedelta(
            seconds=s * 97 + rng.randrange(60), microseconds=rng.randrange(1_000_000)
        )
        n = max(1, int(rng.gauss(messages_per_session, messages_per_session / 4)))
        t = created
        for m in range(n):
            t = t + timedelta(seconds=rng.randrange(1, 300), microseconds=rng.randrange(1_000_000))
            role = "user" if m % 2 == 0 else "assistant"
            length = int(rng.expovariate(1 / (mean_content * (0.4 if role == "user" else 1.6)))) + 1
            start = corpus.find(" ", rng.randrange(clen - 1)) + 1  # a message starts a word
            content = corpus[start : start + length]
            end = content.rfind(" ") if start + length < clen else -1
            content = (content[:end] if end > 0 else content) or "ok"  # and ends one
            meta = {} if role == "user" else {"model": rng.choice(models), "tokens": length // 4}
            message_rows.append(
                (
                    str(uid(int=rng.getrandbits(128), version=4)),
                    sid,
                    role,
                    content,
                    json.dumps(meta),
                    _iso(t),
                )
            )
        title = rng.choice(_TITLES)
        user = rng.randrange(1000)
        meta_s = json.dumps({"source": "web", "tags": ["demo"], "user": f"u{user}"})
        # the app's owner column (today's release); one session in ten is anonymous ('')
        user_id = f"u{user}" if user % 10 else ""
        session_rows.append((sid, title, _iso(created), _iso(t), meta_s, user_id))
        if len(message_rows) >= 50_000:
            flush()
    flush()
    db.commit()
    db.close()
    tmp.replace(path)
    return path
