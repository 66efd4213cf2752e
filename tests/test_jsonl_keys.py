"""A JSONL line whose objects hold a key twice is quarantined as json_duplicate_key, whatever
the object's depth, spelling (escapes, whitespace) or the quotes and colons inside its strings:
parsed, it keeps only the last value (and jsonb would too), so loading it would silently drop
one. The load and verify's own reading judge every line alike."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux_migrate.pipeline.jsonl_verify import read_record
from flux_migrate.stages.convert import Rejected
from flux_migrate.stages.jsonl import parse_line
from flux_migrate.stages.jsonl_values import parse_exact

KEYS = st.sampled_from(["a", "b", "n", "é", 'a\\"b', 'k\\":', "\\u0061"])
SCALARS = st.one_of(
    st.integers(-10, 10),
    st.just(1.5),
    st.booleans(),
    st.none(),
    st.sampled_from(['"x"', '"\\":"', '" \\" : "', '"{"']),
)
SPACE = st.sampled_from(["", " ", "\t", "\r\n "])


@st.composite
def json_text(draw: st.DrawFn, depth: int = 0) -> str:
    """Object text written by hand, so that a key may repeat (written as JSON writes it or
    through an escape) and strings may hold quotes, colons and braces."""
    if depth > 2 or draw(st.booleans()):
        scalar = draw(SCALARS)
        return json.dumps(scalar) if not isinstance(scalar, str) else scalar
    if draw(st.booleans()):
        items = draw(st.lists(json_text(depth + 1), max_size=3))
        return "[" + ",".join(items) + "]"
    pairs = draw(st.lists(st.tuples(KEYS, json_text(depth + 1)), max_size=4))
    sp = draw(SPACE)
    return "{" + ",".join(f'{sp}"{k}"{sp}:{sp}{v}' for k, v in pairs) + "}"


def _repeats(text: str) -> bool:
    """The oracle: whether any object of the text holds a name twice."""
    found = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        names = [k for k, _ in items]
        found |= len(set(names)) != len(names)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return found


@settings(max_examples=400, deadline=None)
@given(body=st.lists(st.tuples(KEYS, json_text()), max_size=4), sp=SPACE)
def test_a_line_is_quarantined_exactly_when_a_key_repeats(
    body: list[tuple[str, str]], sp: str
) -> None:
    line = "{" + ",".join(f'{sp}"{k}"{sp}:{sp}{v}' for k, v in [("id", '"r1"'), *body]) + "}"
    repeats = _repeats(line)
    raw = line.encode("utf-8")
    for parse in (parse_line, parse_exact):
        if repeats:
            with pytest.raises(Rejected) as caught:
                parse(raw)
            assert "json_duplicate_key" == caught.value.reason
        else:
            assert json.loads(line) == parse(raw)
    assert (read_record(raw) is None) == repeats  # verify's own reading agrees
