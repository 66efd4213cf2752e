"""The stop flag: set by a signal handler, checked by the run at batch boundaries."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import structlog

from flux_migrate.core.errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted, MigrateError

T = TypeVar("T")


class StopFlag:
    """Set by a signal handler; the run stops at the next batch boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def request(self, signum: int) -> None:
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise Interrupted (exit 130 or 143) when a stop was requested."""
        if self.signum is not None:
            name = "SIGINT" if self.signum == signal.SIGINT else "SIGTERM"
            code = EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_SIGTERM
            raise Interrupted(
                f"Stopped by {name} at a batch boundary; checkpoints are consistent,"
                " rerun the same command to resume.",
                code,
            )


async def until_signalled(work: Callable[[StopFlag], Awaitable[T]]) -> T:
    """Run ``work(stop)``: a first SIGINT/SIGTERM sets ``stop`` (the work stops at its next
    boundary, raising Interrupted: exit 130/143), a second one cancels it. Signals are caught
    even when the process was started with them ignored (a background job of a script)."""
    stop = StopFlag()
    done: list[T] = []
    failure: list[MigrateError] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, stop, tg.cancel_scope)
        try:
            done.append(await work(stop))
        except MigrateError as exc:
            failure.append(exc)  # raised outside the task group, not wrapped in a group
        finally:
            tg.cancel_scope.cancel()
    if failure:
        raise failure[0]
    stop.check()  # cancelled by a second signal before the work could say so
    return done[0]


async def _watch_signals(stop: StopFlag, scope: anyio.CancelScope) -> None:
    """Set ``stop`` on the first SIGINT/SIGTERM; cancel ``scope`` on the second."""
    log = structlog.get_logger("flux_migrate")
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if stop.signum is not None:
                scope.cancel()  # a second signal: abandon the open batch
                return
            stop.request(signum)
            log.warning("stop_requested", signal=signal.Signals(signum).name)
