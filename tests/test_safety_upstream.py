"""Upstream faults over real sockets: 502/504 OpenAI errors, answers keep their status, nothing stored."""

from __future__ import annotations

import gzip
import json
import socket
import time

import openai
import pytest

from fake_upstream import (Reply, chat_completion, close_reply, error_reply, raw_reply, redirect_reply,
                           stall_reply, trickle_reply, truncated_body_reply)
from helpers import chat_body

CHAT = "/v1/chat/completions"


def assert_upstream_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    return error


def assert_nothing_stored(proxy) -> None:
    assert proxy.store.stats()["entries"] == 0


class _BrokenChunkedReply(Reply):
    """A chunked body whose framing is garbage after the first chunk."""

    delay = 0.0

    def send(self, exchange) -> None:
        exchange.send_head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        exchange.wfile.write(b'5\r\n{"id"\r\nZZZ\r\nnot a chunk\r\n')
        exchange.abort()


@pytest.fixture
def refusing_port():
    """A loopback port nobody listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def unanswered_port():
    """A listening socket that never accepts, its backlog full: new connects hang (SYNs dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


@pytest.mark.parametrize("stream", [False, True])
def test_connect__refused_is_502(start_proxy, http, refusing_port, stream):
    proxy = start_proxy(upstream_base_url=f"http://127.0.0.1:{refusing_port}/v1")
    response = http.post(proxy.url + CHAT, json=chat_body(stream=stream))
    assert_upstream_error(response, 502, "upstream_request_failed")
    assert_nothing_stored(proxy)


@pytest.mark.parametrize("stream", [False, True])
def test_connect__timeout_is_504(start_proxy, http, unanswered_port, stream):
    proxy = start_proxy(upstream_base_url=f"http://127.0.0.1:{unanswered_port}/v1",
                        upstream_timeout_seconds=0.5)
    started = time.monotonic()
    response = http.post(proxy.url + CHAT, json=chat_body(stream=stream))
    assert time.monotonic() - started < 2.0
    assert_upstream_error(response, 504, "upstream_timeout")
    assert_nothing_stored(proxy)


@pytest.mark.parametrize("stream", [False, True])
def test_read__stall_before_headers_is_504_within_the_deadline(start_proxy, fake_upstream, http, stream):
    proxy = start_proxy(upstream_timeout_seconds=0.6)
    fake_upstream.enqueue(stall_reply(5))
    started = time.monotonic()
    response = http.post(proxy.url + CHAT, json=chat_body(stream=stream))
    elapsed = time.monotonic() - started
    assert_upstream_error(response, 504, "upstream_timeout")
    assert 0.5 < elapsed < 1.5
    assert_nothing_stored(proxy)


def test_read__trickle_forever_is_504_at_the_total_deadline(start_proxy, fake_upstream, http):
    proxy = start_proxy(upstream_timeout_seconds=1.0)
    fake_upstream.enqueue(trickle_reply(total_seconds=10, interval=0.1))
    started = time.monotonic()
    response = http.post(proxy.url + CHAT, json=chat_body())
    elapsed = time.monotonic() - started
    assert_upstream_error(response, 504, "upstream_timeout")
    assert 0.9 < elapsed < 2.0, elapsed
    assert_nothing_stored(proxy)


def test_body__fewer_bytes_than_content_length_is_502(proxy, fake_upstream, http):
    fake_upstream.enqueue(truncated_body_reply(json.dumps(chat_completion())[:40], declared_length=500))
    response = http.post(proxy.url + CHAT, json=chat_body())
    assert_upstream_error(response, 502, "upstream_request_failed")
    assert_nothing_stored(proxy)


def test_body__broken_chunked_framing_is_502(proxy, fake_upstream, http):
    fake_upstream.enqueue(_BrokenChunkedReply())
    response = http.post(proxy.url + CHAT, json=chat_body())
    assert_upstream_error(response, 502, "upstream_request_failed")
    assert_nothing_stored(proxy)


def test_body__close_without_a_reply_is_502(proxy, fake_upstream, http):
    fake_upstream.enqueue(close_reply())
    response = http.post(proxy.url + CHAT, json=chat_body())
    assert_upstream_error(response, 502, "upstream_request_failed")
    assert_nothing_stored(proxy)


def test_body__service_keeps_answering_after_faults(proxy, fake_upstream, openai_client):
    fake_upstream.enqueue(close_reply(), truncated_body_reply(b'{"id"', 100))
    for _ in range(2):
        with pytest.raises(openai.APIStatusError):
            openai_client.chat.completions.create(**chat_body())
    answer = openai_client.chat.completions.create(**chat_body())
    assert answer.choices[0].message.content.startswith("echo:")


def test_gzip__client_gets_a_decodable_body_without_content_encoding(proxy, fake_upstream, openai_client):
    completion = chat_completion("zipped", id="chatcmpl-gz")
    fake_upstream.enqueue(raw_reply(json.dumps(completion), gzip=True))
    raw = openai_client.chat.completions.with_raw_response.create(**chat_body())
    assert "content-encoding" not in {name.lower() for name in raw.headers}
    assert raw.parse().choices[0].message.content == "zipped"
    # It was stored decoded, so the hit is the same JSON.
    hit = openai_client.chat.completions.with_raw_response.create(**chat_body())
    assert hit.headers["X-Computer-Use-Cache"] == "HIT"
    assert hit.parse().id == "chatcmpl-gz"


def test_gzip__error_body_is_decoded_too(proxy, fake_upstream, http):
    body = json.dumps({"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}})
    fake_upstream.enqueue(raw_reply(body, status=400, gzip=True))
    response = http.post(proxy.url + CHAT, json=chat_body(), headers={"Accept-Encoding": "identity"})
    assert response.status_code == 400
    assert "Content-Encoding" not in response.headers
    assert response.content == body.encode()


@pytest.mark.parametrize("stream", [False, True])
def test_redirect__never_followed_and_502(proxy, fake_upstream, http, stream):
    statuses = (301, 302, 303, 307, 308)
    for status in statuses:
        fake_upstream.enqueue(redirect_reply(fake_upstream.base_url + "/elsewhere", status=status))
        response = http.post(proxy.url + CHAT, json=chat_body(stream=stream),
                             headers={"Authorization": "Bearer sk-client"})
        error = assert_upstream_error(response, 502, "upstream_request_failed")
        assert "redirect" in error["message"]
    time.sleep(0.1)
    assert [recorded.path for recorded in fake_upstream.requests] == ["/v1/chat/completions"] * len(statuses)
    assert_nothing_stored(proxy)


@pytest.mark.parametrize("stream", [False, True])
def test_retry_after__passed_through_with_status_and_body(proxy, fake_upstream, http, stream):
    # The same body each time, as an SDK retrying after a 429 sends it: no retry may wait on the
    # previous attempt's coalescing slot (UPSTREAM_TIMEOUT_SECONDS is 10 s here).
    started = time.monotonic()
    for status in (429, 500, 503):
        fake_upstream.enqueue(error_reply(status, f"slow down {status}", headers={"Retry-After": "7"}))
        response = http.post(proxy.url + CHAT, json=chat_body(stream=stream))
        assert response.status_code == status
        assert response.headers["Retry-After"] == "7"
        assert response.json()["error"]["message"] == f"slow down {status}"
        assert response.headers["X-Computer-Use-Cache"] == "BYPASS"
    assert time.monotonic() - started < 3.0
    assert_nothing_stored(proxy)


def test_models__upstream_refusing_is_502(start_proxy, http, refusing_port):
    proxy = start_proxy(upstream_base_url=f"http://127.0.0.1:{refusing_port}/v1")
    assert_upstream_error(http.get(proxy.url + "/v1/models"), 502, "upstream_request_failed")


def test_retry_after__sdk_sees_the_rate_limit(proxy, fake_upstream, openai_client):
    fake_upstream.enqueue(error_reply(429, "slow down", headers={"Retry-After": "3"}))
    with pytest.raises(openai.RateLimitError) as caught:
        openai_client.chat.completions.create(**chat_body())
    assert caught.value.response.headers["retry-after"] == "3"


def test_not_json__complete_200_is_passed_through_unstored(proxy, fake_upstream, http):
    fake_upstream.enqueue(raw_reply("<html>hello</html>", content_type="text/html"))
    response = http.post(proxy.url + CHAT, json=chat_body())
    assert response.status_code == 200
    assert response.text == "<html>hello</html>"
    assert response.headers["X-Computer-Use-Cache-Bypass-Reason"] == "upstream response was not JSON"
    assert_nothing_stored(proxy)


def test_gzip__truncated_gzip_is_502(proxy, fake_upstream, http):
    data = gzip.compress(json.dumps(chat_completion()).encode())
    fake_upstream.enqueue(_TruncatedGzip(data[: len(data) // 2], len(data)))
    response = http.post(proxy.url + CHAT, json=chat_body())
    assert_upstream_error(response, 502, "upstream_request_failed")
    assert_nothing_stored(proxy)


class _TruncatedGzip(Reply):
    delay = 0.0

    def __init__(self, data: bytes, declared: int):
        self.data, self.declared = data, declared

    def send(self, exchange) -> None:
        exchange.send_head(200, {"Content-Type": "application/json", "Content-Encoding": "gzip",
                                 "Content-Length": self.declared})
        exchange.wfile.write(self.data)
        exchange.abort()
