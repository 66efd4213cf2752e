"""Extract and convert a JSON Lines file: complete lines from a byte offset, in batches.

Each batch holds only complete lines (a last line without its newline is not consumed: the app
may still be writing it) and carries the byte offset after its last line and a fingerprint of
every byte before that offset (sha256), which the load commits as the checkpoint. Each raw row
is ``(offset, line bytes)``. Converting is pure: a line becomes a COPY-ready tuple in the
table's column order, or a reject with a stable reason code; keys not yet columns become new
columns typed from the batch's values.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from datetime import UTC, tzinfo
from pathlib import Path
from typing import Any

import anyio

from flux_migrate.core.errors import SourceError
from flux_migrate.core.schema import Column, Kind, Table
from flux_migrate.stages.batch import Batch, Reject
from flux_migrate.stages.convert import Rejected
from flux_migrate.stages.jsonl_values import (
    inferred_column,
    json_converter,
    needs_exact,
    parse_exact,
    parse_line,
)

__all__ = ["inferred_column", "json_converter", "parse_line"]

MAX_BATCH_BYTES = 16 * 1024 * 1024  # a batch also ends after this many bytes of lines
MAX_LINE_BYTES = 64 * 1024 * 1024  # a longer line is quarantined as line_too_long
LONG_LINE_KEPT = 64 * 1024  # the first bytes of such a line, kept in its quarantine row
UTF8_BOM = b"\xef\xbb\xbf"
_READ_CHUNK = 1024 * 1024


# ---------------------------------------------------------------- reading


def fingerprint_prefix(path: Path, upto: int) -> tuple[Any, int]:
    """A sha256 of the first ``upto`` bytes of ``path`` (streamed, bounded memory), and how many
    bytes there were (fewer than ``upto`` when the file is now shorter)."""
    digest = hashlib.sha256()
    seen = 0
    with path.open("rb") as f:
        while seen < upto:
            chunk = f.read(min(_READ_CHUNK, upto - seen))
            if not chunk:
                break
            digest.update(chunk)
            seen += len(chunk)
    return digest, seen


def count_lines(path: Path, start: int, end: int) -> int:
    """How many newlines the bytes ``start``..``end`` of ``path`` hold (for progress)."""
    count = 0
    with path.open("rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(_READ_CHUNK, left))
            if not chunk:
                break
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count


class OverlongLine(bytes):
    """The first bytes of a line longer than MAX_LINE_BYTES (quarantined as ``line_too_long``);
    ``length`` is the whole line's length."""

    length: int = 0


def _overlong(start: bytes | bytearray, length: int) -> OverlongLine:
    line = OverlongLine(start[:LONG_LINE_KEPT])
    line.length = length
    return line


def read_complete_lines(
    path: Path,
    offset: int,
    *,
    limit: int,
    max_lines: int,
    max_bytes: int | None = None,
    final: bool = False,
    digest: Any = None,
) -> tuple[int, list[tuple[int, bytes]]]:
    """How many bytes the complete lines (at most ``max_lines``) starting at ``offset`` and
    ending at or before ``limit`` span, and those lines as ``(offset, bytes without the
    newline)``; ``digest`` (a sha256) is advanced over the bytes spanned.

    A batch ends after ``max_bytes``, but a line longer than that is read whole on its own (no
    cap ends a file): up to MAX_LINE_BYTES it is a line like any other, beyond it an
    OverlongLine. A last line without its newline is not complete (the app may still be writing
    it) unless ``final``. Lines holding only whitespace are not records and are left out of the
    list (their bytes count); a UTF-8 BOM at offset 0 is not part of the first line."""
    if offset >= limit:
        return 0, []
    max_bytes = MAX_BATCH_BYTES if max_bytes is None else max_bytes
    buf = bytearray()
    newlines = 0
    with path.open("rb") as f:
        f.seek(offset)
        while newlines < max_lines and len(buf) < max_bytes and offset + len(buf) < limit:
            chunk = f.read(min(_READ_CHUNK, limit - offset - len(buf)))
            if not chunk:
                break
            newlines += chunk.count(b"\n")
            buf += chunk
        at_end = offset + len(buf) >= limit
        if newlines == 0 and not at_end:  # one line longer than a batch's bytes
            return _read_long_line(f, offset, buf, limit, final=final, digest=digest)
    end, lines = _split_lines(buf, offset, max_lines, max_bytes, last=final and at_end)
    if digest is not None:
        digest.update(memoryview(buf)[:end])
    return end, lines


def _split_lines(
    buf: bytearray, offset: int, max_lines: int, max_bytes: int, *, last: bool
) -> tuple[int, list[tuple[int, bytes]]]:
    end = 0
    lines: list[tuple[int, bytes]] = []
    count = 0
    while count < max_lines and end < max_bytes:
        nl = buf.find(b"\n", end)
        if nl < 0:
            if not last or end >= len(buf):
                break
            nl = len(buf)  # --final: the last line without its newline is a line too
        line = bytes(buf[end:nl])
        if offset + end == 0 and line.startswith(UTF8_BOM):
            line = line[len(UTF8_BOM) :]
        if len(line) > MAX_LINE_BYTES:
            line = _overlong(line, len(line))
        if line.strip():
            lines.append((offset + end, line))
        count += 1
        end = min(nl + 1, len(buf))
    return end, lines


def _read_long_line(
    f: Any, offset: int, buf: bytearray, limit: int, *, final: bool, digest: Any
) -> tuple[int, list[tuple[int, bytes]]]:
    """The one line at ``offset`` (its first bytes in ``buf``, the file positioned after them),
    read to its newline: kept whole up to MAX_LINE_BYTES, else as an OverlongLine (its bytes
    are read a second time for the digest, only once it is known to be complete)."""
    length, pos = len(buf), offset + len(buf)
    newline = False
    while pos < limit:
        chunk = f.read(min(_READ_CHUNK, limit - pos))
        if not chunk:
            break
        pos += len(chunk)
        nl = chunk.find(b"\n")
        part = chunk if nl < 0 else chunk[:nl]
        if length + len(part) <= MAX_LINE_BYTES:
            buf += part
        elif len(buf) > LONG_LINE_KEPT:
            del buf[LONG_LINE_KEPT:]
        length += len(part)
        if nl >= 0:
            newline = True
            break
    if not newline and not (final and pos >= limit):
        return 0, []  # not complete yet: the app may still be writing it
    consumed = length + (1 if newline else 0)
    if digest is not None:
        if length <= MAX_LINE_BYTES:
            digest.update(buf)
            digest.update(b"\n" if newline else b"")
        else:
            f.seek(offset)
            left = consumed
            while left > 0:
                chunk = f.read(min(_READ_CHUNK, left))
                digest.update(chunk)
                left -= len(chunk)
    if offset == 0 and buf.startswith(UTF8_BOM):
        del buf[: len(UTF8_BOM)]
    if length > MAX_LINE_BYTES:
        return consumed, [(offset, _overlong(buf, length))]
    return consumed, [(offset, bytes(buf))] if buf.strip() else []


async def extract_jsonl(
    path: Path,
    table: str,
    *,
    after_offset: int,
    digest: Any,
    limit: int,
    batch_size: int,
    final: bool = False,
) -> AsyncGenerator[Batch, None]:
    """Yield the complete lines between ``after_offset`` and ``limit`` in batches of at most
    ``batch_size`` lines (with ``final``, a last line without newline too); ``digest`` is the
    sha256 of the bytes before ``after_offset`` and is advanced with every batch (``last_key``
    is its hex digest at the batch's end).

    The file is opened, read and closed for each batch in a worker thread; nothing is held open
    across a yield, so cancellation or close leaves nothing behind. Stops early when the file
    became shorter than the offset reached (rewritten during the run: the next run reconciles).
    """
    seq = 0
    offset = after_offset
    while offset < limit:
        try:
            spanned, lines = await anyio.to_thread.run_sync(
                functools.partial(
                    read_complete_lines,
                    path,
                    offset,
                    limit=limit,
                    max_lines=batch_size,
                    final=final,
                    digest=digest,
                )
            )
        except OSError as exc:
            raise SourceError(f"The JSONL file {path} cannot be read ({exc.strerror}).") from None
        if not spanned:
            return
        seq += 1
        after, offset = offset, offset + spanned
        yield Batch(
            table=table,
            seq=seq,
            after_rowid=after,
            last_rowid=offset,
            extracted=len(lines),
            last_key=digest.hexdigest(),
            raw=lines,
        )


def file_size(path: Path) -> int:
    """The size of the JSONL file; SourceError when it is missing or not a file."""
    if path.is_dir():
        raise SourceError(f"{path} is a directory, not a JSONL file; check --jsonl.")
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise SourceError(f"The JSONL file {path} does not exist; check --jsonl.") from None


# ---------------------------------------------------------------- evidence for a new key

EVIDENCE_LINES = 1000  # a new key is typed from its values in this many lines


def key_evidence(path: Path, firsts: dict[str, int], *, limit: int) -> dict[str, list[Any]]:
    """For each key, its non-null values in the EVIDENCE_LINES records starting at the line
    (offset) where it is first non-null: what types it, whatever the batch size."""
    values: dict[str, list[Any]] = {k: [] for k in firsts}
    seen = dict.fromkeys(firsts, 0)
    offset = min(firsts.values())
    while seen and offset < limit:
        spanned, lines = read_complete_lines(path, offset, limit=limit, max_lines=EVIDENCE_LINES)
        if not spanned:
            break
        offset += spanned
        for at, line in lines:
            try:
                record = parse_line(line)
            except Rejected:
                continue
            for key in [k for k in seen if firsts[k] <= at]:
                value = record.get(key)
                if value is not None:
                    values[key].append(value)
                seen[key] += 1
                if seen[key] >= EVIDENCE_LINES:
                    del seen[key]
    return values


# ---------------------------------------------------------------- a batch


def key_of_record(record: dict[str, Any] | None) -> str | None:
    value = None if record is None else record.get("id")
    if value is None or isinstance(value, dict | list):
        return None
    return str(value).replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()


Evidence = Callable[[dict[str, int]], dict[str, list[Any]]]


def _new_columns(
    records: list[tuple[int, bytes, dict[str, Any]]], known: set[str], evidence: Evidence | None
) -> tuple[Column, ...]:
    """Columns for the keys the records hold non-null that are not columns yet (a key holding
    only nulls waits: NULL is what its column would hold), typed from ``evidence`` (else from
    this batch's values)."""
    firsts: dict[str, int] = {}
    in_batch: dict[str, list[Any]] = {}
    for offset, _, record in records:
        for key, value in record.items():
            if key not in known and value is not None:
                firsts.setdefault(key, offset)
                in_batch.setdefault(key, []).append(value)
    if not firsts:
        return ()
    values = in_batch if evidence is None else evidence(firsts)
    return tuple(inferred_column(k, values[k] or in_batch[k]) for k in firsts)


def _parse_all(batch: Batch) -> tuple[list[tuple[int, bytes, dict[str, Any]]], list[Reject]]:
    records: list[tuple[int, bytes, dict[str, Any]]] = []
    rejects: list[Reject] = list(batch.rejects)
    for offset, line in batch.raw:
        if isinstance(line, OverlongLine):
            detail = (
                f"the line is {line.length:,} bytes long, over {MAX_LINE_BYTES:,}; its first"
                f" {len(line):,} bytes are kept here"
            )
            kept = (bytes(line),)
            rejects.append(Reject(offset, None, kept, "line_too_long", detail, "transform"))
            continue
        try:
            records.append((offset, line, parse_line(line)))
        except Rejected as exc:
            key = key_of_record(getattr(exc, "record", None))  # known for some (RejectedLine)
            rejects.append(Reject(offset, key, (line,), exc.reason, exc.detail, "transform"))
    return records, rejects


def convert_jsonl_batch(
    batch: Batch, table: Table, *, naive_timezone: tzinfo = UTC, evidence: Evidence | None = None
) -> tuple[Batch, Table]:
    """Parse and convert one batch of lines for ``table``; keys that are not columns yet become
    new columns (typed by ``evidence``), in the batch's ``added_columns``. Returns the batch
    and the table as it leaves it (with those columns)."""
    records, rejects = _parse_all(batch)
    added = _new_columns(records, set(table.column_names), evidence)
    if added:
        table = replace(table, columns=table.columns + added)
    converters = [(c.name, json_converter(c, naive_timezone=naive_timezone)) for c in table.columns]
    exact = [(c.name, c.kind) for c in table.columns if c.kind in _EXACT_KINDS]
    id_at = table.column_names.index("id") if "id" in table.primary_key else None
    rows: list[tuple[Any, ...]] = []
    raw: list[tuple[Any, ...]] = []
    ids: list[str | None] = []
    for offset, line, parsed in records:
        record = parsed
        try:
            if exact and any(needs_exact(kind, record.get(name)) for name, kind in exact):
                record = parse_exact(line)
            get = record.get
            row = tuple([convert(get(name)) for name, convert in converters])
        except Rejected as exc:
            rkey = key_of_record(record)
            rejects.append(Reject(offset, rkey, (line,), exc.reason, exc.detail, "transform"))
            continue
        rows.append(row)
        raw.append((offset, line))
        ids.append(None if id_at is None else str(row[id_at]))
    converted = replace(
        batch,
        raw=raw,
        rows=rows,
        rejects=rejects,
        columns=table.column_names,
        added_columns=added,
        record_ids=ids,
    )
    return converted, table


_EXACT_KINDS = (Kind.REAL, Kind.NUMERIC, Kind.JSON_VALUE)


async def transform_jsonl(
    source: AsyncGenerator[Batch, None],
    table: Table,
    *,
    naive_timezone: tzinfo = UTC,
    evidence: Evidence | None = None,
) -> AsyncGenerator[Batch, None]:
    """Yield each upstream batch converted (in a worker thread), each for the table as the
    batches before it left it (with the columns they added); closes its upstream when closed or
    cancelled."""
    async with contextlib.aclosing(source):
        async for batch in source:
            converted, table = await anyio.to_thread.run_sync(
                functools.partial(
                    convert_jsonl_batch,
                    batch,
                    table,
                    naive_timezone=naive_timezone,
                    evidence=evidence,
                )
            )
            yield converted
