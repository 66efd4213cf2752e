"""The names a config file may use: every section and key `load_settings` and the mapping
reader know. A name outside them is a typo or a setting of another version, never ignored: the
file is refused (exit 2) naming its line and the nearest known name."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flux_migrate.core.errors import ConfigError
from flux_migrate.core.mapping import MAPPING_KEYS

# The mapping (`init` writes it; also under [databases.<file stem>]): the mapping reader's keys.
_TABLE: dict[str, Any] = {k: None for k in MAPPING_KEYS["table"]}
_TABLE.update(
    {part: [dict.fromkeys(MAPPING_KEYS[part])] for part in ("column", "foreign_key", "index")}
)
_MAPPING: dict[str, Any] = {"ignore": {"tables": None, "columns": None}, "table": [_TABLE]}

# A dict: a table with these keys; a list of one dict: an array of such tables; "*": any name
# (a JSONL file's stem, a database's stem); None: a value.
KNOWN: dict[str, Any] = {
    "source": {"busy_timeout": None},
    "target": {"schema": None},
    "tables": {"sessions": {"target": None}, "messages": {"target": None}},
    "transform": {"naive_timezone": None, "strip_nul": None},
    "load": {
        "batch_size": None,
        "buffer_batches": None,
        "workers": None,
        "retry_seconds": None,
        "defer_constraints": None,
        "single_transaction": None,
        "on_conflict": None,
    },
    "jsonl": {"files": None, "*": {"table": None, "snapshot": None}},
    "sync": {"skip_tables": None},
    "databases": {"*": {"mapping": None, "sync": {"skip_tables": None}, **_MAPPING}},
    **_MAPPING,
}


def check_names(data: dict[str, Any], text: str, path: Path) -> None:
    """Refuse (ConfigError) the first section or key of a parsed config file that no setting
    reads, naming its line and the nearest known name."""
    for where, key, known in _unknown(data, KNOWN, ()):
        section = ".".join(where)
        line = _line_of(text, where, key)
        at = f" line {line}" if line else ""
        place = f"in [{section}]" if section else "at the top level"
        hint = _nearest(key, known, where)
        raise ConfigError(
            f"The config file {path}{at}: {key!r} {place} is not a setting flux-migrate knows"
            f"{hint}; fix the name. Nothing was done."
        )


def _unknown(
    data: dict[str, Any], schema: dict[str, Any], where: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], str, list[str]]]:
    """(section, key, the names known there) of every unknown key, depth first."""
    known = [k for k in schema if k != "*"]
    for key, value in data.items():
        sub = schema.get(key, schema.get("*", _MISSING))
        if sub is _MISSING:
            yield where, key, known
            continue
        if isinstance(sub, dict) and isinstance(value, dict):
            yield from _unknown(value, sub, (*where, key))
        elif isinstance(sub, list) and isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    yield from _unknown(item, sub[0], (*where, key))


_MISSING = object()


def _nearest(key: str, known: list[str], where: tuple[str, ...]) -> str:
    """ " (did you mean X?)" for the closest name here, else the section that holds this name
    (or one close to it), else the names known here."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    for cutoff in (1.0, 0.75):
        for section, names in _sections(KNOWN, ()):
            close = difflib.get_close_matches(key, names, n=1, cutoff=cutoff)
            if close and section != where:
                return f" (did you mean {close[0]!r} in [{'.'.join(section)}]?)"
    return f" (known here: {', '.join(known)})" if known else ""


def _sections(
    schema: dict[str, Any], where: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], list[str]]]:
    yield where, [k for k in schema if k != "*"]
    for key, sub in schema.items():
        if key == "*":
            continue
        inner = sub[0] if isinstance(sub, list) else sub
        if isinstance(inner, dict):
            yield from _sections(inner, (*where, key))


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")


def _line_of(text: str, where: tuple[str, ...], key: str) -> int | None:
    """The 1-based line that sets ``key`` under section ``where`` (a header, a key, or a dotted
    key), or None when it cannot be told."""
    section: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            section = tuple(_parts(header.group(1)))
            if section[: len(where) + 1] == (*where, key):
                return number
            continue
        name = line.split("=", 1)[0] if "=" in line and not line.lstrip().startswith("#") else ""
        full = (*section, *_parts(name))
        if name and full[: len(where) + 1] == (*where, key):
            return number
    return None


def _parts(dotted: str) -> list[str]:
    """The parts of a TOML dotted name, quotes removed (good enough to find a line)."""
    return [p.strip().strip("\"'") for p in dotted.split(".")]
