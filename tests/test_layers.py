"""The layers point one way and no module imports itself back: checked on the source, not hoped for.

core (foundation) <- stages <- memory <- pipeline; bench and tests may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("core", "stages", "memory", "pipeline")

# What each package may import of the project (besides itself).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "stages": {"core"},
    "memory": {"core", "stages.convert"},
    "pipeline": {"core", "stages", "memory"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
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
        found.update(n for n in names if n.split(".")[0] in PROJECT)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PROJECT for p in sorted((ROOT / pkg).rglob("*.py"))}
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
