"""The command line: parse arguments into settings, call the library, print, exit with a code."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from flux_migrate.core import errors
from flux_migrate.core.dsn import redact
from flux_migrate.core.errors import ConfigError, Interrupted, MigrateError, single_error
from flux_migrate.core.mapping import Mapping, summary_lines
from flux_migrate.core.schema import BEFORE_FIRST_ROWID
from flux_migrate.pipeline.cli_check import (
    add_commands,
    add_verify_api_arguments,
    cmd_verify_api,
    path_arg,
)
from flux_migrate.pipeline.logs import add_log_arguments, configure_for
from flux_migrate.pipeline.progress import Progress, progress_display
from flux_migrate.pipeline.report import (
    RunReport,
    check_report_path,
    print_summary,
    print_table,
    printable,
)
from flux_migrate.pipeline.settings import ON_CONFLICT, Settings, load_settings
from flux_migrate.pipeline.stop import StopFlag

if TYPE_CHECKING:
    from flux_migrate.pipeline.data_dir import Database

T = TypeVar("T")


def _workers(text: str) -> int:
    """An argparse type: a number of processes, 1 or more."""
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError("give 1 or more workers")
    return value


def _count(text: str) -> int:
    """An argparse type: a whole number from 0 up (argparse exits 2 with the message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    """The options every command that touches a database takes."""
    p.add_argument("--config", type=path_arg, help="TOML mapping (default: configs/default.toml)")
    p.add_argument(
        "--sqlite-path", type=path_arg, help="the app's SQLite file (or env SQLITE_PATH)"
    )
    p.add_argument("--postgres-dsn", help="target PostgreSQL DSN (or env POSTGRES_DSN)")
    add_log_arguments(p)


def _jsonl_sources(p: argparse.ArgumentParser) -> None:
    """The JSONL options of `run` and `verify` (issue 12)."""
    p.add_argument(
        "--jsonl",
        type=path_arg,
        action="append",
        metavar="PATH",
        help="a JSONL file, into a table named after its stem (repeatable)",
    )
    _data_dir_option(p)


def _data_dir_option(p: argparse.ArgumentParser) -> None:
    """--data-dir (issue 12): the app's data directory, for `run`, `verify` and the views."""
    p.add_argument(
        "--data-dir",
        type=path_arg,
        help="the app's data directory: its memory.db, every *.jsonl, and every other *.db"
        " into the schema named after its file",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (registering the commands' functions)."""
    parser = argparse.ArgumentParser(
        prog="flux-migrate",
        description="Move the chat app's memory from SQLite to PostgreSQL, exactly once,"
        " resumably.",
        epilog="Exit codes: 0 done, 1 runtime failure, 2 usage/configuration/preflight error,"
        " 3 done but some rows were quarantined, 4 (sync) done but rows changed on both sides"
        " (or naming a parent sync cannot load) were left as PostgreSQL has them,"
        " 130/143 interrupted;"
        " check: 0 healthy, 1 unhealthy, 2 usage.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_init(sub)
    _add_sync(sub)
    _add_views(sub)
    COMMANDS.update(add_commands(sub))
    demo = sub.add_parser("demo", help="generate a sample database and migrate it (make demo)")
    demo.add_argument("--sessions", type=int, default=20_000)
    demo.add_argument(
        "--keep-server", action="store_true", help="leave the embedded server running"
    )
    demo.add_argument("--workdir", type=path_arg, default=Path(".demo"))
    add_log_arguments(demo)
    return parser


class _VersionAction(argparse.Action):
    """``--version``: the installed version, looked up only when asked for (the lookup costs
    17-22 ms, which every command paid when argparse's own action was given the string)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        print(f"flux-migrate {_version()}")
        parser.exit()


def _version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flux-migrate")
    except PackageNotFoundError:
        return "(not installed)"


def _add_init(sub: Any) -> None:
    """The `init` command: write the mapping a run would use, to edit and pass with --config."""
    init = sub.add_parser(
        "init", help="write the mapping of a SQLite file as editable TOML (for run --config)"
    )
    init.add_argument("--sqlite-path", type=path_arg, required=True, help="the SQLite file")
    init.add_argument("--out", type=path_arg, help="write here instead of printing it")
    init.add_argument(
        "--config", type=path_arg, help="settings file (its mapping, if any, is kept)"
    )
    add_log_arguments(init)


def cmd_init(args: argparse.Namespace) -> int:
    """`init`: discover the source, print or write the mapping TOML with the reasons."""
    from flux_migrate.core.mapping import to_toml
    from flux_migrate.pipeline.mapping_source import resolve_mapping

    settings = load_settings(args.config, sqlite_path=args.sqlite_path)
    configure_for(args)
    mapping, _ = resolve_mapping(settings.require_source(), settings.mapping, settings.busy_timeout)
    text = to_toml(mapping)
    if args.out is None:
        sys.stdout.write(text)
        return errors.EXIT_OK
    try:
        args.out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Cannot write the mapping to {args.out} ({exc.strerror}).") from None
    print(f"Wrote the mapping of {len(mapping.tables)} table(s) to {args.out};"
          f" edit it and pass it with `flux-migrate run --config {args.out}`.")  # fmt: skip
    return errors.EXIT_OK


def _add_run(sub: Any) -> None:
    """The `run` command and its options."""
    run = sub.add_parser("run", help="migrate (or resume migrating) SQLite into PostgreSQL")
    _common(run)
    _jsonl_sources(run)
    run.add_argument("--batch-size", type=int, help="rows per COPY + checkpoint (default 10000)")
    run.add_argument(
        "--workers",
        type=int,
        help="processes converting SQLite batches beside the loader (default: the CPUs, 1-2)",
    )
    run.add_argument("--report-json", type=path_arg, help="write the run's report to this file")
    run.add_argument("--no-progress", action="store_true", help="no live progress display")
    run.add_argument(
        "--on-conflict", choices=ON_CONFLICT, help="rows already in a table not written by us"
    )
    run.add_argument(
        "--restart",
        action="store_true",
        help="clear this tool's checkpoints and the rows it wrote, then start over",
    )
    run.add_argument("--yes", action="store_true", help="confirm --restart without asking")
    run.add_argument(
        "--final",
        action="store_true",
        help="take a JSONL file's last line even without its newline (the app no longer writes"
        " the file)",
    )


def _add_sync(sub: Any) -> None:
    """The `sync` command and its options."""
    sync = sub.add_parser(
        "sync", help="after a run: apply the source's inserts, updates and deletes since"
    )
    _common(sync)
    sync.add_argument("--batch-size", type=int, help="changes per transaction (default 10000)")
    sync.add_argument(
        "--dry-run", action="store_true", help="print what would change per table, write nothing"
    )
    sync.add_argument(
        "--show", type=_count, default=20, help="conflicting keys to name (default 20)"
    )
    sync.add_argument("--no-progress", action="store_true", help="no live progress display")
    sync.add_argument(
        "--on-conflict", choices=ON_CONFLICT, help="as given to the run (its setting is checked)"
    )
    _jsonl_sources(sync)


def cmd_sync(args: argparse.Namespace) -> int:
    """`sync`: catch the target up with the source; exit 0, 3 (rows quarantined) or 4
    (conflicts: rows changed in both, left as PostgreSQL has them)."""
    from flux_migrate.pipeline.data_dir import sync_all
    from flux_migrate.pipeline.stop import until_signalled
    from flux_migrate.pipeline.sync_report import print_sync, sync_exit_code

    settings, databases = _sources(args, batch_size=args.batch_size, on_conflict=args.on_conflict)
    show_inventory(args, settings, databases)
    fmt = configure_for(args)
    with progress_display(fmt == "console" and not args.no_progress) as progress:
        report, jsonl = run_async(
            until_signalled,
            lambda stop: sync_all(
                settings, databases, dry_run=args.dry_run, stop=stop, progress=progress
            ),
        )
    quarantined = (
        print_sync(report, show=args.show, jsonl=jsonl is not None) if report.tables else 0
    )
    if report.not_synced:
        print(f"Not synced (skip_tables of --config): {', '.join(report.not_synced)}.")
    if jsonl is not None:
        print("JSONL files (new lines loaded, rewritten files reconciled, as `run` does):")
        print_summary(jsonl)
        quarantined += jsonl.quarantined_open
        for table, key, kind in jsonl.conflicts[: args.show]:
            print(f"  {table} {printable(key)}: {kind}")
        if jsonl.conflicts:
            return errors.EXIT_CONFLICTS
    elif args.dry_run and settings.jsonl:
        print("JSONL files are caught up by sync without --dry-run (as `run` does).")
    return sync_exit_code(report, quarantined)


def _add_views(sub: Any) -> None:
    """The read-only commands: quarantine, status, verify."""
    quarantine = sub.add_parser(
        "quarantine", help="list the rows that were quarantined, with reasons"
    )
    _common(quarantine)
    quarantine.add_argument("--table", help="only this table (sessions, messages, a JSONL file's)")
    quarantine.add_argument("--limit", type=_count, default=100, help="rows to show (default 100)")
    quarantine.add_argument(
        "--all", action="store_true", help="include rows loaded since (resolved)"
    )
    _data_dir_option(quarantine)
    status = sub.add_parser("status", help="show each table's checkpoint")
    _common(status)
    _data_dir_option(status)
    verify = sub.add_parser("verify", help="compare every source row with its target row")
    _common(verify)
    _jsonl_sources(verify)
    verify.add_argument("--quick", action="store_true", help="only counts and a checksum per table")
    verify.add_argument(
        "--show", type=_count, default=10, help="differing keys to show per table (default 10)"
    )
    verify.add_argument(
        "--workers",
        type=_workers,
        default=None,
        help="processes reading the source (default: the CPUs it may use; 1 reads it in this one)",
    )
    add_verify_api_arguments(verify)


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from --config, the environment and the command line."""
    return load_settings(
        args.config,
        postgres_dsn=args.postgres_dsn,
        **_source_overrides(args),
        **extra,
    )


def _source_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--sqlite-path and --jsonl, completed from --data-dir where given (issue 12)."""
    from flux_migrate.pipeline.data_dir import scan_data_dir

    sqlite_path: Path | None = args.sqlite_path
    jsonl: list[Path] | None = getattr(args, "jsonl", None)
    data_dir: Path | None = getattr(args, "data_dir", None)
    if data_dir is not None:
        found = scan_data_dir(data_dir)
        sqlite_path = sqlite_path or found.memory
        jsonl = (jsonl or []) + list(found.jsonl)
    if jsonl:  # one file named twice (--jsonl and --data-dir, or two spellings) is one file
        unique: dict[Path, Path] = {}
        for p in jsonl:
            unique.setdefault(p.resolve(), p)
        jsonl = list(unique.values())
    return {"sqlite_path": sqlite_path, "jsonl": jsonl}


def _sources(
    args: argparse.Namespace, *, need_source: bool = True, **extra: Any
) -> tuple[Settings, tuple[Database, ...]]:
    """The settings of the main migration and, with --data-dir, the directory's other SQLite
    files, each into the schema named after it; ConfigError when there is nothing to do (no
    source at all, unless ``need_source`` is false: the views of the target alone)."""
    from flux_migrate.pipeline.data_dir import has_main, other_databases, scan_data_dir

    settings = _settings(args, **extra)
    data_dir: Path | None = getattr(args, "data_dir", None)
    databases: tuple[Database, ...] = ()
    if settings.databases and data_dir is None:
        raise ConfigError(
            f"[databases.{settings.databases[0][0]}] of {settings.config_path} configures a"
            " database of --data-dir, and no --data-dir is given; pass it, or remove the"
            " section. Nothing was done."
        )
    if data_dir is not None:
        databases = other_databases(scan_data_dir(data_dir), settings)
        if not databases and not has_main(settings):
            raise ConfigError(
                f"--data-dir {data_dir} holds no memory.db, other *.db or *.jsonl file; name the"
                " app's data directory."
            )
    if need_source and not databases and not has_main(settings):
        raise ConfigError(
            f"No source given: `{args.command}` needs --sqlite-path PATH (or SQLITE_PATH),"
            " --jsonl PATH or --data-dir DIR; nothing was done."
        )
    return settings, databases


def show_inventory(
    args: argparse.Namespace, settings: Settings, databases: Sequence[Database]
) -> None:
    """With --data-dir: print what it takes and ignores (unless -q), and warn on stderr when it
    holds no memory.db and no --sqlite-path names the app's memory."""
    from flux_migrate.pipeline.data_dir import MEMORY_DB, inventory_lines, scan_data_dir

    data_dir: Path | None = getattr(args, "data_dir", None)
    if data_dir is None:
        return
    found = scan_data_dir(data_dir)
    if not getattr(args, "quiet", False):
        print("\n".join(inventory_lines(found, settings, databases)))
    if settings.sqlite_path is None:
        print(
            f"flux-migrate: warning: no {MEMORY_DB} in {data_dir}: no sessions or messages"
            " (--sqlite-path names it).",
            file=sys.stderr,
        )


def run_async(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return anyio.run(fn, *args, backend="asyncio")


def _write_report(path: Path | None, report: RunReport) -> None:
    if path is None:
        return
    path.write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")


def _confirm_restart(
    args: argparse.Namespace, settings: Settings, databases: Sequence[Database] = ()
) -> None:
    """Ask before --restart deletes anything (or require --yes without a terminal)."""
    if not args.restart or args.yes:
        return
    if not sys.stdin.isatty():
        raise ConfigError(
            "--restart deletes the rows flux-migrate wrote and its checkpoints; pass --yes to"
            " confirm."
        )
    schemas = ", ".join([settings.names.schema] + [db.schema for db in databases])
    answer = input(
        "--restart drops or empties the tables flux-migrate filled in schema(s)"
        f" {schemas} and forgets its checkpoints. Type 'yes' to continue: "
    )
    if answer.strip().lower() != "yes":
        raise ConfigError("Restart not confirmed; nothing was changed.")


def cmd_run(args: argparse.Namespace) -> int:
    """`run`: migrate or resume, print the summary; exit 0, or 3 when rows stay quarantined."""
    settings, databases = _sources(
        args,
        batch_size=args.batch_size,
        on_conflict=args.on_conflict,
        jsonl_final=args.final,
        workers=args.workers,
    )
    check_report_path(args.report_json)
    show_inventory(args, settings, databases)
    _confirm_restart(args, settings, databases)
    # The converter thread and the COPY writer share the GIL; a 1 ms hand-over (default 5 ms)
    # keeps PostgreSQL fed while a batch converts (measured: messages ~8% faster).
    sys.setswitchinterval(0.001)
    fmt = configure_for(args)
    report = RunReport(run_id=uuid.uuid4().hex[:12])
    try:
        with progress_display(fmt == "console" and not args.no_progress) as progress:
            run_async(
                _migrate_until_signalled,
                settings,
                databases,
                args.restart,
                progress,
                report,
                args.quiet,
            )
    except MigrateError as exc:
        report.status = "interrupted" if isinstance(exc, Interrupted) else "failed"
        report.message = redact(exc.message)
        if report.tables:
            print_summary(report)
        _write_report(args.report_json, report)
        raise
    print_summary(report)
    _write_report(args.report_json, report)
    data_dir = f" --data-dir {args.data_dir}" if args.data_dir is not None else ""
    return _print_outcome(report, f"flux-migrate quarantine{data_dir}")


def show_mapping(mapping: Mapping, configured: bool, where: str = "") -> None:
    """Print the run's mapping as one screen, before anything loads (``where``: of which file
    into which schema, for the other databases of --data-dir)."""
    of = f" of {where}" if where else ""
    print(f"Mapping{of} ({'from --config' if configured else 'discovered'}), tables in load order:")
    for line in summary_lines(mapping):
        print(line)


async def _migrate_until_signalled(
    settings: Settings,
    databases: Sequence[Database],
    restart: bool,
    progress: Progress,
    report: RunReport,
    quiet: bool,
) -> None:
    """Run the migration (and those of --data-dir's other databases); a first SIGINT/SIGTERM
    stops it at the next batch boundary, a second one abandons the open batch. Raises
    MigrateError (Interrupted when stopped)."""
    from flux_migrate.pipeline.data_dir import migrate_all
    from flux_migrate.pipeline.stop import until_signalled

    async def work(stop: StopFlag) -> None:
        await migrate_all(
            settings,
            databases,
            progress=progress,
            stop=stop,
            restart=restart,
            report=report,
            show_mapping=None if quiet else show_mapping,
        )

    await until_signalled(work)


def _print_outcome(report: RunReport, listing: str = "flux-migrate quarantine") -> int:
    """The sentences after a completed run's summary (``listing``: the command that lists the
    quarantined rows); the exit code (3: rows quarantined)."""
    requeued = sum(t.requeued for t in report.tables.values())
    if requeued:
        print(
            f"{requeued:,} previously quarantined row(s) were fixed in the source and loaded now."
        )
    if all(t.up_to_date for t in report.tables.values()):
        print("The target is up to date: no new rows in the source since the last run.")
    if report.quarantined_open:
        print(
            f"{report.quarantined_open:,} source row(s) are quarantined, not loaded"
            f" ({report.quarantined:,} in this run); list them with `{listing}`."
        )
        return errors.EXIT_QUARANTINED
    return errors.EXIT_OK


def cmd_quarantine(args: argparse.Namespace) -> int:
    """`quarantine`: list the quarantined rows with their reasons."""
    from flux_migrate.pipeline.data_dir import preflight_all
    from flux_migrate.pipeline.status import list_quarantine

    settings, databases = _sources(args, need_source=False)
    configure_for(args)
    run_async(lambda: preflight_all("quarantine", settings, databases))
    total, rows = 0, list[dict[str, object]]()
    prefixes = [f"{db.schema}." for db in databases]  # --data-dir's other databases
    for prefix, where in [("", settings)] + [(f"{db.schema}.", db.settings) for db in databases]:
        table = args.table
        if table is not None:
            if next((p for p in prefixes if table.startswith(p)), "") != prefix:
                continue  # --table names a table of another schema
            table = table.removeprefix(prefix)
        limit = max(args.limit - len(rows), 0)
        count, found = run_async(list_quarantine, where, table, limit, args.all)
        total += count
        rows += [{**r, "source_table": prefix + str(r["source_table"])} for r in found]
    if not rows:
        schemas = [settings.names.schema] + [db.schema for db in databases]
        print(f"No quarantined rows in schema{'s' * (len(schemas) > 1)} {', '.join(schemas)}.")
        return errors.EXIT_OK
    resolved = " (resolved ones included)" if args.all else ""
    print(f"{total:,} quarantined row(s){resolved}; showing {len(rows):,}:")
    header = ("table", "rowid", "key", "reason", "detail")
    table = [header] + [
        (
            str(r["source_table"]),
            str(r["source_rowid"]),
            printable(str(r["source_key"])),
            str(r["reason"]),
            printable(str(r["detail"])) + (f" [{r['resolution']}]" if r["resolution"] else ""),
        )
        for r in rows
    ]
    print_table(table, align="lrlll")
    by_sync = any(str(r["stage"]).startswith("sync") for r in rows)
    print(
        "Fix these rows in the SQLite file (same rowid: UPDATE them in place) and rerun"
        f" `flux-migrate {'sync' if by_sync else 'run'}`: fixed rows are loaded and marked"
        " resolved."
        + (" (Rows of stage sync were quarantined by sync; only sync loads them.)" * by_sync)
    )
    if any(r["source_table"] not in ("sessions", "messages") for r in rows):
        print(
            "For a JSONL table the rowid is the line's byte offset: fix the line in the file,"
            " and the rerun reconciles the rewritten file by id."
        )
    return errors.EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """`status`: each table's checkpoint."""
    from flux_migrate.pipeline.data_dir import preflight_all
    from flux_migrate.pipeline.status import status

    settings, databases = _sources(args, need_source=False)
    configure_for(args)
    run_async(lambda: preflight_all("status", settings, databases))
    rows = run_async(status, settings)
    for db in databases:
        rows += run_async(status, db.settings)
    if not rows:
        print(f"No checkpoints in schema {settings.names.schema}: nothing has been migrated yet.")
        return errors.EXIT_OK
    header = ("table", "target", "status", "last rowid", "loaded", "quarantined", "skipped")
    table = [header + ("updated",)] + [
        (
            c.source_table,
            f"{c.target_schema}.{c.target_table}",
            c.status + (" (keys pending)" if c.constraints_pending else ""),
            "-" if c.last_rowid == BEFORE_FIRST_ROWID else str(c.last_rowid),
            f"{c.loaded:,}",
            f"{c.quarantined:,}",
            f"{c.skipped:,}",
            c.updated_at.isoformat(timespec="seconds"),
        )
        for c in rows
    ]
    print_table(table, align="lllrrrrl")
    return errors.EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """`verify`: compare every row (or, with --quick, counts and checksums); exit 1 on a
    mismatch."""
    from flux_migrate.pipeline.verify import verify_quick, verify_rows

    if args.api:
        return cmd_verify_api(args)
    from flux_migrate.pipeline.data_dir import preflight_all, verify_all, verify_all_quick

    settings, databases = _sources(args)
    show_inventory(args, settings, databases)
    configure_for(args)
    run_async(lambda: preflight_all("verify", settings, databases))
    if settings.sqlite_path is None and (settings.jsonl or databases):
        others = run_async(lambda: verify_all(databases, limit=args.show))
        return _print_verify(_verify_jsonl(settings, args.show) + others)
    if args.quick:
        quick = run_async(lambda: verify_quick(settings, workers=args.workers))
        quick += run_async(verify_all_quick, databases)
        rows: list[tuple[str, ...]] = [
            ("table", "source", "quarantined", "skipped", "target", "checksum", "result")
        ]
        for q in quick:
            same = "same" if q.source_checksum == q.target_checksum else "DIFFERS"
            counts = (q.source_rows, q.quarantined, q.skipped, q.target_count)
            rows.append((q.table, *(f"{n:,}" for n in counts), same, q.verdict))
        print_table(rows, align="lrrrrll")
        code = errors.EXIT_OK if all(q.ok for q in quick) else errors.EXIT_FAILURE
        if settings.jsonl:  # JSONL files have no quick form: compared in full
            code = max(code, _print_verify(_verify_jsonl(settings, args.show)))
        return code
    full = run_async(lambda: verify_rows(settings, limit=args.show, workers=args.workers))
    others = run_async(lambda: verify_all(databases, limit=args.show))
    return _print_verify(full + _verify_jsonl(settings, args.show) + others)


def _verify_jsonl(settings: Settings, show: int) -> list[Any]:
    """The full comparison of the JSONL files of the settings (none: an empty list)."""
    from flux_migrate.pipeline.jsonl_verify import verify_jsonl

    if not settings.jsonl:
        return []
    return run_async(lambda: verify_jsonl(settings, limit=show))


def _print_verify(full: list[Any]) -> int:
    """Print the full comparison per table; exit 0 when every table matches, else 1."""
    header = ("table", "matched", "different", "missing", "extra", "quarantined", "skipped")
    table: list[tuple[str, ...]] = [header + ("result",)]
    for t in full:
        counts = (t.matched, t.different, t.missing, t.extra, t.quarantined, t.skipped)
        table.append((t.table, *(f"{n:,}" for n in counts), t.verdict))
    print_table(table, align="lrrrrrrl")
    for t in full:
        for line in t.samples:
            print(f"  {line}")
    return errors.EXIT_OK if all(t.ok for t in full) else errors.EXIT_FAILURE


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISMATCH"


def cmd_demo(args: argparse.Namespace) -> int:
    from flux_migrate.pipeline.demo import demo

    fmt = configure_for(args)
    return demo(
        workdir=args.workdir,
        sessions=args.sessions,
        keep_server=args.keep_server,
        show_progress=fmt == "console",
    )


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "init": cmd_init,
    "sync": cmd_sync,
    "status": cmd_status,
    "verify": cmd_verify,
    "demo": cmd_demo,
    "quarantine": cmd_quarantine,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code; a Ctrl-C at any moment (also a second one
    while the first is being reported) exits 130 without a traceback."""
    try:
        code = _main(argv)
    except KeyboardInterrupt:
        print("flux-migrate: interrupted; rerun the same command to resume.", file=sys.stderr)
        code = errors.EXIT_SIGINT
    if argv is None:  # the process itself: what is left is exiting, which Ctrl-C cannot improve
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def _main(argv: Sequence[str] | None) -> int:
    """Parse arguments and run one command; print a MigrateError as one sentence and return
    its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MigrateError as exc:
        print(f"flux-migrate: error: {redact(exc.message)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("flux-migrate: interrupted; rerun the same command to resume.", file=sys.stderr)
        return errors.EXIT_SIGINT
    except Exception as exc:  # a bug: one line for the user, the traceback on request
        if os.environ.get("FLUX_DEBUG"):
            raise
        if isinstance(exc, BaseExceptionGroup):
            inner = single_error(exc)
            if isinstance(inner, MigrateError):
                print(f"flux-migrate: error: {redact(inner.message)}", file=sys.stderr)
                return inner.exit_code
            exc = inner if isinstance(inner, Exception) else exc
        if isinstance(exc, sqlite3.Error):  # the source failed mid-read (a damaged page, I/O)
            failure = errors.translate(exc, "the SQLite file")
            print(f"flux-migrate: error: {redact(failure.message)}", file=sys.stderr)
            return failure.exit_code
        print(
            f"flux-migrate: internal error: {type(exc).__name__}: {redact(str(exc))}"
            " (set FLUX_DEBUG=1 for the traceback and please report it).",
            file=sys.stderr,
        )
        return errors.EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
