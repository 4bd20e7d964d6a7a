"""Anthropic Messages end to end: the official anthropic SDK against a real proxy and a real fake
upstream that speaks the Messages API (JSON and named SSE events)."""

from __future__ import annotations

import json
import re

import anthropic
import pytest

from apis.messages import MESSAGES, MessageAssembler, replay_message
from fake_upstream import (FakeUpstream, anthropic_error_reply, anthropic_message, anthropic_sse_reply,
                           json_reply, message_stream_events, truncated_sse_reply)

MODEL = "claude-test"
USER = [{"role": "user", "content": "Open the settings page."}]
STATUS = "X-Computer-Use-Cache"

TEXT = anthropic_message("Sure, opening the settings page now.", id="msg_text")
COMPUTER_CALL = anthropic_message(
    [{"type": "text", "text": "I'll click the gear icon."},
     {"type": "tool_use", "id": "toolu_01A", "name": "computer",
      "input": {"action": "left_click", "coordinate": [1180, 42]}},
     {"type": "tool_use", "id": "toolu_01B", "name": "str_replace_based_edit_tool",
      "input": {"command": "view", "path": "/etc/hosts", "view_range": [1, 5.5], "note": "naïve \u2713"}}],
    id="msg_tools")
THINKING = anthropic_message(
    [{"type": "thinking", "thinking": "The user wants settings; the gear is top right.", "signature": "EqQBCkYIBxgCKkB=="},
     {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP"},
     {"type": "text", "text": "Done."}],
    id="msg_thinking",
    usage={"input_tokens": 2095, "cache_creation_input_tokens": 1024, "cache_read_input_tokens": 4096,
           "output_tokens": 503, "service_tier": "standard"})
SERVER_TOOL = anthropic_message(
    [{"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search", "input": {"query": "gear icon"}},
     {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01",
      "content": [{"type": "web_search_result", "url": "https://example.com", "title": "Example",
                   "encrypted_content": "abc", "page_age": None}]},
     {"type": "text", "text": "Found it."}],
    id="msg_server_tool")
ANSWERS = {"text": TEXT, "computer_tool": COMPUTER_CALL, "thinking": THINKING, "server_tool": SERVER_TOOL}


@pytest.fixture
def client(proxy):
    return anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-client", max_retries=0)


def create(client, **overrides):
    params = {"model": MODEL, "max_tokens": 256, "messages": USER, **overrides}
    raw = client.messages.with_raw_response.create(**params)
    return raw.parse(), raw.headers


def stream_final(client, **overrides):
    params = {"model": MODEL, "max_tokens": 256, "messages": USER, **overrides}
    with client.messages.stream(**params) as stream:
        return stream.get_final_message(), stream.response.headers


def dump(message) -> dict:
    return message.model_dump(mode="json", exclude_none=True)


# -- replay and assembly are inverses ------------------------------------------------------------


def events_of(stream_bytes: list[bytes]) -> list[dict]:
    return [json.loads(event.split(b"data: ", 1)[1]) for event in stream_bytes]


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_replay_message__assembles_back_to_the_stored_message(name):
    stored = ANSWERS[name]
    assembler = MessageAssembler()
    for event in events_of(list(replay_message(stored))):
        assembler.add(event)
    assert assembler.complete()
    assert assembler.message == stored


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_message_assembler__folds_the_vendor_stream_into_its_message(name):
    assembler = MessageAssembler()
    for event in message_stream_events(ANSWERS[name]):
        assembler.add(json.loads(event.split("data: ", 1)[1]))
    assert assembler.message == ANSWERS[name]


def test_replay_message__follows_the_event_grammar():
    events = list(replay_message(THINKING))
    names = [event.split(b"\n", 1)[0].decode() for event in events]
    payloads = events_of(events)
    assert [n.removeprefix("event: ") for n in names] == [p["type"] for p in payloads]
    assert payloads[0]["type"] == "message_start"
    assert payloads[0]["message"]["content"] == [] and payloads[0]["message"]["stop_reason"] is None
    assert payloads[-2]["type"] == "message_delta" and payloads[-2]["delta"]["stop_reason"] == "end_turn"
    assert payloads[-2]["usage"]["output_tokens"] == 503
    assert payloads[-1] == {"type": "message_stop"}
    starts = [p["content_block"] for p in payloads if p["type"] == "content_block_start"]
    assert starts[0] == {"type": "thinking", "thinking": "", "signature": ""}  # grows by deltas
    assert starts[1] == THINKING["content"][1]  # redacted_thinking arrives whole
    assert starts[2] == {"type": "text", "text": ""}
    kinds = [p["delta"]["type"] for p in payloads if p["type"] == "content_block_delta"]
    assert "signature_delta" in kinds and "thinking_delta" in kinds and "text_delta" in kinds
    assert b"[DONE]" not in b"".join(events)


# -- through the SDK, over HTTP ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_messages__miss_then_hit_returns_the_same_message(client, fake_upstream, name):
    fake_upstream.enqueue(json_reply(ANSWERS[name]))
    first, first_headers = create(client)
    second, second_headers = create(client)
    assert (first_headers[STATUS], second_headers[STATUS]) == ("MISS", "HIT")
    assert dump(second) == dump(first)
    assert first.model_dump(mode="json", exclude_unset=True) == ANSWERS[name]
    assert len(fake_upstream.calls("/messages")) == 1


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_messages__stream_hit_rebuilds_the_stored_message_in_the_sdk(client, fake_upstream, name):
    fake_upstream.enqueue(json_reply(ANSWERS[name]))
    stored, _ = create(client)
    final, headers = stream_final(client)
    assert headers[STATUS] == "HIT"
    assert dump(final) == dump(stored)
    assert len(fake_upstream.calls("/messages")) == 1


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_messages__streamed_miss_is_stored_and_an_immediate_repeat_hits(client, fake_upstream, name):
    fake_upstream.enqueue(anthropic_sse_reply(message_stream_events(ANSWERS[name])))
    live, live_headers = stream_final(client)
    replayed, replay_headers = stream_final(client)
    as_json, json_headers = create(client)
    assert (live_headers[STATUS], replay_headers[STATUS], json_headers[STATUS]) == ("MISS", "HIT", "HIT")
    assert dump(replayed) == dump(live) == dump(as_json)
    assert as_json.model_dump(mode="json", exclude_unset=True) == ANSWERS[name]
    assert len(fake_upstream.calls("/messages")) == 1


def test_messages__interrupted_stream_is_not_stored(client, fake_upstream):
    events = message_stream_events(COMPUTER_CALL)
    fake_upstream.enqueue(truncated_sse_reply(events[:6]))
    with pytest.raises(anthropic.APIStatusError) as caught:
        stream_final(client)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "api_error"
    fake_upstream.enqueue(json_reply(COMPUTER_CALL))
    again, headers = create(client)
    assert headers[STATUS] == "MISS"
    assert len(fake_upstream.calls("/messages")) == 2


def test_messages__stream_with_an_error_event_is_relayed_and_not_stored(client, fake_upstream):
    error = 'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
    fake_upstream.enqueue(anthropic_sse_reply(message_stream_events(TEXT)[:4] + [error]))
    with pytest.raises(anthropic.APIStatusError) as caught:
        stream_final(client)
    assert caught.value.body["error"]["type"] == "overloaded_error"
    _, headers = create(client)
    assert headers[STATUS] == "MISS"


def test_messages__stream_without_message_stop_is_not_stored(http, proxy, fake_upstream):
    fake_upstream.enqueue(anthropic_sse_reply(message_stream_events(TEXT)[:-1]))
    body = {"model": MODEL, "max_tokens": 16, "messages": USER, "stream": True}
    response = http.post(proxy.url + "/v1/messages", json=body)
    assert b"event: error" in response.content  # the client is told the stream broke off
    assert http.post(proxy.url + "/v1/messages", json=body).headers[STATUS] == "MISS"


# -- keys and headers ----------------------------------------------------------------------------


def test_messages__metadata_stays_out_of_the_key(client, fake_upstream):
    _, first = create(client, metadata={"user_id": "session-1"})
    _, second = create(client, metadata={"user_id": "session-2"})
    assert (first[STATUS], second[STATUS]) == ("MISS", "HIT")


def test_messages__version_and_beta_headers_are_forwarded_and_keyed(client, fake_upstream):
    beta = {"anthropic-beta": "computer-use-2025-01-24"}
    _, plain = create(client)
    _, with_beta = create(client, extra_headers=beta)
    _, again = create(client, extra_headers=beta)
    _, other_version = create(client, extra_headers={"anthropic-version": "2024-01-01"})
    assert [h[STATUS] for h in (plain, with_beta, again, other_version)] == ["MISS", "MISS", "HIT", "MISS"]
    calls = fake_upstream.calls("/messages")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", calls[0].headers["anthropic-version"])  # the SDK's own
    assert calls[1].headers["anthropic-beta"] == "computer-use-2025-01-24"
    assert calls[2].headers["anthropic-version"] == "2024-01-01"


def test_messages__the_beta_clients_query_string_goes_upstream_and_into_the_key(client, fake_upstream):
    """Claude Code (the TypeScript SDK's beta client) posts to /v1/messages?beta=true."""
    beta = {"beta": "true"}

    def beta_create():
        raw = client.beta.messages.with_raw_response.create(model=MODEL, max_tokens=256, messages=USER,
                                                            extra_query=beta)
        return raw.parse(), raw.headers

    first, first_headers = beta_create()
    again, again_headers = beta_create()
    streamed = client.beta.messages.stream(model=MODEL, max_tokens=256, messages=USER, extra_query=beta)
    with streamed as stream:
        final, stream_headers = stream.get_final_message(), stream.response.headers
    _, plain = create(client)
    _, other_query = create(client, extra_query={"beta": "false"})
    assert [h[STATUS] for h in (first_headers, again_headers, stream_headers, plain, other_query)] == [
        "MISS", "HIT", "HIT", "MISS", "MISS"]
    assert again.model_dump() == first.model_dump() and final.content[0].text == first.content[0].text
    assert [call.query for call in fake_upstream.calls("/messages")] == ["beta=true", "", "beta=false"]


def test_messages__prompt_caching_is_forwarded_and_keyed(http, proxy, fake_upstream):
    system = [{"type": "text", "text": "You operate a computer.", "cache_control": {"type": "ephemeral"}}]
    body = {"model": MODEL, "max_tokens": 16, "messages": USER, "system": system}
    assert http.post(proxy.url + "/v1/messages", json=body).headers[STATUS] == "MISS"
    top = {**body, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    assert http.post(proxy.url + "/v1/messages", json=top).headers[STATUS] == "MISS"
    assert http.post(proxy.url + "/v1/messages", json=top).headers[STATUS] == "HIT"
    forwarded = [call.json for call in fake_upstream.calls("/messages")]
    assert forwarded[0]["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert forwarded[1]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}


def test_messages__our_cache_switch_is_not_forwarded(http, proxy, fake_upstream):
    body = {"model": MODEL, "max_tokens": 16, "messages": USER, "cache_control": {"enabled": False}}
    response = http.post(proxy.url + "/v1/messages", json=body)
    assert response.headers[STATUS] == "BYPASS"
    assert "cache_control" not in fake_upstream.calls("/messages")[0].json


def test_messages__client_keys_are_forwarded_as_sent_and_partition_the_cache(start_proxy, fake_upstream):
    proxy = start_proxy(upstream_api_key="")
    # This SDK sends api_key as a bearer token; Claude Code and older SDKs send x-api-key.
    by_x_api_key = anthropic.Anthropic(base_url=proxy.url, default_headers={"X-Api-Key": "sk-ant-one"},
                                       max_retries=0)
    by_bearer = anthropic.Anthropic(base_url=proxy.url, auth_token="sk-ant-two", max_retries=0)
    statuses = [create(by_x_api_key)[1][STATUS], create(by_bearer)[1][STATUS],
                create(by_x_api_key)[1][STATUS], create(by_bearer)[1][STATUS]]
    assert statuses == ["MISS", "MISS", "HIT", "HIT"]
    first, second = fake_upstream.calls("/messages")
    assert first.headers["x-api-key"] == "sk-ant-one" and "authorization" not in first.headers
    assert second.headers["authorization"] == "Bearer sk-ant-two" and "x-api-key" not in second.headers


@pytest.mark.parametrize("auth, header, value", [
    ("auto", "authorization", "Bearer sk-ant-server"),  # not anthropic.com: bearer (OpenRouter)
    ("x-api-key", "x-api-key", "sk-ant-server"),
])
def test_messages__server_key_wins_and_is_sent_the_upstreams_way(start_proxy, fake_upstream, auth, header, value):
    proxy = start_proxy(anthropic_upstream_api_key="sk-ant-server", anthropic_upstream_auth=auth)
    one = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-one", max_retries=0)
    two = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-two", max_retries=0)
    assert (create(one)[1][STATUS], create(two)[1][STATUS]) == ("MISS", "HIT")  # shared cache
    call = fake_upstream.calls("/messages")[0]
    assert call.headers[header] == value
    assert "sk-ant-one" not in json.dumps(call.headers)


def test_messages__target_for_anthropic_itself_uses_x_api_key():
    from config import load_settings
    target = MESSAGES.upstream_target(load_settings(
        {}, anthropic_upstream_base_url="https://api.anthropic.com/v1", anthropic_upstream_api_key="k"))
    assert (target.base_url, target.key_header) == ("https://api.anthropic.com/v1", "x-api-key")


def test_messages__own_upstream_base_url(start_proxy, fake_upstream):
    with FakeUpstream() as anthropic_upstream:
        proxy = start_proxy(anthropic_upstream_base_url=anthropic_upstream.base_url,
                            anthropic_upstream_api_key="sk-ant-server")
        client = anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0)
        message, _ = create(client)
        assert message.content[0].text == "echo: Open the settings page."
        assert len(anthropic_upstream.calls("/messages")) == 1
    assert fake_upstream.calls("/messages") == []


def test_messages__count_tokens_is_forwarded(client, fake_upstream):
    counted = client.messages.count_tokens(model=MODEL, messages=USER)
    assert counted.input_tokens > 0
    assert fake_upstream.calls("/messages/count_tokens")[0].json["messages"] == USER
    # Claude Code asks with ?beta=true: the query goes upstream too.
    raw = client.messages.with_raw_response.count_tokens(model=MODEL, messages=USER,
                                                         extra_query={"beta": "true"})
    assert raw.headers[STATUS] == "BYPASS" and raw.parse().input_tokens == counted.input_tokens
    assert fake_upstream.calls("/messages/count_tokens")[1].query == "beta=true"


# -- errors --------------------------------------------------------------------------------------


def test_messages__proxy_made_errors_raise_the_sdks_classes(client, fake_upstream):
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=16, messages=[])
    assert caught.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                           "message": "messages must be a non-empty array."}}
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="", max_tokens=16, messages=USER)
    assert fake_upstream.calls("/messages") == []


def test_messages__bad_json_gets_anthropics_error_shape(http, proxy):
    response = http.post(proxy.url + "/v1/messages", data=b"{not json",
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers[STATUS] == "BYPASS"


def test_messages__proxy_key_failure_is_an_authentication_error(start_proxy):
    proxy = start_proxy(proxy_api_keys=("sk-proxy-key",))
    client = anthropic.Anthropic(base_url=proxy.url, auth_token="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(model=MODEL, max_tokens=16, messages=USER)
    assert caught.value.body["error"]["type"] == "authentication_error"
    claude_code = anthropic.Anthropic(base_url=proxy.url, default_headers={"X-Api-Key": "sk-proxy-key"},
                                      max_retries=0)
    assert claude_code.messages.create(model=MODEL, max_tokens=16, messages=USER).content


def test_messages__upstream_errors_pass_through(client, fake_upstream):
    fake_upstream.enqueue(anthropic_error_reply(529, "overloaded_error", "Overloaded"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model=MODEL, max_tokens=16, messages=USER)
    assert caught.value.status_code == 529
    assert caught.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    _, headers = create(client)
    assert headers[STATUS] == "MISS"


# -- where images and tool ids live --------------------------------------------------------------


def test_messages_api__inline_images_and_tool_ids_in_document_order():
    shot = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    body = {
        "system": [{"type": "image", "source": dict(shot, data="AAAA")}, {"type": "text", "text": "sys"}],
        "messages": [
            {"role": "user", "content": [{"type": "image", "source": shot}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "computer", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                          "content": [{"type": "image", "source": dict(shot, media_type="image/jpeg")}]},
                                         {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
        ],
    }
    images = list(MESSAGES.inline_images(body))
    assert [(slot.holder[slot.key], slot.encoding, slot.media_type) for slot in images] == [
        ("AAAA", "base64", "image/png"), ("iVBORw0KGgo=", "base64", "image/png"),
        ("iVBORw0KGgo=", "base64", "image/jpeg")]
    ids = list(MESSAGES.tool_call_ids(body))
    assert [(slot.key, slot.holder[slot.key]) for slot in ids] == [("id", "toolu_1"), ("tool_use_id", "toolu_1")]


def test_settings__anthropic_key_falls_back_and_auth_style_is_checked():
    from config import SettingsError, load_settings
    assert load_settings({"ANTHROPIC_API_KEY": "sk-ant"}).anthropic_upstream_api_key == "sk-ant"
    assert load_settings({"ANTHROPIC_UPSTREAM_API_KEY": "a", "ANTHROPIC_API_KEY": "b"}).anthropic_upstream_api_key == "a"
    with pytest.raises(SettingsError, match="ANTHROPIC_UPSTREAM_AUTH"):
        load_settings({"ANTHROPIC_UPSTREAM_AUTH": "basic"})
    with pytest.raises(SettingsError, match="ANTHROPIC_UPSTREAM_API_KEY"):
        load_settings({"PROXY_API_KEYS": "p", "UPSTREAM_API_KEY": "u",
                       "ANTHROPIC_UPSTREAM_BASE_URL": "https://api.anthropic.com/v1"})


def test_messages__a_computer_use_loop_replays_from_the_cache(start_proxy, fake_upstream):
    """Claude's computer-use loop through the beta client: a screenshot action, then the screenshot
    as a base64 PNG in a tool_result. Run again (a new session id), every step is a HIT and the
    tool ids the cache hands out chain the same way."""
    from test_responses_wire import png_data_url

    screenshot = png_data_url(64, 48, (32, 64, 128)).split(",", 1)[1]
    proxy = start_proxy()
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-client", max_retries=0)
    tools = [{"type": "computer_20250124", "name": "computer", "display_width_px": 1024,
              "display_height_px": 768}]

    def run(session: str) -> tuple[list[str], list]:
        statuses, answers = [], []
        messages = [{"role": "user", "content": "Open the settings page."}]
        for _ in range(2):
            raw = client.beta.messages.with_raw_response.create(
                model=MODEL, max_tokens=512, tools=tools, messages=messages, betas=["computer-use-2025-01-24"],
                metadata={"user_id": session})
            message = raw.parse()
            statuses.append(raw.headers[STATUS])
            answers.append(message.model_dump(mode="json", exclude_none=True))
            calls = [block for block in message.content if block.type == "tool_use"]
            if not calls:
                break
            messages += [{"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in message.content]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": [
                             {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                          "data": screenshot}}]}]}]
        return statuses, answers

    fake_upstream.enqueue(
        json_reply(anthropic_message([{"type": "tool_use", "id": "toolu_shot", "name": "computer",
                                       "input": {"action": "screenshot"}}], id="msg_1")),
        json_reply(anthropic_message("The settings page is open.", id="msg_2")))
    first_statuses, first_answers = run("session-a")
    second_statuses, second_answers = run("session-b")
    assert first_statuses == ["MISS", "MISS"] and second_statuses == ["HIT", "HIT"]
    assert second_answers == first_answers
    calls = fake_upstream.calls("/messages")
    assert len(calls) == 2
    assert calls[0].headers["anthropic-beta"] == "computer-use-2025-01-24"
    assert calls[1].json["messages"][2]["content"][0]["content"][0]["source"]["data"] == screenshot


def test_messages__browsers_may_send_anthropics_headers(http, proxy):
    response = http.options(proxy.url + "/v1/messages", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, anthropic-version, anthropic-beta"})
    allowed = {name.strip().lower() for name in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert response.status_code == 204
    assert {"x-api-key", "anthropic-version", "anthropic-beta"} <= allowed


def test_messages__an_unexpected_failure_is_an_anthropic_api_error(broken_messages_client):
    response = broken_messages_client.post("/v1/messages", json={"model": MODEL, "messages": USER})
    assert response.status_code == 500
    assert response.get_json() == {"type": "error", "error": {
        "type": "api_error", "message": "The cache server failed unexpectedly."}}


@pytest.fixture
def broken_messages_client(app, monkeypatch):
    def broken(body):
        raise RuntimeError("boom")
    monkeypatch.setattr(MESSAGES, "validate", broken)
    return app.test_client()
