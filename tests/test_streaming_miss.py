"""A cacheable streamed miss reaches the client as it arrives and is stored once it proved whole."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from fake_upstream import (BASE_CREATED, chat_completion, chunks_from_completion, error_reply, sse_reply)
from helpers import chat_body, completion_body
from streaming_checks import accumulate_chat_chunks, assert_matches, read_sse, sse_comments

PARALLEL_CALLS = chat_completion(
    None, id="chatcmpl-live-tools", usage={"prompt_tokens": 76, "completion_tokens": 24, "total_tokens": 100},
    tool_calls=[
        {"id": "call_1", "type": "function",
         "function": {"name": "click", "arguments": '{"x": 12, "y": 340, "button": "left"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "type_text", "arguments": '{"text": "grüße 👋 from the agent"}'}},
    ])


def _sse(response) -> list[dict]:
    return [json.loads(payload) for payload in read_sse(response) if payload != "[DONE]"]


@pytest.mark.parametrize("client_asks_usage", [False, True])
def test_stream_miss__tool_call_pieces_are_stored_then_hit_streamed_and_not(
        client_asks_usage, proxy, openai_client, fake_upstream, http):
    # The proxy asks the upstream for usage either way, so the upstream sends the usage chunk.
    upstream_chunks = chunks_from_completion(PARALLEL_CALLS, include_usage=True, piece=3)
    fake_upstream.enqueue(sse_reply(upstream_chunks))
    body = chat_body("Click then type", stream=True)
    if client_asks_usage:
        body["stream_options"] = {"include_usage": True}

    miss = http.post(proxy.url + "/v1/chat/completions", json=body)
    assert miss.status_code == 200
    assert miss.headers["X-Computer-Use-Cache"] == "MISS"
    key = miss.headers["X-Computer-Use-Cache-Key"]
    chunks = _sse(miss)
    forwarded = fake_upstream.calls()[0].json
    assert forwarded["stream_options"] == {"include_usage": True}
    if client_asks_usage:
        assert chunks == upstream_chunks, "relayed exactly as the upstream sent it"
    else:
        # Exactly the stream the client would have had without the proxy's ask for usage.
        assert chunks == [{k: v for k, v in chunk.items() if k != "usage"}
                          for chunk in upstream_chunks if chunk["choices"]]

    # Streamed again: a hit the SDK accumulates into the same completion, usage included.
    raw = openai_client.chat.completions.with_raw_response.create(
        **{**body, "stream_options": {"include_usage": True}})
    assert (raw.headers["X-Computer-Use-Cache"], raw.headers["X-Computer-Use-Cache-Key"]) == ("HIT", key)
    assert_matches(PARALLEL_CALLS, accumulate_chat_chunks([chunk.to_dict() for chunk in raw.parse()]))
    with openai_client.chat.completions.stream(**{k: v for k, v in body.items() if k != "stream"}) as stream:
        final = stream.get_final_completion()
    assert [call.function.name for call in final.choices[0].message.tool_calls] == ["click", "type_text"]

    # Not streamed: a hit whose JSON is exactly the completion the upstream streamed.
    plain = http.post(proxy.url + "/v1/chat/completions", json={**body, "stream": False})
    assert plain.headers["X-Computer-Use-Cache"] == "HIT"
    assert plain.json() == PARALLEL_CALLS
    assert len(fake_upstream.calls()) == 1


def test_stream_miss__n_choices_interleaved_are_stored_in_order(openai_client, fake_upstream, http, proxy):
    # The default fake answer: n echo choices, interleaved chunk by chunk, usage as asked.
    body = chat_body("Three ways", n=3, stream=True)
    streamed = list(openai_client.chat.completions.create(**body))
    assert {chunk.usage for chunk in streamed} == {None}
    plain = http.post(proxy.url + "/v1/chat/completions", json={**body, "stream": False})
    assert plain.headers["X-Computer-Use-Cache"] == "HIT"
    stored = plain.json()
    assert [c["message"]["content"] for c in stored["choices"]] == [
        "echo: Three ways", "echo: Three ways [1]", "echo: Three ways [2]"]
    assert [c["index"] for c in stored["choices"]] == [0, 1, 2]
    assert {c["finish_reason"] for c in stored["choices"]} == {"stop"}
    assert stored["usage"]["total_tokens"] > 0
    with openai_client.chat.completions.stream(**{k: v for k, v in body.items() if k != "stream"}) as stream:
        final = stream.get_final_completion()
    assert [c.message.content for c in final.choices] == [c["message"]["content"] for c in stored["choices"]]
    assert len(fake_upstream.calls()) == 1


def test_stream_miss__keepalive_comments_are_relayed_but_not_stored(proxy, fake_upstream, http):
    completion = chat_completion("Processing took a while.", id="gen-slow")
    chunks = chunks_from_completion(completion, include_usage=True)
    events = [": OPENROUTER PROCESSING", ": OPENROUTER PROCESSING", *chunks[:2], ": OPENROUTER PROCESSING",
              *chunks[2:]]
    fake_upstream.enqueue(sse_reply(events))
    body = chat_body("Slow one", stream=True)
    miss = http.post(proxy.url + "/v1/chat/completions", json=body)
    assert sse_comments(miss.content) == [": OPENROUTER PROCESSING"] * 3

    hit = http.post(proxy.url + "/v1/chat/completions", json=body)
    assert hit.headers["X-Computer-Use-Cache"] == "HIT"
    assert sse_comments(hit.content) == []
    assert b"OPENROUTER" not in hit.content
    assert http.post(proxy.url + "/v1/chat/completions", json={**body, "stream": False}).json() == completion


def test_stream_miss__first_chunk_reaches_the_client_at_once(openai_client, fake_upstream):
    completion = chat_completion("A slow model writes this one piece at a time.", id="chatcmpl-ttfb")
    fake_upstream.enqueue(sse_reply(chunks_from_completion(completion, include_usage=True), delay_between=1.0))
    started = time.monotonic()
    stream = openai_client.chat.completions.create(**chat_body("Be slow"), stream=True)
    first = next(iter(stream))
    elapsed = time.monotonic() - started
    stream.close()
    assert first.choices[0].delta.role == "assistant"
    assert elapsed < 0.3, f"first chunk took {elapsed:.3f}s; the upstream sent it at once"


def test_stream_miss__openrouter_reasoning_and_extras_are_assembled(proxy, fake_upstream, http):
    header = {"id": "gen-42", "provider": "Anthropic", "model": "anthropic/claude-sonnet-4",
              "object": "chat.completion.chunk", "created": BASE_CREATED}

    def chunk(delta, finish=None, native=None, **extra):
        return {**header, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                       "native_finish_reason": native, "logprobs": None}], **extra}

    detail = {"type": "reasoning.text", "format": "anthropic-claude-v1", "index": 0}
    usage = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30, "cost": 0.00042,
             "is_byok": False, "completion_tokens_details": {"reasoning_tokens": 8}}
    events = [
        chunk({"role": "assistant", "content": "", "reasoning": None}),
        chunk({"role": "assistant", "content": "", "reasoning": "Look at ",
               "reasoning_details": [{**detail, "text": "Look at "}]}),
        chunk({"role": "assistant", "content": "", "reasoning": "the screen.",
               "reasoning_details": [{**detail, "text": "the screen."}]}),
        chunk({"role": "assistant", "content": "", "reasoning_details": [{**detail, "signature": "sig=="}]}),
        chunk({"role": "assistant", "content": "Taking a screenshot."}),
        chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "toolu_1", "type": "function",
             "function": {"name": "computer", "arguments": ""}}]}),
        chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "function": {"arguments": '{"action":"screenshot"}'}}]}),
        chunk({"role": "assistant", "content": ""}, "tool_calls", "tool_use"),
        {**header, "choices": [], "usage": usage},
    ]
    fake_upstream.enqueue(sse_reply(events))
    body = chat_body("What is on screen?", model="anthropic/claude-sonnet-4", stream=True)
    http.post(proxy.url + "/v1/chat/completions", json=body)
    stored = http.post(proxy.url + "/v1/chat/completions", json={**body, "stream": False}).json()
    assert stored == {
        "id": "gen-42", "object": "chat.completion", "provider": "Anthropic",
        "model": "anthropic/claude-sonnet-4", "created": BASE_CREATED,
        "choices": [{"index": 0, "logprobs": None, "finish_reason": "tool_calls",
                     "native_finish_reason": "tool_use",
                     "message": {"role": "assistant", "content": "Taking a screenshot.", "refusal": None,
                                 "reasoning": "Look at the screen.",
                                 "reasoning_details": [{**detail, "text": "Look at the screen.",
                                                        "signature": "sig=="}],
                                 "tool_calls": [{"id": "toolu_1", "type": "function",
                                                 "function": {"name": "computer",
                                                              "arguments": '{"action":"screenshot"}'}}]}}],
        "usage": usage,
    }


def test_stream_miss__legacy_completion_is_stored(openai_client, fake_upstream, http, proxy):
    body = completion_body(["first prompt", "second prompt"], n=2)
    texts: dict[int, str] = {}
    for chunk in openai_client.completions.create(**body, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    plain = http.post(proxy.url + "/v1/completions", json=body)
    assert plain.headers["X-Computer-Use-Cache"] == "HIT"
    stored = plain.json()
    assert stored["object"] == "text_completion"
    assert [c["text"] for c in stored["choices"]] == [texts[i] for i in range(4)]
    assert texts[3] == "echo: second prompt [1]"
    assert stored["usage"]["total_tokens"] > 0
    assert len(fake_upstream.calls("/completions")) == 1


def test_stream_miss__upstream_rejecting_stream_options_gets_the_clients_request(proxy, fake_upstream, http):
    """Some providers (older Azure API versions) reject stream_options: the proxy's own ask must
    never turn a working request into a 400."""
    completion = chat_completion("Fine without usage.", id="chatcmpl-no-opts")
    fake_upstream.enqueue(
        error_reply(400, "Unrecognized request argument supplied: stream_options", "invalid_request_error"),
        sse_reply(chunks_from_completion(completion)))
    body = chat_body("Old provider", stream=True)
    response = http.post(proxy.url + "/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert read_sse(response)[-1] == "[DONE]"
    first, second = fake_upstream.calls()
    assert "stream_options" in first.json and "stream_options" not in second.json
    hit = http.post(proxy.url + "/v1/chat/completions", json={**body, "stream": False})
    assert hit.headers["X-Computer-Use-Cache"] == "HIT"
    assert hit.json() == {k: v for k, v in completion.items() if k != "usage"}


def test_stream_miss__events_split_across_reads_and_crlf_framing(proxy, fake_upstream, http):
    """Upstream reads cut events (and a UTF-8 character) anywhere; CRLF framing is allowed by SSE."""
    completion = chat_completion("Grüße 👋🏽 aus Zürich", id="chatcmpl-split")
    frames = b"".join(
        b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\r\n\r\n"
        for chunk in chunks_from_completion(completion, include_usage=True)) + b"data: [DONE]\r\n\r\n"
    cut = frames.index("👋".encode()) + 2  # inside the emoji's four bytes
    pieces = [frames[:7], frames[7:cut], frames[cut:-3], frames[-3:]]
    fake_upstream.enqueue(sse_reply(pieces, delay_between=0.02, done=False))
    body = chat_body("Split me", stream=True)
    miss = http.post(proxy.url + "/v1/chat/completions", json=body)
    assert miss.content.replace(b"\r\n", b"\n").count(b"\n\ndata: ") >= 5
    hit = http.post(proxy.url + "/v1/chat/completions", json={**body, "stream": False})
    assert hit.headers["X-Computer-Use-Cache"] == "HIT"
    assert hit.json() == completion


def test_stream_miss__bypassed_stream_is_relayed_as_is_and_not_stored(proxy, fake_upstream, http):
    completion = chat_completion("Not for the cache.", id="chatcmpl-bypass")
    chunks = chunks_from_completion(completion)
    fake_upstream.enqueue(sse_reply(chunks))
    body = chat_body("Private", stream=True)
    response = http.post(proxy.url + "/v1/chat/completions", json=body, headers={"X-Cache-Bypass": "1"})
    assert response.headers["X-Computer-Use-Cache"] == "BYPASS"
    assert [json.loads(p) for p in read_sse(response)[:-1]] == chunks
    assert "stream_options" not in fake_upstream.calls()[0].json, "nothing to store, so no usage asked for"
    assert proxy.store.get(response.headers["X-Computer-Use-Cache-Key"]) is None


def test_stream_miss__identical_request_waiting_on_a_streamed_miss_gets_the_stored_answer(
        proxy, fake_upstream, http):
    """The stored stream releases its waiting twins: one upstream call, the twin replays the answer."""
    completion = chat_completion("Only one of us pays for this answer.", id="chatcmpl-twin")
    fake_upstream.enqueue(sse_reply(chunks_from_completion(completion, include_usage=True), delay_between=0.1))
    body = chat_body("Twins", stream=True)
    results = {}

    def twin() -> None:
        results["twin"] = http_twin.post(proxy.url + "/v1/chat/completions", json=body, timeout=10)

    with requests.Session() as http_twin:
        leader = http.post(proxy.url + "/v1/chat/completions", json=body, stream=True)
        pieces = leader.iter_content(chunk_size=None)
        assert b"assistant" in next(pieces)
        thread = threading.Thread(target=twin)
        thread.start()
        rest = b"".join(pieces)
        thread.join(10)
    assert leader.headers["X-Computer-Use-Cache"] == "MISS" and rest.endswith(b"data: [DONE]\n\n")
    twin_response = results["twin"]
    assert twin_response.headers["X-Computer-Use-Cache"] == "HIT"
    assert twin_response.headers["X-Computer-Use-Cache-Coalesced"] == "true", "it waited for the stream"
    assert_matches({k: v for k, v in completion.items() if k != "usage"},
                   accumulate_chat_chunks([json.loads(p) for p in read_sse(twin_response)[:-1]]))
    assert len(fake_upstream.calls()) == 1


def test_stream_miss__done_without_a_final_blank_line_still_counts(proxy, fake_upstream, http):
    completion = chat_completion("Terse server.", id="chatcmpl-terse")
    chunks = chunks_from_completion(completion, include_usage=True)
    fake_upstream.enqueue(sse_reply([*chunks, b"data: [DONE]"], done=False))
    body = chat_body("Terse", stream=True)
    response = http.post(proxy.url + "/v1/chat/completions", json=body)
    assert read_sse(response)[-1] == "[DONE]" and b'"error"' not in response.content
    assert http.post(proxy.url + "/v1/chat/completions", json={**body, "stream": False}).json() == completion


def test_stream_miss__usage_the_proxy_asked_for_is_cut_out_leaving_the_upstreams_bytes(proxy, fake_upstream, http):
    # A Python-served upstream writes spaced JSON with \u escapes; logprobs carry exponents.
    # The proxy asked for usage on its own account: the client gets each event without its
    # "usage": null member, every other byte as sent, and no usage chunk.
    completion = chat_completion("héllo wörld", id="chatcmpl-bytes",
                                 usage={"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    chunks = chunks_from_completion(completion, include_usage=True)
    for chunk in chunks:
        for choice in chunk["choices"]:
            choice["logprobs"] = {"content": [{"token": "h", "logprob": -1e-05, "top_logprobs": []}]}
    frames = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks]
    fake_upstream.enqueue(sse_reply(frames))  # then data: [DONE]
    body = chat_body("Say hello", stream=True)

    miss = http.post(proxy.url + "/v1/chat/completions", json=body)

    assert miss.headers["X-Computer-Use-Cache"] == "MISS"
    expected = "".join(frame.replace(', "usage": null', "") for frame in frames
                       if '"choices": []' not in frame) + "data: [DONE]\n\n"
    assert miss.content == expected.encode()
    assert b"\\u00e9" in miss.content and b"-1e-05" in miss.content and b'"usage"' not in miss.content
    stored = http.post(proxy.url + "/v1/chat/completions", json={**body, "stream": False})
    assert stored.headers["X-Computer-Use-Cache"] == "HIT"
    assert stored.json()["usage"] == completion["usage"]
    assert stored.json()["choices"][0]["message"]["content"] == "héllo wörld"
