"""What every worker process of flux-migrate shares (sync's scan, run's converters, verify's
readers): started with ``spawn`` (never a fork of a process running threads), dying with the
command that started it, collecting cyclic garbage rarely, and, when one ends abruptly, a
sentence instead of an internal error."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    from flux_migrate.core.errors import RuntimeFailure

SPAWN = multiprocessing.get_context("spawn")  # no fork of a process running threads
# Whether a worker can tell who sent it a signal (Linux: sigtimedwait's si_pid).
_SENDER_KNOWN = hasattr(signal, "sigtimedwait")


def die_with_parent(parent: int) -> None:
    """A worker's initializer: the worker dies when ``parent`` does, however it dies (SIGKILL
    too: PR_SET_PDEATHSIG on Linux, and a watchdog on the parent's pid elsewhere), ignores the
    SIGINT/SIGTERM meant for its parent (which stops at a boundary), and holds none of its
    parent's output open (so a pipe reading the parent's output ends with it).

    A SIGTERM the parent itself sends still ends the worker: that is how the standard
    library's pool ends the other workers when one died, and joins them; a worker ignoring
    it left the parent waiting for ever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _SENDER_KNOWN:  # SIGTERM waits for the watchdog, which asks who sent it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # every thread after this
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    quiet = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(quiet, fd)
    os.close(quiet)
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def worker_started(parent: int) -> None:
    """What a worker does first: die with ``parent`` (die_with_parent) and collect rarely."""
    die_with_parent(parent)
    few_collections()


# Tracked objects allocated (net) before a young-generation collection: Python's default is
# 700. A worker's batch or page holds tens of thousands of row tuples, and each default
# collection traversed the live ones again: 784 collections for 20 converted batches of 10k
# messages (8% of the converter's CPU), 263 for 200k rows of verify --quick's scan (5%).
# Workers make no reference cycles on their path; this still finds any they left.
_YOUNG_COLLECTION_EVERY = 50_000


def few_collections() -> None:
    """Freeze the modules' objects out of every collection, collect the young generation every
    _YOUNG_COLLECTION_EVERY allocations, and each older one every 20 collections of the one
    below it (10 by default)."""
    gc.freeze()
    gc.set_threshold(_YOUNG_COLLECTION_EVERY, 20, 20)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A standard-library pool of ``workers`` processes (spawned, dying with this one), all of
    them started now, before its first job.

    Left to itself the pool starts a spawned process per job submitted while its manager thread
    already runs; when one dies in that window, the manager terminates the processes it knows
    and then joins all of them, the one still being started included, which it never
    terminated: the command waited for ever (or printed the pool's own traceback when the list
    changed under it). Started up front, every process is known before the manager runs.

    The manager thread starts now too, as under fork: it is what ends the processes when the
    pool shuts down. Left to start with the first job, a pool that never got one (a sync
    stopped by Ctrl-C before its first scan) kept its processes after shutdown, and the command
    waited for them for ever as it exited."""
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=SPAWN, initializer=worker_started, initargs=(os.getpid(),)
    )
    launch = getattr(pool, "_launch_processes", None)  # the pool's own: what it does under fork
    manage = getattr(pool, "_start_executor_manager_thread", None)
    if launch is not None:
        launch()
    if manage is not None:
        manage()
    return pool


def _watch_parent(parent: int) -> None:
    """The worker's watchdog: it ends the worker once ``parent`` is gone (checked each second)
    or, where the sender of a signal can be known, when ``parent`` sends it SIGTERM."""
    while os.getppid() == parent:
        if not _SENDER_KNOWN:
            time.sleep(1.0)
            continue
        told = signal.sigtimedwait({signal.SIGTERM}, 1.0)
        if told is not None and told.si_pid == parent:
            break
    os._exit(1)


def worker_lost(command: str) -> RuntimeFailure:
    """The error of a command whose read-only worker process ended abruptly (killed, or out of
    memory): nothing was written, running the command again is the way on."""
    from flux_migrate.core.errors import RuntimeFailure  # here: workers import no driver

    return RuntimeFailure(
        f"A process reading the source for {command} ended abruptly (killed, or out of"
        f" memory); nothing was written. Run {command} again."
    )
