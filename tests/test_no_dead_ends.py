"""A cut-over with no dead ends (issue 22): nothing exits 0 having done nothing, no setting is
silently ignored, every refusal is one sentence with exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from flux_migrate.core.errors import ConfigError
from flux_migrate.pipeline.settings import load_settings
from tests.support import ROOT, cli

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/chat"


@pytest.mark.parametrize("command", ["run", "sync", "verify", "verify --quick"])
def test_a_command_without_a_source_is_refused_with_exit_2(command: str) -> None:
    """run, sync and verify with no SQLite file, JSONL file or data directory refuse with exit 2
    before touching the server, and never claim the target is up to date."""
    done = cli(*command.split(), "--postgres-dsn", UNREACHABLE, env={"SQLITE_PATH": ""})
    assert 2 == done.returncode, done.stdout + done.stderr
    assert "up to date" not in done.stdout
    assert "No source given" in done.stderr and "--sqlite-path" in done.stderr


@pytest.mark.parametrize("option", ["--sqlite-path", "--data-dir", "--jsonl", "--config"])
@pytest.mark.parametrize("command", ["run", "sync", "verify"])
def test_an_empty_path_is_refused_not_read_as_the_current_directory(
    command: str, option: str
) -> None:
    """`--sqlite-path "$UNSET"` (an empty argument) is a usage error naming the option."""
    done = cli(command, option, "", "--postgres-dsn", UNREACHABLE)
    assert 2 == done.returncode, done.stdout + done.stderr
    assert f"argument {option}: the path is empty" in done.stderr


def _leaf_names(text: str) -> list[tuple[int, str, str]]:
    """(line, section, key) of every key set in a TOML text with plain [section] headers."""
    section, out = "", []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            out.append((number, section, line.split("=", 1)[0].strip()))
    return out


DEFAULT_TEXT = (ROOT / "configs" / "default.toml").read_text(encoding="utf-8")


@settings(max_examples=40, deadline=None)
@given(
    target=st.sampled_from(_leaf_names(DEFAULT_TEXT)),
    edit=st.sampled_from(["drop", "swap", "double"]),
    at=st.integers(min_value=0, max_value=20),
)
def test_a_misspelt_key_of_the_default_config_is_refused_naming_line_and_name(
    tmp_path_factory: pytest.TempPathFactory, target: tuple[int, str, str], edit: str, at: int
) -> None:
    """Any one-letter typo of any key of configs/default.toml is exit 2 naming the line and the
    intended name, never a file read as if the setting were absent."""
    line, section, key = target
    i = at % (len(key) - 1)
    typo = {
        "drop": key[:i] + key[i + 1 :],
        "swap": key[:i] + key[i + 1] + key[i] + key[i + 2 :],
        "double": key[:i] + key[i] + key[i:],
    }[edit]
    assume(typo != key)
    lines = DEFAULT_TEXT.splitlines()
    lines[line - 1] = lines[line - 1].replace(key, typo, 1)
    path = tmp_path_factory.mktemp("cfg") / "typo.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_settings(path)
    message = refused.value.message
    assert f"{path} line {line}: {typo!r} in [{section}]" in message
    assert f"did you mean {key!r}?" in message


@pytest.mark.parametrize(
    ("text", "line", "hint"),
    [
        ('[transfrom]\nnaive_timezone = "Europe/Berlin"\n', 1, "did you mean 'transform'?"),
        ('[load]\nnaive_timezone = "Europe/Berlin"\n', 2, "'naive_timezone' in [transform]?"),
        ('transform.naive_timzone = "Europe/Berlin"\n', 1, "did you mean 'naive_timezone'?"),
        ('[jsonl.feedback]\ntabel = "fb"\n', 2, "did you mean 'table'?"),
        ("[databases.audit.ignore]\ntabels = []\n", 2, "did you mean 'tables'?"),
        (
            '[[table]]\nname = "t"\n[[table.column]]\nname = "a"\nconvert = "text"\ntyp = "x"\n',
            6,
            "did you mean 'type'?",
        ),
    ],
)
def test_an_unknown_section_or_key_anywhere_is_exit_2_with_its_line(
    tmp_path: Path, text: str, line: int, hint: str
) -> None:
    """Unknown names in sections, dotted keys, per-file and per-database tables and the mapping
    are refused by every command (exit 2, the line, the nearest known name)."""
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    for command in ("run", "verify", "check"):
        done = cli(command, "--config", str(path), "--postgres-dsn", UNREACHABLE)
        assert 2 == done.returncode, done.stdout + done.stderr
        assert f"{path} line {line}:" in done.stderr and hint in done.stderr


def test_version_names_the_installed_release() -> None:
    """`flux-migrate --version` prints the distribution's version and exits 0."""
    from importlib.metadata import version

    done = cli("--version")
    assert (0, f"flux-migrate {version('flux-migrate')}") == (done.returncode, done.stdout.strip())


@pytest.mark.parametrize("flag", [["--quick"], ["--jsonl", "x.jsonl"]])
def test_verify_api_refuses_flags_it_would_ignore(flag: list[str]) -> None:
    """verify --api with --quick or --jsonl is a usage error, not a flag silently dropped."""
    done = cli("verify", "--api", *flag, "--sqlite-path", "x.db", "--postgres-dsn", UNREACHABLE)
    assert 2 == done.returncode and f"takes no {flag[0]}" in done.stderr, done.stderr


def test_verify_api_takes_memory_db_from_the_data_dir(tmp_path: Path, pg_dsn: str) -> None:
    """verify --api --data-dir compares the directory's memory.db (it was ignored), and refuses
    a directory without one."""
    from flux_migrate.pipeline.sample import generate

    data = tmp_path / "data"
    data.mkdir()
    done = cli("verify", "--api", "--data-dir", str(data), "--postgres-dsn", pg_dsn)
    assert 2 == done.returncode and "holds none; pass --sqlite-path" in done.stderr
    generate(data / "memory.db", sessions=10, messages_per_session=2, seed=3)
    assert 0 == cli("run", "--data-dir", str(data), "--postgres-dsn", pg_dsn).returncode
    done = cli("verify", "--api", "--data-dir", str(data), "--postgres-dsn", pg_dsn)
    assert 0 == done.returncode, done.stdout + done.stderr
    assert f"Comparing the memory API on {data / 'memory.db'}" in done.stdout
    assert "sessions compared: 10" in done.stdout


@settings(max_examples=30, deadline=None)
@given(
    names=st.lists(
        st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1,
                 max_size=30),
        min_size=1, max_size=12, unique=True,
    ),
    types=st.lists(st.sampled_from(["text", "bigint", "double precision", "timestamptz",
                                    "jsonb", "varchar(36)", "numeric"]), min_size=12,
                   max_size=12),
)  # fmt: skip
# two lines that begin with a name that begins with a space (no-break, then ASCII)
@example(names=["k", "z" * 65, "\xa0b", "w" * 65, " a"], types=["text"] * 12)
def test_the_printed_mapping_names_every_column_and_type_within_80_columns(
    names: list[str], types: list[str]
) -> None:
    """Every column's name and type is printed (never cut), and lines fit 80 columns unless a
    single column is longer than a line."""
    from flux_migrate.core.mapping import Mapping, summary_lines
    from flux_migrate.core.schema import Column, Kind, Table

    columns = tuple(
        Column(name=n, kind=Kind.TEXT, type=t, not_null=False)
        for n, t in zip(names, types, strict=False)
    )
    table = Table(name="t", columns=columns, primary_key=(names[0],), profile="generic")
    lines = summary_lines(Mapping((table,)))
    # only the indentation comes off (2 spaces, then 6): a name may begin with a space of its own
    assert lines[0].startswith("  ") and all(line.startswith("      ") for line in lines[1:])
    text = " ".join([lines[0][2:], *(line[6:] for line in lines[1:])])
    for column in columns:
        assert f"{column.name} {column.pg_type}" in text
    for line in lines:
        assert len(line) <= 80 or ", " not in line.strip().rstrip(","), line


def test_the_printed_mapping_of_the_app_shows_column_types() -> None:
    """The app's tables are printed with their columns and types, as the README says."""
    from flux_migrate.core.mapping import Mapping, summary_lines
    from flux_migrate.core.schema import TABLES

    text = " ".join(line.strip() for line in summary_lines(Mapping(TABLES)))
    for table in TABLES:
        for column in table.columns:
            assert f"{column.name} {column.pg_type}" in text


def test_the_demo_on_your_own_server_says_what_it_leaves_there(tmp_path: Path, pg_dsn: str) -> None:
    """`make demo` with POSTGRES_DSN migrates into schema flux_demo and says it stays there,
    with the statement that removes it."""
    done = cli("demo", "--sessions", "20", "--workdir", str(tmp_path), env={"POSTGRES_DSN": pg_dsn})
    assert 0 == done.returncode, done.stdout + done.stderr
    assert "Left in your database: schema flux_demo" in done.stdout
    assert "DROP SCHEMA flux_demo CASCADE;" in done.stdout
