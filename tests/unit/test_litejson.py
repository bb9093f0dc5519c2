"""efsplug.litejson against the json package: the same text for every value efsplug sends,
the same values back, and an error exactly where strict json (no NaN) has one."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efsplug import litejson

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


def _strict(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


@given(JSON_VALUES)
def test_dumps_is_compact_json_byte_for_byte(value: object) -> None:
    assert litejson.dumps(value) == json.dumps(value, separators=(",", ":"), allow_nan=False)


@given(JSON_VALUES)
def test_loads_reads_back_what_either_wrote(value: object) -> None:
    assert litejson.loads(litejson.dumps(value)) == value
    assert litejson.loads(json.dumps(value, indent=2)) == value


@settings(max_examples=500)
@given(st.text(alphabet='{}[]",:0123456789.eE+-truefalsnNIiy \t\n\\u\x01é', max_size=40))
def test_text_is_refused_exactly_where_strict_json_refuses_it(text: str) -> None:
    try:
        expected = _strict(text)
    except (ValueError, RecursionError):
        with pytest.raises((ValueError, RecursionError)):
            litejson.loads(text)
        return
    got = litejson.loads(text)
    assert got == expected or (isinstance(got, float) and math.isnan(got) and math.isnan(expected))


@pytest.mark.parametrize("text", ["", "  ", "NaN", "-Infinity", '{"a": 1} {"b": 2}', "[1,]", '"\x01"', '{"a" 1}'])
def test_what_is_not_one_strict_json_value_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        litejson.loads(text)


def test_absurd_nesting_is_a_recursion_error_not_a_crash() -> None:
    with pytest.raises(RecursionError):
        litejson.loads("[" * 200_000)


@pytest.mark.parametrize("value", [float("nan"), {"a": object()}, {1j: 1}])
def test_what_json_cannot_say_is_refused(value: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        litejson.dumps(value)


def test_a_failed_dumps_leaves_the_next_one_intact() -> None:
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(ValueError):
        litejson.dumps(cycle)
    shared = [1]
    assert litejson.dumps([shared, shared]) == "[[1],[1]]"  # no stale circular-reference marker
