"""The official openai SDK pointed at the proxy: what a user's agent actually does."""

from __future__ import annotations

import openai
import pytest

from fake_upstream import chat_completion, error_reply, json_reply
from test_cache_policy import original_key

MESSAGES = [{"role": "user", "content": "Which button submits the form?"}]


def test_sdk__plain_call_miss_then_hit(start_proxy, fake_upstream):
    proxy = start_proxy(upstream_api_key="")
    openai_client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test-client", max_retries=0)
    first = openai_client.chat.completions.create(model="test/model-a", messages=MESSAGES)
    second = openai_client.chat.completions.create(model="test/model-a", messages=MESSAGES)
    assert first.choices[0].message.content == "echo: Which button submits the form?"
    assert second.model_dump() == first.model_dump()
    assert len(fake_upstream.calls()) == 1
    assert fake_upstream.requests[0].headers["authorization"] == "Bearer sk-test-client"


@pytest.fixture
def shared_client(start_proxy):
    """A proxy holding its own upstream key: one shared cache with the original's keys."""
    proxy = start_proxy(upstream_api_key="sk-upstream-test")
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test-client", max_retries=0)


def test_sdk__with_raw_response_headers(shared_client, fake_upstream):
    openai_client = shared_client
    key = original_key("chat", {"model": "test/model-a", "messages": MESSAGES, "temperature": 0})
    raw = [openai_client.chat.completions.with_raw_response.create(
        model="test/model-a", messages=MESSAGES, temperature=0) for _ in range(2)]
    assert [r.headers["x-computer-use-cache"] for r in raw] == ["MISS", "HIT"]
    assert [r.headers["x-code-model-cache"] for r in raw] == ["MISS", "HIT"]
    assert raw[0].headers["x-computer-use-cache-store"] == "stored"
    assert {r.headers["x-computer-use-cache-key"] for r in raw} == {key}
    assert raw[1].parse().id == raw[0].parse().id


def test_sdk__tool_call_is_cached_intact(openai_client, fake_upstream):
    call = {"id": "call_1", "type": "function", "function": {"name": "click", "arguments": '{"x":12,"y":40}'}}
    fake_upstream.enqueue(json_reply(chat_completion(None, tool_calls=[call])))
    tools = [{"type": "function", "function": {"name": "click", "parameters": {"type": "object"}}}]
    results = [openai_client.chat.completions.create(model="test/model-a", messages=MESSAGES, tools=tools)
               for _ in range(2)]
    for result in results:
        assert result.choices[0].finish_reason == "tool_calls"
        assert result.choices[0].message.tool_calls[0].function.arguments == '{"x":12,"y":40}'
    assert len(fake_upstream.calls()) == 1


def test_sdk__streamed_hit(openai_client, fake_upstream):
    stored = openai_client.chat.completions.create(model="test/model-a", messages=MESSAGES)
    response = openai_client.chat.completions.with_raw_response.create(
        model="test/model-a", messages=MESSAGES, stream=True)
    assert response.headers["x-computer-use-cache"] == "HIT"
    chunks = list(response.parse())
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == stored.choices[0].message.content
    assert chunks[0].id == stored.id
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len(fake_upstream.calls()) == 1


def test_sdk__legacy_completions(shared_client, fake_upstream):
    openai_client = shared_client
    raw = [openai_client.completions.with_raw_response.create(model="test/model-a", prompt="Say hello")
           for _ in range(2)]
    assert [r.headers["x-computer-use-cache"] for r in raw] == ["MISS", "HIT"]
    assert raw[1].parse().choices[0].text == raw[0].parse().choices[0].text == "echo: Say hello"
    assert raw[0].headers["x-computer-use-cache-key"] == original_key(
        "completion", {"model": "test/model-a", "prompt": "Say hello"})
    assert len(fake_upstream.calls("/completions")) == 1


def test_sdk__upstream_error_is_a_typed_exception(openai_client, fake_upstream):
    fake_upstream.enqueue(error_reply(429, "Rate limit exceeded"))
    with pytest.raises(openai.RateLimitError) as caught:
        openai_client.chat.completions.create(model="test/model-a", messages=MESSAGES)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["x-computer-use-cache"] == "BYPASS"


def test_sdk__bad_request_is_a_typed_exception(openai_client, fake_upstream):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="test/model-a", messages=[])
    assert caught.value.body["message"] == "messages must be a non-empty array."
    assert fake_upstream.requests == []
