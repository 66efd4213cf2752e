"""The keys and index deferred during the bulk load, built after it (each resumable by name)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog

from flux_migrate.core import bookkeeping
from flux_migrate.core.catalog import existing_constraints
from flux_migrate.core.errors import already_exists, constraint_failure
from flux_migrate.core.schema import Constraint, Table, TargetNames, constraints, pg_identifier
from flux_migrate.core.target import Target
from flux_migrate.pipeline.stop import StopFlag

log = structlog.get_logger("flux_migrate")


Repair = Callable[[Constraint, BaseException], Awaitable[bool]]


async def build_constraints(
    target: Target,
    names: TargetNames,
    stop: StopFlag,
    tables: tuple[Table, ...] | None = None,
    repair: Repair | None = None,
    before_foreign_keys: Callable[[list[Constraint]], Awaitable[None]] | None = None,
) -> float:
    """Build the keys and index not yet built, then record that none is pending; return the
    seconds it took. Stops (Interrupted) between two builds when a stop was requested. Where
    the rows break a key, ``repair`` (if given) may set them aside and build it;
    ``before_foreign_keys`` gets the foreign keys to build, once, before the first of them."""
    started = time.monotonic()
    have = await target.retrying(
        lambda c: existing_constraints(c, names.schema), what="reading constraints"
    )
    todo = [
        c
        for c in constraints(names, tables)
        if (c.name, pg_identifier(names.table(c.table))) not in have
    ]
    foreign = [c for c in todo if c.kind == "fk"]
    for c in todo:
        if foreign and c is foreign[0] and before_foreign_keys is not None:
            await before_foreign_keys(foreign)
        stop.check()
        log.debug("constraint_build_started", constraint=c.name)
        await build_one(target, c, repair)
    await target.retrying(
        lambda c: bookkeeping.clear_constraints_pending(c, names.schema), what="recording the keys"
    )
    return time.monotonic() - started


async def build_one(target: Target, constraint: Constraint, repair: Repair | None = None) -> None:
    """Build one key or index; one built by an attempt whose reply was lost counts as built.

    Raises RuntimeFailure when the rows break the key and ``repair`` does not set them aside.
    """
    try:
        await target.retrying(
            lambda conn: conn.execute(constraint.sql), what=f"building {constraint.name}"
        )
    except Exception as exc:
        if already_exists(exc):
            return  # built by an attempt whose reply was lost
        if repair is not None and await repair(constraint, exc):
            return
        failure = constraint_failure(exc, constraint.name)
        if failure is None:
            raise
        raise failure from None
