"""A sync scanning a table large enough for worker processes, stopped by a signal: its workers
never outlive it (SIGKILL of the parent included), a pipe reading its output ends, and
SIGINT/SIGTERM stop it at a boundary with exit 130/143 and a sentence, as `run` does (real
processes, real PostgreSQL)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flux_migrate.core.errors import EXIT_FAILURE, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM
from flux_migrate.pipeline.sync_plan import CHUNK
from tests.support import ROOT, alive, cli, worker_processes

ROWS = 3 * CHUNK + 1000  # four ranges: read by worker processes


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT)")
    db.executemany("INSERT INTO big VALUES (?, ?)", ((i, "x" * 40) for i in range(ROWS)))
    db.commit()
    db.close()
    return path


def _start_sync(
    path: Path, dsn: str, *, ignore_sigint: bool = False, session: bool = False
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_DSN"}
    # as a script's `cmd &` starts it: SIGINT ignored, which the child inherits
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.SIG_DFL)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "flux_migrate.pipeline", "sync", "--sqlite-path", str(path)]
            + ["--postgres-dsn", dsn, "--log-format", "json"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=session,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("signum", "code", "ignore_sigint"),
    [
        (signal.SIGKILL, -signal.SIGKILL, False),
        (signal.SIGTERM, EXIT_SIGTERM, False),
        (signal.SIGINT, EXIT_SIGINT, True),
    ],
    ids=["sigkill", "sigterm", "sigint_in_background"],
)
def test_a_signalled_sync_leaves_no_worker_behind(
    big_source: Path, pg_dsn: str, signum: int, code: int, ignore_sigint: bool
) -> None:
    """SIGKILL, SIGTERM, or SIGINT of a background sync while its workers scan: the workers
    are gone within seconds, the pipe reading the sync's output ends; SIGTERM and SIGINT
    exit 143 and 130 with a sentence; a rerun then completes."""
    args = ["--sqlite-path", str(big_source), "--postgres-dsn", pg_dsn]
    ran = cli("run", *args, timeout=300)
    assert ran.returncode == EXIT_OK, ran.stderr
    proc = _start_sync(big_source, pg_dsn, ignore_sigint=ignore_sigint)
    workers = worker_processes(proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)  # the pipes end: no worker holds them
    assert code == proc.returncode, err[-2000:]
    if signum != signal.SIGKILL:
        name = signal.Signals(signum).name
        assert f"Stopped by {name} at a batch boundary" in err, err[-2000:]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in workers)
    rerun = cli("sync", *args, timeout=300)
    assert EXIT_OK == rerun.returncode, rerun.stdout + rerun.stderr


def test_a_scan_worker_killed_ends_the_sync_with_a_sentence(big_source: Path, pg_dsn: str) -> None:
    """A worker process of sync's scan killed (as the OOM killer would): sync exits 1 with one
    sentence saying nothing was written and to run it again, no traceback, no worker left;
    the rerun completes."""
    args = ["--sqlite-path", str(big_source), "--postgres-dsn", pg_dsn]
    ran = cli("run", *args, timeout=300)
    assert ran.returncode == EXIT_OK, ran.stderr
    proc = _start_sync(big_source, pg_dsn, ignore_sigint=False)
    workers = worker_processes(proc)
    os.kill(min(workers), signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert EXIT_FAILURE == proc.returncode, err[-2000:]
    assert "ended abruptly (killed, or out of memory); nothing was written" in err, err[-2000:]
    assert "Traceback" not in err and "never retrieved" not in err, err[-2000:]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in workers)
    rerun = cli("sync", *args, timeout=300)
    assert EXIT_OK == rerun.returncode, rerun.stdout + rerun.stderr


def test_sigterm_to_the_whole_group_stops_the_sync_at_a_boundary(
    big_source: Path, pg_dsn: str
) -> None:
    """SIGTERM to the sync's whole process group (as a service manager stops it) while its
    workers scan: they ignore a SIGTERM their sync did not send (the one it sends, when its
    pool breaks, ends them), so the sync stops at a boundary with 143 and its sentence, not a
    lost worker; none is left behind."""
    args = ["--sqlite-path", str(big_source), "--postgres-dsn", pg_dsn]
    ran = cli("run", *args, timeout=300)
    assert ran.returncode == EXIT_OK, ran.stderr
    proc = _start_sync(big_source, pg_dsn, session=True)
    workers = worker_processes(proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert EXIT_SIGTERM == proc.returncode, err[-2000:]
    assert "Stopped by SIGTERM at a batch boundary" in err, err[-2000:]
    assert "ended abruptly" not in err, err[-2000:]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in workers)
