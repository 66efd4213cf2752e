"""DSN text for people: where a DSN points, and any text with its passwords removed.

Both work by parsing, never by trusting the DSN to be well formed: a URI whose password holds a
raw ``#``, ``/``, ``?`` or ``@``, a URI with one slash or none after the scheme, a libpq
``key=value`` string (quoted values included) and a DSN wrapped in the quotes an env file keeps.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlencode

# A URI in any text: the scheme, then the rest of the word (a raw @ or / may be in a password).
_URI = re.compile(r"(postgres(?:ql)?:/{0,2})(\S+)", re.IGNORECASE)
# A libpq keyword value: single-quoted (backslash escapes) or a run without spaces.
_VALUE = r"'(?:[^'\\]|\\.)*'?|[^\s']\S*"
_KEYWORD = re.compile(rf"\s*([A-Za-z_]+)\s*=\s*({_VALUE})")
_PASSWORD_KV = re.compile(rf"(password\s*=\s*)({_VALUE})", re.IGNORECASE)
_HOSTSPEC = re.compile(r"[A-Za-z0-9._\-\[\]%,]*(?::\d*)?")

# Passwords of the DSNs this process was given (see normalize_dsn): removed from any text.
_SECRETS: set[str] = set()


def _redact_uri(match: re.Match[str]) -> str:
    scheme, rest = match.group(1), match.group(2)
    if "@" in rest:
        userinfo, after = rest.rsplit("@", 1)
        if ":" in userinfo:
            rest = userinfo.split(":", 1)[0] + ":***@" + after
    return scheme + rest


def redact(text: str) -> str:
    """Remove passwords from any text that may contain a DSN."""
    text = _URI.sub(_redact_uri, text)
    text = _PASSWORD_KV.sub(r"\1***", text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _unquote_value(value: str) -> str:
    if value.startswith("'"):
        return re.sub(r"\\(.)", r"\1", value[1:-1] if value.endswith("'") else value[1:])
    return value


def keyword_pairs(dsn: str) -> dict[str, str] | None:
    """The pairs of a libpq ``key=value`` DSN, or None when ``dsn`` is not one."""
    pairs: dict[str, str] = {}
    at = 0
    while at < len(dsn.rstrip()):
        found = _KEYWORD.match(dsn, at)
        if found is None or (found.group(2).startswith("'") and not found.group(2).endswith("'")):
            return None
        pairs[found.group(1).lower()] = _unquote_value(found.group(2))
        at = found.end()
    return pairs or None


def _strip_quotes(dsn: str) -> str:
    dsn = dsn.strip()
    if len(dsn) >= 2 and dsn[0] == dsn[-1] and dsn[0] in "'\"":
        return dsn[1:-1].strip()
    return dsn


def _uri_password(dsn: str) -> str | None:
    found = _URI.match(dsn)
    if found is None or "@" not in found.group(2):
        return None
    userinfo = found.group(2).rsplit("@", 1)[0]
    return userinfo.split(":", 1)[1] if ":" in userinfo else None


def _remember(password: str | None) -> None:
    # Shorter ones would blank out ordinary words of every message; they are still redacted
    # wherever they appear inside a DSN.
    if password and len(password) >= 4:
        _SECRETS.update({password, unquote(password)})


def normalize_dsn(dsn: str) -> str:
    """The DSN as asyncpg takes it: env-file quotes removed, ``key=value`` pairs turned into a
    URI. Raises ValueError with a sentence (never the DSN text) for a malformed DSN; the
    password is remembered, so :func:`redact` removes it from any text afterwards."""
    dsn = _strip_quotes(dsn)
    found = _URI.match(dsn)
    if found is not None:
        _remember(_uri_password(dsn))
        if not found.group(1).endswith("//"):
            raise ValueError(
                "The PostgreSQL DSN needs two slashes after its scheme"
                " (postgresql://user@host:port/dbname)."
            )
        return dsn
    pairs = keyword_pairs(dsn)
    if pairs is None:
        raise ValueError(
            "The PostgreSQL DSN is neither a postgresql:// URI nor libpq key=value pairs."
        )
    _remember(pairs.get("password"))
    return "postgresql://?" + urlencode(pairs, quote_via=quote)


def dsn_location(dsn: str) -> str:
    """host:port/database of a DSN, without user or password, for messages and logs."""
    dsn = _strip_quotes(dsn)
    found = _URI.match(dsn)
    if found is None:
        pairs = keyword_pairs(dsn)
        if pairs is None:
            return "(unparseable DSN)"
        port = f":{pairs['port']}" if pairs.get("port", "").isdigit() else ""
        db = pairs.get("dbname") or "(default database)"
        return f"{pairs.get('host') or 'localhost'}{port}/{db}"
    rest = found.group(2).rsplit("@", 1)[-1]
    hostspec = _HOSTSPEC.match(rest)
    after = rest[hostspec.end() if hostspec else 0 :]
    path, _, query = after.partition("?")
    if hostspec is None or (path and not path.startswith("/")) or "/" in path[1:]:
        return "(unparseable DSN)"
    host, _, port = hostspec.group(0).partition(":")
    params = {k: unquote(v) for k, _, v in (p.partition("=") for p in query.split("&"))}
    host = params.get("host") or host or "localhost"
    port = params.get("port", port)
    db = unquote(path[1:]) or params.get("dbname") or params.get("database") or ""
    return f"{host}{':' + port if port.isdigit() else ''}/{db or '(default database)'}"
