"""How a sync's outcome prints, and the exit code it maps to."""

from __future__ import annotations

import sys
from typing import TextIO

from flux_migrate.core import errors
from flux_migrate.pipeline.report import print_table, printable
from flux_migrate.pipeline.sync import SyncReport


def print_sync(
    report: SyncReport, *, show: int = 20, out: TextIO | None = None, jsonl: bool = False
) -> int:
    """Print per table what sync did (or would do), then the conflicts by name; return the
    number of source rows quarantined and not loaded (``jsonl``: JSONL files follow, so "up
    to date" speaks of the SQLite tables only)."""
    out = out or sys.stdout
    would = "would " if report.dry_run else ""
    header = ("table", "scanned", f"{would}insert", f"{would}update", f"{would}delete")
    more = ("conflicts", f"{would}quarantine" if would else "quarantined", "seconds")
    table: list[tuple[str, ...]] = [header + more]
    for name, t in report.tables.items():
        counts = (t.scanned, t.inserted, t.updated, t.deleted, len(t.conflicts), t.quarantined)
        table.append((name, *(f"{n:,}" for n in counts), f"{t.seconds:.1f}"))
    print_table(table, out)
    if report.dry_run:
        out.write(
            "Dry run: nothing was written; the counts, conflicts and exit code are those the"
            " sync would have now.\n"
        )
    if report.idle and jsonl:
        out.write(
            "The SQLite tables are up to date: nothing changed in them since the last sync.\n"
        )
    elif report.idle:
        out.write("The target is up to date: nothing changed in the source since the last sync.\n")
    conflicts = report.conflicts
    if conflicts:
        out.write(
            f"{len(conflicts):,} row(s) {'would be ' if would else 'were '}left as PostgreSQL has"
            " them, changed there by someone else or naming a parent row it lacks"
            f" ({'would be ' if would else ''}recorded in flux_migrate.conflicts; the kinds are"
            " explained in docs/cut-over.md):\n"
        )
        for name, key, kind in conflicts[:show]:
            out.write(f"  {name} {printable(key)}: {kind}\n")
    deferred = sum(t.deferred for t in report.tables.values())
    if deferred:
        out.write(
            f"{deferred:,} source row(s) the app changed while this sync ran (or whose parent it"
            " wrote meanwhile) were left for the next sync, which takes them; run it again with"
            " the app stopped to be exact.\n"
        )
    if report.quarantined_open:
        out.write(
            f"{report.quarantined_open:,} source row(s) are quarantined, not loaded; list them"
            " with `flux-migrate quarantine`, fix them in the source and sync again.\n"
        )
    return report.quarantined_open


def sync_exit_code(report: SyncReport, quarantined: int) -> int:
    """4 when rows are in conflict, 3 when source rows stay quarantined, else 0."""
    if report.conflicts:
        return errors.EXIT_CONFLICTS
    if quarantined:
        return errors.EXIT_QUARANTINED
    return errors.EXIT_OK
