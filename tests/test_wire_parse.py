"""Strict request parsing: the fast path (parse first, then measure the parsed value's nesting)
refuses exactly what the byte-level check before parsing refused, with the same error."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

import wire
from errors import InvalidRequest
from wire import MAX_JSON_DEPTH, json_depth_exceeds, nesting_exceeds, parse_request_json


def _reference_parse(data: bytes):
    """parse_request_json as it was: the byte-level depth check before json.loads."""
    if not data.strip():
        raise InvalidRequest("Request body must be JSON.", code="invalid_json")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("Request body must be JSON encoded as UTF-8.", code="invalid_json") from None
    if json_depth_exceeds(data):
        raise InvalidRequest(f"Request body JSON is nested deeper than {MAX_JSON_DEPTH} levels.",
                             code="invalid_json")

    def reject(name):
        raise wire._NonFinite(name)

    def finite(text):
        value = float(text)
        if not math.isfinite(value):
            raise wire._NonFinite(text)
        return value

    try:
        body = json.loads(text, parse_constant=reject, parse_float=finite)
    except wire._NonFinite:
        raise InvalidRequest("Request body must be JSON: NaN, Infinity and numbers too large for "
                             "a double are not allowed.", code="invalid_json") from None
    except (ValueError, RecursionError):
        raise InvalidRequest("Request body must be JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object.", code="invalid_json")
    return body


def _outcome(parse, data: bytes):
    try:
        return "ok", parse(data)
    except InvalidRequest as exc:
        return "error", (exc.message, exc.code, exc.status)


def _nested(depth: int, inner: str = "1", shape: str = "[]") -> str:
    opening, closing = ('{"k":', "}") if shape == "{}" else ("[", "]")
    return opening * depth + inner + closing * depth


# Pieces of JSON text, valid and not: deep and shallow nesting, NaN, escapes, bad UTF-8, a BOM.
_FRAGMENTS = st.sampled_from([
    "{", "}", "[", "]", ",", ":", '"', "\\", '\\"', "\\\\", " ", "1", "1.5", "1e999", "-1e400",
    "NaN", "Infinity", "-Infinity", "null", "true", '"a"', '"[["', '"\\"["', '"model"', '"m"',
    '{"model":"m","messages":[{"role":"user","content":"x"}]}',
    _nested(255), _nested(256), _nested(257), _nested(300, shape="{}"), "[" * 600, "]" * 600,
    _nested(1200), '"' + "[" * 300 + '"',
])
_TEXTS = st.lists(_FRAGMENTS, max_size=12).map("".join)
_BYTES = (
    _TEXTS.map(str.encode)
    | _TEXTS.map(lambda text: b"\xef\xbb\xbf" + text.encode())
    | _TEXTS.map(lambda text: text.encode() + b"\xff")
    | st.binary(max_size=64)
)


@given(_BYTES)
@hypothesis_settings(max_examples=600, deadline=None)
def test_parse_request_json__same_outcome_as_the_check_before_parsing(data):
    assert _outcome(parse_request_json, data) == _outcome(_reference_parse, data)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab', max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=20,
)


def _wrap(value, depth: int, shape: str):
    for _ in range(depth):
        value = [value] if shape == "[]" else {"k": value}
    return value


@given(_JSON_VALUES, st.integers(0, 300), st.sampled_from(["[]", "{}"]), st.booleans())
@hypothesis_settings(max_examples=400, deadline=None)
def test_nesting_exceeds__agrees_with_the_byte_check(value, depth, shape, as_object):
    value = _wrap(value, depth, shape)
    if as_object:
        value = {"model": "m", "tools": value}
    data = json.dumps(value).encode()

    assert nesting_exceeds(value, data) == json_depth_exceeds(data)
    assert nesting_exceeds(value, data, max_items=10**9) == json_depth_exceeds(data)  # walked only


@pytest.mark.parametrize("text, too_deep", [
    ("[" * 257 + "]" * 257, True),
    ("[" * 256 + "]" * 256, False),
    ('{"a":' * 257 + "1" + "}" * 257, True),
    ("[" * 100 + '{"a":' * 156 + "1" + "}" * 156 + "]" * 100, False),
    ("[" * 100 + '{"a":' * 157 + "1" + "}" * 157 + "]" * 100, True),
    ("[" * 250 + "[[],[],[[[[[[]]]]]]]" + "]" * 250, True),
    ("[" + "[]," * 100_000 + "[]]", False),
    (json.dumps([list(range(1000))] * 50), False),
    (json.dumps(_wrap(list(range(10_000)), 255, "[]")), False),
    (json.dumps(_wrap(list(range(10_000)), 256, "[]")), True),
    ("1", False),
    ('"[[["', False),
])
def test_nesting_exceeds__walked_or_scanned(text, too_deep):
    # Long arrays exceed the walking budget and are settled by the byte scan instead.
    data = text.encode()

    assert nesting_exceeds(json.loads(data), data) is too_deep
    assert nesting_exceeds(json.loads(data), data, max_items=10**9) is too_deep
    assert nesting_exceeds(json.loads(data), data, max_items=0) is too_deep
    assert json_depth_exceeds(data) is too_deep


def test_parse_request_json__deep_array_is_named_as_too_deep_not_as_recursion():
    with pytest.raises(InvalidRequest) as caught:
        parse_request_json(b"[" * 40_000)
    assert "nested deeper than 256" in caught.value.message


def test_parse_request_json__too_deep_but_valid_is_refused_after_parsing():
    data = json.dumps({"model": "m", "tools": _wrap(1, 257, "[]")}).encode()

    with pytest.raises(InvalidRequest) as caught:
        parse_request_json(data)
    assert "nested deeper than 256" in caught.value.message
