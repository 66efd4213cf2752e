"""Rows of two or more tables that reference each other (a cycle of foreign keys across
tables), all deleted from the source: deleted one table after the other, each would still be
referenced by the next (PostgreSQL refuses, or a cascade would run), so sync first keeps them
as child_rows_kept; this deletes those kept only by each other together, in one statement
(PostgreSQL checks the foreign keys at its end)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import asyncpg

from flux_migrate.core import bookkeeping
from flux_migrate.core.schema import quote_ident
from flux_migrate.pipeline.sync_apply import CHILD_ROWS_KEPT, Applier, TableSync


async def delete_together(appliers: Sequence[Applier], reports: Mapping[str, TableSync]) -> None:
    """Delete together the rows sync kept as child_rows_kept (source rows gone) that only
    rows kept with them reference; their conflicts are withdrawn. One transaction."""
    kept = {
        a.table.name: [k for k, kind in reports[a.table.name].conflicts if kind == CHILD_ROWS_KEPT]
        for a in appliers
    }
    if sum(1 for keys in kept.values() if keys) < 2:
        return  # one table's own rows are already deleted together (a tree)
    first = appliers[0]

    async def commit(conn: asyncpg.Connection) -> dict[str, list[str]]:
        async with conn.transaction():
            return await _delete_together(conn, appliers, kept)

    gone = await first.target.retrying(commit, what="deleting rows that reference each other")
    for name, keys in gone.items():
        t, done = reports[name], set(keys)
        t.conflicts = [c for c in t.conflicts if not (c[1] == CHILD_ROWS_KEPT and c[0] in done)]
        t.deleted += len(keys)


async def _delete_together(
    conn: asyncpg.Connection, appliers: Sequence[Applier], kept: dict[str, list[str]]
) -> dict[str, list[str]]:
    """Lock and check the kept rows (still flux-migrate's), drop those that rows outside the
    set reference (until nothing changes), delete the rest in one statement; return them."""
    going: dict[str, list[str]] = {}
    for a in appliers:
        if kept[a.table.name]:
            own, _ = await a.ownership(conn, kept[a.table.name], "UPDATE")
            going[a.table.name] = sorted(k for k, r in own.items() if r["present"] and r["ours"])
    by_name = {a.table.name: a for a in appliers}
    while True:
        held: dict[str, set[str]] = {}
        for name, keys in going.items():
            applier = by_name[name]
            for child, columns, parent_columns in applier.children:
                others = going.get(child.name, [])
                held.setdefault(name, set()).update(
                    await applier.referencing(conn, child, columns, parent_columns, keys, others)
                    if keys
                    else set()
                )
        if not any(held.values()):
            break
        going = {n: [k for k in keys if k not in held.get(n, set())] for n, keys in going.items()}
    going = {n: keys for n, keys in going.items() if keys}
    if len(going) < 2:
        return {}  # nothing a single table's own deletes would not have done
    parts, args = [], []
    for i, (name, keys) in enumerate(going.items()):
        a = by_name[name]
        parts.append(
            f"DELETE FROM {a.names.qualified(name)} WHERE {quote_ident(a.pk)}"
            f" = ANY(${i + 1}::text[]::{a.pk_type}[])"
        )
        args.append(keys)
    ctes = ", ".join(f"d{i} AS ({sql})" for i, sql in enumerate(parts[:-1]))
    await conn.execute(f"WITH {ctes} {parts[-1]}", *args)
    for name, keys in going.items():
        schema = by_name[name].names.schema
        await bookkeeping.forget_digests(conn, schema, name, keys)
        await bookkeeping.forget_conflicts(conn, schema, name, keys)
        await bookkeeping.account_sync(conn, schema, name, loaded=-len(keys), quarantined=0)
    return going
