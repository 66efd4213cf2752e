"""`make bench`: every contender against the same PostgreSQL, in one invocation.

Contenders (each into a fresh database, each run as its own process so that its peak RSS and
CPU seconds are its own):
  flux       `flux-migrate run` as a user runs it (checkpoints, quarantine checks, keys)
  flux-wN    the same with `--workers N` (not in the default list: for the scaling figures)
  original   the app's original approach: read all, executemany INSERT in batches of 100
  ceiling    the same data already transformed into a binary COPY file, then only COPY FROM
             that file plus the key and index build
  pgloader   when installed, with an equivalent load file
  duckdb     when installed (the bench extra): DuckDB's sqlite and postgres extensions, one
             INSERT ... SELECT with casts per table into bare tables, then the same keys
Extra measurements: flux with one commit at the end (the cost of checkpointing), and a kill at
90% of the messages followed by a resume (rows re-read).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from flux_migrate.core.schema import TABLES, TargetNames, constraints, create_table_sql
from flux_migrate.pipeline.sample import generate

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Measure:
    wall: float
    rss_mb: float
    cpu: float
    # (seconds since start, resident MB) sampled every 20 ms: the client's memory over time
    rss_series: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Contender:
    name: str
    runs: list[Measure] = field(default_factory=list)
    rows: int = 0
    note: str = ""

    def median(self, attr: str) -> float:
        return statistics.median(getattr(m, attr) for m in self.runs)

    def span(self, attr: str) -> tuple[float, float]:
        values = [getattr(m, attr) for m in self.runs]
        return min(values), max(values)


def with_db(dsn: str, db: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + db))


async def _admin(dsn: str, *sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for s in sql:
            await conn.execute(s)
    finally:
        await conn.close()


def read_through(path: Path) -> None:
    """Read ``path`` once, so that the timed runs find it in the page cache alike."""
    with path.open("rb") as f:
        while f.read(8 << 20):
            pass


def fresh_db(admin: str, db: str) -> str:
    asyncio.run(
        _admin(admin, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)', f'CREATE DATABASE "{db}"')
    )
    return with_db(admin, db)


def drop_db(admin: str, db: str) -> None:
    asyncio.run(_admin(admin, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))


def measure(cmd: list[str], *, stderr: Any = subprocess.DEVNULL) -> Measure:
    """Run a command to completion; its wall time, peak RSS and CPU (user + system)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    peak_kb = 0
    series: list[tuple[float, float]] = []
    while True:
        # ru_maxrss would include the bench's own memory copied at fork; VmHWM is the child's.
        # With worker processes, the peak is that of all of them together (sampled sum).
        hwm_kb, rss_kb = _vm_kb(proc.pid)
        rss_kb += sum(_vm_kb(child)[1] for child in _descendants(proc.pid))
        peak_kb = max(peak_kb, hwm_kb, rss_kb)
        if rss_kb:
            series.append((round(time.monotonic() - started, 3), round(rss_kb / 1024, 1)))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.02)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 3):
        raise SystemExit(f"bench: {' '.join(cmd[:4])} ... failed with exit {proc.returncode}")
    return Measure(wall, peak_kb / 1024, usage.ru_utime + usage.ru_stime, series)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc children lists); empty when gone."""
    out: list[int] = []
    todo = [pid]
    while todo:
        at = todo.pop()
        try:
            tasks = list(Path(f"/proc/{at}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                found = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            out += found
            todo += found
    return out


def _vm_kb(pid: int) -> tuple[int, int]:
    """The process's peak and current resident set (VmHWM, VmRSS) in kB; 0 when gone."""
    found = {"VmHWM:": 0, "VmRSS:": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(None, 1)[0] if line else ""
            if key in found:
                found[key] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return found["VmHWM:"], found["VmRSS:"]


async def _checksum(dsn: str) -> dict[str, tuple[int, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        out = {}
        for table in TABLES:
            rec = await conn.fetchrow(
                "SELECT count(*),"
                " coalesce(sum(('x' || substr(md5(t::text), 1, 15))::bit(60)::bigint), 0)"
                f" FROM {table.name} t"
            )
            out[table.name] = (int(rec[0]), int(rec[1]))
        return out
    finally:
        await conn.close()


def checksum(dsn: str) -> dict[str, tuple[int, int]]:
    return asyncio.run(_checksum(dsn))


def verify_cmds(source: Path, dsn: str) -> dict[str, list[str]]:
    """``verify`` and ``verify --quick`` of a flux run's target, as a user runs them."""
    base = [PY, "-m", "flux_migrate.pipeline", "verify", "--sqlite-path", str(source)]
    base += ["--postgres-dsn", dsn]
    return {"verify": base, "verify --quick": [*base, "--quick"]}


def flux_cmd(source: Path, dsn: str, *extra: str) -> list[str]:
    return [
        PY,
        "-m",
        "flux_migrate.pipeline",
        "run",
        "--sqlite-path",
        str(source),
        "--postgres-dsn",
        dsn,
        "--no-progress",
        "--log-format",
        "json",
        *extra,
    ]


async def _dump_copy_files(dsn: str, folder: Path) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for table in TABLES:
            await conn.copy_from_table(
                table.name, output=folder / f"{table.name}.copy", format="binary"
            )
    finally:
        await conn.close()


def pgloader_cmd(source: Path, dsn: str, workdir: Path) -> list[str] | None:
    exe = shutil.which("pgloader")
    if exe is None:
        return None
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(dsn)
    host = parse_qs(parts.query).get("host", [parts.hostname or "localhost"])[0]
    port = parts.port or 5432
    target = (
        f"postgresql://{parts.username or 'postgres'}@unix:{host}:{port}{parts.path}"
        if host.startswith("/")
        else f"postgresql://{parts.username or 'postgres'}@{host}:{port}{parts.path}"
    )
    load = workdir / "bench.load"
    load.write_text(
        f"LOAD DATABASE\n  FROM sqlite://{source}\n  INTO {target}\n"
        "  WITH data only, create no tables, create no indexes, reset no sequences,\n"
        "       prefetch rows = 10000, batch rows = 10000\n"
        "  INCLUDING ONLY TABLE NAMES LIKE 'sessions', 'messages';\n"
    )
    return [exe, "--no-ssl-cert-verification", str(load)]


def build_keys(dsn: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for c in constraints(TargetNames()):
                await conn.execute(c.sql)
        finally:
            await conn.close()

    asyncio.run(run())


def bare_tables(dsn: str) -> None:
    asyncio.run(_admin(dsn, *(create_table_sql(t, TargetNames()) for t in TABLES)))


def resume_after_kill(source: Path, admin: str, total_messages: int) -> dict[str, int]:
    """Kill flux at ~90% of the messages, rerun, and count what the rerun read."""
    dsn = fresh_db(admin, "bench_resume")
    batch = min(10_000, max(100, total_messages // 20))  # enough batches to stop near 90%
    proc = subprocess.Popen(
        flux_cmd(source, dsn, "--batch-size", str(batch)),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    done = 0
    for line in proc.stderr:
        if '"batch_loaded"' in line and '"messages"' in line:
            done += json.loads(line)["rows"]
            if done >= 0.9 * total_messages:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    loaded_before = asyncio.run(_loaded(dsn))
    report = Path(tempfile.mkdtemp()) / "r.json"
    measure(flux_cmd(source, dsn, "--report-json", str(report), "--batch-size", str(batch)))
    rerun = json.loads(report.read_text())["tables"]["messages"]
    drop_db(admin, "bench_resume")
    return {
        "messages_total": total_messages,
        "batch_size": batch,
        "loaded_before_kill": loaded_before,
        "read_by_rerun": rerun["extracted"],
        "reread_already_loaded": rerun["extracted"] - (total_messages - loaded_before),
    }


async def _loaded(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT loaded FROM flux_migrate.checkpoints WHERE source_table = 'messages'"
            )
        )
    finally:
        await conn.close()


def sync_bench(source: Path, admin: str) -> dict[str, Any]:
    """Bulk run, idle sync, the stated app changes and the final sync, in one database."""
    from bench.sync import sync_figures

    dsn = fresh_db(admin, "bench_sync")
    try:
        live = source.with_name(source.stem + "-live.sqlite")
        return sync_figures(source, dsn, PY, measure, flux_cmd(live, dsn))
    finally:
        drop_db(admin, "bench_sync")


def server(workdir: Path) -> tuple[str, Any]:
    dsn = os.environ.get("POSTGRES_DSN")
    if dsn:
        return dsn, None
    from flux_migrate.pipeline.embedded import dsn_for, start_server

    srv = start_server(workdir / "pgdata", cleanup_mode="stop")
    return dsn_for(srv), srv


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=100_000, help="sessions (~10 messages each)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    ap.add_argument("--contenders", default="flux,original,ceiling,pgloader,duckdb")
    ap.add_argument(
        "--no-extras", action="store_true", help="skip the checkpoint-cost and resume runs"
    )
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"chat-{args.sessions}.sqlite"
    if not source.exists():
        print(f"generating {source} ({args.sessions:,} sessions) ...", flush=True)
        generate(source, sessions=args.sessions, seed=2026)
    admin, srv = server(work)
    import sqlite3

    src = sqlite3.connect(source)
    n_sessions = src.execute("SELECT count(*) FROM sessions").fetchone()[0]
    n_messages = src.execute("SELECT count(*) FROM messages").fetchone()[0]
    src.close()
    total = n_sessions + n_messages
    print(
        f"source: {n_sessions:,} sessions + {n_messages:,} messages = {total:,} rows,"
        f" {source.stat().st_size / 1e6:,.0f} MB",
        flush=True,
    )

    # The ceiling's input: the exact target rows in PostgreSQL's binary COPY format, made once.
    wanted = args.contenders.split(",")
    copy_dir = work / f"copy-{args.sessions}"
    if "ceiling" in wanted and not (copy_dir / "messages.copy").exists():
        copy_dir.mkdir(exist_ok=True)
        prep = fresh_db(admin, "bench_prep")
        measure(flux_cmd(source, prep))
        asyncio.run(_dump_copy_files(prep, copy_dir))
        drop_db(admin, "bench_prep")

    # Every contender's input read once before any is timed: the first timed run (always
    # flux's) otherwise paid for reading the source from disk alone. After other work on the
    # machine, flux's first run took 38.3 s against 13.3-15.3 s in two invocations, and on the
    # development server with the page cache dropped 20.3 s against 11.3 s.
    copies = sorted(copy_dir.glob("*.copy")) if "ceiling" in wanted else []
    for path in [source, *copies]:
        read_through(path)
    contenders = {name: Contender(name) for name in wanted}
    sums: dict[str, dict[str, tuple[int, int]]] = {}
    checks: dict[str, list[float]] = {}  # verify kind -> its wall / the run's, per repeat
    for rep in range(args.repeat):
        for name in wanted:
            db = f"bench_{name}"
            dsn = fresh_db(admin, db)
            c = contenders[name]
            if name == "flux":
                m = measure(flux_cmd(source, dsn))
                if not args.no_extras:
                    for kind, cmd in verify_cmds(source, dsn).items():
                        checks.setdefault(kind, []).append(measure(cmd).wall / m.wall)
            elif name.startswith("flux-w"):  # flux-w1, flux-w2: a given number of workers
                m = measure(flux_cmd(source, dsn, "--workers", name.removeprefix("flux-w")))
            elif name == "original":
                m = measure([PY, "-m", "bench.original", str(source), dsn])
            elif name == "ceiling":
                m = measure([PY, "-m", "bench.ceiling", dsn, str(copy_dir)])
            elif name == "pgloader":
                cmd = pgloader_cmd(source, dsn, work)
                if cmd is None:
                    c.note = "not installed (apt-get install pgloader)"
                    drop_db(admin, db)
                    continue
                bare_tables(dsn)
                m = measure(cmd)
                started = time.monotonic()
                build_keys(dsn)
                m.wall += time.monotonic() - started
            elif name == "duckdb":
                from bench import duck

                if not duck.available():
                    c.note = "not installed (pip install -e '.[bench]')"
                    drop_db(admin, db)
                    continue
                bare_tables(dsn)
                m = measure([PY, "-m", "bench.duck", str(source), dsn])
                started = time.monotonic()
                build_keys(dsn)
                m.wall += time.monotonic() - started
            else:
                raise SystemExit(f"unknown contender {name}")
            sums[name] = checksum(dsn)
            drop_db(admin, db)
            c.runs.append(m)
            c.rows = total
            print(
                f"  run {rep + 1}/{args.repeat} {name:<9} {m.wall:7.1f} s"
                f"  {total / m.wall:9,.0f} rows/s"
                f"  rss {m.rss_mb:6.0f} MB  cpu {m.cpu:6.1f} s",
                flush=True,
            )

    reference = next(iter(sums.values())) if sums else {}
    for name, s in sums.items():
        if s != reference:
            raise SystemExit(
                f"bench: {name} produced different data ({s} vs {reference}); no figures printed"
            )

    extras: dict[str, Any] = {}
    if not args.no_extras and "flux" in wanted:
        single = []
        for _ in range(args.repeat):
            dsn = fresh_db(admin, "bench_single")
            cfg = work / "single.toml"
            cfg.write_text("[load]\nsingle_transaction = true\n")
            single.append(measure(flux_cmd(source, dsn, "--config", str(cfg))).wall)
            drop_db(admin, "bench_single")
        per_batch = contenders["flux"].median("wall")
        extras["checkpoint_cost"] = {
            "per_batch_commit_wall_s": round(per_batch, 2),
            "one_commit_wall_s": round(statistics.median(single), 2),
            "cost_pct": round(100 * (per_batch / statistics.median(single) - 1), 1),
        }
        extras["resume_after_kill_at_90pct"] = resume_after_kill(source, admin, n_messages)
    if not args.no_extras and "flux" in wanted:
        extras["sync"] = sync_bench(source, admin)

    ceiling = contenders.get("ceiling")
    ceiling_rate = total / ceiling.median("wall") if ceiling and ceiling.runs else None
    lines = [
        f"Source: {n_sessions:,} sessions + {n_messages:,} messages ({total:,} rows, "
        f"{source.stat().st_size / 1e6:,.0f} MB SQLite); {args.repeat} runs each, median (min-max);"
        f" {os.cpu_count()} cores.",
        "",
        "| contender | wall s | rows/s | vs ceiling | client peak RSS MB | client CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for c in contenders.values():
        if not c.runs:
            lines.append(f"| {c.name} | {c.note} | | | | |")
            continue
        lo, hi = c.span("wall")
        rate = total / c.median("wall")
        ratio = f"{rate / ceiling_rate:.2f}" if ceiling_rate else "n/a"
        rlo, rhi = c.span("rss_mb")
        lines.append(
            f"| {c.name} | {c.median('wall'):.1f} ({lo:.1f}-{hi:.1f}) | {rate:,.0f} | {ratio} |"
            f" {c.median('rss_mb'):.0f} ({rlo:.0f}-{rhi:.0f}) | {c.median('cpu'):.1f} |"
        )
    if checks:
        extras["verify_vs_run"] = {k: round(statistics.median(v), 3) for k, v in checks.items()}
        lines += [
            "",
            "Verify after each flux run (median of its wall time / that run's): "
            + ", ".join(f"`{k}` {v:.2f}x" for k, v in extras["verify_vs_run"].items())
            + ".",
        ]
    if "sync" in extras:
        sy = extras["sync"]
        ch = sy["changes"]
        lines += [
            "",
            f"Sync (app changes: {ch['sessions_renamed']:,} sessions renamed,"
            f" {ch['messages_appended']:,} messages appended to old sessions,"
            f" {ch['sessions_deleted']:,} sessions deleted with"
            f" {ch['messages_deleted_with_them']:,} messages, {ch['sessions_new']:,} new"
            f" sessions): bulk run {sy['bulk_run_wall_s']} s, idle sync {sy['idle_sync_wall_s']} s,"
            f" final sync {sy['final_sync_wall_s']} s = {sy['final_vs_bulk_pct']}% of the bulk"
            f" run; peak RSS {sy['final_sync_rss_mb']} MB (sync and its scan processes"
            f" together); verify --quick exit {sy['verify_quick_exit']}.",
        ]
    if "checkpoint_cost" in extras:
        cc = extras["checkpoint_cost"]
        rs = extras["resume_after_kill_at_90pct"]
        lines += [
            "",
            f"Checkpointing: one commit per batch {cc['per_batch_commit_wall_s']} s vs one commit"
            f" at the end {cc['one_commit_wall_s']} s: {cc['cost_pct']:+.1f}%.",
            f"Resume: killed after {rs['loaded_before_kill']:,} of {rs['messages_total']:,}"
            f" messages were committed (batches of {rs['batch_size']:,}); the rerun read"
            f" {rs['read_by_rerun']:,} rows, of which"
            f" {rs['reread_already_loaded']:,} had already been loaded.",
        ]
    text = "\n".join(lines)
    print("\n" + text)
    (work / f"results-{args.sessions}.md").write_text(text + "\n")
    (work / f"results-{args.sessions}.json").write_text(
        json.dumps(
            {
                "sessions": n_sessions,
                "messages": n_messages,
                "repeat": args.repeat,
                "contenders": {
                    c.name: {"runs": [m.__dict__ for m in c.runs], "note": c.note}
                    for c in contenders.values()
                },
                "extras": extras,
                "checksums": {k: {t: list(v) for t, v in s.items()} for k, s in sums.items()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwritten: {work / f'results-{args.sessions}.md'} and .json")
    picture = ROOT / "docs" / "benchmark.png"
    try:
        from bench.plot import draw
    except ImportError:  # matplotlib is in the bench (and dev) extra
        print("bench: no picture; pip install -e '.[bench]' for matplotlib")
    else:
        draw(json.loads((work / f"results-{args.sessions}.json").read_text()), picture)
        print(f"drawn: {picture}")
    if srv is not None:
        srv.cleanup()


if __name__ == "__main__":
    main()
