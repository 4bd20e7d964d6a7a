"""Reading a request body as JSON, strictly, for every API (each API's own checks live in ``apis/``)."""

from __future__ import annotations

import json
import math
import re
from array import array
from itertools import accumulate
from typing import Any

from errors import InvalidRequest

MAX_JSON_DEPTH = 256

_BACKSLASH_PAIR = b"\\\\"
_ESCAPED_QUOTE = b'\\"'
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_NOT_STRUCTURE = bytes(byte for byte in range(256) if byte not in b'[]{}"')
_AS_PARENS = bytes.maketrans(b"[{]}", b"(())")
_PAREN_STEPS = bytes.maketrans(b"()", b"\x01\xff")
_PEEL_PASSES = 8
_DEPTH_SLICE = 65536


def json_depth_exceeds(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when arrays/objects nest deeper than ``limit``, found without parsing or recursion.

    C-speed byte operations strip everything but the brackets outside strings: escaped quotes go
    first (``_without_escaped_quotes``), then everything but brackets and quotes, then every
    other quote-delimited piece is string content. Depth can never exceed the number of
    brackets, so ordinary bodies (screenshots are strings) are settled by a count; the rest are
    summed in slices that stop at the first one too deep.
    """
    structure = _without_escaped_quotes(data).translate(None, _NOT_STRUCTURE)
    outside_strings = b"".join(structure.split(b'"')[0::2])
    brackets = outside_strings.translate(None, _NOT_BRACKETS)
    if len(brackets) <= limit:
        return False
    # Peel the innermost pairs a few times at C speed: each pass lowers the depth by exactly one
    # (at most one for unbalanced text, which is not JSON anyway), and shallow bulk disappears.
    parens = brackets.translate(_AS_PARENS)
    peeled = 0
    while peeled < _PEEL_PASSES and len(parens) > limit - peeled:
        shorter = parens.replace(b"()", b"")
        if len(shorter) == len(parens):
            break
        parens, peeled = shorter, peeled + 1
    if peeled > limit:  # each pass took a level: only possible for a limit below _PEEL_PASSES
        return True
    if len(parens) <= limit - peeled:
        return False
    # As signed bytes "(" is +1 and ")" is -1: the running sum is the depth.
    steps = array("b", parens.translate(_PAREN_STEPS))
    depth = peeled
    for start in range(0, len(steps), _DEPTH_SLICE):
        piece = steps[start:start + _DEPTH_SLICE]
        if max(accumulate(piece, initial=depth)) > limit:
            return True
        depth += sum(piece)
    return False


def _without_escaped_quotes(data: bytes) -> bytes:
    """data less every escaped quote (and its backslash); other escapes may stay, they hold no
    quote or bracket.

    A backslash escapes the next byte, so a run of backslashes pairs up from its left end. With
    few backslashes (JSON arguments inside a tool call) they are visited one by one, each found
    with a memchr; with many (a body of code), dropping every backslash pair and then every
    backslash-quote does the same in two passes over the whole body.
    """
    position = data.find(b"\\")
    if position < 0:
        return data
    visits = len(data) // 256 + 64
    pieces = []
    kept_from = 0
    while position >= 0:
        visits -= 1
        if visits < 0:
            return data.replace(_BACKSLASH_PAIR, b"").replace(_ESCAPED_QUOTE, b"")
        if data.startswith(b'"', position + 1):
            pieces.append(data[kept_from:position])
            kept_from = position + 2
        position = data.find(b"\\", position + 2)  # the escaped byte, even a backslash, is skipped
    pieces.append(data[kept_from:])
    return b"".join(pieces)


def _at_most_brackets(data: bytes, limit: int) -> bool:
    """At most ``limit`` opening brackets anywhere in data, so it cannot nest deeper than that.

    Each is found with a memchr and the count stops past the limit: a few microseconds for an
    agent request, whose screenshots hold none.
    """
    count = 0
    for bracket in (b"[", b"{"):
        position = data.find(bracket)
        while position >= 0:
            count += 1
            if count > limit:
                return False
            position = data.find(bracket, position + 1)
    return True


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff, hex digits in either case). Only such an
# escape can put a surrogate into a parsed body (strict UTF-8 decoding refuses encoded ones); a
# high one followed by a low one decodes to a single character, any other is left alone.
_SURROGATE_ESCAPE = re.compile(rb"(?i)\\ud[89a-f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPE_VISITS = 64


def _holds_surrogate_escape(data: bytes) -> bool:
    """True when the JSON text holds a surrogate escape (or, past a few dozen escapes, might).

    Each backslash is found with a memchr and the escape it starts is matched in place: a few
    microseconds for an agent request, whose screenshots hold none, where one regex search
    over 400 KB of base64 takes a hundred. A body with many escapes (code) is searched by the
    regex from there on.
    """
    position = data.find(b"\\")
    visits = _ESCAPE_VISITS
    while position >= 0:
        if visits == 0:
            return _SURROGATE_ESCAPE.search(data, position) is not None
        visits -= 1
        if _SURROGATE_ESCAPE.match(data, position):
            return True
        position = data.find(b"\\", position + 2)  # the escaped byte, even a backslash, is skipped
    return False


def lone_surrogate_path(value: Any) -> str | None:
    """Where a parsed JSON value holds a lone surrogate, in a string or a key, as a path like
    ``messages[0].content`` (a key is shown as its JSON string: ``metadata["\\ud800"]``); None when
    it holds none. Such text cannot be encoded as UTF-8: not stored, counted or sent anywhere."""
    steps = _surrogate_steps(value)
    if steps is None:
        return None
    path = ""
    for step in reversed(steps):
        if isinstance(step, int):
            path += f"[{step}]"
        elif _PLAIN_NAME.fullmatch(step):
            path += f".{step}" if path else step
        else:
            path += f"[{json.dumps(step)}]"
    return path


def _surrogate_steps(value: Any) -> list[str | int] | None:
    """The keys and indexes leading to the first lone surrogate, innermost first (so no path is
    built for the many values that hold none); None when there is none. Nesting is bounded by
    MAX_JSON_DEPTH, checked before parsing."""
    if isinstance(value, str):
        return [] if _holds_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _holds_surrogate(key):
                return [key]
            steps = _surrogate_steps(item)
            if steps is not None:
                steps.append(key)
                return steps
    elif isinstance(value, list):
        for index, item in enumerate(value):
            steps = _surrogate_steps(item)
            if steps is not None:
                steps.append(index)
                return steps
    return None


def _holds_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


class _NonFinite(ValueError):
    """NaN/Infinity: Python's json reads them, JSON and the upstream do not."""


def _reject_constant(name: str) -> Any:
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


# Built once: json.loads(text, **hooks) builds a new decoder (and its C scanner) on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def parse_request_json(data: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidRequest saying what is wrong with it.

    Strict where Python's json is lenient: UTF-8 only, no NaN/Infinity (nor numbers that
    overflow to them), nesting at most MAX_JSON_DEPTH, checked before parsing: the parser
    recurses once per level on the C stack, and a worker thread's stack may be small. No lone
    surrogate (``"\\ud800"`` without its pair): text that is not Unicode cannot be stored,
    counted or logged, and providers refuse it too; the body is walked only when its bytes hold
    a surrogate escape (``_holds_surrogate_escape``: microseconds for a screenshot-sized body).
    """
    if not data.strip():
        raise InvalidRequest("Request body must be JSON.", code="invalid_json")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("Request body must be JSON encoded as UTF-8.", code="invalid_json") from None
    if not _at_most_brackets(data, MAX_JSON_DEPTH) and json_depth_exceeds(data):
        raise _too_deep()
    try:
        # What json.loads(text) does, less its BOM check: a BOM fails to parse all the same.
        body = _DECODER.decode(text)
    except _NonFinite:
        raise InvalidRequest("Request body must be JSON: NaN, Infinity and numbers too large for "
                             "a double are not allowed.", code="invalid_json") from None
    except (ValueError, RecursionError):
        raise InvalidRequest("Request body must be JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object.", code="invalid_json")
    if _holds_surrogate_escape(data):
        path = lone_surrogate_path(body)
        if path is not None:
            raise InvalidRequest(
                f"Request body must be Unicode text: {path} holds a lone UTF-16 surrogate (a "
                "\\ud800-\\udfff escape without its pair).", param=path, code="invalid_json")
    return body


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"Request body JSON is nested deeper than {MAX_JSON_DEPTH} levels.",
                          code="invalid_json")
