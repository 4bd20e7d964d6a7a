"""Hostile HTTP requests against a running proxy: the generator and the runner behind the fuzz test
(tests/test_fuzz_http.py, 2,000 requests) and `make fuzz` (this file as a script: 10,000 requests
against gunicorn with the production config, in front of the fake upstream it starts).

Every route and method comes from the app's own url_map, so a new route is fuzzed as soon as it
exists. What a realistic body looks like on a kind of route (``BODY_TEMPLATES``), the headers the
proxy reads and their hostile values (``HEADER_VALUES``) and the query parameters routes read
(``QUERY_VALUES``) are tables: a new API, header or parameter is one more line.

A seeded ``random.Random`` makes every run with the same seed send the same requests (the order
across threads varies). First a sweep puts a lone surrogate into every string and every key of
every template on every JSON route, and every hostile value of every header on one request
per kind of route that reads it; random mutations fill up the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import requests

HANG_SECONDS = 5.0  # an answer slower than this counts as a hang
ADMIN_TOKEN = "fuzz-admin-token"
UPSTREAM_ERROR_REASON = "upstream returned an error"  # the proxy's BYPASS reason when it relays one
EXTRA_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")  # tried on every route, for 404/405s
UNKNOWN_PATHS = ("/nope", "/v1", "/v1/chat/completions/", "/V1/CHAT/COMPLETIONS", "//v1/models",
                 "/v1/models%00", "/cache/entries/", "/static/../server.py", "/" + "a" * 3000,
                 "/v1/chat/completions;x", "/%ED%A0%80", "/%FF%FE")
# Values for a path parameter (<key>, <path:filename>), raw in the URL.
PATH_SEGMENTS = ("0" * 64, "abc", "%00", "..%2F..%2Fserver.py", "%ED%A0%80", "%FF", "x" * 3000,
                 "%F0%9F%98%80", "a%20b", "%25", "%5Cud800", "null", "-1")
# A plain value per path parameter, for requests that must reach their route's view (the body
# sweep): {parameter name: value}; any other parameter gets "sample".
SAMPLE_SEGMENTS = {"item_id": "resp_fuzz", "action": "cancel", "key": "0" * 64}

# -- bodies ---------------------------------------------------------------------------------------

CONTENTS = ("Plan the next click.", "What is on screen?", "東京 🚀 «Weiter»", "", "x" * 2000,
            "line one\nline \"two\"\t\\")
TINY_PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
            "DwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def chat_template(rng: random.Random) -> dict:
    content: Any = rng.choice(CONTENTS)
    if rng.random() < 0.3:
        content = [{"type": "text", "text": content},
                   {"type": "image_url", "image_url": {"url": TINY_PNG, "detail": "low"}}]
    body: dict[str, Any] = {"model": "test/model-a", "messages": [
        {"role": "system", "content": "You operate a computer."},
        {"role": "user", "content": content}]}
    if rng.random() < 0.3:
        body["messages"] += [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "click", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "clicked"}]
        body["tools"] = [{"type": "function", "function": {"name": "click", "parameters": {
            "type": "object", "properties": {"x": {"type": "integer"}}}}}]
    return _sampling(rng, body)


def completion_template(rng: random.Random) -> dict:
    return _sampling(rng, {"model": "test/model-a", "prompt": rng.choice([rng.choice(CONTENTS), ["a", "b"]])})


def count_tokens_template(rng: random.Random) -> dict:
    body = messages_template(rng)
    for name in ("max_tokens", "stream", "stream_options", "temperature", "cache"):
        body.pop(name, None)
    return body


def messages_template(rng: random.Random) -> dict:
    return _sampling(rng, {"model": "claude-test", "max_tokens": 64, "system": "You operate a computer.",
                           "messages": [{"role": "user", "content": [
                               {"type": "text", "text": rng.choice(CONTENTS)},
                               {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                            "data": TINY_PNG.split(",", 1)[1]}}]}]})


def responses_template(rng: random.Random) -> dict:
    return _sampling(rng, {"model": "test/model-a", "instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": rng.choice(CONTENTS)},
                                     {"type": "input_image", "image_url": TINY_PNG}]}]})


def embeddings_template(rng: random.Random) -> dict:
    return {"model": "test/embed", "input": rng.choice([rng.choice(CONTENTS), ["a", "b"], [1, 2, 3]]),
            "encoding_format": rng.choice(["float", "base64"])}


def _sampling(rng: random.Random, body: dict) -> dict:
    if rng.random() < 0.3:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.3:
        body["temperature"] = rng.choice([0, 0.5, 2])
    if rng.random() < 0.1:
        body["cache"] = rng.choice([False, "off", True])
    return body


# The realistic body of each kind of JSON route, by how its rule ends before its first path
# parameter (an item's routes, /v1/responses/<item_id>/..., speak their API's): the first match wins.
BODY_TEMPLATES: list[tuple[str, Callable[[random.Random], dict]]] = [
    ("/chat/completions", chat_template),
    ("/completions", completion_template),
    ("/messages/count_tokens", count_tokens_template),
    ("/messages", messages_template),
    ("/responses", responses_template),
    ("/embeddings", embeddings_template),
]


def template_for(rule: str) -> Callable[[random.Random], dict]:
    """The body template of a route (its url_map rule), or of a path that is no route's."""
    static = rule.split("/<", 1)[0]
    for suffix, template in BODY_TEMPLATES:
        if static.endswith(suffix):
            return template
    return chat_template


# Lone surrogates as JSON escapes: high alone, low alone, a pair the wrong way round, a high
# followed by something that is not a low one, either letter case.
LONE_SURROGATES = ("\\ud800", "\\uDBFF", "\\udc00", "\\uDFFF", "\\ude00\\ud83d", "\\ud83d\\u0041",
                   "x\\ud800", "\\ud800\\ud800")
MARKER = "@@lone@@"  # put where a lone surrogate goes, replaced once the body is JSON text


def strings_of(value: Any, trail: tuple = ()) -> Iterator[tuple[tuple, bool]]:
    """Every string of a JSON value as (trail, is_key): ``trail`` leads to it."""
    if isinstance(value, str):
        yield trail, False
    elif isinstance(value, dict):
        for key, item in value.items():
            yield trail + (key,), True
            yield from strings_of(item, trail + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from strings_of(item, trail + (index,))


def with_marker(value: Any, trail: tuple, is_key: bool, rng: random.Random) -> Any:
    """A copy of value whose string (or key) at trail holds MARKER."""
    value, holder, last = _copy_at(value, trail)
    if is_key:
        holder[_marked(last, rng)] = holder.pop(last)
    else:
        holder[last] = _marked(holder[last], rng)
    return value


def _copy_at(value: Any, trail: tuple) -> tuple[Any, Any, Any]:
    """A deep copy of value, the dict or list in it that holds the item at trail, and the
    item's key or index there."""
    value = json.loads(json.dumps(value))
    *parents, last = trail
    holder = value
    for step in parents:
        holder = holder[step]
    return value, holder, last


def _marked(text: str, rng: random.Random) -> str:
    where = rng.randrange(len(text) + 1)
    return text[:where] + MARKER + text[where:]


def dumps(value: Any, rng: random.Random) -> bytes:
    text = json.dumps(value, ensure_ascii=rng.random() < 0.3, allow_nan=True)
    while MARKER in text:
        text = text.replace(MARKER, rng.choice(LONE_SURROGATES), 1)
    return text.encode("utf-8")


JSON_VALUES: tuple[Any, ...] = (None, True, False, 0, -1, 1.5, 2 ** 63, -(2 ** 64), 10 ** 300, 1e308, -0.0,
                                "", "x", "\u0000", "🚀", [], {}, [None], {"": None}, [[[]]], "true", "1",
                                {"role": "user"}, ["a", 1, None])
HUGE_NUMBERS = (b"1e999", b"-1e999", b"1" * 5000, b"9" * 400, b"1e308", b"-0", b"0.0000000000001e-400",
                b"123456789012345678901234567890", b"1E+2", b"01", b"1.", b".5", b"+1", b"0x10")
NON_FINITE = (b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf")


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 2 or roll < 0.6:
        return rng.choice(JSON_VALUES)
    if roll < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["model", "messages", "role", "content", "x", ""]): random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def _replace_somewhere(value: Any, rng: random.Random, new: Any) -> Any:
    places = [trail for trail, is_key in strings_of(value) if not is_key]
    containers = _container_trails(value)
    trail = rng.choice(places + containers) if places + containers else ()
    if not trail:
        return new
    value, holder, last = _copy_at(value, trail)
    holder[last] = new
    return value


def _container_trails(value: Any, trail: tuple = ()) -> list[tuple]:
    found = [trail] if trail else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _container_trails(item, trail + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _container_trails(item, trail + (index,))
    return found


def _raw_at_value(rng: random.Random, body: dict, token: bytes) -> bytes:
    """The body as JSON text with one value replaced by raw bytes (not expressible as Python)."""
    marked = _replace_somewhere(body, rng, MARKER)
    return json.dumps(marked).encode().replace(json.dumps(MARKER).encode(), token, 1)


def mutate(rng: random.Random, body: dict) -> tuple[str, bytes]:
    """(what was done, the body bytes)."""
    kind = rng.choice(MUTATIONS)
    return kind.__name__.removeprefix("_m_"), kind(rng, body)


def _m_valid(rng, body):
    return dumps(body, rng)


def _m_wrong_type(rng, body):
    return dumps(_replace_somewhere(body, rng, random_value(rng)), rng)


def _m_missing_field(rng, body):
    body = dict(body)
    body.pop(rng.choice(list(body)), None)
    return dumps(body, rng)


def _m_extra_fields(rng, body):
    names = ["cache", "cache_control", "metadata", "stream", "stream_options", "n", "user", "seed", "tools",
             "tool_choice", "response_format", "max_tokens", "stop", "logprobs", "input", "prompt"]
    body = dict(body)
    for _ in range(rng.randrange(1, 4)):
        body[rng.choice(names)] = random_value(rng)
    return dumps(body, rng)


def _m_deep(rng, body):
    depth = rng.choice([100, 255, 256, 257, 300, 5000])
    if rng.random() < 0.3:
        return b"[" * depth * 4
    return _raw_at_value(rng, body, b"[" * depth + b"]" * depth)


def _m_huge_number(rng, body):
    return _raw_at_value(rng, body, rng.choice(HUGE_NUMBERS))


def _m_non_finite(rng, body):
    return _raw_at_value(rng, body, rng.choice(NON_FINITE))


def _m_duplicate_keys(rng, body):
    text = json.dumps(body)
    name = rng.choice(list(body))
    twin = json.dumps(random_value(rng))
    return (text[:1] + f"{json.dumps(name)}: {twin}, " + text[1:]).encode()


def _m_truncated(rng, body):
    data = dumps(body, rng)
    return data[:rng.randrange(len(data))]


def _m_not_utf8(rng, body):
    data = dumps(body, rng)
    where = rng.randrange(len(data) + 1)
    bad = rng.choice([b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"])
    choice = rng.random()
    if choice < 0.2:
        return json.dumps(body, ensure_ascii=False).encode("utf-16")
    if choice < 0.3:
        return b"\xef\xbb\xbf" + data
    if choice < 0.4:
        return json.dumps(body, ensure_ascii=False).encode("latin-1", "replace")
    return data[:where] + bad + data[where:]


def _m_lone_surrogate(rng, body):
    trail, is_key = rng.choice(list(strings_of(body)))
    return dumps(with_marker(body, trail, is_key, rng), rng)


def _m_paired_surrogate(rng, body):
    # Must be accepted: a pair is one character.
    trail, is_key = rng.choice(list(strings_of(body)))
    text = json.dumps(with_marker(body, trail, is_key, rng))
    return text.replace(MARKER, rng.choice(["\\ud83d\\ude00", "\\uD800\\uDC00", "\\udbff\\udfff"])).encode()


def _m_garbage(rng, body):
    return rng.choice([b"", b" ", b"null", b"[]", b"{}", b'"text"', b"42", b"{", b"}", b"{\"a\"}",
                       b"\x00" * 10, bytes(rng.randrange(256) for _ in range(rng.randrange(64))),
                       b"{'model': 'single quotes'}", b"{\"model\": \"m\",}", b"\n".join([b"{}"] * 3)])


MUTATIONS = (_m_valid, _m_valid, _m_wrong_type, _m_missing_field, _m_extra_fields, _m_deep,
             _m_huge_number, _m_non_finite, _m_duplicate_keys, _m_truncated, _m_not_utf8,
             _m_lone_surrogate, _m_lone_surrogate, _m_paired_surrogate, _m_garbage)

# -- headers and query parameters -----------------------------------------------------------------

_SWITCHES = (b"1", b"0", b"true", b"false", b"yes", b"off", b"", b"maybe", b"\xff", b"1" * 9000, b"TRUE ")
# Every request header the proxy (or an open issue's new code) reads, with hostile values; sent as
# bytes, as a client may send any byte but CR, LF and NUL.
HEADER_VALUES: dict[str, tuple[bytes, ...]] = {
    "X-Cache-Bypass": _SWITCHES,
    "Cache-Control": (b"no-cache", b"no-store", b"max-age=0", b"max-age=-1", b"max-age=" + b"9" * 40,
                      b"max-age=abc", b"max-age", b"max-age=", b"no-cache, no-store, max-age=5", b",,,",
                      b"\xff\xfe", b"max-age=1e3", b'private="x"', b"max-age=\xb2", b"max-age=\xd9\xa3",
                      b"NO-CACHE", b"max-age=5, max-age=1"),
    "X-Cache-TTL": (b"0", b"-1", b"60", b"1e9", b"9" * 40, b"abc", b"", b"5 ", b"\xb2", b"\xd9\xa3",
                    b"0x10", b"+5", b"3.5"),
    "X-Cache-Namespace": (b"team-a", b"", b"../..", b"a" * 65, b"\xe6\x9d\xb1", b"\xff", b"a b", b"ns:1@x/y+z",
                          b".hidden", b"a\tb"),
    "X-Cache-Match": (b"exact", b"near", b"", b"\xff", b"near;threshold=2", b"NEAR", b"x" * 500),
    "Authorization": (b"Bearer sk-test", b"Bearer ", b"Bearer", b"Basic Zm9vOmJhcg==", b"Bearer \xff\xfe",
                      b"Bearer " + b"x" * 5000, b"Bearer sk-\xc3\xa9", b"bearer  sk-two-spaces",
                      b"Bearer " + ADMIN_TOKEN.encode()),
    "X-Cache-Admin-Token": (ADMIN_TOKEN.encode(), b"wrong", b"", b"\xff", ADMIN_TOKEN.encode() + b"\xe9",
                            b"x" * 5000),
    "Content-Type": (b"application/json", b"application/json; charset=utf-8", b"text/plain", b"",
                     b"application/json; charset=latin-1", b"application/x-www-form-urlencoded",
                     b"multipart/form-data; boundary=x", b"application/jsonx", b"\xff/\xfe",
                     b"APPLICATION/JSON;;;", b"application/json; charset=\xff"),
    "x-api-key": (b"sk-ant-test", b"", b"\xff", b"x" * 5000),
    "anthropic-version": (b"2023-06-01", b"", b"\xff", b"1999-01-01", b"x" * 500),
    "anthropic-beta": (b"computer-use-2025-01-24", b"", b",,", b"\xff", b"a," * 300),
    "Accept-Encoding": (b"gzip", b"br", b"identity;q=0", b"*;q=0", b"\xff"),
    "X-Title": (b"agent", b"\xe6\x9d\xb1\xe4\xba\xac", b"\xff", b"x" * 9000),
    "HTTP-Referer": (b"https://example.com", b"\xff", b"javascript:alert(1)"),
}
# Query parameters routes read, with hostile values (added to any route now and then).
QUERY_VALUES: dict[str, tuple[str, ...]] = {
    "limit": ("1", "0", "-1", "500", "501", "abc", "1e3", "٣", "²", "9" * 40, ""),
    "cursor": ("", "abc", "%%%", "W10", "WzEsMl0", "bnVsbA", "WyJhIiwiYiJd", "x" * 3000, "%ED%A0%80"),
    "model": ("test/model-a", "", "%ED%A0%80", "%FF", "x" * 3000, "%00"),
    "namespace": ("", "team-a", "%FF", "../.."),
    "since": ("0", "-1", "abc", "1e999", "nan"),
}

# -- requests -------------------------------------------------------------------------------------


@dataclass
class HostileRequest:
    method: str
    path: str  # with its query string, raw
    headers: dict[str, bytes] = field(default_factory=dict)
    body: bytes | None = None
    kind: str = ""
    rule: str | None = None  # the url_map rule the request was made for (None: an unknown path)
    chunked: bool = False  # sent with Transfer-Encoding: chunked (no Content-Length)
    content_length: bytes | None = None  # a Content-Length that is not the body's own


@dataclass(frozen=True)
class Route:
    rule: str  # as in the url_map: /cache/entries/<key>
    methods: tuple[str, ...]

    @property
    def takes_json(self) -> bool:
        """A JSON body goes here: POST outside the admin routes, as the server's guard sees it
        (guard.is_api_path; test_fuzz_http holds the two to the same routes)."""
        return "POST" in self.methods and not self.rule.startswith("/cache/")


def routes_of(app: Any) -> list[Route]:
    """Every route of a Flask app with all its methods (HEAD and OPTIONS too)."""
    merged: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        merged.setdefault(rule.rule, set()).update(rule.methods or ())
    return [Route(rule, tuple(sorted(methods))) for rule, methods in sorted(merged.items())]


_CONVERTER = re.compile(r"<[^>]*>")


def _concrete(rule: str, rng: random.Random) -> str:
    """The rule with a hostile value for each path parameter."""
    return _CONVERTER.sub(lambda _: rng.choice(PATH_SEGMENTS), rule)


def sample_path(rule: str) -> str:
    """The rule with a plain value for each path parameter: a path its route answers."""
    return _CONVERTER.sub(lambda match: SAMPLE_SEGMENTS.get(match.group(0)[1:-1].split(":")[-1], "sample"), rule)


def _method_for(route: Route, rng: random.Random) -> str:
    """Mostly a method the route takes (HEAD and OPTIONS, which every route takes, less often),
    sometimes one it does not."""
    roll = rng.random()
    main = [method for method in route.methods if method not in ("HEAD", "OPTIONS")] or list(route.methods)
    if roll < 0.75:
        return rng.choice(main)
    if roll < 0.9:
        return rng.choice(route.methods)
    return rng.choice(EXTRA_METHODS)


def _query(rng: random.Random) -> str:
    names = rng.sample(sorted(QUERY_VALUES), rng.randrange(1, 3))
    return "?" + "&".join(f"{name}={rng.choice(QUERY_VALUES[name])}" for name in names)


def _json_headers(rng: random.Random) -> dict[str, bytes]:
    content_type = b"application/json" if rng.random() < 0.85 else rng.choice(HEADER_VALUES["Content-Type"])
    headers = {"Content-Type": content_type}
    for name, values in HEADER_VALUES.items():
        if name != "Content-Type" and rng.random() < 0.08:
            headers[name] = rng.choice(values)
    return headers


def json_routes(routes: list[Route]) -> list[Route]:
    return [route for route in routes if route.takes_json]


def sweep(routes: list[Route], rng: random.Random) -> Iterator[HostileRequest]:
    """Every method (its own and the others) on every route; a lone surrogate in every string and
    key of every template, on every JSON route; every huge or non-finite number in each top-level
    field; every hostile value of every header once, on a completion route, a Messages route and
    an admin route."""
    for route in routes:
        for method in sorted(set(route.methods) | set(EXTRA_METHODS)):
            yield _with_body(HostileRequest(method, _concrete(route.rule, rng), _json_headers(rng),
                                            rule=route.rule), rng)
    for route in json_routes(routes):
        # A plain path: the body is what is hostile, and it must reach the route's own view.
        path = sample_path(route.rule)
        body = template_for(route.rule)(random.Random(0))
        for trail, is_key in strings_of(body):
            yield HostileRequest("POST", path, {"Content-Type": b"application/json"},
                                 dumps(with_marker(body, trail, is_key, rng), rng), "sweep_surrogate",
                                 rule=route.rule)
    completion_route = next((route.rule for route in json_routes(routes)), "/v1/chat/completions")
    body = chat_template(random.Random(0))
    for name in [*body, "n", "max_tokens", "temperature", "seed", "stream"]:
        for token in HUGE_NUMBERS + NON_FINITE:
            text = json.dumps({**body, name: MARKER}).replace(json.dumps(MARKER), token.decode())
            yield HostileRequest("POST", completion_route, {"Content-Type": b"application/json"},
                                 text.encode(), "sweep_number", rule=completion_route)
    # Anthropic's headers (x-api-key, anthropic-version, anthropic-beta) are read on its routes.
    header_routes = [completion_route] + [route.rule for route in json_routes(routes)
                                          if template_for(route.rule) is messages_template][:1]
    for name, values in HEADER_VALUES.items():
        for value in values:
            headers = {"Content-Type": b"application/json", name: value}
            for rule in header_routes:
                yield HostileRequest("POST", rule, dict(headers), dumps(template_for(rule)(rng), rng),
                                     "sweep_header", rule=rule)
            yield HostileRequest("GET", "/cache/stats", dict(headers), None, "sweep_header", rule="/cache/stats")


def random_request(routes: list[Route], rng: random.Random) -> HostileRequest:
    roll = rng.random()
    rule = None
    if roll < 0.05:
        path = rng.choice(UNKNOWN_PATHS)
        method = rng.choice(EXTRA_METHODS)
    else:
        # JSON routes twice as often: they are where bodies matter.
        route = rng.choice(routes + json_routes(routes))
        rule = route.rule
        path = _concrete(route.rule, rng)
        method = _method_for(route, rng)
    if rng.random() < 0.15:
        path += _query(rng)
    request = _with_body(HostileRequest(method, path, _json_headers(rng), rule=rule), rng)
    oddity = rng.random()
    if request.body is not None and oddity < 0.05:
        request.chunked = True
    elif request.body is not None and oddity < 0.08:
        # Shorter than the body (the rest would be read as the next request: the connection is
        # closed after it), or not a plain number. Never longer: a server rightly waits for the rest.
        shorter = str(max(0, len(request.body) - 3)).encode()
        request.content_length = rng.choice([shorter, b"+" + shorter, b"0" + shorter, b"abc", b"-1",
                                             b"1e3", b"0x0", b""])
        request.headers["Connection"] = b"close"
    return request


def _with_body(request: HostileRequest, rng: random.Random) -> HostileRequest:
    if request.method in ("POST", "PUT", "PATCH", "DELETE") or rng.random() < 0.05:
        request.kind, request.body = mutate(rng, template_for(request.rule or request.path.split("?")[0])(rng))
    else:
        request.kind = "no_body"
    return request


def hostile_requests(routes: list[Route], count: int, seed: int) -> list[HostileRequest]:
    """The sweep (cut to count), then random requests up to count."""
    rng = random.Random(seed)
    found = list(sweep(routes, rng))[:count]
    while len(found) < count:
        found.append(random_request(routes, rng))
    rng.shuffle(found)
    return found


# -- running them ---------------------------------------------------------------------------------


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    cache_statuses: Counter = field(default_factory=Counter)  # X-Computer-Use-Cache of the 200s
    problems: list[str] = field(default_factory=list)
    slowest: float = 0.0
    seconds: float = 0.0

    def histogram(self) -> str:
        lines = [f"{self.requests} requests in {self.seconds:.1f} s, slowest answer {self.slowest:.2f} s"]
        lines += [f"  {status}: {count}" for status, count in sorted(self.statuses.items(), key=lambda i: str(i[0]))]
        lines.append("  cache: " + ", ".join(f"{status} {count}" for status, count in sorted(self.cache_statuses.items())))
        return "\n".join(lines)


def _send(session: requests.Session, base_url: str, hostile: HostileRequest) -> requests.Response:
    data: Any = hostile.body
    if hostile.chunked and data is not None:
        body = data
        data = (body[i:i + 1000] for i in range(0, len(body), 1000))
    prepared = session.prepare_request(requests.Request(hostile.method, base_url + hostile.path,
                                                        headers=hostile.headers, data=data))
    if hostile.content_length is not None:
        prepared.headers["Content-Length"] = hostile.content_length  # type: ignore[assignment]
    return session.send(prepared, timeout=HANG_SECONDS, allow_redirects=False)


def _judge(hostile: HostileRequest, response: requests.Response) -> str | None:
    """What is wrong with an answer, or None."""
    status = response.status_code
    caused_upstream = response.headers.get("X-Computer-Use-Cache-Bypass-Reason") == UPSTREAM_ERROR_REASON
    if status >= 500 and not caused_upstream:
        return f"{status} {response.content[:300]!r}"
    text = response.content[:100_000]
    if b"Traceback" in text or b'File "' in text:
        return f"{status} carries a traceback"
    if (400 <= status < 500 and hostile.method != "HEAD"
            and response.headers.get("Content-Type", "").startswith("application/json")):
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} JSON error without an error object: {text[:200]!r}"
        if isinstance(error, dict) and not {"message", "type"} <= set(error):
            return f"{status} error object without message/type: {error!r}"
    return None


def _describe(hostile: HostileRequest) -> str:
    body = hostile.body[:160] if hostile.body is not None else None
    headers = {name: value[:60] for name, value in hostile.headers.items()}
    return f"{hostile.kind}: {hostile.method} {hostile.path[:120]} headers={headers} body={body!r}"


def run(base_url: str, hostile: list[HostileRequest], threads: int = 4) -> FuzzReport:
    """Send every request (``threads`` clients, each with its own keep-alive session)."""
    report = FuzzReport(requests=len(hostile))
    work: queue.SimpleQueue = queue.SimpleQueue()
    for item in hostile:
        work.put(item)
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            while True:
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    return
                started = time.monotonic()
                try:
                    response = _send(session, base_url, item)
                    outcome: Any = response.status_code
                    problem = _judge(item, response)
                except requests.Timeout:
                    outcome, problem = "hang", f"no answer within {HANG_SECONDS} s"
                except requests.ConnectionError as exc:
                    outcome, problem = "no answer", f"connection failed: {type(exc).__name__}"
                    session.close()
                elapsed = time.monotonic() - started
                with lock:
                    report.statuses[outcome] += 1
                    if outcome == 200 and "X-Computer-Use-Cache" in response.headers:
                        report.cache_statuses[response.headers["X-Computer-Use-Cache"]] += 1
                    report.slowest = max(report.slowest, elapsed)
                    if problem is not None:
                        report.problems.append(f"{problem} <- {_describe(item)}")

    started = time.monotonic()
    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    report.seconds = time.monotonic() - started
    return report


ADMIN_HEADERS = {"X-Cache-Admin-Token": ADMIN_TOKEN}
AFTERWARDS = ("/healthz", "/cache/stats", "/cache/entries", "/metrics")


def still_serving(base_url: str) -> list[str]:
    """Problems with the server after the fuzz: its read routes answer 200 and a new request
    misses, then hits."""
    problems = []
    with requests.Session() as session:
        for path in AFTERWARDS:
            response = session.get(base_url + path, headers=ADMIN_HEADERS, timeout=HANG_SECONDS)
            if response.status_code != 200:
                problems.append(f"afterwards GET {path}: {response.status_code} {response.text[:200]}")
        body = {"model": "test/model-a", "messages": [{"role": "user", "content": f"after {time.time_ns()}"}]}
        seen = []
        for _ in range(2):
            response = session.post(base_url + "/v1/chat/completions", json=body, timeout=HANG_SECONDS)
            seen.append((response.status_code, response.headers.get("X-Computer-Use-Cache")))
        if seen != [(200, "MISS"), (200, "HIT")]:
            problems.append(f"afterwards a new request answered {seen}, not a miss then a hit")
    return problems


# -- `make fuzz` ----------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise SystemExit(f"nothing answered at {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz the production server (gunicorn, as `make run`) "
                                                 "with hostile requests and print a status histogram.")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a new seed)")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from fake_upstream import FakeUpstream  # noqa: E402 - found through the path set just above
    from server import create_app  # noqa: E402

    with tempfile.TemporaryDirectory(prefix="computer-use-cache-fuzz-") as workdir, FakeUpstream() as upstream:
        port = _free_port()
        environment = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port),
                       "CACHE_DB_PATH": os.path.join(workdir, "cache.sqlite3"),
                       "UPSTREAM_BASE_URL": upstream.base_url, "UPSTREAM_API_KEY": "sk-upstream-fuzz",
                       "CACHE_ADMIN_TOKEN": ADMIN_TOKEN}
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        log_path = os.path.join(workdir, "server.log")
        with open(log_path, "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
                                       "server:create_app()"], cwd=ROOT, env=environment,
                                      stdout=subprocess.DEVNULL, stderr=log)
        base_url = f"http://127.0.0.1:{port}"
        try:
            _wait_for(base_url + "/healthz", server)
            # The same routes the server has: its app built here (nothing is opened until used).
            import config

            routes = routes_of(create_app(config.load_settings({}, cache_db_path=os.path.join(
                workdir, "routes.sqlite3"), upstream_base_url=upstream.base_url)))
            print(f"fuzzing {base_url} (gunicorn, production config): {len(routes)} routes, "
                  f"{args.requests} requests, seed {seed}", flush=True)
            report = run(base_url, hostile_requests(routes, args.requests, seed), threads=args.threads)
            problems = report.problems + still_serving(base_url)
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        server_log = Path(log_path).read_text(errors="replace")
    errors = [line for line in server_log.splitlines() if "[ERROR]" in line or "Traceback" in line]
    print(report.histogram())
    print(f"upstream calls: {len(upstream.requests)}; server log: {len(errors)} error lines")
    for line in errors[:20]:
        print("  log:", line[:300])
    for problem in problems[:50]:
        print("PROBLEM:", problem[:600])
    if problems or errors:
        print(f"FAILED: {len(problems)} problems, {len(errors)} error lines (replay: --seed {seed})")
        return 1
    print("ok: no 5xx the upstream did not cause, no hang, the server still serves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
