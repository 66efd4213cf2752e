"""The PostgreSQL side: connecting, reconnecting, and retrying transient failures."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import anyio
import asyncpg
import structlog

from flux_migrate.core.dsn import dsn_location, redact
from flux_migrate.core.errors import ErrorClass, RuntimeFailure, classify, translate
from flux_migrate.core.instant import PG_EPOCH, shipped_micros

T = TypeVar("T")
log = structlog.get_logger("flux_migrate")


# What flux-migrate's own connections undo of the database's or role's defaults, as pg_dump
# does: a timeout meant for the app's queries would cancel a batch or a key build again on
# every retry (a statement timeout is a transient failure) until the run gave up.
OWN_SESSION = "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0"


async def connect(dsn: str, *, timeout: float = 10.0) -> asyncpg.Connection:
    """Open one connection (OWN_SESSION set); raises MigrateError with a sentence on failure
    (no password shown)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - translated into one sentence for the user
        raise translate(exc, dsn_location(dsn), connecting=True) from None
    return await own_session(conn)


async def own_session(
    conn: asyncpg.Connection, *steps: Callable[[asyncpg.Connection], Awaitable[None]]
) -> asyncpg.Connection:
    """``conn`` with OWN_SESSION set, then ``steps`` run on it; terminated if one fails."""
    try:
        await conn.execute(OWN_SESSION)
        for step in steps:
            await step(conn)
    except BaseException:
        conn.terminate()
        raise
    return conn


def _text_to_wire(value: str | bytes) -> bytes:
    return value if type(value) is bytes else value.encode("utf-8")  # type: ignore[union-attr]


async def accept_text_bytes(conn: asyncpg.Connection) -> None:
    """Let ``text`` parameters be UTF-8 bytes as read from SQLite, sent without a decode and
    re-encode; PostgreSQL validates the encoding (a bad value fails its COPY with 22021)."""
    for name in ("text", "varchar"):  # varchar(n) of an existing table: the same wire format
        await conn.set_type_codec(
            name,
            schema="pg_catalog",
            encoder=_text_to_wire,
            decoder=lambda data: data.decode("utf-8"),
            format="binary",
        )


_PG_INFINITY = 2**63 - 1


def _instant_to_wire(value: datetime | int) -> tuple[int]:
    """A timestamptz parameter: an aware datetime, or already its instant_micros (an int, as
    converter processes ship them: an int pickles ten times faster than a datetime)."""
    return (shipped_micros(value),)


def _instant_from_wire(value: tuple[int]) -> datetime:
    (micros,) = value
    if micros == _PG_INFINITY:
        return datetime.max.replace(tzinfo=UTC)
    if micros == -_PG_INFINITY - 1:
        return datetime.min.replace(tzinfo=UTC)
    return PG_EPOCH + timedelta(microseconds=micros)


# The loader's socket send buffer. A 1 MB chunk of a COPY payload rarely fits the default
# (208 KB on Linux): the event loop then keeps the rest in its own buffer and moves it down
# after each partial send. With this the kernel takes each chunk whole: 0.30-0.34 against
# 0.80-0.92 ms of the run's CPU per MB sent (850 MB at the 1M bench: about 0.5 CPU-s).
SEND_BUFFER = 4 << 20


async def widen_send_buffer(conn: asyncpg.Connection) -> None:
    """Give ``conn``'s socket a SEND_BUFFER send buffer (the system may cap it); nothing where
    the socket cannot be reached."""
    transport = getattr(conn, "_transport", None)  # asyncpg keeps its asyncio transport here
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


async def send_instants_exactly(conn: asyncpg.Connection) -> None:
    """Send every timestamptz as its microseconds since 2000-01-01 UTC: asyncpg's own encoder
    sends datetime.min and datetime.max (0001-01-01T00:00:00Z, 9999-12-31T23:59:59.999999Z,
    both valid instants) as -infinity and infinity."""
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=_instant_to_wire,
        decoder=_instant_from_wire,
        format="tuple",
    )


class Target:
    """One connection to the target that can be re-opened after a transient failure."""

    def __init__(self, dsn: str, *, retry_seconds: float = 60.0) -> None:
        self.dsn = dsn
        self.retry_seconds = retry_seconds
        self._conn: asyncpg.Connection | None = None
        self.location = dsn_location(dsn)

    async def conn(self) -> asyncpg.Connection:
        """The live connection, opened (with the loader's session settings) when there is none."""
        if self._conn is None or self._conn.is_closed():
            # Batches commit without waiting for the WAL flush: a server crash can only lose
            # whole batches together with their checkpoints (the load rewinds and redoes them),
            # and the run ends with one synchronous commit (pipeline.finish.make_durable).
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=10.0, server_settings={"synchronous_commit": "off"}
                )
            except (ValueError, TypeError, asyncpg.ClientConfigurationError) as exc:
                raise translate(exc, self.location, connecting=True) from None
            self._conn = await own_session(
                conn, accept_text_bytes, send_instants_exactly, widen_send_buffer
            )
        return self._conn

    async def drop(self) -> None:
        """Forget the current connection (after a failure), closing it without waiting long."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def close(self) -> None:
        """Close the connection politely; one whose server went away meanwhile (a restart
        right after the last commit: broken pipe) is dropped instead of failing the command."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with anyio.move_on_after(5, shield=True):
                try:
                    await conn.close()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    pass  # terminated below
            if not conn.is_closed():
                conn.terminate()

    async def retrying(
        self,
        operation: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        what: str,
        on_retry: Callable[[int, BaseException, float], None] | None = None,
    ) -> T:
        """Run ``operation`` on a live connection, retrying transient failures with backoff.

        Waits at most ``retry_seconds`` in total, then raises RuntimeFailure. Fatal and data
        errors propagate at once. Cancellation propagates at once (the failed transaction is
        rolled back by the server when the connection goes).
        """
        deadline = time.monotonic() + self.retry_seconds
        attempt = 0
        while True:
            try:
                conn = await self.conn()
                return await operation(conn)
            except Exception as exc:
                kind = classify(exc)
                if kind is not ErrorClass.TRANSIENT:
                    raise
                await self.drop()
                attempt += 1
                delay = min(0.25 * 2 ** (attempt - 1), 8.0) * (0.75 + random.random() / 2)
                if time.monotonic() + delay > deadline:
                    raise RuntimeFailure(
                        f"PostgreSQL at {self.location} stayed unreachable for"
                        f" {self.retry_seconds:.0f} s while {what} ({type(exc).__name__}:"
                        f" {redact(str(exc)) or 'no message'}); rerun the same command to resume."
                    ) from None
                if on_retry is not None:
                    on_retry(attempt, exc, delay)
                await anyio.sleep(delay)
