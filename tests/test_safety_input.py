"""Bad input gets a clear 4xx OpenAI error: never a 5xx, never an upstream call, nothing stored."""

from __future__ import annotations

import json
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from helpers import chat_body

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}


def assert_openai_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def assert_untouched(fake_upstream, proxy) -> None:
    assert fake_upstream.requests == []
    assert proxy.store.stats()["entries"] == 0


MALFORMED_BODIES = [
    (b"", "must be JSON"),
    (b"   ", "must be JSON"),
    (b"{not json", "must be JSON"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "caf\xe9"}]}', "UTF-8"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "NaN"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": Infinity}', "NaN"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": -Infinity}', "NaN"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 1e999}', "NaN"),
    (b'[{"model": "m"}]', "JSON object"),
    (b'"a string"', "JSON object"),
    (b"42", "JSON object"),
    (b"null", "JSON object"),
    (b'\xef\xbb\xbf{"model": "m", "messages": [{"role": "user", "content": "x"}]}', "must be JSON"),
]


def test_parse__malformed_bodies_are_400(proxy, fake_upstream, http):
    # One server for all cases: each case is one request, and a server costs more than a request.
    for data, message_part in MALFORMED_BODIES:
        response = http.post(proxy.url + CHAT, data=data, headers=JSON)
        error = assert_openai_error(response, 400, "invalid_json")
        assert message_part in error["message"], data
    assert_untouched(fake_upstream, proxy)


WRONG_TYPES = [
    ({"model": 42}, "model"),
    ({"model": ["a"]}, "model"),
    ({"model": None}, "model"),
    ({"messages": {"role": "user", "content": "x"}}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": ["hello"]}, "messages[0]"),
    ({"stream": "true"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream_options": "yes"}, "stream_options"),
]


def test_validate__wrong_types_are_400_naming_the_field(proxy, fake_upstream, http):
    for overrides, param in WRONG_TYPES:
        response = http.post(proxy.url + CHAT, json=chat_body(**overrides))
        assert assert_openai_error(response, 400)["param"] == param, overrides
    assert_untouched(fake_upstream, proxy)


def test_validate__legacy_completion_prompt_of_wrong_type_is_400(proxy, fake_upstream, http):
    response = http.post(proxy.url + "/v1/completions", json={"model": "m", "prompt": {"a": 1}})
    assert assert_openai_error(response, 400)["param"] == "prompt"
    assert_untouched(fake_upstream, proxy)


def test_depth__deeply_nested_json_is_400_fast(proxy, fake_upstream, http):
    data = b"[" * 40_000
    started = time.monotonic()
    response = http.post(proxy.url + CHAT, data=data, headers=JSON)
    assert time.monotonic() - started < 1.0
    assert "nested deeper than 256" in assert_openai_error(response, 400, "invalid_json")["message"]
    assert_untouched(fake_upstream, proxy)


def test_depth__nesting_hidden_in_a_valid_body_is_400(proxy, fake_upstream, http):
    deep = json.loads("[" * 300 + "]" * 300)
    body = chat_body(tools=deep)
    response = http.post(proxy.url + CHAT, data=json.dumps(body), headers=JSON)
    assert_openai_error(response, 400, "invalid_json")
    assert_untouched(fake_upstream, proxy)


def test_depth__brackets_inside_strings_do_not_count(proxy, fake_upstream, http):
    response = http.post(proxy.url + CHAT, json=chat_body("[" * 5000 + '\\"{' * 300))
    assert response.status_code == 200
    assert len(fake_upstream.requests) == 1


def test_size__content_length_over_the_limit_is_413_before_the_body_is_read(start_proxy, fake_upstream):
    proxy = start_proxy(max_request_bytes=1000)
    # Declare a huge body but send none: only a check of the header can answer this.
    head, body = _raw_request(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert_untouched(fake_upstream, proxy)


def test_size__chunked_body_without_length_is_capped_while_read(start_proxy, fake_upstream, http):
    proxy = start_proxy(max_request_bytes=1000)

    def pieces():
        for _ in range(20):
            yield b" " * 500

    response = http.post(proxy.url + CHAT, data=pieces(), headers=JSON)
    assert "MAX_REQUEST_BYTES" in assert_openai_error(response, 413, "request_too_large")["message"]
    assert_untouched(fake_upstream, proxy)


def test_size__body_at_the_limit_is_accepted(start_proxy, fake_upstream, http):
    proxy = start_proxy(max_request_bytes=1000)
    data = json.dumps(chat_body()).encode()
    data += b" " * (1000 - len(data))

    def pieces():
        yield data

    assert http.post(proxy.url + CHAT, data=data, headers=JSON).status_code == 200
    assert http.post(proxy.url + CHAT, data=pieces(), headers=JSON).status_code == 200


def test_content_type__missing_or_wrong_is_400(proxy, fake_upstream, http):
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", "application/jsonx"):
        headers = {"Content-Type": content_type} if content_type else {}
        # bytes data: requests then sends no Content-Type of its own.
        response = http.post(proxy.url + CHAT, data=json.dumps(chat_body()).encode(), headers=headers)
        error = assert_openai_error(response, 400, "invalid_content_type")
        assert "application/json" in error["message"], content_type
    assert_untouched(fake_upstream, proxy)


def test_content_type__json_with_parameters_is_accepted(proxy, fake_upstream, http):
    for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/json;charset=UTF-8"):
        response = http.post(proxy.url + CHAT, data=json.dumps(chat_body(content_type)),
                             headers={"Content-Type": content_type})
        assert response.status_code == 200, content_type
    assert len(fake_upstream.requests) == 3


def _raw_request(proxy, head: bytes, body: bytes = b"") -> tuple[bytes, bytes]:
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + body)
        data = b""
        # Until the whole JSON error body is in (it ends with "}}").
        while not data.rstrip().endswith(b"}}"):
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    status_head, _, rest = data.partition(b"\r\n\r\n")
    return status_head, rest


def test_headers__folded_header_never_reaches_the_upstream_with_a_line_break(proxy, fake_upstream):
    body = json.dumps(chat_body()).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Title: agent\r\n Injected: yes\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    status_head, _ = _raw_request(proxy, head, body)
    # Flask's server unfolds obsolete line folding to a space (RFC 9112 allows either that or 400).
    assert status_head.split(b" ")[1] in (b"200", b"400")
    for recorded in fake_upstream.requests:
        assert "injected" not in recorded.headers
        assert all("\r" not in value and "\n" not in value for value in recorded.headers.values())


@pytest.mark.parametrize("value", ["agent\r\nInjected: yes", "agent\nx", "agent\rx", "a\x00b"])
def test_headers__control_characters_in_a_value_are_400(app, fake_upstream, value):
    # The test client refuses to build such headers, so they go straight into the WSGI environ,
    # as a lenient server would pass them.
    response = app.test_client().post(CHAT, json=chat_body(), environ_overrides={"HTTP_X_TITLE": value})
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_header"
    assert fake_upstream.requests == []


def test_headers__absurdly_long_header_is_431(proxy, fake_upstream, http):
    response = http.post(proxy.url + CHAT, json=chat_body(), headers={"X-Title": "a" * 20000})
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_header_fields_too_large"
    assert_untouched(fake_upstream, proxy)


def test_headers__many_long_headers_are_431(proxy, fake_upstream, http):
    headers = {f"X-Pad-{number}": "b" * 8000 for number in range(10)}
    response = http.post(proxy.url + CHAT, json=chat_body(), headers=headers)
    assert response.status_code == 431
    assert_untouched(fake_upstream, proxy)


def test_headers__a_header_line_too_long_for_the_server_gets_no_5xx(proxy, fake_upstream):
    head = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 70000 + b"\r\nConnection: close\r\n\r\n")
    status_head, _ = _raw_request(proxy, head)
    assert status_head.split(b" ")[1] == b"431"
    assert fake_upstream.requests == []


# -- property-based: whatever arrives, the answer is never a 5xx or a traceback ----------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
chat_like = st.fixed_dictionaries(
    {},
    optional={
        "model": json_values | st.just("test/model-a"),
        "messages": json_values | st.just([{"role": "user", "content": "hi"}]),
        "stream": json_values,
        "stream_options": json_values,
        "cache": json_values,
        "metadata": json_values,
        "cache_control": json_values,
        "n": json_values,
        "prompt": json_values,
    },
)
bodies = (
    st.binary(max_size=200)
    | json_values.map(lambda value: json.dumps(value).encode())
    | chat_like.map(lambda value: json.dumps(value).encode())
)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=24)
json_type = st.just("application/json")
headers = st.fixed_dictionaries({
    # Mostly JSON, so most bodies get past the Content-Type check into parsing and validation.
    "Content-Type": st.one_of(json_type, json_type, json_type, header_text,
                              st.sampled_from(["text/plain", "application/json; charset=utf-8", ""])),
}, optional={
    "Authorization": header_text,
    "X-Cache-Bypass": header_text,
    "X-Title": header_text,
    "HTTP-Referer": header_text,
})
paths = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/chat/completions", "/v1/models",
                         "/cache/clear", "/nope"])


@hypothesis_settings(max_examples=300, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))
@given(cases=st.lists(st.tuples(paths, bodies, headers), min_size=6, max_size=6))
def test_fuzz__no_input_gives_a_5xx_or_a_traceback(app, fake_upstream, cases):
    """1,800 generated requests (300 examples of 6) through the whole app."""
    client = app.test_client()
    for path, body, request_headers in cases:
        response = client.post(path, data=body, headers=request_headers)
        text = response.get_data(as_text=True)
        assert response.status_code < 500, text
        assert "Traceback" not in text and 'File "' not in text
        if response.status_code >= 400 and response.is_json:
            assert set(response.get_json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("text, too_deep", [
    ("[" * 257 + "]" * 257, True),
    ("[" * 256 + "]" * 256, False),
    ('{"a":' * 257 + "1" + "}" * 257, True),
    ("[" * 100 + "{" * 156 + "}" * 156 + "]" * 100, False),
    ("[" * 100 + "{" * 157 + "}" * 157 + "]" * 100, True),
    ("[" * 250 + "[][][[[[[[[]]]]]]]" + "]" * 250, True),
    ("[]" * 100_000, False),
    (json.dumps({"a": "[" * 1000}), False),
    (json.dumps({"a": "\\" * 3 + '"' + "[" * 300}), False),
    (json.dumps(["\\\"" * 5, "[[" * 300, "x\\"]), False),
    (json.dumps({"k\\\"[[": ["]" * 400]}), False),
])
def test_depth__scan_ignores_strings_and_escapes(text, too_deep):
    from wire import json_depth_exceeds

    assert json_depth_exceeds(text.encode()) is too_deep
