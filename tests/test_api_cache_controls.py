"""Per-request switches, what reaches the upstream, what is answered but never stored, the
decision headers and the metadata object; all over real HTTP."""

from __future__ import annotations

import json
import sqlite3

import pytest

from fake_upstream import chat_completion, error_reply, json_reply, raw_reply
from helpers import chat_body, completion_body
from test_cache_policy import original_key

CHAT = "/v1/chat/completions"
PREFIXES = ("X-Computer-Use-Cache", "X-Code-Model-Cache")


def cache_state(response) -> tuple:
    """(status, store, reason) under both prefixes, which must agree."""
    states = {(response.headers.get(p), response.headers.get(f"{p}-Store"),
               response.headers.get(f"{p}-Bypass-Reason")) for p in PREFIXES}
    assert len(states) == 1, states
    return states.pop()


def stored_rows(proxy) -> list[tuple]:
    db = sqlite3.connect(proxy.store.path)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'completions'").fetchone():
            return []  # the store was never opened: nothing can have been written
        return db.execute("SELECT cache_key, request_json, response_json FROM completions").fetchall()
    finally:
        db.close()


def post_twice(http, proxy, body, **kwargs):
    return [http.post(proxy.url + CHAT, json=body, **kwargs) for _ in range(2)]


# --------------------------------------------------------------------------- switches

@pytest.mark.parametrize("body, headers, reason", [
    (chat_body(cache=False), {}, "cache disabled for request"),
    (chat_body(cache="false"), {}, "cache disabled for request"),
    (chat_body(cache_control={"enabled": False}), {}, "cache disabled for request"),
    (chat_body(metadata={"cache": False}), {}, "cache disabled for request"),
    (chat_body(metadata={"cache_enabled": "off"}), {}, "cache disabled for request"),
    (chat_body(), {"X-Cache-Bypass": "true"}, "X-Cache-Bypass requested"),
    (chat_body(), {"X-Cache-Bypass": "1"}, "X-Cache-Bypass requested"),
], ids=["cache-false", "cache-string", "cache_control", "metadata.cache", "metadata.cache_enabled",
        "header-true", "header-1"])
def test_switches__bypass_with_the_originals_reason(proxy, fake_upstream, http, body, headers, reason):
    http.post(proxy.url + CHAT, json=chat_body())  # a stored entry a bypass must not read
    for response in post_twice(http, proxy, body, headers=headers):
        assert response.status_code == 200
        assert cache_state(response) == ("BYPASS", None, reason)
        assert response.headers["X-Computer-Use-Cache-Key"] == original_key("chat", body)
    assert len(fake_upstream.calls()) == 3
    assert len(stored_rows(proxy)) == 1


def test_switches__header_false_keeps_caching(proxy, fake_upstream, http):
    first, second = post_twice(http, proxy, chat_body(), headers={"X-Cache-Bypass": "false"})
    assert (cache_state(first)[0], cache_state(second)[0]) == ("MISS", "HIT")


def test_switches__cache_true_caches_when_disabled(start_proxy, fake_upstream, http):
    proxy = start_proxy(cache_enabled=False)
    plain = post_twice(http, proxy, chat_body("plain"))
    assert [cache_state(r) for r in plain] == [("BYPASS", None, "cache disabled for request")] * 2
    opted = post_twice(http, proxy, chat_body("opted", cache=True))
    assert [cache_state(r) for r in opted] == [("MISS", "stored", None), ("HIT", None, None)]
    assert len(fake_upstream.calls()) == 3


@pytest.mark.parametrize("body, forwarded", [
    (chat_body(cache=True), chat_body()),
    (chat_body(cache=False), chat_body()),
    (chat_body(cache_control={"enabled": True}), chat_body()),
    (chat_body(cache_control={"enabled": True, "type": "ephemeral"}),
     chat_body(cache_control={"enabled": True, "type": "ephemeral"})),
    (chat_body(cache_control={"type": "ephemeral"}), chat_body(cache_control={"type": "ephemeral"})),
    (chat_body(metadata={"cache": True}), chat_body()),
    (chat_body(metadata={"cache_enabled": False, "run": "r1"}), chat_body(metadata={"run": "r1"})),
    (chat_body(metadata={"run": "r1"}), chat_body(metadata={"run": "r1"})),
], ids=["cache-true", "cache-false", "cache_control-only-enabled", "cache_control-more", "cache_control-other",
        "metadata-emptied", "metadata-kept", "metadata-untouched"])
def test_switches__proxy_controls_never_reach_the_upstream(proxy, fake_upstream, http, body, forwarded):
    http.post(proxy.url + CHAT, json=body)
    assert fake_upstream.requests[-1].json == forwarded


def test_upstream_body__unchanged_request_is_sent_as_the_clients_bytes(proxy, fake_upstream, http):
    raw = b'{ "messages": [{"role":"user","content":"\\u6771"}],  "model": "test/model-a" }'
    http.post(proxy.url + CHAT, data=raw, headers={"Content-Type": "application/json"})
    assert fake_upstream.requests[-1].body == raw


# --------------------------------------------------------------------------- answered, not cached

@pytest.mark.parametrize("overrides, model, reason", [
    ({"cache_model_allowlist": ("openai/*",)}, "test/model-a", "model is not cacheable: test/model-a"),
    ({"cache_model_denylist": ("test/*",)}, "test/model-a", "model is not cacheable: test/model-a"),
    ({"cache_model_denylist": ("*:free",)}, "vendor/m:free", "model is not cacheable: vendor/m:free"),
    ({"cache_model_allowlist": ("test/model-?",), "cache_model_denylist": ("test/model-a",)},
     "test/model-a", "model is not cacheable: test/model-a"),
])
def test_not_cached__model_lists(start_proxy, fake_upstream, http, overrides, model, reason):
    proxy = start_proxy(**overrides)
    for response in post_twice(http, proxy, chat_body(model=model)):
        assert response.status_code == 200
        assert cache_state(response) == ("BYPASS", None, reason)
    assert stored_rows(proxy) == []


def test_not_cached__non_ascii_model_name_is_a_safe_header(start_proxy, fake_upstream, http):
    proxy = start_proxy(cache_model_denylist=("*",))
    response = http.post(proxy.url + CHAT, json=chat_body(model="東京/m\r\nX-Evil: 1"))
    assert response.status_code == 200
    assert cache_state(response) == ("BYPASS", None, "model is not cacheable: ??/m??X-Evil: 1")
    assert "X-Evil" not in response.headers


def test_not_cached__allowlist_match_is_cached(start_proxy, fake_upstream, http):
    proxy = start_proxy(cache_model_allowlist=("openai/*", "test/model-[ab]"))
    assert [cache_state(r)[0] for r in post_twice(http, proxy, chat_body())] == ["MISS", "HIT"]


def test_not_cached__request_over_input_limit(start_proxy, fake_upstream, http):
    body = chat_body("x" * 200)
    canonical_size = len(json.dumps({"mode": "chat", **body}, separators=(",", ":")))
    proxy = start_proxy(cache_max_input_chars=canonical_size - 1)
    for response in post_twice(http, proxy, body):
        assert cache_state(response) == ("BYPASS", None, "request is too large for cache")
    small = post_twice(http, proxy, chat_body("x"))
    assert [cache_state(r)[0] for r in small] == ["MISS", "HIT"]


def test_not_cached__response_over_limit(start_proxy, fake_upstream, http):
    proxy = start_proxy(cache_max_response_chars=300)
    fake_upstream.enqueue(json_reply(chat_completion("y" * 400)), json_reply(chat_completion("y" * 400)))
    for response in post_twice(http, proxy, chat_body()):
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == "y" * 400
        assert cache_state(response) == ("MISS", "skipped: response is too large for cache", None)
    assert stored_rows(proxy) == []


@pytest.mark.parametrize("content", [
    "use api_key=sk-live-abcdef123456 to log in",
    "login with password: hunter2hunter2",
    "ACCESS-TOKEN: ghp_abcdefghijkl",
    "-----BEGIN PRIVATE KEY----- private_key=MIIEvQIBADANBgkq",
])
def test_not_cached__credentials_in_the_prompt(proxy, fake_upstream, http, content):
    for response in post_twice(http, proxy, chat_body(content)):
        assert response.status_code == 200
        assert cache_state(response) == ("BYPASS", None, "request appears to contain credentials or secrets")
    assert stored_rows(proxy) == []
    assert len(fake_upstream.calls()) == 2


def test_not_cached__upstream_error_passes_through(proxy, fake_upstream, http):
    fake_upstream.enqueue(error_reply(429, "Slow down", headers={"Retry-After": "7", "X-Request-Id": "req-1"}))
    response = http.post(proxy.url + CHAT, json=chat_body())
    assert response.status_code == 429
    assert response.json() == {"error": {"message": "Slow down", "type": "rate_limit_error", "param": None,
                                         "code": None}}
    assert response.headers["Content-Type"] == "application/json"
    assert (response.headers["Retry-After"], response.headers["X-Request-Id"]) == ("7", "req-1")
    assert cache_state(response) == ("BYPASS", None, "upstream returned an error")
    again = http.post(proxy.url + CHAT, json=chat_body())
    assert (again.status_code, cache_state(again)[0]) == (200, "MISS")


def test_not_cached__non_json_200_passes_through(proxy, fake_upstream, http):
    fake_upstream.enqueue(raw_reply("plain words", content_type="text/plain; charset=utf-8"))
    response = http.post(proxy.url + CHAT, json=chat_body())
    assert (response.status_code, response.text) == (200, "plain words")
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert cache_state(response) == ("BYPASS", None, "upstream response was not JSON")
    assert stored_rows(proxy) == []


@pytest.mark.parametrize("reply, store", [
    ({"error": {"message": "provider overloaded", "code": 502}}, "skipped: upstream response carries an error"),
    ({"id": "x", "object": "chat.completion", "choices": []}, "skipped: upstream response has no choices"),
    ({"id": "x", "object": "chat.completion"}, "skipped: upstream response has no choices"),
    (["not", "an", "object"], "skipped: response is not a JSON object"),
], ids=["error-object", "empty-choices", "no-choices", "list"])
def test_not_cached__2xx_json_without_an_answer(proxy, fake_upstream, http, reply, store):
    fake_upstream.enqueue(json_reply(reply))
    response = http.post(proxy.url + CHAT, json=chat_body())
    assert (response.status_code, response.json()) == (200, reply)
    assert cache_state(response) == ("MISS", store, None)
    assert stored_rows(proxy) == []


# --------------------------------------------------------------------------- headers and metadata

def test_headers__every_completion_response_carries_the_decision(proxy, fake_upstream, http):
    key = original_key("chat", chat_body())
    miss, hit = post_twice(http, proxy, chat_body())
    assert cache_state(miss) == ("MISS", "stored", None)
    assert cache_state(hit) == ("HIT", None, None)
    for response in (miss, hit):
        assert response.headers["X-Computer-Use-Cache-Key"] == response.headers["X-Code-Model-Cache-Key"] == key
    fake_upstream.enqueue(json_reply(chat_completion("v2")))
    bypassed = http.post(proxy.url + CHAT, json=chat_body(), headers={"X-Cache-Bypass": "yes"})
    assert cache_state(bypassed) == ("BYPASS", None, "X-Cache-Bypass requested")
    fake_upstream.enqueue(error_reply(500, "boom", "server_error"))
    error = http.post(proxy.url + CHAT, json=chat_body("other"))
    assert cache_state(error) == ("BYPASS", None, "upstream returned an error")
    invalid = http.post(proxy.url + CHAT, json={"messages": []})
    assert invalid.status_code == 400
    assert cache_state(invalid)[0] == "BYPASS"


def test_headers__unreadable_row_is_a_miss_and_is_updated(start_proxy, fake_upstream, http):
    proxy = start_proxy(include_cache_metadata=True)
    first = http.post(proxy.url + CHAT, json=chat_body())
    db = sqlite3.connect(proxy.store.path)
    db.execute("UPDATE completions SET response_json = '{broken'")
    db.commit()
    db.close()
    second = http.post(proxy.url + CHAT, json=chat_body())
    assert second.status_code == 200
    assert cache_state(first) == ("MISS", "stored", None)
    assert cache_state(second) == ("MISS", "updated", None)
    assert json.loads(stored_rows(proxy)[0][2])["id"] == second.json()["id"]


@pytest.mark.parametrize("path, body", [(CHAT, chat_body()), ("/v1/completions", completion_body())])
def test_metadata__added_when_asked_and_never_stored(start_proxy, fake_upstream, http, path, body):
    proxy = start_proxy(include_cache_metadata=True)
    key = original_key("chat" if path == CHAT else "completion", body)
    miss = http.post(proxy.url + path, json=body).json()
    hit = http.post(proxy.url + path, json=body).json()
    bypass = http.post(proxy.url + path, json=body, headers={"X-Cache-Bypass": "on"}).json()
    assert miss["code_model_cache"] == {"cache_hit": False, "cache_key": key, "store_status": "stored",
                                        "bypass_reason": None}
    assert hit["code_model_cache"] == {"cache_hit": True, "cache_key": key, "store_status": None,
                                       "bypass_reason": None}
    assert bypass["code_model_cache"] == {"cache_hit": False, "cache_key": key, "store_status": None,
                                          "bypass_reason": "X-Cache-Bypass requested"}
    assert {k: v for k, v in hit.items() if k != "code_model_cache"} == \
        {k: v for k, v in miss.items() if k != "code_model_cache"}
    [(stored_key, request_json, response_json)] = stored_rows(proxy)
    assert stored_key == key
    assert "code_model_cache" not in response_json
    assert json.loads(request_json)["cache_key"] == key


def test_metadata__off_by_default(proxy, http):
    assert "code_model_cache" not in http.post(proxy.url + CHAT, json=chat_body()).json()


def test_hit__returns_the_stored_json_unchanged(proxy, fake_upstream, http):
    text = '{"id":"chatcmpl-1",  "object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"東京"},"finish_reason":"stop"}],"usage":{"total_tokens":3}}'  # noqa: E501
    fake_upstream.enqueue(raw_reply(text))
    miss, hit = post_twice(http, proxy, chat_body())
    assert miss.content == text.encode()
    assert hit.content.decode() == text
    assert hit.headers["Content-Type"] == "application/json"


# --------------------------------------------------------------------------- upstream headers

def test_upstream__client_bearer_forwarded_when_no_key_set(start_proxy, fake_upstream, http):
    proxy = start_proxy(upstream_api_key="")
    http.post(proxy.url + CHAT, json=chat_body(), headers={"Authorization": "Bearer sk-client"})
    sent = fake_upstream.requests[-1].headers
    assert sent["authorization"] == "Bearer sk-client"
    assert sent["content-type"] == "application/json"
    assert sent["accept"] == "application/json"


def test_upstream__configured_key_replaces_the_clients(start_proxy, fake_upstream, http):
    proxy = start_proxy(upstream_api_key="sk-upstream")
    http.post(proxy.url + CHAT, json=chat_body(), headers={"Authorization": "Bearer sk-client"})
    http.post(proxy.url + CHAT, json=chat_body("no auth"))
    assert [r.headers["authorization"] for r in fake_upstream.requests] == ["Bearer sk-upstream"] * 2


def test_upstream__no_key_anywhere_sends_no_authorization(start_proxy, fake_upstream, http):
    proxy = start_proxy(upstream_api_key="")
    http.post(proxy.url + CHAT, json=chat_body())
    assert "authorization" not in fake_upstream.requests[-1].headers


def test_upstream__referer_and_title_from_client(proxy, fake_upstream, http):
    http.post(proxy.url + CHAT, json=chat_body(), headers={"HTTP-Referer": "https://agent.example",
                                                          "X-Title": "Agent"})
    sent = fake_upstream.requests[-1].headers
    assert (sent["http-referer"], sent["x-title"]) == ("https://agent.example", "Agent")


def test_upstream__referer_and_title_from_settings_win(start_proxy, fake_upstream, http):
    proxy = start_proxy(openrouter_http_referer="https://ours.example", openrouter_x_title="Ours")
    http.post(proxy.url + CHAT, json=chat_body(), headers={"HTTP-Referer": "https://agent.example",
                                                          "X-Title": "Agent"})
    sent = fake_upstream.requests[-1].headers
    assert (sent["http-referer"], sent["x-title"]) == ("https://ours.example", "Ours")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_upstream__unreachable_is_502(start_proxy, http, stream):
    proxy = start_proxy(upstream_base_url="http://127.0.0.1:9/v1")
    response = http.post(proxy.url + CHAT, json=chat_body(stream=stream))
    assert response.status_code == 502
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("upstream_error", None, "upstream_request_failed")
    assert "Traceback" not in response.text
    assert cache_state(response)[0] == "BYPASS"


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("path, data, message", [
    (CHAT, b"{not json", "Request body must be JSON."),
    (CHAT, b"", "Request body must be JSON."),
    (CHAT, b'["a list"]', None),
    (CHAT, b'"a string"', None),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}]}', "model is required."),
    (CHAT, b'{"model": "  ", "messages": [{"role": "user", "content": "x"}]}', "model is required."),
    (CHAT, b'{"model": null, "messages": [{"role": "user", "content": "x"}]}', "model is required."),
    (CHAT, b'{"model": "m"}', "messages must be a non-empty array."),
    (CHAT, b'{"model": "m", "messages": []}', "messages must be a non-empty array."),
    (CHAT, b'{"model": "m", "messages": "hi"}', "messages must be a non-empty array."),
    ("/v1/completions", b'{"model": "m"}', "prompt is required."),
    ("/v1/completions", b'{"model": "m", "prompt": ""}', "prompt is required."),
    ("/completions", b"{oops", "Request body must be JSON."),
])
def test_bad_input__400_and_no_upstream_call(proxy, fake_upstream, http, path, data, message):
    response = http.post(proxy.url + path, data=data, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    if message:
        assert error["message"] == message
    assert fake_upstream.requests == []
