"""The cache key over real HTTP: byte-for-byte the original's, stable where it must be, and
different for every field that changes the answer."""

from __future__ import annotations

import json
import sqlite3

import pytest

from helpers import chat_body, completion_body
from test_cache_policy import original_key

CHAT = "/v1/chat/completions"


def post_raw(http, proxy, text: str, path: str = CHAT):
    return http.post(proxy.url + path, data=text.encode("utf-8"), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("body", [
    chat_body(),
    chat_body("Klicke auf «Weiter», dann 東京 öffnen 🚀 — \u00e9\u0301"),
    chat_body([{"type": "text", "text": "what is on screen?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}],
              temperature=0, tools=[{"type": "function", "function": {"name": "click", "parameters": {
                  "type": "object", "properties": {"y": {"type": "integer"}, "x": {"type": "integer"}}}}}]),
], ids=["ascii", "non-ascii", "image-and-tools"])
def test_key__is_byte_for_byte_the_originals(proxy, http, body):
    for path, mode in ((CHAT, "chat"), ("/v1/completions", "completion")):
        request = dict(body, prompt="p") if mode == "completion" else body
        response = http.post(proxy.url + path, json=request)
        expected = original_key(mode, request)
        assert response.headers["X-Computer-Use-Cache-Key"] == expected
        assert response.headers["X-Code-Model-Cache-Key"] == expected


def test_key__non_ascii_sent_unescaped_or_escaped_is_the_same_request(proxy, fake_upstream, http):
    body = chat_body("東京 🚀")
    first = post_raw(http, proxy, json.dumps(body, ensure_ascii=False))
    second = post_raw(http, proxy, json.dumps(body, ensure_ascii=True))
    assert (first.headers["X-Computer-Use-Cache"], second.headers["X-Computer-Use-Cache"]) == ("MISS", "HIT")
    assert first.headers["X-Computer-Use-Cache-Key"] == original_key("chat", body)


def test_key__independent_of_key_order_and_whitespace(proxy, fake_upstream, http):
    compact = '{"model":"test/model-a","messages":[{"role":"user","content":"hi"}],"temperature":0.5}'
    spread = """{
        "temperature" : 0.5,
        "messages" : [ { "content" : "hi", "role" : "user" } ],
        "model" : "test/model-a"
    }"""
    first = post_raw(http, proxy, compact)
    second = post_raw(http, proxy, spread)
    assert (first.headers["X-Computer-Use-Cache"], second.headers["X-Computer-Use-Cache"]) == ("MISS", "HIT")
    assert first.headers["X-Computer-Use-Cache-Key"] == second.headers["X-Computer-Use-Cache-Key"]
    assert len(fake_upstream.calls()) == 1


@pytest.mark.parametrize("extra", [
    {"stream": False},
    {"stream_options": {"include_usage": True}},
    {"cache": True},
    {"cache_control": {"enabled": True}},
    {"cache_control": {"type": "ephemeral"}},
    {"metadata": {"run": "r-17", "step": 4}},
    {"metadata": {"cache": True}},
], ids=lambda extra: json.dumps(extra))
def test_key__ignored_fields_do_not_change_it(proxy, fake_upstream, http, extra):
    base = chat_body()
    first = http.post(proxy.url + CHAT, json=base)
    second = http.post(proxy.url + CHAT, json={**base, **extra})
    assert second.headers["X-Computer-Use-Cache"] == "HIT"
    assert second.headers["X-Computer-Use-Cache-Key"] == first.headers["X-Computer-Use-Cache-Key"]
    assert len(fake_upstream.calls()) == 1


def test_key__cache_ignore_keys_setting(start_proxy, fake_upstream, http):
    proxy = start_proxy(cache_ignore_keys=("user", "session_id"))
    first = http.post(proxy.url + CHAT, json=chat_body(user="alice", session_id="s1"))
    second = http.post(proxy.url + CHAT, json=chat_body(user="bob"))
    assert second.headers["X-Computer-Use-Cache"] == "HIT"
    assert first.headers["X-Computer-Use-Cache-Key"] == original_key("chat", chat_body())
    assert len(fake_upstream.calls()) == 1


# Each of these changes the answer, so each must give a new key (and a new upstream call).
CHANGES = {
    "model": {"model": "test/model-b"},
    "messages-content": {"messages": [{"role": "user", "content": "Plan the next click!"}]},
    "messages-role": {"messages": [{"role": "system", "content": "Plan the next click."}]},
    "messages-extra": {"messages": [{"role": "user", "content": "Plan the next click."},
                                    {"role": "assistant", "content": "ok"}]},
    "temperature": {"temperature": 0.7},
    "temperature-int-vs-float": {"temperature": 1},
    "top_p": {"top_p": 0.9},
    "n": {"n": 2},
    "seed": {"seed": 42},
    "max_tokens": {"max_tokens": 64},
    "max_completion_tokens": {"max_completion_tokens": 64},
    "stop": {"stop": ["\n"]},
    "tools": {"tools": [{"type": "function", "function": {"name": "click", "parameters": {"type": "object"}}}]},
    "tool_choice": {"tool_choice": "required"},
    "parallel_tool_calls": {"parallel_tool_calls": False},
    "response_format": {"response_format": {"type": "json_object"}},
    "presence_penalty": {"presence_penalty": 0.5},
    "frequency_penalty": {"frequency_penalty": 0.5},
    "logprobs": {"logprobs": True},
    "user": {"user": "alice"},
    "reasoning": {"reasoning": {"effort": "high"}},
    "provider": {"provider": {"order": ["openai"]}},
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_key__changes_with_every_other_field(proxy, fake_upstream, http, change):
    base = chat_body(temperature=1.0)
    first = http.post(proxy.url + CHAT, json=base)
    changed_body = {**base, **change}
    second = http.post(proxy.url + CHAT, json=changed_body)
    assert second.headers["X-Computer-Use-Cache"] == "MISS"
    assert second.headers["X-Computer-Use-Cache-Key"] != first.headers["X-Computer-Use-Cache-Key"]
    assert second.headers["X-Computer-Use-Cache-Key"] == original_key("chat", changed_body)
    assert len(fake_upstream.calls()) == 2


def test_key__completion_prompt_and_suffix_matter(proxy, fake_upstream, http):
    keys = {http.post(proxy.url + "/v1/completions", json=body).headers["X-Computer-Use-Cache-Key"]
            for body in (completion_body("a"), completion_body("b"), completion_body("a", suffix="!"),
                         completion_body(["a"]))}
    assert len(keys) == 4


@pytest.mark.parametrize("metadata", [False, True], ids=["plain", "with-metadata"])
def test_key__surrogate_escapes_are_cached_in_pairs_and_refused_alone(start_proxy, fake_upstream, http,
                                                                     metadata):
    # A pair decodes to one character (cached like any other); a lone one is not Unicode text,
    # which providers refuse and SQLite cannot hold: 400 at the edge (tests/test_hostile_input.py).
    proxy = start_proxy(include_cache_metadata=metadata)
    raw = '{"model":"test/model-a","messages":[{"role":"user","content":"x\\uD83D\\ude00 \\\\ud800"}]}'
    lone = raw.replace("\\ude00", "")
    assert post_raw(http, proxy, lone).json()["error"]["param"] == "messages[0].content"
    first = post_raw(http, proxy, raw)
    second = post_raw(http, proxy, raw)
    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.headers["X-Computer-Use-Cache"], second.headers["X-Computer-Use-Cache"]) == ("MISS", "HIT")
    assert first.headers["X-Computer-Use-Cache-Store"] == "stored"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["choices"][0]["message"]["content"] == "echo: x\U0001F600 \\ud800"
    assert len(fake_upstream.calls()) == 1
    [(request_json,)] = sqlite_rows(proxy, "SELECT request_json FROM completions")
    stored = json.loads(request_json)
    assert stored["messages"] == json.loads(raw)["messages"]
    assert stored["cache_key"] == first.headers["X-Computer-Use-Cache-Key"]


def sqlite_rows(proxy, sql: str) -> list[tuple]:
    db = sqlite3.connect(proxy.store.path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()
