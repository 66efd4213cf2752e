"""Laws of the pure converters, stated for any input hypothesis can find."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flux_migrate.stages.convert import (
    REASONS,
    Rejected,
    convert_key,
    decode_text,
    has_duplicate_keys,
    json_object_text,
    parse_json_object,
    parse_timestamp,
    raw_to_json,
    raw_value_from_json,
    raw_value_to_json,
)

offsets = st.builds(
    timezone,
    st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
        lambda m: timedelta(minutes=m)
    ),
)
aware = st.datetimes(timezones=offsets)
naive = st.datetimes()


def _utc_or_none(value: datetime) -> datetime | None:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return None


@given(aware, st.booleans())
def test_aware_isoformat_parses_to_the_same_instant(value: datetime, drop_micros: bool) -> None:
    """Any aware datetime rendered with isoformat() parses back to the same instant, or is
    rejected as out of range exactly when its UTC instant falls outside years 1-9999."""
    if drop_micros:
        value = value.replace(microsecond=0)
    expected = _utc_or_none(value)
    text = value.isoformat()
    if expected is None:
        with pytest.raises(Rejected) as info:
            parse_timestamp(text.encode())
        assert info.value.reason == "timestamp_out_of_range"
    else:
        parsed = parse_timestamp(text.encode())
        assert expected == parsed
        assert parsed.tzinfo == UTC


@given(naive)
def test_naive_isoformat_parses_as_utc(value: datetime) -> None:
    """A timestamp without an offset is taken as UTC, never the machine's local zone."""
    assert value.replace(tzinfo=UTC) == parse_timestamp(value.isoformat().encode())


def test_naive_timestamp_uses_the_configured_zone() -> None:
    """With another zone configured, a naive timestamp is read in that zone."""
    berlin = ZoneInfo("Europe/Berlin")
    parsed = parse_timestamp(b"2026-07-01T12:00:00", naive_timezone=berlin)
    assert datetime(2026, 7, 1, 10, 0, tzinfo=UTC) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-26T14:14:34Z",
        "2026-11-26 14:14:34.123+00:00",
        "2026-11-26T14:14:34,5+0000",
        "2026-11-26T15:14:34+01:00",
        "2026-11-26T14:14:34.1234567+00:00",
    ],
)
def test_iso_variants_python_reads_are_accepted(text: str) -> None:
    """Every ISO-8601 variant Python 3.11 reads (Z, space, comma, +0000, 7 digits) is accepted."""
    parsed = parse_timestamp(text.encode())
    assert datetime(2026, 11, 26, 14, 14, 34, tzinfo=UTC) == parsed.replace(microsecond=0)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
    json_values,
    max_size=6,
)


@given(json_objects)
def test_json_dumps_of_any_object_parses_back_equal(value: dict[str, object]) -> None:
    """json.dumps of any JSON object (without NUL) parses back to an equal dict."""
    text = json.dumps(value)
    assert value == parse_json_object(text.encode())
    assert value == json.loads(json_object_text(text.encode()))


@given(json_values.filter(lambda v: not isinstance(v, dict)))
def test_json_that_is_not_an_object_is_rejected(value: object) -> None:
    """Valid JSON that is not an object is rejected as json_not_object."""
    with pytest.raises(Rejected) as info:
        parse_json_object(json.dumps(value).encode())
    assert info.value.reason == "json_not_object"


@pytest.mark.parametrize("raw", [None, b"", ""])
def test_null_or_empty_metadata_is_an_empty_object(raw: bytes | str | None) -> None:
    """NULL or empty metadata becomes {} (the app reads it that way)."""
    assert parse_json_object(raw) == {}
    assert json_object_text(raw) == "{}"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"a": NaN}', "invalid_json"),
        (b'{"a": Infinity}', "invalid_json"),
        (b'{"a": -Infinity}', "invalid_json"),
        (b"{'a': 1}", "invalid_json"),
        (b"   ", "invalid_json"),
        (b'{"a": "x\\u0000y"}', "json_nul_character"),
        (b'{"x\\u0000": 1}', "json_nul_character"),
        (b"[1, 2]", "json_not_object"),
        (b'"text"', "json_not_object"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (b"[" * 100_000 + b"]" * 100_000, "json_too_deep"),
    ],
)
def test_bad_metadata_is_rejected_with_its_reason(raw: bytes, reason: str) -> None:
    """Each kind of bad metadata is rejected with its documented reason code."""
    with pytest.raises(Rejected) as info:
        json_object_text(raw)
    assert reason == info.value.reason


def test_nul_in_metadata_can_be_stripped_when_asked() -> None:
    """With strip_nul, \\u0000 is removed from metadata strings and keys instead of rejecting."""
    assert json.loads(json_object_text(b'{"a\\u0000b": "x\\u0000y"}', strip_nul=True)) == {
        "ab": "xy"
    }


def test_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    """A literal backslash followed by u0000 is text, not a NUL, and loads unchanged."""
    raw = b'{"path": "C:\\\\u0000dir"}'
    assert raw.decode() == json_object_text(raw)


def test_integers_beyond_64_bits_keep_every_digit() -> None:
    """A huge integer is parsed exactly and its text passed on unchanged."""
    raw = b'{"n": 123456789012345678901234567890}'
    assert parse_json_object(raw) == {"n": 123456789012345678901234567890}
    assert raw.decode() == json_object_text(raw)


@given(st.one_of(st.binary(), st.text(), st.none()))
def test_any_input_converts_or_is_rejected_with_a_documented_reason(
    raw: bytes | str | None,
) -> None:
    """Any value at all converts or raises Rejected with a documented reason, nothing else."""
    for convert in (
        lambda r: decode_text(r, "content"),
        lambda r: convert_key(r, "id"),
        lambda r: parse_timestamp(r, "created_at"),
        lambda r: json_object_text(r, "metadata"),
        lambda r: parse_json_object(r, "metadata"),
    ):
        try:
            convert(raw)
        except Rejected as exc:
            assert exc.reason in REASONS
            assert exc.detail.startswith("column ")


@given(st.one_of(st.binary(), st.text(), st.none(), st.integers(), st.floats(allow_nan=False)))
def test_quarantine_raw_encoding_is_lossless(raw: bytes | str | float | None) -> None:
    """Raw values survive the quarantine's JSON encoding byte for byte (text returns as bytes)."""
    encoded = json.loads(json.dumps(raw_value_to_json(raw)))
    expected = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    assert expected == raw_value_from_json(encoded)


@given(st.text(min_size=37, max_size=80))
def test_keys_longer_than_the_column_are_rejected(key: str) -> None:
    """A key longer than 36 characters is rejected as key_too_long (or for its bad bytes)."""
    with pytest.raises(Rejected) as info:
        convert_key(key.encode("utf-8", "surrogatepass"), "id")
    assert info.value.reason in {"key_too_long", "nul_character", "invalid_utf8"}


def test_raw_row_encoding_names_every_column() -> None:
    """raw_to_json maps each column name to its encoded raw value."""
    assert raw_to_json((b"a", None, b"\xff"), ("id", "title", "content")) == {
        "id": "a",
        "title": None,
        "content": {"base64": "/w=="},
    }


@pytest.mark.parametrize("depth", [300, 600, 3000])
def test_deep_metadata_with_nul_is_rejected_not_crashed(depth: int) -> None:
    """Deeply nested metadata holding \\u0000 is rejected with a reason, never a RecursionError."""
    raw = ('{"a": ' + "[" * depth + '"x\\u0000"' + "]" * depth + "}").encode()
    with pytest.raises(Rejected) as info:
        json_object_text(raw)
    assert info.value.reason in {"json_nul_character", "json_too_deep"}


# JSON written token by token, objects as lists of pairs so that a key can repeat: few key
# names (repeats are common), names with quotes, backslashes, colons and non-ASCII, string
# values that begin with a colon, any JSON whitespace around every token, and names written
# plainly or wholly as \u escapes (two spellings of one key).
_names = st.sampled_from(["a", "b", "", ":", '"', "\\", "a:", '":', "é", "😀", " a"])
_spaces = st.text(st.sampled_from(" \t\n\r"), max_size=2)


def _escaped(name: str) -> str:
    units = name.encode("utf-16-be")
    return (
        '"' + "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2)) + '"'
    )


@st.composite
def _json_texts(draw: st.DrawFn, depth: int = 0) -> str:
    pad = lambda: draw(_spaces)  # noqa: E731
    kind = draw(
        st.sampled_from(["object", "object", "array", "scalar"] if depth < 3 else ["scalar"])
    )
    if kind == "scalar":
        scalar = draw(
            st.one_of(st.integers(), st.sampled_from([": x", ":", "x", '"', "\\"]), st.none())
        )
        return json.dumps(scalar, ensure_ascii=draw(st.booleans()))
    items = draw(st.lists(_json_texts(depth + 1), max_size=4))
    if kind == "array":
        return "[" + ",".join(pad() + i + pad() for i in items) + "]"
    pairs = []
    for item in items:
        name = draw(_names)
        key = _escaped(name) if draw(st.booleans()) else json.dumps(name, ensure_ascii=False)
        pairs.append(pad() + key + pad() + ":" + pad() + item + pad())
    return "{" + ",".join(pairs) + "}"


def _repeats_a_key(text: str) -> bool:
    found = False

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        nonlocal found
        found = found or len({k for k, _ in items}) != len(items)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return found


@given(_json_texts())
def test_a_repeated_key_is_found_however_it_is_written(text: str) -> None:
    """has_duplicate_keys agrees with a parser that sees every pair, with or without the
    parsed value at hand, and metadata holding a repeated key is never loaded."""
    repeated = _repeats_a_key(text)
    assert has_duplicate_keys(text) == repeated
    assert has_duplicate_keys(text, orjson.loads(text)) == repeated
    if text.lstrip().startswith("{"):
        if repeated:
            with pytest.raises(Rejected) as caught:
                json_object_text(text.encode())
            assert caught.value.reason == "json_duplicate_key"
        else:
            assert json.loads(json_object_text(text.encode())) == json.loads(text)
