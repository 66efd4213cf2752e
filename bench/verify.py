"""`python -m bench.verify`: `run` against `verify` and `verify --quick`, in one invocation.

Each repeat migrates the bench source into a fresh database (`run`), then times `verify` and
`verify --quick` on it, each as its own process; the figures are medians over the repeats and
each verify's ratio to the run's wall time (the goal of issue 23: full <= 1.0x, quick <= 0.25x).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from bench.__main__ import PY, ROOT, Measure, drop_db, flux_cmd, fresh_db, measure, server
from flux_migrate.pipeline.sample import generate


def verify_cmd(source: Path, dsn: str, *extra: str, tree: Path | None = None) -> list[str]:
    """`verify` as a user runs it; with ``tree``, the flux-migrate of that checkout instead."""
    start = ["-m", "flux_migrate.pipeline"]
    if tree is not None:  # ahead of the editable install's finder
        start = ["-c", _FROM_TREE.format(tree=str(tree))]
    args = ["verify", "--sqlite-path", str(source), "--postgres-dsn", dsn, *extra]
    return [PY, *start, *args]


_FROM_TREE = (
    "import sys; sys.path.insert(0, {tree!r});"
    " sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()];"
    " from flux_migrate.pipeline.cli import main; sys.exit(main())"
)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=30_000, help="sessions (~10 messages each)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    ap.add_argument(
        "--before", type=Path, help="a checkout of an earlier flux-migrate to time its verify too"
    )
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"chat-{args.sessions}.sqlite"
    if not source.exists():
        generate(source, sessions=args.sessions, seed=2026)
    admin, _srv = server(work)
    times: dict[str, list[Measure]] = {"run": [], "verify": [], "verify --quick": []}
    if args.before:
        times.update({"verify (before)": [], "verify --quick (before)": []})
    for rep in range(args.repeat):
        dsn = fresh_db(admin, "bench_verify")
        times["run"].append(measure(flux_cmd(source, dsn)))
        times["verify"].append(measure(verify_cmd(source, dsn)))
        times["verify --quick"].append(measure(verify_cmd(source, dsn, "--quick")))
        if args.before:
            old = args.before
            times["verify (before)"].append(measure(verify_cmd(source, dsn, tree=old)))
            quick = verify_cmd(source, dsn, "--quick", tree=old)
            times["verify --quick (before)"].append(measure(quick))
        drop_db(admin, "bench_verify")
        print(
            f"  repeat {rep + 1}: "
            + ", ".join(f"{k} {v[-1].wall:.1f} s (cpu {v[-1].cpu:.1f})" for k, v in times.items()),
            flush=True,
        )
    run = statistics.median(m.wall for m in times["run"])
    print(f"{source.name}, {args.repeat} repeats, medians, {os.cpu_count()} cores:")
    for name, runs in times.items():
        wall = statistics.median(m.wall for m in runs)
        cpu = statistics.median(m.cpu for m in runs)
        print(f"  {name:<24} {wall:6.1f} s  cpu {cpu:6.1f} s  {wall / run:5.2f}x run")


if __name__ == "__main__":
    main()
