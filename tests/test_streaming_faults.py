"""Streams that go wrong are ended cleanly for the client, never stored, and never left running upstream."""

from __future__ import annotations

import json
import socket

import openai
import pytest
import requests
from fake_upstream import (chat_completion, chunks_from_completion, error_reply, json_reply, raw_reply,
                           sse_reply, truncated_sse_reply)
from helpers import chat_body
from streaming_checks import read_sse

COMPLETION = chat_completion("One two three four five six seven eight nine ten.", id="chatcmpl-fault")
CHUNKS = chunks_from_completion(COMPLETION, include_usage=True, piece=5)


def _is_stored(proxy, key: str) -> bool:
    return proxy.store.get(key) is not None


def _post_stream(http, proxy, body: dict) -> requests.Response:
    return http.post(proxy.url + "/v1/chat/completions", json={**body, "stream": True})


def test_stream_fault__truncated_stream_ends_with_an_error_event(proxy, openai_client, fake_upstream, http):
    fake_upstream.enqueue(truncated_sse_reply(CHUNKS[:4]))
    body = chat_body("Cut me off")
    response = _post_stream(http, proxy, body)
    assert response.status_code == 200
    payloads = read_sse(response)
    assert [json.loads(p) for p in payloads[:4]] == [{k: v for k, v in c.items() if k != "usage"} for c in CHUNKS[:4]]
    assert len(payloads) == 5, "the relayed chunks, then one error event, then the end"
    error = json.loads(payloads[-1])["error"]
    assert error["type"] == "upstream_error" and error["code"] and error["message"] and "param" in error
    assert not _is_stored(proxy, response.headers["X-Computer-Use-Cache-Key"])

    # The SDK turns that event into an exception instead of a silently short answer.
    fake_upstream.enqueue(truncated_sse_reply(CHUNKS[:4]))
    received = []
    with pytest.raises(openai.APIError):
        for chunk in openai_client.chat.completions.create(**body, stream=True):
            received.append(chunk)
    assert len(received) == 4
    assert len(fake_upstream.calls()) == 2


def test_stream_fault__stream_that_stops_without_done_is_not_stored(proxy, fake_upstream, http):
    """A clean end of the body, but no [DONE]: the client is told, nothing is stored."""
    fake_upstream.enqueue(sse_reply(CHUNKS[:-1], done=False))
    response = _post_stream(http, proxy, chat_body("No done"))
    payloads = read_sse(response)
    assert "error" in json.loads(payloads[-1]) and "[DONE]" not in payloads
    assert not _is_stored(proxy, response.headers["X-Computer-Use-Cache-Key"])


def test_stream_fault__mid_stream_error_chunk_is_relayed_not_stored(proxy, fake_upstream, http):
    upstream_error = {"error": {"message": "Provider returned error", "code": 502,
                                "metadata": {"provider_name": "Example"}}}
    fake_upstream.enqueue(sse_reply([*CHUNKS[:3], upstream_error], done=False))
    response = _post_stream(http, proxy, chat_body("Provider fails midway"))
    payloads = read_sse(response)
    assert json.loads(payloads[-1]) == upstream_error, "the provider's own error, and no second one"
    assert len(payloads) == 4
    assert not _is_stored(proxy, response.headers["X-Computer-Use-Cache-Key"])

    # Even when every choice finished and [DONE] follows the error chunk.
    fake_upstream.enqueue(sse_reply([*CHUNKS[:-1], upstream_error]))
    response = _post_stream(http, proxy, chat_body("Provider fails then says done"))
    assert read_sse(response)[-2:] == [json.dumps(upstream_error, separators=(",", ":")), "[DONE]"]
    assert not _is_stored(proxy, response.headers["X-Computer-Use-Cache-Key"])


def test_stream_fault__choice_without_finish_reason_is_not_stored(proxy, fake_upstream, http):
    unfinished = [chunk for chunk in CHUNKS if not (chunk["choices"] and chunk["choices"][0]["finish_reason"])]
    fake_upstream.enqueue(sse_reply(unfinished))
    response = _post_stream(http, proxy, chat_body("Never finishes"))
    assert read_sse(response)[-1] == "[DONE]"
    assert not _is_stored(proxy, response.headers["X-Computer-Use-Cache-Key"])


def test_stream_fault__missing_choice_of_n_is_not_stored(proxy, fake_upstream, http):
    """n=2 asked, one choice streamed: not a whole answer to this request."""
    fake_upstream.enqueue(sse_reply(CHUNKS))
    response = _post_stream(http, proxy, chat_body("Two please", n=2))
    assert read_sse(response)[-1] == "[DONE]"
    assert not _is_stored(proxy, response.headers["X-Computer-Use-Cache-Key"])


def test_stream_fault__upstream_error_status_is_passed_through(proxy, openai_client, fake_upstream, http):
    fake_upstream.enqueue(error_reply(429, "Slow down", headers={"Retry-After": "7"}))
    body = chat_body("Too fast")
    response = _post_stream(http, proxy, body)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert response.headers["X-Computer-Use-Cache"] == "BYPASS"
    assert response.json()["error"]["message"] == "Slow down"
    assert not _is_stored(proxy, response.headers["X-Computer-Use-Cache-Key"])

    fake_upstream.enqueue(error_reply(429, "Slow down"))
    with pytest.raises(openai.RateLimitError):
        openai_client.chat.completions.create(**body, stream=True)
    assert len(fake_upstream.calls()) == 2


def test_stream_fault__non_sse_body_is_passed_through(proxy, fake_upstream, http):
    fake_upstream.enqueue(raw_reply("<html>maintenance</html>", content_type="text/html"))
    response = _post_stream(http, proxy, chat_body("Maintenance"))
    assert response.status_code == 200
    assert response.text == "<html>maintenance</html>"
    assert response.headers["X-Computer-Use-Cache"] == "BYPASS"
    assert not _is_stored(proxy, response.headers["X-Computer-Use-Cache-Key"])

    fake_upstream.enqueue(json_reply(COMPLETION))
    response = _post_stream(http, proxy, chat_body("JSON instead of a stream"))
    assert response.json() == COMPLETION
    assert not _is_stored(proxy, response.headers["X-Computer-Use-Cache-Key"])


def test_stream_fault__unreachable_upstream_is_a_502_error_object(start_proxy, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    proxy = start_proxy(upstream_base_url=f"http://127.0.0.1:{closed_port}/v1")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(**chat_body("Anyone there?"), stream=True)
    assert raised.value.status_code == 502
    error = raised.value.body
    assert set(error) >= {"message", "type", "param", "code"} and error["type"] == "upstream_error"


def test_stream_fault__client_leaving_mid_stream_closes_the_upstream(proxy, openai_client, fake_upstream):
    fake_upstream.enqueue(sse_reply(CHUNKS, delay_between=0.2))
    raw = openai_client.chat.completions.with_raw_response.create(**chat_body("Leave early"), stream=True)
    stream = raw.parse()
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    stream.close()
    assert fake_upstream.wait_for_disconnect(timeout=2.0), "the upstream kept streaming to nobody"
    assert not _is_stored(proxy, raw.headers["X-Computer-Use-Cache-Key"])


def test_stream_fault__client_leaving_before_the_first_byte_closes_the_upstream(proxy, fake_upstream):
    """The client hangs up while the upstream is still thinking; the proxy drops the upstream
    as soon as there is something to write."""
    fake_upstream.enqueue(sse_reply(CHUNKS, first_delay=0.3, delay_between=0.2))
    body = json.dumps({**chat_body("Leave before anything"), "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert fake_upstream.wait_for_requests(1)
    assert fake_upstream.wait_for_disconnect(timeout=2.0), "the upstream kept streaming to nobody"
    assert proxy.store.stats()["entries"] == 0


def test_stream_fault__upstream_stalling_past_the_deadline_ends_with_an_error_event(
        start_proxy, fake_upstream, http):
    proxy = start_proxy(upstream_timeout_seconds=0.5)
    fake_upstream.enqueue(sse_reply(CHUNKS, delay_between=1.2))
    response = _post_stream(http, proxy, chat_body("Stall"))
    payloads = read_sse(response)
    assert len(payloads) == 2, "the first chunk, then the error event"
    assert json.loads(payloads[-1])["error"]["code"] == "upstream_timeout"
    assert not _is_stored(proxy, response.headers["X-Computer-Use-Cache-Key"])
    assert fake_upstream.wait_for_disconnect(timeout=2.0)


@pytest.mark.parametrize("reply", [error_reply(429, "Slow down"), raw_reply("<html>busy</html>", content_type="text/html"),
                                   truncated_sse_reply(CHUNKS[:2])], ids=["429", "not_sse", "truncated"])
def test_stream_fault__a_failed_stream_lets_the_next_identical_request_through(reply, proxy, fake_upstream, http):
    """The coalescing flight of a failed stream is released: a repeat goes upstream at once."""
    fake_upstream.enqueue(reply)
    body = chat_body("Fail then retry")
    _post_stream(http, proxy, body)
    fake_upstream.enqueue(sse_reply(CHUNKS))
    retry = http.post(proxy.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=3)
    assert retry.headers["X-Computer-Use-Cache"] == "MISS"
    assert read_sse(retry)[-1] == "[DONE]"
    assert len(fake_upstream.calls()) == 2
