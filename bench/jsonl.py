"""Benchmark: a generated feedback.jsonl (all four formats) into PostgreSQL, rows/s and peak RSS.

    .venv/bin/python -m bench.jsonl --lines 1000000 [--batch-size 10000]

Uses POSTGRES_DSN when set (schema ``flux_bench_jsonl``, dropped first), else a throwaway
embedded server under .bench/. The migration runs in a child process so its peak RSS (VmHWM)
is its own. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(path: Path, lines: int) -> int:
    """Write ``lines`` feedback records cycling through the four formats; return the size."""
    base = datetime(2024, 1, 1)
    with path.open("w", encoding="utf-8") as f:
        for n in range(lines):
            fmt = 1 + n % 4
            at = base + timedelta(seconds=n)
            record = {
                "id": str(uuid.UUID(int=n * 7919 + 1)),
                "message_id": str(uuid.UUID(int=n * 31 + 2)),
                "session_id": str(uuid.UUID(int=n % 5000 + 3)),
                "rating": n % 3 - 1,
                "comment": "답변이 정확했어요" if n % 2 else "could be better",
                "corrected_answer": None if n % 3 else "정정된 답변입니다. " * 3,
                "created_at": (at if fmt == 1 else at.replace(tzinfo=UTC)).isoformat(),
            }
            if fmt >= 3:
                record["rating_label"] = ("inaccurate", "partial", "accurate")[n % 3]
            if fmt >= 4:
                record["query"] = "서울의 인구는 얼마인가요? " * 2
                record["answer"] = "서울의 인구는 약 940만 명입니다. " * 4
                record["username"] = "anonymous" if n % 5 else f"user{n % 100}"
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path.stat().st_size


CHILD = """
import json, resource, sys, time, anyio
from pathlib import Path
from flux_migrate.core.schema import TargetNames
from flux_migrate.pipeline.jsonl_run import JsonlFile, migrate_jsonl
from flux_migrate.pipeline.logs import configure
from flux_migrate.pipeline.settings import Settings
configure("json")
import logging; logging.disable(logging.INFO)
dsn, path, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
s = Settings(postgres_dsn=dsn, batch_size=batch, names=TargetNames(schema="flux_bench_jsonl"))
t0 = time.monotonic()
report, _ = anyio.run(lambda: migrate_jsonl(s, [JsonlFile.of(path)]), backend="asyncio")
wall = time.monotonic() - t0
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
t = report.tables["feedback"]
print(json.dumps({"wall_s": wall, "loaded": t.loaded, "quarantined": t.quarantined,
                  "peak_rss_mb": int(hwm) / 1024}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.jsonl")
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / "feedback.jsonl"
    started = time.monotonic()
    size = generate(path, args.lines)
    print(
        f"generated {args.lines:,} lines, {size / 1e6:.0f} MB in {time.monotonic() - started:.0f} s"
    )
    server = None
    dsn = os.environ.get("POSTGRES_DSN")
    if not dsn:
        sys.path.insert(0, str(ROOT))
        from flux_migrate.pipeline.embedded import dsn_for, start_server

        server = start_server(args.workdir / "pgdata-jsonl", cleanup_mode="stop")
        dsn = dsn_for(server)
    import anyio
    import asyncpg

    async def reset() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("DROP SCHEMA IF EXISTS flux_bench_jsonl CASCADE")
            for table in ("checkpoints", "quarantine", "jsonl_seen"):  # each made when needed
                if await conn.fetchval(f"SELECT to_regclass('flux_migrate.{table}') IS NOT NULL"):
                    await conn.execute(
                        f"DELETE FROM flux_migrate.{table} WHERE target_schema = 'flux_bench_jsonl'"
                    )
        finally:
            await conn.close()

    anyio.run(reset, backend="asyncio")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, dsn, str(path), str(args.batch_size)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return 1
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rate = result["loaded"] / result["wall_s"]
    print(
        f"{result['loaded']:,} rows loaded ({result['quarantined']} quarantined) in"
        f" {result['wall_s']:.1f} s: {rate:,.0f} rows/s, {size / 1e6 / result['wall_s']:.0f} MB/s,"
        f" peak RSS {result['peak_rss_mb']:.0f} MB (batch {args.batch_size:,})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
