"""Apply a table's sync plan in batches, each one transaction with its bookkeeping.

Each batch reads its source rows again (by rowid) and decides per key, inside the transaction,
against the digest rows it locks: a target row is flux-migrate's to change only while its
``xmin`` equals its digest row's (both were written in the same transaction, and any later
write by someone else gives the target row a new xmin). Rows someone else changed are left
alone: if the source changed them too, they are recorded in ``flux_migrate.conflicts``. The
digests written with the rows are the checkpoint: a batch that committed is not in the next
plan, so a sync killed at any moment and rerun converges.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, cast

import aiosqlite
import asyncpg
import structlog

from flux_migrate.core import bookkeeping
from flux_migrate.core.digest import digests, key_position
from flux_migrate.core.schema import Kind, Table, TargetNames, quote_ident
from flux_migrate.core.target import Target
from flux_migrate.pipeline.requeue import read_rowids
from flux_migrate.pipeline.settings import Settings
from flux_migrate.pipeline.sync_plan import Stored, source_rowids, source_rows_by, source_rows_of
from flux_migrate.stages.batch import Batch
from flux_migrate.stages.load import LoadContext, quarantine_records
from flux_migrate.stages.transform import key_of, pack_keys, transform_batch

log = structlog.get_logger("flux_migrate")

Ref = tuple[str, ...]  # the values of a foreign key's columns, as the bookkeeping spells them

# Conflict kinds recorded in flux_migrate.conflicts (stable names, documented).
CHANGED_IN_BOTH = "changed_in_both"  # source changed, PostgreSQL row changed by someone else
DELETED_IN_POSTGRES = "deleted_in_postgres"  # source changed, PostgreSQL row deleted
DELETED_IN_SOURCE = "deleted_in_source"  # source deleted, PostgreSQL row changed by someone else
INSERTED_IN_BOTH = "inserted_in_both"  # a new source key someone else inserted in PostgreSQL
CHILD_ROWS_KEPT = "child_rows_kept"  # source deleted, but rows not deleted by sync reference it
# a new or changed source row names a parent flux-migrate loaded that someone deleted in PostgreSQL
PARENT_DELETED_IN_POSTGRES = "parent_deleted_in_postgres"
# a new or changed source row names a parent neither PostgreSQL holds nor sync could load
# (the source stood still while sync tried: no later sync would load it either)
PARENT_MISSING = "parent_missing"

# The quarantine's stage of rows sync quarantined: a new row, or a changed row whose previous
# version stays in PostgreSQL (documented; `quarantine` says to fix them and sync again).
STAGE_SYNC = "sync"
STAGE_STALE = "sync_previous_kept"


@dataclass
class TableSync:
    """What sync did to one table."""

    scanned: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    moved: int = 0
    quarantined: int = 0
    resolved: int = 0
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # key, kind
    # (rowid, key, the conflict it is if it never goes) of rows left to wait: written by the
    # app while this sync ran, naming a parent the target does not hold yet, or changing a key
    # rows still reference; retried within the sync, else the next sync's
    waiting: list[tuple[int, str, str]] = field(default_factory=list)
    # keys gone from the source whose target rows sync kept because rows it owns still
    # reference them, while the app wrote meanwhile (it may have reused a deleted row's key):
    # the next round or sync deletes them once those rows are synced, or names them
    kept_waiting: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def deferred(self) -> int:
        return len(self.waiting) + len(self.kept_waiting)

    @property
    def changed(self) -> int:
        return self.inserted + self.updated + self.deleted


@dataclass(frozen=True)
class Applier:
    """Where one table's changes go, and how its rows convert."""

    src: aiosqlite.Connection
    target: Target
    settings: Settings
    table: Table
    run_id: str
    missing_parents: frozenset[str] = frozenset()
    # (table, its columns, the columns of this table they reference) of each foreign key
    # referencing this table
    children: tuple[tuple[Table, tuple[str, ...], tuple[str, ...]], ...] = ()
    # (columns, parent table, the parent's columns they reference) of each foreign key
    parents: tuple[tuple[tuple[str, ...], Table, tuple[str, ...]], ...] = ()
    known: Mapping[str, Stored | None] = field(default_factory=dict)  # the plan's (TablePlan)

    @property
    def names(self) -> TargetNames:
        return self.settings.names

    @property
    def pk(self) -> str:
        return self.table.primary_key[0]

    @property
    def pk_type(self) -> str:
        return self.table.column(self.pk).pg_type

    @property
    def at(self) -> int:
        at = key_position(self.table.column_names, self.table.primary_key)
        assert at is not None
        return at

    def context(self) -> LoadContext:
        return LoadContext(table=self.table, names=self.names, run_id=self.run_id)

    async def ownership(
        self, conn: asyncpg.Connection, keys: list[str], strength: str
    ) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """Lock the target rows of ``keys`` (``FOR {strength}``), then per key with a stored
        digest: ``digest``, ``pair`` (the xmin it is paired with, as text), ``present`` (the
        target row exists) and ``ours`` (its xmin is still ``pair``: nobody rewrote it since
        flux-migrate did), from its digest_rows entry (locked) or else the pack entry the
        plan read; and the keys the plan knows nothing of (written meanwhile by a live app:
        left to the next sync, which plans them)."""
        xmins = await self._lock(conn, keys, strength)
        rows = await bookkeeping.digest_entries(conn, self.names.schema, self.table.name, keys)
        own: dict[str, dict[str, Any]] = {}
        deferred: set[str] = set()
        entered = {r["key"]: r for r in rows}
        for key in keys:
            if (entry := entered.get(key)) is not None:
                stored: Stored | None = (
                    None if entry["digest"] is None else (entry["digest"], entry["pair"])
                )  # NULL: deleted, new again
            elif key not in self.known:
                deferred.add(key)
                continue
            elif (stored := self.known[key]) is not None and stored[1] is None:
                deferred.add(key)  # the plan read a digest_rows entry that is gone now
                continue
            if stored is not None:
                xmin = xmins.get(key)
                own[key] = {
                    "digest": stored[0],
                    "pair": stored[1],
                    "present": xmin is not None,
                    "ours": xmin is not None and xmin == stored[1],
                }
        return own, deferred

    # ------------------------------------------------------------ inserts and updates

    async def upsert(self, rowids: Sequence[int], report: TableSync) -> None:
        """Insert or update the source rows at ``rowids`` (read again now), one transaction."""
        raw = await read_rowids(self.src, self.table, list(rowids))
        batch = transform_batch(
            Batch(self.table.name, 0, 0, 0, len(raw), raw=raw),
            self.table,
            naive_timezone=self.settings.naive_timezone,
            strip_nul=self.settings.strip_nul,
            missing_parents=self.missing_parents,
        )

        async def commit(conn: asyncpg.Connection) -> _Upserted:
            async with conn.transaction():
                return await self._upsert(conn, batch)

        done = await self.target.retrying(commit, what=f"syncing {self.table.name}")
        log.debug("sync_batch", table=self.table.name, rows=len(rowids), kind="upsert")
        report.inserted += done.inserted
        report.updated += done.updated
        report.waiting += done.waiting
        report.quarantined += done.quarantined
        report.resolved += done.resolved
        report.conflicts += done.conflicts

    async def _upsert(self, conn: asyncpg.Connection, batch: Batch) -> _Upserted:
        schema, name, at = self.names.schema, self.table.name, self.at
        keys = pack_keys([r[at + 1] for r in batch.raw])
        values = digests(batch.raw, len(self.table.column_names))
        own, deferred = await self.ownership(conn, keys, "NO KEY UPDATE")
        inserts: list[int] = []
        updates: list[int] = []
        moved: list[tuple[str, int, int, str | None]] = []
        out = _Upserted(
            waiting=[
                (batch.raw[i][0], k, PARENT_MISSING) for i, k in enumerate(keys) if k in deferred
            ]
        )
        for i, key in enumerate(keys):
            rec = own.get(key)
            if key in deferred:
                continue
            if rec is None:
                inserts.append(i)
            elif rec["digest"] == values[i]:  # done by an earlier attempt, or changed back
                moved.append((key, batch.raw[i][0], values[i], rec["pair"]))
            elif not rec["present"]:
                out.conflicts.append((key, DELETED_IN_POSTGRES))
            elif not rec["ours"]:
                out.conflicts.append((key, CHANGED_IN_BOTH))
            else:
                updates.append(i)
        wait, orphaned = await self._parents_missing(conn, batch, keys, inserts + updates)
        out.waiting += [(batch.raw[i][0], keys[i], PARENT_MISSING) for i in sorted(wait)]
        out.conflicts += [(keys[i], PARENT_DELETED_IN_POSTGRES) for i in sorted(orphaned)]
        inserts = [i for i in inserts if i not in wait and i not in orphaned]
        updates = [i for i in updates if i not in wait and i not in orphaned]
        inserted, held = await self._write(conn, batch.rows, inserts, updates, keys)
        out.waiting += [(batch.raw[i][0], keys[i], CHILD_ROWS_KEPT) for i in updates if i in held]
        updates = [i for i in updates if i not in held]
        for i in inserts:
            if keys[i] not in inserted:
                out.conflicts.append((keys[i], INSERTED_IN_BOTH))
        done = [i for i in inserts if keys[i] in inserted]
        adopted = await self._adopt_equal(conn, batch, keys, out.conflicts)
        adopted_keys = {keys[i] for i in adopted}
        out.conflicts = [c for c in out.conflicts if c[0] not in adopted_keys]
        new_digests = [i for i in adopted if own.get(keys[i]) is None]
        done += new_digests
        updates += [i for i in adopted if own.get(keys[i]) is not None]
        await bookkeeping.put_digests(
            conn,
            schema,
            name,
            [(keys[i], batch.raw[i][0], values[i], None) for i in done + updates],
            rewritten=True,
        )
        await bookkeeping.put_digests(conn, schema, name, moved, rewritten=False)
        written = [keys[i] for i in done + updates]
        stages = await bookkeeping.resolve_quarantine_keys(conn, schema, name, written, "loaded")
        out.resolved = len(stages)
        out.quarantined, stale = await self._quarantine(conn, batch)
        await bookkeeping.record_conflicts(conn, schema, name, out.conflicts, self.run_id)
        await bookkeeping.account_sync(
            conn,
            schema,
            name,  # a row quarantined with its previous version in PostgreSQL is not loaded
            loaded=len(done) + stages.count(STAGE_STALE) - stale,
            quarantined=out.quarantined - out.resolved,
        )
        out.inserted, out.updated = len(done), len(updates)
        return out

    async def _lock(
        self, conn: asyncpg.Connection, keys: list[str], strength: str
    ) -> dict[str, str]:
        """Lock the target rows of ``keys`` until the transaction ends, so that nobody writes
        them between the ownership check and sync's write (``NO KEY UPDATE`` before updates,
        so the app can still insert rows referencing them; ``UPDATE`` before deletes, so
        nobody can); return each found key's xmin (as text). Keys are text or integers (see
        SYNC_KEY_KINDS), whose text PostgreSQL prints as the bookkeeping spells it."""
        pk, target = quote_ident(self.pk), self.names.qualified(self.table.name)
        rows = await conn.fetch(
            f"SELECT {pk}::text AS key, xmin::text AS xmin FROM {target}"
            f" WHERE {pk} = ANY($1::text[]::{self.pk_type}[]) FOR {strength}",
            keys,
        )
        return {r["key"]: r["xmin"] for r in rows}

    async def _parents_missing(
        self, conn: asyncpg.Connection, batch: Batch, keys: list[str], writing: list[int]
    ) -> tuple[set[int], set[int]]:
        """Of the rows at ``writing``, those naming a parent row the target does not hold: a
        conflict when the parent is a row flux-migrate loaded (its digest is kept) that someone
        deleted in PostgreSQL; else (a parent the app wrote after this sync read the parent
        table, or one written later in this sync) left to wait, to be retried. Parents
        quarantined are transform's business (their children are quarantined). The parents
        found are locked (FOR KEY SHARE) until the batch commits. For a table referencing
        itself, a parent written in this batch counts only if it is written after all: rows
        naming a row left out are left out too, until nothing changes."""
        wait: set[int] = set()
        orphaned: set[int] = set()
        checked: dict[tuple[int, Ref], bool] = {}  # (reference, value) -> the target has it
        later: dict[tuple[int, Ref], bool] = {}  # (reference, missing value) -> wait
        while True:
            left = [i for i in writing if i not in wait and i not in orphaned]
            before = len(wait) + len(orphaned)
            for n, (columns, parent, parent_columns) in enumerate(self.parents):
                wanted: dict[Ref, list[int]] = {}
                for i in left:
                    if (value := self._ref(batch.raw[i], columns)) is not None:
                        wanted.setdefault(value, []).append(i)
                if parent.name == self.table.name:  # rows of this batch written with it
                    for i in left:
                        wanted.pop(self._ref(batch.raw[i], parent_columns) or (), None)
                unknown = [k for k in wanted if (n, k) not in checked]
                if unknown:
                    found = await self._parents_present(conn, parent, parent_columns, unknown)
                    checked.update(((n, k), k in found) for k in unknown)
                missing = [k for k in wanted if not checked[(n, k)]]
                if new := [k for k in missing if (n, k) not in later]:
                    fresh = await self._parents_new(conn, parent, parent_columns, new)
                    later.update(((n, k), v) for k, v in fresh.items())
                for key in missing:
                    (wait if later[(n, key)] else orphaned).update(wanted[key])
            if len(wait) + len(orphaned) == before:
                return wait, orphaned

    def _ref(self, raw: tuple[Any, ...], columns: tuple[str, ...]) -> Ref | None:
        """The values of ``columns`` in a raw row (rowid first) as the bookkeeping spells
        them; None when one is NULL (such a reference is not checked, as in PostgreSQL)."""
        names = self.table.column_names
        texts = tuple(key_of(raw[names.index(c) + 1]) for c in columns)
        return None if None in texts else cast(Ref, texts)

    async def _parents_new(
        self, conn: asyncpg.Connection, parent: Table, columns: tuple[str, ...], values: list[Ref]
    ) -> dict[Ref, bool]:
        """Per value of ``columns`` that the target's ``parent`` lacks: False when the source
        row holding it is one flux-migrate loaded (its digest is kept) and its key is gone
        from the target (someone deleted it in PostgreSQL); else True, to wait for: a row new
        in the source, or one whose change to these values is not written yet."""
        now: dict[Ref, tuple[int, str]]
        if len(columns) == 1:
            one = await source_rows_of(self.src, parent, columns[0], [v[0] for v in values])
            now = {(k,): found for k, found in one.items()}
        else:
            now = await source_rows_by(self.src, parent, columns, values)
        loaded = await bookkeeping.loaded_keys(
            conn, self.names.schema, parent.name, {key: rowid for rowid, key in now.values()}
        )
        pk = parent.primary_key[0]
        held = await conn.fetch(  # rows whose change to these values is not written yet
            f"SELECT {quote_ident(pk)}::text AS key FROM {self.names.qualified(parent.name)}"
            f" WHERE {quote_ident(pk)} = ANY($1::text[]::{parent.column(pk).pg_type}[])",
            sorted(loaded),
        )
        gone = loaded - {r["key"] for r in held}
        return {v: v not in now or now[v][1] not in gone for v in values}

    async def _parents_present(
        self, conn: asyncpg.Connection, parent: Table, columns: tuple[str, ...], values: list[Ref]
    ) -> set[Ref]:
        """Those of ``values`` (of ``columns``) the target's ``parent`` table holds, compared
        in the parent's types, their rows locked against deletion until the transaction ends."""
        names = [f"k{i}" for i in range(len(columns))]
        arrays = ", ".join(f"${i + 1}::text[]" for i in range(len(columns)))
        match = " AND ".join(
            f"p.{quote_ident(c)} = u.{k}::{parent.column(c).pg_type}"
            for c, k in zip(columns, names, strict=True)
        )
        rows = await conn.fetch(
            f"SELECT {', '.join(f'u.{k}' for k in names)} FROM unnest({arrays})"
            f" AS u({', '.join(names)}) JOIN {self.names.qualified(parent.name)} AS p ON {match}"
            " FOR KEY SHARE OF p",
            *([v[i] for v in values] for i in range(len(columns))),
        )
        return {tuple(r) for r in rows}

    async def _write(
        self,
        conn: asyncpg.Connection,
        rows: list[tuple[Any, ...]],
        inserts: list[int],
        updates: list[int],
        keys: list[str],
    ) -> tuple[set[str], set[int]]:
        """Update rows ``updates`` and insert rows ``inserts`` (positions in ``rows``) through a
        staging table; return the keys inserted (others already existed in PostgreSQL) and the
        updates held back: they change a unique key that rows still reference."""
        if not inserts and not updates:
            return set(), set()
        table, pk = self.table, quote_ident(self.pk)
        stage = quote_ident(f"flux_sync_{table.name}")
        target = self.names.qualified(table.name)
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {target} INCLUDING DEFAULTS)"
            " ON COMMIT DELETE ROWS"
        )
        await conn.execute(f"DELETE FROM {stage}")  # empty unless in a dry run's transaction
        await conn.copy_records_to_table(
            f"flux_sync_{table.name}",
            records=[rows[i] for i in inserts + updates],
            columns=table.column_names,
        )
        held: set[int] = set()
        if updates:
            busy = await self._referenced_keys_changing(conn, stage, [keys[i] for i in updates])
            held = {i for i in updates if keys[i] in busy}
            sets = ", ".join(
                f"{quote_ident(c)} = s.{quote_ident(c)}" for c in table.column_names if c != self.pk
            )
            await conn.execute(
                f"UPDATE {target} AS t SET {sets} FROM {stage} AS s WHERE t.{pk} = s.{pk}"
                f" AND s.{pk} = ANY($1::text[]::{self.pk_type}[])",
                [keys[i] for i in updates if i not in held],
            )
        if not inserts:
            return set(), held
        cols = ", ".join(quote_ident(c) for c in table.column_names)
        written = await conn.fetch(
            f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {stage}"
            f" WHERE {pk} = ANY($1::text[]::{self.pk_type}[]) ON CONFLICT ({pk}) DO NOTHING"
            f" RETURNING {pk}::text AS key",
            [keys[i] for i in inserts],
        )
        return {r["key"] for r in written}, held

    async def _referenced_keys_changing(
        self, conn: asyncpg.Connection, stage: str, keys: list[str]
    ) -> set[str]:
        """Those of ``keys`` (staged for update) whose update changes the values of a unique
        key that target rows reference (PostgreSQL would refuse it): they wait until those
        rows are gone (deleted by this sync, then retried) or are named."""
        found: set[str] = set()
        pk, target = quote_ident(self.pk), self.names.qualified(self.table.name)
        for child, columns, parent_columns in self.children:
            if parent_columns == (self.pk,):
                continue  # a key sync never changes
            changed = " OR ".join(
                f"s.{quote_ident(c)} IS DISTINCT FROM p.{quote_ident(c)}" for c in parent_columns
            )
            rows = await conn.fetch(
                f"SELECT p.{pk}::text AS key FROM {target} AS p"
                f" JOIN {stage} AS s ON s.{pk} = p.{pk}"
                f" WHERE p.{pk} = ANY($1::text[]::{self.pk_type}[]) AND ({changed})"
                f" AND EXISTS (SELECT FROM {self.names.qualified(child.name)} AS c"
                f" WHERE {_pairs(columns, parent_columns)})",
                keys,
            )
            found |= {r["key"] for r in rows}
        return found

    async def _adopt_equal(
        self,
        conn: asyncpg.Connection,
        batch: Batch,
        keys: list[str],
        conflicts: list[tuple[str, str]],
    ) -> list[int]:
        """Of the rows in conflict whose PostgreSQL row holds exactly what the source row
        converts to (both sides made the same change): make them flux-migrate's again (the
        target row is rewritten unchanged, so its xmin pairs with the digest written with it)
        and return their positions."""
        wanted = {k for k, kind in conflicts if kind in (CHANGED_IN_BOTH, INSERTED_IN_BOTH)}
        if not wanted:
            return []
        pk, target = quote_ident(self.pk), self.names.qualified(self.table.name)
        cols = ", ".join(quote_ident(c) for c in self.table.column_names)
        found = {
            r[0] if isinstance(r[0], str) else str(r[0]): tuple(r)
            for r in await conn.fetch(
                f"SELECT {cols} FROM {target} WHERE {pk} = ANY($1::text[]::{self.pk_type}[])"
                " FOR NO KEY UPDATE",
                sorted(wanted),
            )
        }
        equal = [
            i
            for i, key in enumerate(keys)
            if key in found and _same(self.table, found[key], batch.rows[i])
        ]
        if equal:
            await conn.execute(
                f"UPDATE {target} SET {pk} = {pk} WHERE {pk} = ANY($1::text[]::{self.pk_type}[])",
                [keys[i] for i in equal],
            )
        return equal

    async def _quarantine(self, conn: asyncpg.Connection, batch: Batch) -> tuple[int, int]:
        """Quarantine the batch's rejects not already quarantined (by key), marked as sync's
        (STAGE_STALE when PostgreSQL keeps the row's previous version, which then no longer
        counts as loaded); return how many, and how many of those were STAGE_STALE."""
        if not batch.rejects:
            return 0, 0
        open_keys = await bookkeeping.unresolved_keys(conn, self.names.schema, self.table.name)
        new = [r for r in batch.rejects if r.key not in open_keys]
        if not new:
            return 0, 0
        own, _ = await self.ownership(conn, [r.key or "" for r in new], "NO KEY UPDATE")
        stale = {k for k, rec in own.items() if rec["present"]}
        marked = [replace(r, stage=STAGE_STALE if r.key in stale else STAGE_SYNC) for r in new]
        await bookkeeping.write_quarantine(conn, quarantine_records(self.context(), marked))
        return len(new), len(stale)

    # ------------------------------------------------------------ deletes

    async def delete(self, keys: Sequence[str], report: TableSync) -> None:
        """Delete the target rows of keys gone from the source (checked again now)."""
        present = await self._in_source(list(keys))
        gone = [k for k in keys if k not in present]

        async def commit(conn: asyncpg.Connection) -> tuple[int, list[tuple[str, str]]]:
            async with conn.transaction():
                return await self._delete(conn, gone)

        deleted, conflicts = await self.target.retrying(
            commit, what=f"deleting from {self.table.name}"
        )
        log.debug("sync_batch", table=self.table.name, rows=len(keys), kind="delete")
        report.deleted += deleted
        report.conflicts += conflicts

    async def _delete(
        self, conn: asyncpg.Connection, keys: list[str]
    ) -> tuple[int, list[tuple[str, str]]]:
        schema, name = self.names.schema, self.table.name
        # a key unknown to the plan (deferred) is not deleted
        own, _ = await self.ownership(conn, keys, "UPDATE")
        ours = [k for k, r in own.items() if r["present"] and r["ours"]]
        conflicts = [
            (k, DELETED_IN_SOURCE) for k, r in own.items() if r["present"] and not r["ours"]
        ]
        kept = await self._referenced(conn, ours)
        conflicts += [(k, CHILD_ROWS_KEPT) for k in sorted(kept)]
        ours = [k for k in ours if k not in kept]
        already_gone = [k for k, r in own.items() if not r["present"]]
        pk = quote_ident(self.pk)
        await conn.execute(
            f"DELETE FROM {self.names.qualified(name)}"
            f" WHERE {pk} = ANY($1::text[]::{self.pk_type}[])",
            ours,
        )
        await bookkeeping.forget_digests(conn, schema, name, ours + already_gone)
        await bookkeeping.record_conflicts(conn, schema, name, conflicts, self.run_id)
        await bookkeeping.account_sync(
            conn, schema, name, loaded=-len(ours) - len(already_gone), quarantined=0
        )
        return len(ours), conflicts

    async def _referenced(self, conn: asyncpg.Connection, keys: list[str]) -> set[str]:
        """Those of ``keys`` whose target row a row sync is not deleting with them still
        references (written by someone else, or kept in conflict), through any foreign key,
        by the columns it names, compared in the target's types; deleting them would cascade
        or fail. Rows of a table referencing itself deleted in the same statement do not
        count, unless kept themselves."""
        kept: set[str] = set()
        while deleting := [k for k in keys if k not in kept]:
            found: set[str] = set()
            for child, columns, parent_columns in self.children:
                found |= await self.referencing(conn, child, columns, parent_columns, deleting)
            if not found:
                break
            kept |= found
        return kept

    async def referencing(
        self,
        conn: asyncpg.Connection,
        child: Table,
        columns: tuple[str, ...],
        parent_columns: tuple[str, ...],
        keys: list[str],
        going: Sequence[str] | None = None,
    ) -> set[str]:
        """Those of ``keys`` whose target row rows of ``child`` reference through ``columns``
        -> ``parent_columns``, other than the child rows of keys ``going`` (deleted in the same
        statement; by default, for a table referencing itself, ``keys`` themselves)."""
        pk, me = quote_ident(self.pk), self.names.qualified(self.table.name)
        if going is None and child.name == self.table.name:
            going = keys
        others = ""
        if going:
            child_pk = child.primary_key[0]
            others = (
                f" AND NOT c.{quote_ident(child_pk)}"
                f" = ANY($2::text[]::{child.column(child_pk).pg_type}[])"
            )
        # A semi-join, not a join made DISTINCT: for 100 sessions deleted at 1M messages the
        # join was once planned as a hash of every message (233 ms, 13 ms this way); with 10k
        # keys 55-64 ms against 65-91 ms.
        rows = await conn.fetch(
            f"SELECT p.{pk}::text AS key FROM {me} AS p"
            f" WHERE p.{pk} = ANY($1::text[]::{self.pk_type}[])"
            f" AND EXISTS (SELECT FROM {self.names.qualified(child.name)} AS c"
            f" WHERE {_pairs(columns, parent_columns)}{others})",
            keys,
            *([list(going)] if going else []),
        )
        return {r["key"] for r in rows}

    async def leaves_first(self, keys: list[str]) -> list[str]:
        """``keys`` to delete ordered so that, for a table referencing itself, a row comes
        before the rows it references among them (a subtree goes in one sync, whatever the
        batch size); unchanged for other tables."""
        own = [(cols, refs) for c, cols, refs in self.children if c.name == self.table.name]
        if not own or len(keys) < 2:
            return keys
        pk, me = quote_ident(self.pk), self.names.qualified(self.table.name)
        above: dict[str, set[str]] = {}
        for columns, parent_columns in own:
            sql = (
                f"SELECT c.{pk}::text AS key, p.{pk}::text AS up FROM {me} AS c"
                f" JOIN {me} AS p ON {_pairs(columns, parent_columns)}"
                f" WHERE c.{pk} = ANY($1::text[]::{self.pk_type}[])"
                f" AND p.{pk} = ANY($1::text[]::{self.pk_type}[])"
            )
            rows = await self.target.retrying(
                functools.partial(_fetch, sql=sql, args=(keys,)),
                what=f"ordering the deletes of {self.table.name}",
            )
            for r in rows:
                above.setdefault(r["key"], set()).add(r["up"])
        depth = _depths(keys, above)
        return sorted(keys, key=lambda k: -depth[k])

    async def _in_source(self, keys: list[str]) -> set[str]:
        """Those of ``keys`` the source holds now (a live app may have written them again)."""
        return set(await source_rowids(self.src, self.table, self.pk, keys))

    # ------------------------------------------------------------ quarantined rows gone

    async def resolve_gone(self, report: TableSync) -> None:
        """Mark resolved the quarantined rows whose key the source no longer holds."""
        schema, name = self.names.schema, self.table.name
        open_keys = await self.target.retrying(
            lambda c: bookkeeping.unresolved_keys(c, schema, name), what="reading the quarantine"
        )
        present = await self._in_source(sorted(open_keys))
        gone = sorted(open_keys - present)
        if not gone:
            return

        async def commit(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                stages = await bookkeeping.resolve_quarantine_keys(
                    conn, schema, name, gone, "source_row_gone"
                )
                n = len(stages)
                # a stale previous version counts as loaded again: the delete that follows
                # (planned from its digest) subtracts it
                await bookkeeping.account_sync(
                    conn,
                    schema,
                    name,
                    loaded=stages.count(STAGE_STALE),
                    quarantined=-n,
                    skipped=n,
                )
                return n

        report.resolved += await self.target.retrying(commit, what="resolving the quarantine")

    # ------------------------------------------------------------ moved rowids

    async def move(self, moves: Sequence[tuple[str, int, int]], report: TableSync) -> None:
        """Point digests at the rowids their rows have now (after a VACUUM); bookkeeping only."""
        schema, name = self.names.schema, self.table.name

        rows = [(k, rowid, digest, _pack_of(self.known.get(k))) for k, rowid, digest in moves]

        async def commit(conn: asyncpg.Connection) -> None:
            await bookkeeping.put_digests(conn, schema, name, rows, rewritten=False)

        await self.target.retrying(commit, what=f"recording moved rows of {name}")
        report.moved += len(moves)


def _pairs(columns: tuple[str, ...], parent_columns: tuple[str, ...]) -> str:
    """The join condition of child rows ``c`` on their parent rows ``p`` by a foreign key."""
    return " AND ".join(
        f"c.{quote_ident(c)} = p.{quote_ident(p)}"
        for c, p in zip(columns, parent_columns, strict=True)
    )


async def _fetch(
    conn: asyncpg.Connection, *, sql: str, args: Sequence[Any]
) -> list[asyncpg.Record]:
    return list(await conn.fetch(sql, *args))


def _depths(keys: list[str], above: dict[str, set[str]]) -> dict[str, int]:
    """Per key, how many rows lie above it on its longest path up ``above`` (a cycle ends a
    path); iterative, so a chain of any length is fine."""
    depth: dict[str, int] = {}
    for start in keys:
        if start in depth:
            continue
        stack, on_path = [start], {start}
        while stack:
            key = stack[-1]
            ups = above.get(key, set())
            if pending := [u for u in ups if u not in depth and u not in on_path]:
                stack.append(pending[0])
                on_path.add(pending[0])
                continue
            depth[key] = max((1 + depth[u] for u in ups if u in depth), default=0)
            stack.pop()
            on_path.discard(key)
    return depth


def _pack_of(stored: Stored | None) -> str | None:
    """The xmin of the pack a stored digest came from (None: from digest_rows)."""
    return None if stored is None else stored[1]


@dataclass
class _Upserted:
    waiting: list[tuple[int, str, str]] = field(default_factory=list)
    inserted: int = 0
    updated: int = 0
    quarantined: int = 0
    resolved: int = 0
    conflicts: list[tuple[str, str]] = field(default_factory=list)


def _same(table: Table, target_row: tuple[Any, ...], source_row: tuple[Any, ...]) -> bool:
    """Whether a target row holds the values a converted source row would write (JSON
    compared parsed, with exact numbers; everything else as PostgreSQL returns it)."""
    for column, a, b in zip(table.columns, target_row, source_row, strict=True):
        if column.kind in (Kind.JSON, Kind.JSON_VALUE) and a is not None and b is not None:
            if _json(a) != _json(b):
                return False
        elif isinstance(b, bytes) and isinstance(a, str):
            if a.encode() != b:
                return False
        elif a != b:
            return False
    return True


def _json(text: str | bytes) -> Any:
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)
