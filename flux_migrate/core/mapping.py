"""The mapping: which source tables and columns go where, as which PostgreSQL type, and why.

Built from discovery (``map_schema``), or read from the TOML that ``flux-migrate init`` writes
(``read_mapping``); either way every source table and column is placed or explicitly ignored,
or ``unplaced`` names what is missing. The app's own ``sessions`` and ``messages`` keep the app
profile (core.schema.SESSIONS / MESSAGES); any other table is mapped from its declared types
by SQLite's affinity rules, with evidence from a sample of its values where types are vague.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from collections.abc import Iterable, Sequence
from collections.abc import Mapping as MappingT
from dataclasses import dataclass, replace
from typing import Any

from flux_migrate.core.discover import SourceColumn, SourceIndex, SourceSchema, SourceTable
from flux_migrate.core.schema import (
    EPOCH_UNITS,
    MESSAGES,
    PG_TYPES,
    SESSIONS,
    Column,
    ForeignKey,
    Index,
    Kind,
    Predicate,
    Table,
    condition_sql,
    where_text,
)
from flux_migrate.core.target_rules import (
    MAX_KEY_COLUMNS,
    ON_DELETE,
    allowed_types,
    canonical_type,
    default_sql,
    foreign_key_problem,
    parse_condition,
    resolve_name,
)


@dataclass(frozen=True)
class Evidence:
    """What EVERY non-NULL value of one column is, counted over the whole column before
    loading (pipeline/evidence.py): SQLite storage classes, and how many texts convert
    losslessly (the load's converter accepts them and verification reads back the same
    meaning) to an instant, to JSON, or to a number."""

    count: int = 0
    integers: int = 0
    reals: int = 0
    texts: int = 0
    blobs: int = 0
    instants: int = 0  # texts that are ISO-8601 dates or date-times, kept exactly
    timed_instants: int = 0  # those of them with a time of day
    json_values: int = 0  # texts that are JSON jsonb keeps whole (no duplicate keys, NaN, NUL)
    json_containers: int = 0  # those of them that are objects or arrays
    decimal_texts: int = 0  # texts that are plain decimal numbers (no spaces, no '_')

    @property
    def numbers(self) -> int:
        return self.integers + self.reals


@dataclass(frozen=True)
class Mapping:
    """Every table to load, in load order, and what is deliberately left out."""

    tables: tuple[Table, ...]
    ignored_tables: tuple[str, ...] = ()
    ignored_columns: tuple[str, ...] = ()  # "table.column"
    notes: tuple[str, ...] = ()  # what could not be carried over (expression indexes, ...)
    views: tuple[str, ...] = ()

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tables)

    def fingerprint(self, *, legacy: bool = False) -> str:
        """A hash of what shapes the target (tables, columns, types, conversions, keys); the
        [ignore] lists shape nothing, so ignoring a column or table the source gained later
        resumes instead of being refused (``legacy``: the hash releases before took, with
        them, which a target filled then still holds)."""
        shaped = self if legacy else replace(self, ignored_tables=(), ignored_columns=())
        return hashlib.sha256(to_toml(shaped, comments=False).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ choosing a column's type


def _affinity_kind(declared: str) -> Kind | None:
    """SQLite's affinity rules on the declared type, refined by the names the issue maps."""
    d = declared.upper()
    if "BOOL" in d:
        return Kind.BOOLEAN
    if "JSON" in d:
        return Kind.JSON_VALUE
    if "DATE" in d or "TIMESTAMP" in d:
        return Kind.INSTANT
    if "INT" in d:
        return Kind.INTEGER
    if "CHAR" in d or "CLOB" in d or "TEXT" in d:
        return Kind.NULLABLE_TEXT
    if "BLOB" in d:
        return Kind.BLOB
    if "REAL" in d or "FLOA" in d or "DOUB" in d:
        return Kind.REAL
    if d.strip() == "":
        return None  # no type: decided by the values
    return Kind.NUMERIC


def needs_evidence(sc: SourceColumn, *, in_primary_key: bool, strict: bool) -> bool:
    """Whether choose_column looks at this column's values (else its declared type decides)."""
    if strict and sc.declared_type.strip().upper() == "ANY":
        return True
    kind = _affinity_kind(sc.declared_type)
    if kind is Kind.NULLABLE_TEXT:
        return not in_primary_key
    return kind in (None, Kind.NUMERIC, Kind.INSTANT, Kind.JSON_VALUE)


def choose_column(
    sc: SourceColumn, ev: Evidence, *, in_primary_key: bool, strict: bool = False
) -> Column:
    """The target column for one source column, with the reason as a note (init writes it).

    Lossless by construction: a column becomes a richer type (timestamptz, jsonb, numeric)
    only when EVERY value in it converts and reads back with the same meaning, else it stays
    as SQLite stored it (text, numbers as their exact decimal text); numbers are never read as
    epoch instants unless the mapping says which unit. A STRICT table's ANY column, which
    SQLite keeps verbatim, is decided by its values like a column without a type."""
    declared = sc.declared_type or "(no type)"
    any_type = strict and sc.declared_type.strip().upper() == "ANY"
    kind = None if any_type else _affinity_kind(sc.declared_type)
    if kind is None:
        kind, why = _by_values(ev)
    elif kind is Kind.NUMERIC:
        kind, why = _numeric(ev)
    elif kind is Kind.NULLABLE_TEXT and not in_primary_key:
        kind, why = _promoted_text(ev)
    elif kind is Kind.INSTANT:
        kind, why = _instant(ev)
    elif kind is Kind.JSON_VALUE:
        kind, why = _json(ev)
    else:
        why = ""
    note = f"{declared}{why} -> {{type}}"
    if sc.generated:
        note += " (a generated column: loaded as the values SQLite computes)"
    not_null = sc.not_null or in_primary_key
    if kind is Kind.NULLABLE_TEXT and not_null:
        kind = Kind.TEXT
    return Column(
        name=sc.name,
        kind=kind,
        not_null=not_null,
        default=translate_default(sc.default, kind),
        note=note.format(type=PG_TYPES[kind]),
    )


_AS_STORED = " (numbers as their exact decimal text)"


def _by_values(ev: Evidence) -> tuple[Kind, str]:
    """A column without a type (or STRICT ANY): the one storage class all values share."""
    if ev.count and ev.blobs == ev.count:
        return Kind.BLOB, f", all {ev.count} values are BLOBs"
    if ev.count and ev.integers == ev.count:
        return Kind.INTEGER, f", all {ev.count} values are integers"
    if ev.count and ev.numbers == ev.count:
        return Kind.NUMERIC, f", all {ev.count} values are numbers"
    return Kind.NULLABLE_TEXT, ", values kept as stored" + _AS_STORED


def _numeric(ev: Evidence) -> tuple[Kind, str]:
    """NUMERIC affinity: numeric while every text in it is a plain decimal number."""
    if ev.texts and ev.decimal_texts < ev.texts:
        other = ev.texts - ev.decimal_texts
        return Kind.NULLABLE_TEXT, f" (numeric affinity), {other} values are not numbers" + (
            _AS_STORED
        )
    return Kind.NUMERIC, ""


def _promoted_text(ev: Evidence) -> tuple[Kind, str]:
    """TEXT: timestamptz or jsonb only when every value is such a text, exactly kept."""
    if ev.count and ev.texts == ev.count:
        if ev.timed_instants == ev.count:
            return Kind.INSTANT, f", all {ev.count} values are ISO-8601 instants (checked all)"
        if ev.json_containers == ev.count:
            return Kind.JSON_VALUE, f", all {ev.count} values are JSON objects/arrays"
    return Kind.NULLABLE_TEXT, ""


def _instant(ev: Evidence) -> tuple[Kind, str]:
    """DATE/DATETIME/TIMESTAMP: timestamptz when every value is ISO-8601 text kept exactly;
    numbers stay numbers (set convert = "instant" and epoch = "s", "ms" or "julian" to read
    them as instants); anything else keeps the column as text."""
    if ev.texts == ev.count and ev.instants == ev.count:
        return Kind.INSTANT, ""
    if ev.numbers == ev.count:
        kind = Kind.INTEGER if ev.integers == ev.count else Kind.NUMERIC
        return kind, (
            f", all {ev.count} values are numbers, kept as numbers (no unit is assumed: set"
            ' convert = "instant" and epoch = "s", "ms" or "julian" to read them as instants)'
        )
    bad = ev.count - ev.instants
    return Kind.NULLABLE_TEXT, (
        f", {bad} of {ev.count} values are not ISO-8601 text PostgreSQL keeps exactly, so the"
        " column is kept as text" + _AS_STORED
    )


def _json(ev: Evidence) -> tuple[Kind, str]:
    """JSON: jsonb when every value is JSON text jsonb keeps whole, else text."""
    if ev.texts == ev.count and ev.json_values == ev.count:
        return Kind.JSON_VALUE, ""
    bad = ev.count - ev.json_values
    return Kind.NULLABLE_TEXT, (
        f", {bad} of {ev.count} values are not JSON jsonb keeps whole (duplicate keys, NaN,"
        " \\u0000, invalid), so the column is kept as text" + _AS_STORED
    )


def translate_default(default: str | None, kind: Kind) -> str | None:
    """A SQLite DEFAULT as PostgreSQL SQL, where it is a literal the column holds as is (see
    target_rules.default_sql); else None."""
    if default is None or default.strip().strip("()").strip().upper() == "NULL":
        return None
    return default_sql(kind, default)


# ------------------------------------------------------------------ tables and keys


def _index(
    si: SourceIndex, table: str, columns: Sequence[Column], notes: list[str]
) -> Index | None:
    """An SQLite index as a target index, or None (with a note) when PostgreSQL cannot build
    the same one: an expression, or a condition it would read otherwise."""
    if si.has_expression:
        notes.append(f"index {si.name} on {table} indexes an expression; not created")
        return None
    if len(si.columns) > MAX_KEY_COLUMNS:
        notes.append(
            f"index {si.name} on {table} has {len(si.columns)} columns, more than PostgreSQL's"
            f" {MAX_KEY_COLUMNS}; not created"
        )
        return None
    where: tuple[Predicate, ...] = ()
    if si.where is not None:
        found = parse_condition(si.where, [c.name for c in columns])
        probe = Table(table, tuple(columns), primary_key=(), profile="generic")
        if not found or condition_sql(found, probe) is None:
            notes.append(f"index {si.name} on {table} has WHERE {si.where}; not created")
            return None
        where = found
    if si.collations:
        notes.append(
            f"index {si.name} on {table} compares with COLLATE {', '.join(si.collations)} in"
            " SQLite; created comparing exactly"
        )
    return Index(si.name, tuple(c for c in si.columns if c is not None), si.unique, where)


def _not_kept(st: SourceTable, columns: Sequence[Column]) -> list[str]:
    """Notes naming what of ``st`` the target does not keep: DEFAULTs that are no literal of
    their column's type, CHECK constraints, collations, triggers, AUTOINCREMENT."""
    out = []
    for sc, c in zip(st.columns, columns, strict=True):
        dropped = sc.default is not None and sc.default.strip("() ").upper() != "NULL"
        if dropped and c.default is None:
            out.append(
                f"column {sc.name} of {st.name} has DEFAULT {sc.default}, not a {c.pg_type}"
                " literal; created without a default"
            )
    for fk in st.foreign_keys:
        if fk.on_update not in ("", "NO ACTION"):
            out.append(
                f"foreign key {st.name}({', '.join(fk.columns)}) -> {fk.parent} has ON UPDATE"
                f" {fk.on_update}; created without it (NO ACTION)"
            )
    if st.checks:
        out.append(f"table {st.name} has CHECK constraints; not created in PostgreSQL")
    for collation in st.collations:
        out.append(
            f"table {st.name} compares with COLLATE {collation} in SQLite; PostgreSQL compares"
            " its columns and keys exactly (case and all)"
        )
    for trigger in st.triggers:
        out.append(f"trigger {trigger} on {st.name} is not carried over")
    if st.autoincrement:
        out.append(
            f"table {st.name} has AUTOINCREMENT; its key is a plain bigint in PostgreSQL (no"
            " sequence): new rows need their key from the app"
        )
    return out


def map_table(st: SourceTable, evidence: MappingT[str, Evidence], notes: list[str]) -> Table:
    """A generic table: every column by its declared type and evidence, keys as in SQLite."""
    pk = st.primary_key
    columns = tuple(
        choose_column(
            c, evidence.get(c.name, Evidence()), in_primary_key=c.name in pk, strict=st.strict
        )
        for c in st.columns
    )
    if not pk:
        notes.append(f"table {st.name} has no primary key: loaded without one, in rowid order")
    fks = tuple(
        ForeignKey(fk.columns, fk.parent, fk.parent_columns, fk.on_delete or "NO ACTION")
        for fk in st.foreign_keys
    )
    indexes = tuple(i for i in (_index(si, st.name, columns, notes) for si in st.indexes) if i)
    notes += _not_kept(st, columns)
    return Table(
        name=st.name,
        columns=columns,
        primary_key=pk,
        foreign_keys=fks,
        indexes=indexes,
        without_rowid=st.without_rowid,
        profile="generic",
    )


def app_table(st: SourceTable) -> Table | None:
    """The app profile's table for ``st`` when it has the app's shape (either release): a
    ``sessions`` with ``user_id`` copies it; one from before that release gets it as a
    target-only column with its default ''."""
    profile = {"sessions": SESSIONS, "messages": MESSAGES}.get(st.name)
    if profile is None:
        return None
    have = {c.name for c in st.columns}
    required = set(profile.column_names)
    optional = {c.name for c in profile.target_only}
    if not required <= have or not have <= required | optional:
        return None
    return with_source_columns(profile, have)


def with_source_columns(profile: Table, have: set[str]) -> Table:
    """``profile`` with those of its target-only columns the source has copied like the rest."""
    copied = tuple(c for c in profile.target_only if c.name in have)
    if not copied:
        return profile
    rest = tuple(c for c in profile.target_only if c.name not in have)
    return replace(profile, columns=profile.columns + copied, target_only=rest)


def load_order(tables: Sequence[Table]) -> tuple[tuple[Table, ...], tuple[str, ...]]:
    """Tables with parents before children, and the names of tables in a foreign-key cycle
    (loaded in name order; their keys are built after the load like every other)."""
    by_name = {t.name: t for t in tables}

    def parents(t: Table) -> set[str]:
        named = {fk.parent for fk in t.foreign_keys} | ({t.parent} if t.parent else set())
        return {p for p in named if p in by_name and p != t.name}

    pending = {t.name: parents(t) for t in tables}
    order: list[Table] = []
    while pending:
        ready = sorted(n for n, ps in pending.items() if not ps)
        if not ready:
            break
        for name in ready:
            order.append(by_name[name])
            del pending[name]
        for ps in pending.values():
            ps.difference_update(ready)
    cycle = tuple(sorted(pending))
    order.extend(by_name[n] for n in cycle)
    return tuple(order), cycle


def _resolved(fk: ForeignKey, by_name: MappingT[str, Table]) -> ForeignKey:
    """``fk`` with its parent table and columns named as they are, resolved as SQLite does
    (``REFERENCES P(ID)`` names table ``p`` and its column ``id``), the parent's key filled in
    where SQLite left the columns out."""
    parent_name = resolve_name(fk.parent, list(by_name)) or fk.parent
    parent = by_name.get(parent_name)
    if parent is None:
        return replace(fk, parent=parent_name)
    refs = tuple(resolve_name(c, parent.column_names) or c for c in fk.parent_columns)
    return replace(fk, parent=parent_name, parent_columns=refs or parent.primary_key)


def resolve_foreign_keys(
    tables: Sequence[Table], notes: list[str], *, strict: bool = False
) -> list[Table]:
    """Foreign keys name their parent table and columns as they are; one PostgreSQL cannot
    build (parent not loaded, not a key of the parent, columns of other types) is left out
    with a note, or with ``strict`` (a mapping file asked for it) refused (MappingError)."""
    by_name = {t.name: t for t in tables}
    out = []
    for t in tables:
        kept = []
        for fk in (_resolved(fk, by_name) for fk in t.foreign_keys):
            problem = foreign_key_problem(t, fk, by_name.get(fk.parent))
            if problem is None:
                kept.append(fk)
            elif strict:
                raise MappingError(f"{problem}; fix or remove its [[table.foreign_key]]")
            else:
                notes.append(f"{problem}; not created")
        out.append(replace(t, foreign_keys=tuple(kept)) if t.generic else t)
    return out


def map_schema(schema: SourceSchema, evidence: MappingT[str, MappingT[str, Evidence]]) -> Mapping:
    """The mapping ``run`` uses without --config: every table and column of ``schema``."""
    notes: list[str] = []
    tables = []
    for st in schema.tables:
        tables.append(app_table(st) or map_table(st, evidence.get(st.name, {}), notes))
    ordered, cycle = load_order(resolve_foreign_keys(tables, notes))
    if cycle:
        notes.append(f"tables {', '.join(cycle)} reference each other (a foreign-key cycle)")
    return Mapping(ordered, notes=tuple(notes), views=schema.views + schema.virtual_tables)


# ------------------------------------------------------------------ what is not placed


def unplaced(schema: SourceSchema, mapping: Mapping) -> list[str]:
    """One sentence per source table or column the mapping neither places nor ignores, and
    per mapped table or column the source lacks; empty when the mapping covers the source."""
    problems = []
    source = {t.name: t for t in schema.tables}
    ignored_cols = set(mapping.ignored_columns)
    for st in schema.tables:
        if st.name in mapping.ignored_tables:
            continue
        if st.name not in mapping.names:
            problems.append(
                f"source table {st.name} is not in the mapping: add a [[table]] with"
                f" name = {_q(st.name)} (flux-migrate init writes one), or add {_q(st.name)}"
                " to [ignore] tables"
            )
            continue
        placed = set(mapping.table(st.name).column_names)
        for c in st.columns:
            if c.name not in placed and f"{st.name}.{c.name}" not in ignored_cols:
                problems.append(
                    f"column {c.name} of source table {st.name} is not in the mapping: add"
                    f' {{ name = {_q(c.name)}, convert = "..." }} to its columns, or add'
                    f" {_q(st.name + '.' + c.name)} to [ignore] columns"
                )
    for t in mapping.tables:
        found = source.get(t.name)
        if found is None:
            problems.append(f"mapped table {t.name} does not exist in the source")
            continue
        have = {c.name for c in found.columns}
        for col in t.columns:
            if col.name not in have:
                problems.append(f"mapped column {t.name}.{col.name} does not exist in the source")
        problems += _keyset_problems(t, found)
    return problems


def ignored_yet_mapped(mapping: Mapping) -> list[str]:
    """The tables and columns a mapping file both places and lists under [ignore]: which one
    it means cannot be told (a column left out on purpose, for its contents, must not load)."""
    mapped = {t.name: set(t.column_names) for t in mapping.tables}
    out = [f"table {name}" for name in mapping.ignored_tables if name in mapped]
    for entry in mapping.ignored_columns:
        table, dot, column = entry.partition(".")
        if dot and column in mapped.get(table, ()):
            out.append(f"column {entry}")
    return out


def _keyset_problems(t: Table, found: SourceTable) -> list[str]:
    """A generic table is read as SQLite stores it: by rowid, or (WITHOUT ROWID) in the order
    of its own primary key, which the mapping must then keep."""
    if not t.generic:
        return []
    flag = "true" if found.without_rowid else "false"
    if t.without_rowid != found.without_rowid:
        return [
            f"table {t.name} is {'' if found.without_rowid else 'not '}WITHOUT ROWID in the"
            f" source: set without_rowid = {flag} in its [[table]]"
        ]
    if found.without_rowid and t.primary_key != found.primary_key:
        return [
            f"table {t.name} is WITHOUT ROWID and read in the order of its primary key: set"
            f" primary_key = {_list(found.primary_key)} in its [[table]]"
        ]
    return []


# ------------------------------------------------------------------ the TOML file


def _q(value: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(value, ensure_ascii=False)


def _list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


def to_toml(mapping: Mapping, *, comments: bool = True) -> str:
    """The mapping as the editable TOML that ``run --config`` reads back."""
    out = []
    if comments:
        out += [
            "# flux-migrate mapping: tables in load order, each column's PostgreSQL type and",
            "# converter, with the reason for the choice. Edit and pass with `run --config`.",
            "# convert: " + ", ".join(k.value for k in Kind),
        ]
        out += [f"# note: {n}" for n in mapping.notes]
        out += [f"# view or virtual table (not migrated): {v}" for v in mapping.views]
    out += ["", "[ignore]", f"tables = {_list(mapping.ignored_tables)}"]
    out.append(f"columns = {_list(mapping.ignored_columns)}")
    for t in mapping.tables:
        out += ["", "[[table]]", f"name = {_q(t.name)}", f"profile = {_q(t.profile)}"]
        if t.profile == "app":
            if comments:
                out.append("# the app's own table: columns and keys of the app profile")
            out.append(f"target_only = {_list(c.name for c in t.target_only)}")
            continue
        out.append(f"primary_key = {_list(t.primary_key)}")
        out.append(f"without_rowid = {'true' if t.without_rowid else 'false'}")
        for c in t.columns:
            out += ["", "[[table.column]]"]
            if comments and c.note:
                out.append(f"# {c.note}")
            out += [f"name = {_q(c.name)}", f"convert = {_q(c.kind.value)}"]
            out.append(f"type = {_q(c.pg_type)}")
            out.append(f"not_null = {'true' if not c.nullable else 'false'}")
            if c.default is not None:
                out.append(f"default = {_q(c.default)}")
            if c.epoch is not None:
                out.append(f"epoch = {_q(c.epoch)}")
        for fk in t.foreign_keys:
            out += ["", "[[table.foreign_key]]", f"columns = {_list(fk.columns)}"]
            out += [f"parent = {_q(fk.parent)}", f"parent_columns = {_list(fk.parent_columns)}"]
            out.append(f"on_delete = {_q(fk.on_delete)}")
        for ix in t.indexes:
            out += [
                "",
                "[[table.index]]",
                f"name = {_q(ix.name)}",
                f"columns = {_list(ix.columns)}",
            ]
            out.append(f"unique = {'true' if ix.unique else 'false'}")
            if ix.where:
                out.append(f"where = {_q(where_text(ix.where))}")
    return "\n".join(out) + "\n"


class MappingError(ValueError):
    """The mapping file is not a mapping this version understands; the message says where."""


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MappingError(f"{where} must be a list of strings")
    return tuple(value)


# The keys each part of a mapping file may hold: anything else is a typo, refused.
_KEYS = {
    "table": {"name", "profile", "target_only", "primary_key", "without_rowid", "column",
              "foreign_key", "index"},
    "column": {"name", "convert", "type", "not_null", "default", "epoch"},
    "foreign_key": {"columns", "parent", "parent_columns", "on_delete"},
    "index": {"name", "columns", "unique", "where"},
}  # fmt: skip
MAPPING_KEYS = _KEYS  # also read by the config file's name check (pipeline/config_names.py)


def _closed(data: Any, part: str, where: str) -> MappingT[str, Any]:
    if not isinstance(data, dict):
        raise MappingError(f"{where} must be a table of keys")
    unknown = sorted(set(data) - _KEYS[part])
    if unknown:
        raise MappingError(
            f"{where} has {unknown[0]!r}, which is not one of {', '.join(sorted(_KEYS[part]))}"
        )
    return data


def _flag(data: MappingT[str, Any], key: str, where: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise MappingError(f"{where}: {key} must be true or false")
    return value


def _column(raw: Any, where: str) -> Column:
    data = _closed(raw, "column", where)
    try:
        kind = Kind(data["convert"])
        name = data["name"]
    except KeyError as exc:
        raise MappingError(f"{where} lacks {exc.args[0]}") from None
    except ValueError:
        raise MappingError(
            f"{where}: convert = {data['convert']!r} is not one of"
            f" {', '.join(k.value for k in Kind)}"
        ) from None
    if not isinstance(name, str):
        raise MappingError(f"{where}: name must be a string")
    where = f"{where} ({name})"
    written = data.get("type", PG_TYPES[kind])
    pg_type = canonical_type(kind, written) if isinstance(written, str) else None
    if pg_type is None:
        raise MappingError(
            f"{where}: type = {written!r} cannot hold every value of convert = {kind.value!r}"
            f" unchanged; use one of {allowed_types(kind)}"
        )
    epoch = data.get("epoch")
    if epoch not in (None, *EPOCH_UNITS) or (epoch is not None and kind is not Kind.INSTANT):
        raise MappingError(
            f'{where}: epoch must be "s", "ms" or "julian", and only with convert = "instant"'
        )
    default = data.get("default")
    if default is not None:
        rendered = default_sql(kind, default) if isinstance(default, str) else None
        if rendered is None:
            raise MappingError(
                f"{where}: default = {default!r} is not a literal a {pg_type} column holds"
                " (a number, a quoted string, true/false, CURRENT_TIMESTAMP; JSON text for"
                " jsonb); fix it or remove it"
            )
        default = rendered
    return Column(
        name=name,
        kind=kind,
        type=pg_type,
        not_null=_flag(data, "not_null", where),
        default=default,
        epoch=epoch,
    )


def _existing(names: tuple[str, ...], columns: tuple[str, ...], where: str) -> tuple[str, ...]:
    missing = [n for n in names if n not in columns]
    if missing:
        raise MappingError(f"{where} names column {missing[0]!r}, which the table does not have")
    if len(set(names)) != len(names):
        raise MappingError(f"{where} names a column twice")
    return names


def _foreign_key(raw: Any, columns: tuple[str, ...], where: str) -> ForeignKey:
    f = _closed(raw, "foreign_key", where)
    parent = f.get("parent")
    if not isinstance(parent, str):
        raise MappingError(f"{where} lacks a parent")
    on_delete = f.get("on_delete", "NO ACTION")
    if not isinstance(on_delete, str) or " ".join(on_delete.upper().split()) not in ON_DELETE:
        raise MappingError(
            f"{where}: on_delete = {on_delete!r} is not one of {', '.join(ON_DELETE)}"
        )
    return ForeignKey(
        _existing(_str_list(f.get("columns"), f"{where} columns"), columns, f"{where} columns"),
        parent,
        _str_list(f.get("parent_columns", []), f"{where} parent_columns"),
        " ".join(on_delete.upper().split()),
    )


def _index_entry(raw: Any, table: tuple[Column, ...], where: str) -> Index:
    i = _closed(raw, "index", where)
    name, columns = i.get("name"), tuple(c.name for c in table)
    if not isinstance(name, str) or not name:
        raise MappingError(f"{where} lacks a name")
    condition = i.get("where")
    predicate: tuple[Predicate, ...] | None = ()
    if condition is not None:
        predicate = parse_condition(condition, columns) if isinstance(condition, str) else None
        probe = Table(str(name), table, primary_key=(), profile="generic")
        if not predicate or condition_sql(predicate, probe) is None:
            raise MappingError(
                f"{where} ({name}): where = {condition!r} is not a condition PostgreSQL reads"
                " as SQLite does; write `column IS [NOT] NULL` or `column = literal` with a"
                " literal of the column's type, or remove the index"
            )
    return Index(
        name,
        _existing(_str_list(i.get("columns"), f"{where} columns"), columns, f"{where} columns"),
        _flag(i, "unique", where),
        predicate or (),
    )


def _table(raw: Any, where: str) -> Table:
    data = _closed(raw, "table", where)
    name = data.get("name")
    if not isinstance(name, str):
        raise MappingError(f"{where} lacks a name")
    if data.get("profile", "generic") == "app":
        profile = {"sessions": SESSIONS, "messages": MESSAGES}.get(name)
        if profile is None:
            raise MappingError(f"{where}: only sessions and messages have the app profile")
        absent = set(_str_list(data.get("target_only", []), f"{where} target_only"))
        return with_source_columns(profile, {c.name for c in profile.target_only} - absent)
    if data.get("profile", "generic") != "generic":
        raise MappingError(f'{where}: profile must be "generic" or "app"')
    where = f"{where} ({name})"
    columns = tuple(
        _column(c, f"{where} column {i + 1}") for i, c in enumerate(data.get("column", []))
    )
    if not columns:
        raise MappingError(f"{where} has no columns")
    names = tuple(c.name for c in columns)
    if len(set(names)) != len(names):
        raise MappingError(f"{where} lists a column twice")
    return Table(
        name=name,
        columns=columns,
        primary_key=_existing(
            _str_list(data.get("primary_key", []), f"{where} primary_key"),
            names,
            f"{where} primary_key",
        ),
        foreign_keys=tuple(
            _foreign_key(f, names, f"{where} foreign_key {n + 1}")
            for n, f in enumerate(data.get("foreign_key", []))
        ),
        indexes=tuple(
            _index_entry(i, columns, f"{where} index {n + 1}")
            for n, i in enumerate(data.get("index", []))
        ),
        without_rowid=_flag(data, "without_rowid", where),
        profile="generic",
    )


def read_mapping(data: MappingT[str, Any]) -> Mapping:
    """The mapping in a parsed TOML document (raises MappingError naming the problem)."""
    ignore = data.get("ignore", {})
    tables = [_table(t, f"[[table]] {i + 1}") for i, t in enumerate(data.get("table", []))]
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise MappingError("a table is listed twice")
    ordered, _ = load_order(resolve_foreign_keys(tables, [], strict=True))
    return Mapping(
        ordered,
        ignored_tables=_str_list(ignore.get("tables", []), "[ignore] tables"),
        ignored_columns=_str_list(ignore.get("columns", []), "[ignore] columns"),
    )


def summary_lines(mapping: Mapping, width: int = 80) -> list[str]:
    """Per table its key and every column with its PostgreSQL type, wrapped (never cut) to
    ``width`` columns, then the notes."""
    out = []
    for t in mapping.tables:
        if t.profile == "app":
            extra = [c.name for c in t.target_only]
            gap = f"; {', '.join(extra)} absent in the source: default" if extra else ""
            head = f"{t.name}: app profile{gap}; key (id)"
        else:
            key = f"key ({', '.join(t.primary_key)})" if t.primary_key else "no key"
            head = f"{t.name}: {key}"
        parts = [f"{c.name} {c.pg_type}" for c in t.columns]
        out += _wrapped([f"{head};", *(p + "," for p in parts[:-1]), *parts[-1:]], width)
    for n in mapping.notes:
        out += textwrap.wrap(f"note: {n}", width, initial_indent="  ", subsequent_indent="      ")
    return out


def _wrapped(pieces: list[str], width: int) -> list[str]:
    """``pieces`` joined by spaces into lines of at most ``width`` columns (a piece is never
    split; one longer than a line stands alone), the first indented 2, the others 6."""
    lines: list[str] = []
    line = "  "
    for piece in pieces:
        if line.strip() and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = "      "
        line += ("" if not line.strip() else " ") + piece
    return [*lines, line]
