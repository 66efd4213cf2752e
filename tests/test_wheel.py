"""Installed from its wheel (not editable), the tool runs inside an app that has its own `core`,
`pipeline`, `stages`, `memory`, `config` and `agent` packages, as the chat app's backend does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP_PACKAGES = ("core", "pipeline", "stages", "memory", "config", "agent")

CRUD = textwrap.dedent(
    """
    import asyncio, os, sys

    import core.cache, pipeline.chunker, stages.own, memory.own, config.own, agent.memory
    for module in (core.cache, pipeline.chunker, stages.own, memory.own, config.own, agent.memory):
        assert module.OWNER == "app", module.__name__
        assert module.__file__.startswith(os.getcwd()), module.__file__

    import flux_migrate.memory
    from flux_migrate.memory import MemorySettings, create_memory

    assert "site-packages" in flux_migrate.memory.__file__, flux_migrate.memory.__file__
    assert ".egg-link" not in flux_migrate.memory.__file__

    async def main() -> None:
        settings = MemorySettings(backend="postgres", postgres_dsn=os.environ["DSN"])
        async with create_memory(settings) as mem:
            sid = await mem.create_session(title="hello", user_id="u1")
            await mem.add_message(sid, "user", "hi there", {"k": [1, 2]})
            await mem.update_session_title(sid, "renamed")
            history = await mem.get_history(sid)
            session = await mem.get_session(sid)
            await mem.delete_session(sid)
            gone = await mem.get_session(sid)
        print(history[0]["content"], history[0]["metadata"], session["title"], gone)

    asyncio.run(main())
    """
)


def _app_dir(root: Path) -> Path:
    """A directory holding packages with the app's names, each marked as the app's own."""
    app = root / "app"
    modules = {
        "core": "cache",
        "pipeline": "chunker",
        "stages": "own",
        "memory": "own",
        "config": "own",
        "agent": "memory",
    }
    for package, module in modules.items():
        (app / package).mkdir(parents=True)
        (app / package / "__init__.py").write_text("")
        (app / package / f"{module}.py").write_text('OWNER = "app"\n')
    return app


@pytest.mark.slow
def test_wheel_installs_beside_the_apps_own_packages_and_works(
    tmp_path: Path, pg_dsn: str, sample_db: Path
) -> None:
    """A wheel built and installed into a fresh venv leaves the app's packages importable as its
    own, and its memory backend, `--help` and `run` work from the app's directory."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    (wheel,) = wheels.glob("flux_migrate-*.whl")
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
        capture_output=True,
    )
    app = _app_dir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["DSN"] = pg_dsn

    crud = subprocess.run(
        [py, "-c", CRUD], cwd=app, env=env, capture_output=True, text=True, check=False, timeout=120
    )
    assert crud.returncode == 0, crud.stderr
    assert "hi there {'k': [1, 2]} renamed None" == crud.stdout.strip()

    cli = venv / "bin" / "flux-migrate"
    helped = subprocess.run(
        [cli, "--help"], cwd=app, env=env, capture_output=True, text=True, check=False
    )
    assert helped.returncode == 0, helped.stderr
    assert "run" in helped.stdout

    ran = subprocess.run(
        [cli, "run", "--sqlite-path", str(sample_db), "--postgres-dsn", pg_dsn, "--no-progress"],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    as_module = subprocess.run(
        [
            py,
            "-m",
            "flux_migrate.pipeline",
            "verify",
            "--sqlite-path",
            str(sample_db),
            "--postgres-dsn",
            pg_dsn,
        ],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert as_module.returncode == 0, as_module.stderr
    installed = {p.name for p in (venv / "lib").glob("python*/site-packages/*")}
    assert [] == sorted(installed & set(APP_PACKAGES))
