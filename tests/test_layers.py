"""The layers point one way and no module imports itself back: checked on the source, not hoped for.

Under the one import name ``flux_migrate``: core (foundation) <- stages <- memory <- pipeline;
bench and tests may import anything, but only through ``flux_migrate`` (never a bare ``core``,
``pipeline``, ``stages`` or ``memory``, names the app itself uses).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "flux_migrate"
PROJECT = ("core", "stages", "memory", "pipeline")
# Where each room's files are: pipeline/ and stages/ stay at the repository's root.
FOLDERS = {
    "core": "flux_migrate/core",
    "memory": "flux_migrate/memory",
    "pipeline": "pipeline",
    "stages": "stages",
}

# What each package may import of the project (besides itself).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "stages": {"core"},
    "memory": {"core", "stages.convert"},
    "pipeline": {"core", "stages", "memory"},
}


def _module_name(room: str, path: Path) -> str:
    """The module's name within the package, without the ``flux_migrate.`` prefix."""
    parts = [room, *path.relative_to(ROOT / FOLDERS[room]).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Project modules imported by one file, at any depth (function-level imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        prefix = PACKAGE + "."
        found.update(n.removeprefix(prefix) for n in names if n.startswith(prefix))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {
        _module_name(room, p): p
        for room in PROJECT
        for p in sorted((ROOT / FOLDERS[room]).rglob("*.py"))
    }
    return {name: {i for i in _imports(p) if i in modules} for name, p in modules.items()}


def _allowed(importer: str, imported: str) -> bool:
    package = importer.split(".")[0]
    if imported.split(".")[0] == package:
        return True
    return any(imported == a or imported.startswith(a + ".") for a in ALLOWED[package])


def test_lower_layers_never_import_higher_ones() -> None:
    """core imports nothing of the project, stages only core, memory core and the converters."""
    violations = sorted(
        f"{importer} imports {imported}"
        for importer, targets in _graph().items()
        for imported in targets
        if not _allowed(importer, imported)
    )
    assert violations == []


def test_no_import_cycle_between_modules() -> None:
    """No module reaches itself through its imports (a cycle hides which room is the lower one)."""
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_checker_sees_a_violation() -> None:
    """The rule itself fails on an upward import, so the two tests above cannot pass vacuously."""
    assert not _allowed("core.schema", "pipeline.settings")
    assert not _allowed("stages.load", "memory.base")
    assert not _allowed("memory.base", "stages.load")
    assert _allowed("memory.base", "stages.convert")
    assert len(_graph()) > 20


def test_nothing_imports_a_bare_name_the_app_also_uses() -> None:
    """Code, tests and bench import the project only as ``flux_migrate.*``: a bare ``core`` or
    ``pipeline`` would resolve to the app's own package inside the app's process."""
    files = [
        p for folder in (*FOLDERS.values(), "tests", "bench") for p in (ROOT / folder).rglob("*.py")
    ]
    bare = sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        for name in (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
            else []
        )
        if name.split(".")[0] in PROJECT
    )
    assert bare == []
    assert len(files) > 60


def test_the_package_links_point_at_the_root_folders() -> None:
    """``flux_migrate/pipeline`` and ``flux_migrate/stages`` are the root folders, not copies."""
    for room in ("pipeline", "stages"):
        assert (ROOT / PACKAGE / room).resolve() == (ROOT / room).resolve()


def test_a_converter_process_imports_no_event_loop_driver_or_logger() -> None:
    """What a run's converter process imports (the main module again, as multiprocessing's
    spawn does, then the module of its function) holds no asyncio, driver or logger: each of
    them costs every converter ~20 MB of resident memory (the run's memory goal)."""
    probe = (
        "import runpy, sys\n"
        "runpy.run_module('flux_migrate.pipeline.__main__', run_name='__mp_main__')\n"
        "import flux_migrate.pipeline.convert_worker\n"
        "heavy = ('asyncio', 'anyio', 'asyncpg', 'aiosqlite', 'structlog', 'ssl', 'rich')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    assert _printed(probe) == []


def test_the_migration_commands_start_without_the_memory_backends() -> None:
    """The command line imports the app's memory backends only for the commands that use them
    (``check``, ``verify --api``): every other command (run, verify, sync) would pay 0.09 s of
    start-up for them, a part of `verify --quick`'s and an idle sync's few seconds."""
    probe = (
        "import sys\n"
        "import flux_migrate.pipeline.cli\n"
        "print(' '.join(m for m in sys.modules if m.startswith('flux_migrate.memory')))\n"
    )
    assert _printed(probe) == []


def _printed(probe: str) -> list[str]:
    """The words ``probe`` prints, run by a fresh interpreter (nothing imported before it)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.split()
