"""Strict request parsing: the shortcuts (a bracket count instead of the depth check, escaped
quotes found one by one) refuse exactly what the plain check refused, with the same error."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

import wire
from errors import InvalidRequest
from array import array
from itertools import accumulate

from wire import MAX_JSON_DEPTH, json_depth_exceeds, parse_request_json


def _reference_depth_exceeds(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """The byte-level depth check as it was (two replaces over the whole body), verbatim."""
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside_strings = b"".join(unescaped.split(b'"')[0::2])
    brackets = outside_strings.translate(None, wire._NOT_BRACKETS)
    if len(brackets) <= limit:
        return False
    parens = brackets.translate(wire._AS_PARENS)
    peeled = 0
    while peeled < wire._PEEL_PASSES and len(parens) > limit - peeled:
        shorter = parens.replace(b"()", b"")
        if len(shorter) == len(parens):
            break
        parens, peeled = shorter, peeled + 1
    if len(parens) <= limit - peeled:
        return False
    steps = array("b", parens.translate(wire._PAREN_STEPS))
    depth = peeled
    for start in range(0, len(steps), wire._DEPTH_SLICE):
        piece = steps[start:start + wire._DEPTH_SLICE]
        if max(accumulate(piece, initial=depth)) > limit:
            return True
        depth += sum(piece)
    return False


def _reference_parse(data: bytes):
    """parse_request_json as it was: the byte-level depth check before json.loads."""
    if not data.strip():
        raise InvalidRequest("Request body must be JSON.", code="invalid_json")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("Request body must be JSON encoded as UTF-8.", code="invalid_json") from None
    if _reference_depth_exceeds(data):
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


@given(_BYTES | st.lists(st.sampled_from(["\\", '"', "[", "]", "{", "}", "a", "\\\\", '\\"']),
                       max_size=40).map(lambda parts: "".join(parts).encode()))
@hypothesis_settings(max_examples=1000, deadline=None)
def test_json_depth_exceeds__same_as_the_plain_check(data):
    assert json_depth_exceeds(data) == _reference_depth_exceeds(data)
    assert json_depth_exceeds(data, 9) == _reference_depth_exceeds(data, 9)


@pytest.mark.parametrize("depth", range(0, 6))
@pytest.mark.parametrize("limit", range(0, 5))
def test_json_depth_exceeds__small_limits_on_valid_json(depth, limit):
    # Peeling may take every level when the limit is below its passes: still an answer.
    data = json.dumps({"a": _wrap(1, depth, "[]")}).encode()
    assert json_depth_exceeds(data, limit) is (depth + 1 > limit)


@pytest.mark.parametrize("escapes", [10, 100_000])  # visited one by one / too many: replaced
def test_json_depth_exceeds__with_few_and_many_escapes(escapes):
    for inner in ["[" * 300, "]" * 300, ""]:
        data = json.dumps({"a": ['"\\' * escapes + inner] + [[[1]]] * 3, "b": _wrap(1, 255, "[]")}).encode()
        deep = data.replace(b'"b": ', b'"b": [') + b"]"  # one level more, unbalanced
        for body in (data, deep, data.replace(b'\\\\', b'\\')):
            assert json_depth_exceeds(body) == _reference_depth_exceeds(body)


def test_at_most_brackets__counts_both_kinds_anywhere():
    assert wire._at_most_brackets(b'{"a": "[[["}', 4)
    assert not wire._at_most_brackets(b'{"a": "[[["}', 3)
    assert wire._at_most_brackets(b"x" * 1000, 0)


def _wrap(value, depth: int, shape: str):
    for _ in range(depth):
        value = [value] if shape == "[]" else {"k": value}
    return value


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
def test_json_depth_exceeds__valid_bodies(text, too_deep):
    data = text.encode()

    assert json_depth_exceeds(data) is too_deep
    assert _reference_depth_exceeds(data) is too_deep


def test_parse_request_json__deep_array_is_named_as_too_deep_not_as_recursion():
    with pytest.raises(InvalidRequest) as caught:
        parse_request_json(b"[" * 40_000)
    assert "nested deeper than 256" in caught.value.message


def test_parse_request_json__too_deep_but_valid_is_refused():
    data = json.dumps({"model": "m", "tools": _wrap(1, 257, "[]")}).encode()

    with pytest.raises(InvalidRequest) as caught:
        parse_request_json(data)
    assert "nested deeper than 256" in caught.value.message
