"""The ``check`` and ``verify --api`` commands: parse arguments, call the library, print.

Wiring into ``pipeline/cli.py``::

    handlers = add_commands(sub)            # adds `check`; returns {"check": cmd_check}
    add_verify_api_arguments(verify)        # adds --api and --page-size to `verify`
    # in cmd_verify: if args.api: return cmd_verify_api(args)

Handlers return an exit code (0 healthy/agreeing, 1 not) and raise MigrateError subclasses
(ConfigError, exit 2) for usage problems; ``pipeline.cli.main`` prints those.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from flux_migrate.core import errors
from flux_migrate.core.errors import ConfigError
from flux_migrate.pipeline.logs import add_log_arguments, configure_for
from flux_migrate.pipeline.settings import Settings, load_settings, validate

Handler = Callable[[argparse.Namespace], int]


def path_arg(text: str) -> Path:
    """An argparse type: a path that is not empty (an unset shell variable gives ``""``, which
    would otherwise name the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty (an unset variable?); name a file")
    return Path(text)


def add_commands(subparsers: Any) -> dict[str, Handler]:
    """Add the ``check`` command to an argparse subparsers object; return its handler by name."""
    p = subparsers.add_parser(
        "check",
        help="check the PostgreSQL the app's memory will use (connect, schema, pool, CRUD)",
        description="Connect, print server version and latency, compare the target tables with"
        " the app's schema, open a pool and run a create/read/update/delete and jsonb round"
        " trip that is rolled back. Exit 0 healthy, 1 unhealthy, 2 usage.",
    )
    p.add_argument("--config", type=path_arg, help="TOML mapping (default: configs/default.toml)")
    p.add_argument("--postgres-dsn", help="PostgreSQL DSN (or env POSTGRES_DSN)")
    p.add_argument("--schema", help="target schema (default: from --config, else public)")
    p.add_argument("--postgres-read-dsn", help="standby DSN for reads (or env POSTGRES_READ_DSN)")
    p.add_argument("--quick", action="store_true", help="only connect: version and latency")
    p.add_argument("--pool-min", type=int, help="pool minimum (default: MEMORY_POOL_MIN or 2)")
    p.add_argument("--pool-max", type=int, help="pool maximum (default: MEMORY_POOL_MAX or 10)")
    add_log_arguments(p)
    return {"check": cmd_check}


def add_verify_api_arguments(verify: argparse.ArgumentParser) -> None:
    """Add ``--api`` (and its ``--page-size``) to the existing ``verify`` command."""
    verify.add_argument(
        "--api",
        action="store_true",
        help="compare what the memory API answers on SQLite and PostgreSQL, session by session",
    )
    verify.add_argument("--page-size", type=int, default=50, help="get_sessions page size (--api)")


def _settings(args: argparse.Namespace) -> Settings:
    """Config file < environment < flags, as for every other command; --schema last."""
    settings = load_settings(
        getattr(args, "config", None),
        sqlite_path=getattr(args, "sqlite_path", None),
        postgres_dsn=args.postgres_dsn,
    )
    schema = getattr(args, "schema", None)
    if schema is not None:
        settings = settings.with_(names=dataclasses.replace(settings.names, schema=schema))
        validate(settings)
    return settings


def cmd_check(args: argparse.Namespace) -> int:
    """``flux-migrate check``: 0 healthy, 1 unhealthy; ConfigError for usage problems."""
    # Imported here: the memory's backends cost every other command 0.09 s of start-up.
    from flux_migrate.memory.factory import MemorySettings, pool_bounds
    from flux_migrate.pipeline.check import check

    configure_for(args)
    settings = _settings(args)
    dsn = settings.require_dsn()
    env = MemorySettings.from_env()
    read_dsn = args.postgres_read_dsn or env.postgres_read_dsn
    pool_min = env.pool_min if args.pool_min is None else args.pool_min
    pool_max = env.pool_max if args.pool_max is None else args.pool_max
    pool_bounds(pool_min, pool_max, "--pool-min and --pool-max")

    async def run() -> Any:
        return await check(
            dsn,
            read_dsn=read_dsn,
            names=settings.names,
            quick=args.quick,
            pool_min=pool_min,
            pool_max=pool_max,
        )

    result = anyio.run(run, backend="asyncio")
    for line in result.lines():
        print(line)
    return errors.EXIT_OK if result.healthy else errors.EXIT_FAILURE


def _api_only(args: argparse.Namespace) -> None:
    """--api compares the memory API, which only the app's memory.db has: --data-dir names
    it (its other files are compared by `verify --data-dir`); --quick and --jsonl are refused
    rather than ignored."""
    for flag, given in (
        ("--quick", getattr(args, "quick", False)),
        ("--jsonl", getattr(args, "jsonl", None)),
    ):
        if given:
            raise ConfigError(
                f"verify --api compares the app's memory API and takes no {flag}; run"
                f" `verify {flag} ...` on its own."
            )
    if getattr(args, "data_dir", None) is None:
        return
    memory = args.data_dir / "memory.db"
    if args.sqlite_path is None and not memory.is_file():
        raise ConfigError(
            f"verify --api compares the app's memory.db, and {args.data_dir} holds none; pass"
            " --sqlite-path."
        )
    args.sqlite_path = args.sqlite_path or memory
    print(
        f"Comparing the memory API on {args.sqlite_path} (the data directory's other files:"
        " `verify --data-dir`)."
    )


def cmd_verify_api(args: argparse.Namespace) -> int:
    """``flux-migrate verify --api``: 0 when both backends agree, 1 on any mismatch."""
    from flux_migrate.pipeline.verify_api import compare_api  # the memory's backends: see above

    configure_for(args)
    _api_only(args)
    settings = _settings(args)
    path = settings.require_source()
    dsn = settings.require_dsn()
    if args.page_size < 1:
        raise ConfigError(f"--page-size must be at least 1, not {args.page_size}.")

    async def run() -> Any:
        return await compare_api(path, dsn, names=settings.names, page_size=args.page_size)

    result = anyio.run(run, backend="asyncio")
    for line in result.lines():
        print(line)
    return errors.EXIT_OK if result.ok else errors.EXIT_FAILURE
