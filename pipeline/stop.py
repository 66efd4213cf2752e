"""The stop flag: set by a signal handler, checked by the run at batch boundaries."""

from __future__ import annotations

import signal

from flux_migrate.core.errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted


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
