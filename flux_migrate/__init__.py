"""flux-migrate: move a chat app's SQLite and JSONL data to PostgreSQL, and serve its memory there.

Everything installed lives under this one import name, so the tool and the app's PostgreSQL
memory can run inside the app's process beside its own ``core``, ``pipeline`` or ``memory``:

- ``flux_migrate.core``      the foundation (schema model, errors, target, bookkeeping)
- ``flux_migrate.stages``    extract, transform, load and the pure converters (``stages/``)
- ``flux_migrate.memory``    the app's memory API on SQLite and PostgreSQL
- ``flux_migrate.pipeline``  settings, runner, verify, sync, CLI (``pipeline/``)

``pipeline/`` and ``stages/`` stay at the repository's root (the design card's layout); the
entries of the same names in this folder are symbolic links to them, which a wheel build
resolves into ordinary files.
"""
