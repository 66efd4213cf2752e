"""What PostgreSQL accepts of a mapping, checked before anything is written.

A closed vocabulary for what a mapping file may say (types per converter, DEFAULT literals,
partial-index conditions, ON DELETE actions), parsed into parts and rendered by flux-migrate:
no text of a mapping reaches SQL except as a quoted identifier or a literal it rendered. And
the schema checks PostgreSQL would otherwise make mid-run: names it refuses or cuts into one
(63 bytes), column counts, foreign keys it cannot build (type pairs, non-unique parents).
Pure functions; the callers turn the sentences into a refusal (exit 2) or a note.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from decimal import Decimal

from flux_migrate.core.schema import (
    NAME_MAX_BYTES,
    ForeignKey,
    Kind,
    Predicate,
    Table,
    pg_identifier,
    sql_string,
)

MAX_COLUMNS = 1600  # PostgreSQL's MaxHeapAttributeNumber
MAX_KEY_COLUMNS = 32  # PostgreSQL's INDEX_MAX_KEYS
SYSTEM_COLUMNS = ("tableoid", "xmin", "cmin", "xmax", "cmax", "ctid")
ON_DELETE = ("NO ACTION", "RESTRICT", "CASCADE", "SET NULL", "SET DEFAULT")

# ------------------------------------------------------------------ types


_TEXT_TYPES = ("text", "varchar")
TYPES: dict[Kind, tuple[str, ...]] = {
    Kind.KEY: ("varchar(36)", "text"),
    Kind.TEXT: _TEXT_TYPES,
    Kind.NULLABLE_TEXT: _TEXT_TYPES,
    Kind.TIMESTAMP: ("timestamptz",),
    Kind.JSON: ("jsonb",),
    Kind.INTEGER: ("bigint", "numeric"),
    Kind.REAL: ("double precision",),
    Kind.NUMERIC: ("numeric",),
    Kind.BOOLEAN: ("boolean",),
    Kind.BLOB: ("bytea",),
    Kind.INSTANT: ("timestamptz",),
    Kind.JSON_VALUE: ("jsonb",),
}
_ALIASES = {
    "int8": "bigint",
    "float8": "double precision",
    "decimal": "numeric",
    "bool": "boolean",
    "timestamp with time zone": "timestamptz",
    "character varying": "varchar",
}
_VARCHAR = re.compile(r"^(?:varchar|character varying)\s*\(\s*(\d{1,8})\s*\)$")
_VARCHAR_MAX = 10_485_760


def canonical_type(kind: Kind, written: str) -> str | None:
    """The target type ``written`` names, spelled as flux-migrate writes it, when it stores
    every value of ``kind`` unchanged; None otherwise (``real``, ``numeric(5,2)``,
    ``timestamptz(0)``, anything that is not one type name)."""
    text = " ".join(written.lower().split())
    text = _ALIASES.get(text, text)
    allowed = TYPES[kind]
    found = _VARCHAR.match(text)
    if found and "varchar" in allowed and 1 <= int(found.group(1)) <= _VARCHAR_MAX:
        return f"varchar({int(found.group(1))})"
    return text if text in allowed else None


def allowed_types(kind: Kind) -> str:
    extra = ", varchar(n)" if "varchar" in TYPES[kind] else ""
    return ", ".join(TYPES[kind]) + extra


def type_family(pg_type: str) -> str:
    """Types PostgreSQL compares without a cast (a foreign key needs one family)."""
    return "text" if pg_type == "text" or pg_type.startswith("varchar") else pg_type


def fk_types_match(child: str, parent: str) -> bool:
    """Whether PostgreSQL builds a foreign key from a ``child`` column to a ``parent`` one:
    one family, or a bigint child of a numeric key (measured: not the other way round)."""
    return type_family(child) == type_family(parent) or (child, parent) == ("bigint", "numeric")


# ------------------------------------------------------------------ literals

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_INTEGER = re.compile(r"^[+-]?\d+$")
_PLAIN_STRING = re.compile(r"^'((?:[^']|'')*)'$", re.DOTALL)
_E_STRING = re.compile(r"^[eE]'((?:[^'\\]|''|\\\\)*)'$", re.DOTALL)


def parse_literal(text: str) -> tuple[str, bool] | None:
    """A number or string literal as (its text or content, is_string); None for anything else.
    A plain string takes no backslash escapes (SQLite, standard SQL); E'' takes ``\\\\``."""
    t = text.strip()
    while t.startswith("(") and t.endswith(")"):
        t = t[1:-1].strip()
    if _NUMBER.match(t):
        return t, False
    plain = _PLAIN_STRING.match(t)
    if plain:
        return plain.group(1).replace("''", "'"), True
    escaped = _E_STRING.match(t)
    if escaped:
        return escaped.group(1).replace("''", "'").replace("\\\\", "\\"), True
    return None


def _is_json(text: str) -> bool:
    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError):
        return False
    return "\\u0000" not in text


_NOW = ("CURRENT_TIMESTAMP", "CURRENT_DATE", "NOW()")


def _fits(kind: Kind, value: str) -> bool:
    """Whether a number literal is one the column's type holds (a finite double; numeric's
    131072 digits before the point and 16383 after)."""
    if kind is Kind.REAL:
        return math.isfinite(float(value))
    number = Decimal(value)
    return number.adjusted() < 131_072 and number.as_tuple().exponent >= -16_383  # type: ignore[operator]


def _text_ok(value: str) -> bool:
    """Text PostgreSQL can store: no NUL, no lone surrogate (bytes that were not UTF-8)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def default_sql(kind: Kind, written: str) -> str | None:
    """The DEFAULT a column of ``kind`` gets for the literal ``written`` (SQLite's or the
    mapping's), rendered by flux-migrate; None when it is no literal the column holds as is
    (an expression, ``'none'`` for JSON, ``1.5`` for an integer)."""
    t = written.strip()
    while t.startswith("(") and t.endswith(")"):
        t = t[1:-1].strip()
    word = t.upper()
    if kind in (Kind.INSTANT, Kind.TIMESTAMP):
        return "now()" if word in _NOW else None
    if kind is Kind.BOOLEAN:
        return {"0": "false", "1": "true", "TRUE": "true", "FALSE": "false"}.get(word)
    literal = parse_literal(t)
    if literal is None:
        return None
    value, is_string = literal
    if kind is Kind.INTEGER and not is_string and _INTEGER.match(value):
        return str(int(value)) if -(2**63) <= int(value) < 2**63 else None
    if kind in (Kind.REAL, Kind.NUMERIC) and not is_string:
        return value if _fits(kind, value) else None
    if is_string and not _text_ok(value):
        return None  # NUL or bytes that are not UTF-8: PostgreSQL takes no such text
    if kind in (Kind.TEXT, Kind.NULLABLE_TEXT, Kind.KEY) and is_string:
        return sql_string(value)
    if kind in (Kind.JSON_VALUE, Kind.JSON) and is_string and _is_json(value):
        if kind is Kind.JSON and not value.strip().startswith("{"):
            return None
        return sql_string(value)
    return None


# ------------------------------------------------------------------ partial-index conditions

_IDENT = r'"(?:[^"]|"")+"|`(?:[^`]|``)+`|\[[^\]]+\]|[A-Za-z_][\w$]*'
_LITERAL = r"[eE]?'(?:[^']|'')*'|[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|TRUE|FALSE"
_CONDITION = re.compile(
    rf"^\s*({_IDENT})\s*(?:(IS\s+NOT\s+NULL|NOTNULL|NOT\s+NULL)|(IS\s+NULL|ISNULL)"
    rf"|(==|=|<>|!=|<=|>=|<|>)\s*({_LITERAL}))\s*$",
    re.IGNORECASE | re.DOTALL,
)
_TRUTH = re.compile(rf"^\s*(NOT\s+)?({_IDENT})\s*$", re.IGNORECASE | re.DOTALL)
_QUOTED_OR_WORD = re.compile(
    r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`(?:[^`]|``)*`|\[[^\]]*\]|\w+|.", re.DOTALL
)


def _unquote(ident: str) -> str:
    if ident[0] == '"':
        return ident[1:-1].replace('""', '"')
    if ident[0] == "`":
        return ident[1:-1].replace("``", "`")
    if ident[0] == "[":
        return ident[1:-1]
    return ident


def resolve_name(name: str, names: Sequence[str]) -> str | None:
    """``name`` as SQLite resolves it among ``names``: exactly, else ignoring ASCII case."""
    if name in names:
        return name
    folded = name.encode().lower()
    found = [n for n in names if n.encode().lower() == folded]
    return found[0] if len(found) == 1 else None


def _conjuncts(text: str) -> list[str] | None:
    """``text`` split at its top-level ANDs (outside quotes and parentheses), each part
    without the parentheses around it; None when an OR or unbalanced parenthesis is there."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for token in _QUOTED_OR_WORD.findall(text):
        word = token.upper()
        depth += (token == "(") - (token == ")")
        if depth < 0 or (depth == 0 and word == "OR"):
            return None
        if depth == 0 and word == "AND":
            parts.append("".join(current))
            current = []
        else:
            current.append(token)
    parts.append("".join(current))
    return [_unwrapped(p) for p in parts] if depth == 0 else None


def _unwrapped(part: str) -> str:
    """``part`` without the parentheses that enclose all of it."""
    text = part.strip()
    while text.startswith("(") and text.endswith(")"):
        inner = _conjuncts(text[1:-1])
        if inner is None or len(inner) != 1:
            break  # "(a) = (b)", or an AND inside: not one comparison in parentheses
        text = text[1:-1].strip()
    return text


def parse_condition(text: str, columns: Sequence[str]) -> tuple[Predicate, ...] | None:
    """A partial index's WHERE (SQLite SQL) as comparisons that must all hold, each on one of
    ``columns`` (its name resolved as SQLite does: ``Flag`` is column ``flag``): ``col op
    literal``, ``col IS [NOT] NULL``, ``col`` or ``NOT col``, joined by AND; None for any other
    condition."""
    parts = _conjuncts(text)
    if not parts:
        return None
    out = []
    for part in parts:
        predicate = _predicate(part, columns)
        if predicate is None:
            return None
        out.append(predicate)
    return tuple(out)


def _predicate(text: str, columns: Sequence[str]) -> Predicate | None:
    truth = _TRUTH.match(text)
    if truth is not None and truth.group(2).upper() not in ("NOT", "NULL", "TRUE", "FALSE"):
        column = resolve_name(_unquote(truth.group(2)), columns)
        if column is None:
            return None
        return Predicate(column, "FALSE" if truth.group(1) else "TRUE")
    found = _CONDITION.match(text)
    if found is None:
        return None
    column = resolve_name(_unquote(found.group(1)), columns)
    if column is None:
        return None
    if found.group(2):
        return Predicate(column, "IS NOT NULL")
    if found.group(3):
        return Predicate(column, "IS NULL")
    op = {"==": "=", "!=": "<>"}.get(found.group(4), found.group(4))
    word = found.group(5).upper()
    if word in ("TRUE", "FALSE"):  # SQLite's TRUE and FALSE are the integers 1 and 0
        return Predicate(column, op, "1" if word == "TRUE" else "0")
    literal = parse_literal(found.group(5))
    if literal is None:
        return None
    return Predicate(column, op, literal[0], literal[1])


# ------------------------------------------------------------------ names and keys


def _clashes(names: Sequence[str]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    out = []
    for name in names:
        kept = pg_identifier(name)
        if kept in seen:
            out.append((seen[kept], name))
        else:
            seen[kept] = name
    return out


def _table_problems(table: Table) -> list[str]:
    """Column names and counts PostgreSQL refuses or cuts into one, for one table."""
    t = table.name
    out = []
    names = [c.name for c in table.columns + table.target_only]
    if len(names) > MAX_COLUMNS:
        out.append(
            f"table {t} has {len(names)} columns, more than PostgreSQL's {MAX_COLUMNS}: split"
            " it in SQLite, or add the columns it can do without to [ignore] columns"
        )
    for name in names:
        if not _text_ok(name):
            out.append(
                f"a column of table {t} has a name that is not UTF-8 text ({name!r}), which"
                " PostgreSQL refuses: rename it in SQLite"
            )
        elif name == "":
            out.append(
                f'table {t} has a column with an empty name (""), which PostgreSQL refuses:'
                " rename it in SQLite, or add it to [ignore] columns"
            )
        elif name in SYSTEM_COLUMNS:
            out.append(
                f"column {name} of table {t} has the name of a PostgreSQL system column:"
                f" rename it in SQLite, or add {json.dumps(t + '.' + name)} to [ignore] columns"
            )
    for first, second in _clashes(names):
        out.append(
            f"columns {first} and {second} of table {t} share their first {NAME_MAX_BYTES}"
            " bytes, which is all of a name PostgreSQL keeps: rename one in SQLite, or add"
            " one to [ignore] columns"
        )
    keys = [("primary key", table.primary_key)] + [
        (f"index {i.name}", i.columns) for i in table.indexes
    ]
    for what, cols in keys:
        if len(cols) > MAX_KEY_COLUMNS:
            out.append(
                f"the {what} of table {t} has {len(cols)} columns, more than PostgreSQL's"
                f" {MAX_KEY_COLUMNS}: remove it from the mapping"
            )
    return out


def schema_problems(tables: Sequence[Table], target_names: Sequence[str]) -> list[str]:
    """One sentence (what, where, the fix) per thing PostgreSQL would refuse about the target
    schema of ``tables`` (their target names in ``target_names``); empty when it takes it."""
    out = []
    for name in target_names:
        if not _text_ok(name):
            out.append(
                f"table {name!r} has a name that is not UTF-8 text, which PostgreSQL refuses:"
                " rename it in SQLite, or add it to [ignore] tables"
            )
        if name == "":
            out.append(
                'a table has an empty name (""), which PostgreSQL refuses: rename it in SQLite,'
                ' or add "" to [ignore] tables'
            )
    for first, second in _clashes(target_names):
        out.append(
            f"tables {first} and {second} share their first {NAME_MAX_BYTES} bytes, which is"
            " all of a name PostgreSQL keeps: rename one in SQLite, or add one to [ignore] tables"
        )
    for table in tables:
        out += _table_problems(table)
    by_name = {t.name: t for t in tables}
    for table in tables:
        for fk in table.foreign_keys:
            parent = by_name.get(fk.parent)
            problem = foreign_key_problem(table, fk, parent)
            if problem is not None:
                out.append(problem)
    return out


def _unique_sets(table: Table) -> list[frozenset[str]]:
    sets = [frozenset(table.primary_key)] if table.primary_key else []
    sets += [frozenset(i.columns) for i in table.indexes if i.unique and not i.where]
    return sets


def foreign_key_problem(table: Table, fk: ForeignKey, parent: Table | None) -> str | None:
    """Why PostgreSQL cannot build ``fk`` of ``table`` (None when it can): its parent is not
    loaded, a column is missing, the parent columns are not a key of the parent, or a column
    pair differs in type (text against bigint, timestamptz against text)."""
    name = f"foreign key {table.name}({', '.join(fk.columns)}) -> {fk.parent}"
    if parent is None:
        return f"{name}: the parent table is not loaded"
    refs = fk.parent_columns or parent.primary_key
    if len(refs) != len(fk.columns) or not fk.columns:
        return f"{name}: it names {len(fk.columns)} column(s) and the parent {len(refs)}"
    have, parent_have = set(table.column_names), set(parent.column_names)
    missing = [c for c in fk.columns if c not in have]
    missing += [f"{parent.name}.{c}" for c in refs if c not in parent_have]
    if missing:
        return f"{name}: no column {missing[0]}"
    if frozenset(refs) not in _unique_sets(parent) or len(set(refs)) != len(refs):
        return (
            f"{name}: ({', '.join(refs)}) is not the primary key or a unique index of"
            f" {parent.name}, which PostgreSQL requires of a referenced key"
        )
    for c, pc in zip(fk.columns, refs, strict=True):
        child_type, parent_type = table.column(c).pg_type, parent.column(pc).pg_type
        if not fk_types_match(child_type, parent_type):
            return (
                f"{name}: column {c} is {child_type} and {parent.name}.{pc} is {parent_type},"
                " which PostgreSQL cannot compare in a foreign key"
            )
    return None
