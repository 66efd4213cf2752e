"""DSN text for people: where a DSN points, and any text with its passwords removed."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_PASSWORD_IN_URI = re.compile(
    r"(postgres(?:ql)?://[^:/@\s]*:)(\S+)(@)"
)  # greedy: a raw @ in a password
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Remove passwords from any text that may contain a DSN."""
    text = _PASSWORD_IN_URI.sub(r"\1***\3", text)
    return _PASSWORD_KV.sub(r"\1***", text)


def dsn_location(dsn: str) -> str:
    """host:port/database of a DSN, without user or password, for messages and logs."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        if parts.query and "host=" in parts.query:
            host = next(q[5:] for q in parts.query.split("&") if q.startswith("host="))
        port = f":{parts.port}" if parts.port else ""
        db = parts.path.lstrip("/") or "(default database)"
        return f"{host}{port}/{db}"
    except ValueError:
        return "(unparseable DSN)"
