"""The hit path: replayed streams are rendered once, yet never served stale."""

from __future__ import annotations

import json

import openai

from cache_policy import decide
from cache_store import NewEntry
from fake_upstream import chat_completion
from helpers import chat_body


def streamed_text(client, body) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(**body, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    return raw.headers["X-Computer-Use-Cache"], text


def test_hit_path__a_restored_entry_replays_its_new_answer(start_proxy, fake_upstream):
    proxy = start_proxy()
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    body = chat_body("replay me")

    assert streamed_text(client, body) == ("MISS", "echo: replay me")
    assert streamed_text(client, body) == ("HIT", "echo: replay me")
    assert streamed_text(client, body) == ("HIT", "echo: replay me")  # from the rendered replay
    key = decide(proxy.app.extensions["computer_use_cache"].settings, "chat", body).key
    newer = chat_completion("a newer answer", id="chatcmpl-newer")
    proxy.store.put(NewEntry(key, "chat", body["model"], "{}", json.dumps(newer)))

    assert streamed_text(client, body) == ("HIT", "a newer answer")
    assert len(fake_upstream.calls()) == 1


def test_hit_path__a_cleared_entry_is_not_replayed(start_proxy, fake_upstream, http):
    proxy = start_proxy()
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    body = chat_body("then cleared")
    streamed_text(client, body)
    assert streamed_text(client, body)[0] == "HIT"

    assert http.post(proxy.url + "/cache/clear").json()["deleted"] == 1

    assert streamed_text(client, body)[0] == "MISS"
    assert len(fake_upstream.calls()) == 2


def test_hit_path__known_bytes_still_honour_the_bypass_header(proxy, fake_upstream, http):
    data = json.dumps(chat_body("same bytes")).encode()
    headers = {"Content-Type": "application/json"}
    url = proxy.url + "/v1/chat/completions"
    assert http.post(url, data=data, headers=headers).headers["X-Computer-Use-Cache"] == "MISS"
    assert http.post(url, data=data, headers=headers).headers["X-Computer-Use-Cache"] == "HIT"

    bypassed = http.post(url, data=data, headers={**headers, "X-Cache-Bypass": "1"})
    respaced = http.post(url, data=json.dumps(chat_body("same bytes"), indent=2).encode(), headers=headers)

    assert bypassed.headers["X-Computer-Use-Cache"] == "BYPASS"
    assert respaced.headers["X-Computer-Use-Cache"] == "HIT"  # same meaning, other bytes: full path
    assert len(fake_upstream.calls()) == 2
