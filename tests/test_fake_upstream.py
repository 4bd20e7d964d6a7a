"""Tests for the fake upstream itself: if it lies about the wire format, every proxy test lies too."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from fake_upstream import (
    FakeUpstream,
    chat_completion,
    chunks_from_completion,
    close_reply,
    error_reply,
    json_reply,
    raw_reply,
    redirect_reply,
    sse_reply,
    stall_reply,
    trickle_reply,
    truncated_body_reply,
    truncated_sse_reply,
)


@pytest.fixture
def fake():
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def sdk_client(fake):
    return openai.OpenAI(base_url=fake.base_url, api_key="test", max_retries=0, timeout=5)


def post_chat(fake, **body):
    payload = {"model": "test/model-a", "messages": [{"role": "user", "content": "hi"}], **body}
    return requests.post(f"{fake.base_url}/chat/completions", json=payload, timeout=5)


def sse_frames(response) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order."""
    return [line[len("data: ") :] for line in response.text.split("\n\n") if line.startswith("data: ")]


def sse_json(response) -> list[dict]:
    frames = sse_frames(response)
    assert frames[-1] == "[DONE]"
    return [json.loads(frame) for frame in frames[:-1]]


# --------------------------------------------------------------------------- defaults


def test_models_and_unknown_path(fake):
    for path in ("/v1/models", "/models"):
        body = requests.get(f"http://127.0.0.1:{fake.port}{path}", timeout=5).json()
        assert body["data"][0]["id"] == "test/model-a"
    missing = requests.get(f"{fake.base_url}/nope", timeout=5)
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_default_chat_is_an_echo_with_a_unique_id(fake):
    first = post_chat(
        fake,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:,"}}],
            }
        ],
    )
    second = post_chat(fake, model="other/model")
    one, two = first.json(), second.json()
    assert first.headers["Content-Type"] == "application/json"
    assert one["object"] == "chat.completion" and one["model"] == "test/model-a"
    assert one["choices"][0]["message"] == {"role": "assistant", "content": "echo: look", "refusal": None}
    assert one["choices"][0]["finish_reason"] == "stop" and one["choices"][0]["logprobs"] is None
    assert one["id"] != two["id"] and one["created"] != two["created"]
    assert two["model"] == "other/model" and two["choices"][0]["message"]["content"] == "echo: hi"
    usage = one["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    recorded = fake.calls()
    assert [r.path for r in recorded] == ["/v1/chat/completions"] * 2
    assert recorded[1].json["model"] == "other/model" and recorded[1].headers["content-type"] == "application/json"


def test_n_choices(fake):
    choices = post_chat(fake, n=2).json()["choices"]
    assert [(c["index"], c["message"]["content"]) for c in choices] == [(0, "echo: hi"), (1, "echo: hi [1]")]


def test_stream_without_usage(fake):
    response = post_chat(fake, stream=True, messages=[{"role": "user", "content": "hello world"}])
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Transfer-Encoding"] == "chunked"
    chunks = sse_json(response)
    assert all("usage" not in chunk for chunk in chunks)
    assert len({(c["id"], c["created"], c["model"], c["system_fingerprint"], c["object"]) for c in chunks}) == 1
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["system_fingerprint"] == "fp_fake"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == "echo: hello world" and len(pieces) > 3
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_stream_with_include_usage_and_n(fake):
    response = post_chat(fake, stream=True, n=2, stream_options={"include_usage": True})
    chunks = sse_json(response)
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
    assert texts == {0: "echo: hi", 1: "echo: hi [1]"}
    assert chunks[0]["choices"][0]["index"] == 0


def test_legacy_completions_plain_and_streamed(fake):
    url = f"{fake.base_url}/completions"
    plain = requests.post(url, json={"model": "m", "prompt": "say"}, timeout=5).json()
    assert plain["object"] == "text_completion" and plain["id"].startswith("cmpl-fake-")
    assert plain["choices"] == [{"text": "echo: say", "index": 0, "logprobs": None, "finish_reason": "stop"}]
    streamed = requests.post(
        url, json={"model": "m", "prompt": "say", "stream": True, "stream_options": {"include_usage": True}}, timeout=5
    )
    chunks = sse_json(streamed)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "echo: say"
    assert chunks[-2]["choices"][0]["text"] == "" and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_openai_sdk_plain_and_streamed(sdk_client):
    plain = sdk_client.chat.completions.create(model="test/model-a", messages=[{"role": "user", "content": "sdk"}])
    assert plain.choices[0].message.content == "echo: sdk"
    with sdk_client.chat.completions.stream(
        model="test/model-a", messages=[{"role": "user", "content": "streamed"}], stream_options={"include_usage": True}
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "echo: streamed"
    assert final.choices[0].message.role == "assistant" and final.choices[0].finish_reason == "stop"
    assert final.usage is not None and final.usage.total_tokens > 0
    assert final.id != plain.id


# --------------------------------------------------------------------------- chunks_from_completion


def test_parallel_tool_calls_survive_the_sdk_accumulator(fake, sdk_client):
    tool_calls = [
        {"id": "call_1", "type": "function", "function": {"name": "click", "arguments": '{"x": 12, "y": 340}'}},
        {"id": "call_2", "type": "function", "function": {"name": "type_text", "arguments": '{"text": "hello there"}'}},
    ]
    source = chat_completion(None, id="chatcmpl-tools", tool_calls=tool_calls)
    chunks = chunks_from_completion(source, include_usage=True)
    openers = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and "id" in str(c["choices"][0]["delta"].get("tool_calls"))
    ]
    assert [o["id"] for o in openers] == ["call_1", "call_2"]
    assert all(o["function"]["arguments"] == "" for o in openers)
    fake.enqueue(sse_reply(chunks))
    with sdk_client.chat.completions.stream(
        model="test/model-a", messages=[{"role": "user", "content": "go"}]
    ) as stream:
        final = stream.get_final_completion()
    got = [
        {"id": t.id, "type": t.type, "function": {"name": t.function.name, "arguments": t.function.arguments}}
        for t in final.choices[0].message.tool_calls
    ]
    assert got == tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and final.choices[0].message.role == "assistant"
    assert final.id == "chatcmpl-tools" and final.usage.total_tokens == source["usage"]["total_tokens"]


def test_refusal_and_multiple_choices_survive_the_sdk_accumulator(fake, sdk_client):
    source = chat_completion(
        "first answer",
        choices=[
            {
                "index": 0,
                "message": {"role": "assistant", "content": "first answer", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            },
            {
                "index": 1,
                "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."},
                "logprobs": None,
                "finish_reason": "stop",
            },
        ],
    )
    chunks = chunks_from_completion(source)
    assert chunks[1]["choices"][0]["index"] == 1  # choices interleave after first appearing in order
    fake.enqueue(sse_reply(chunks))
    with sdk_client.chat.completions.stream(
        model="test/model-a", messages=[{"role": "user", "content": "x"}]
    ) as stream:
        final = stream.get_final_completion()
    assert [c.message.content for c in final.choices] == ["first answer", None]
    assert [c.message.refusal for c in final.choices] == [None, "I can't help with that."]


# --------------------------------------------------------------------------- scripted replies


def test_enqueue_is_fifo_then_default(fake):
    fake.enqueue(json_reply({"n": 1}), json_reply({"n": 2}, status=201, headers={"X-Test": "yes"}))
    assert requests.get(f"{fake.base_url}/models", timeout=5).json()["object"] == "list"  # GETs do not consume
    first, second, third = (post_chat(fake) for _ in range(3))
    assert first.json() == {"n": 1}
    assert (second.status_code, second.json(), second.headers["X-Test"]) == (201, {"n": 2}, "yes")
    assert third.json()["object"] == "chat.completion"
    assert fake.wait_for_requests(4, timeout=1) and not fake.wait_for_requests(5, timeout=0.05)
    fake.enqueue(json_reply({}))
    fake.reset()
    assert fake.requests == [] and post_chat(fake).json()["object"] == "chat.completion"


def test_raw_reply_gzip_and_error_reply(fake, sdk_client):
    fake.enqueue(
        raw_reply('{"zipped": true}', gzip=True),
        raw_reply(b"<html>bad gateway</html>", status=502, content_type="text/html"),
        error_reply(headers={"Retry-After": "1"}),
        error_reply(400, "bad model", "invalid_request_error", code="model_not_found"),
    )
    zipped = requests.post(f"{fake.base_url}/chat/completions", json={}, stream=True, timeout=5)
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(zipped.raw.read(decode_content=False))) == {"zipped": True}
    html = post_chat(fake)
    assert (html.status_code, html.text, html.headers["Content-Type"]) == (502, "<html>bad gateway</html>", "text/html")
    limited = post_chat(fake)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    assert limited.json() == {
        "error": {"message": "Rate limit exceeded", "type": "rate_limit_error", "param": None, "code": None}
    }
    with pytest.raises(openai.BadRequestError) as caught:
        sdk_client.chat.completions.create(model="test/model-a", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "model_not_found"


def test_sse_reply_comments_raw_frames_and_no_done(fake):
    fake.enqueue(
        sse_reply([": OPENROUTER PROCESSING", {"a": 1}, 'data: {"b":2}\n\n'], status=200, headers={"X-Sse": "1"}),
        sse_reply([{"a": 1}], done=False),
    )
    with_done = post_chat(fake)
    assert with_done.text == ': OPENROUTER PROCESSING\n\ndata: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    assert with_done.headers["X-Sse"] == "1"
    assert post_chat(fake).text == 'data: {"a":1}\n\n'


def test_sse_reply_flushes_each_event_as_it_happens(fake):
    fake.enqueue(sse_reply([{"i": i} for i in range(3)], delay_between=0.2, first_delay=0.0))
    started = time.monotonic()
    response = requests.post(f"{fake.base_url}/chat/completions", json={}, stream=True, timeout=5)
    arrivals = [time.monotonic() - started for line in response.iter_lines() if line.startswith(b"data: {")]
    assert arrivals[0] < 0.15 and arrivals[-1] >= 0.35


def test_truncated_sse_breaks_the_chunked_stream(fake):
    fake.enqueue(truncated_sse_reply([{"a": 1}, {"a": 2}]))
    response = requests.post(f"{fake.base_url}/chat/completions", json={}, stream=True, timeout=5)
    received = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for line in response.iter_lines():
            received.append(line)
    assert b'data: {"a":2}' in received and b"data: [DONE]" not in received


def test_truncated_body_close_stall_trickle_and_redirect(fake):
    fake.enqueue(
        truncated_body_reply(b'{"partial":', declared_length=100),
        close_reply(),
        stall_reply(2),
        trickle_reply(0.5, interval=0.1),
        redirect_reply("http://elsewhere.invalid/v1/chat/completions"),
    )
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        post_chat(fake)
    with pytest.raises(requests.exceptions.ConnectionError):
        post_chat(fake)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{fake.base_url}/chat/completions", json={}, timeout=(1, 0.2))
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.post(f"{fake.base_url}/chat/completions", json={}, timeout=(1, 0.3))  # no single read waits 0.3 s
    assert time.monotonic() - started >= 0.45
    redirected = requests.post(f"{fake.base_url}/chat/completions", json={}, allow_redirects=False, timeout=5)
    assert redirected.status_code == 302 and redirected.headers["Location"].startswith("http://elsewhere.invalid")


def test_default_delay_and_reply_delay_override():
    with FakeUpstream(default_delay=0.3) as fake:
        fake.enqueue(json_reply({"fast": True}, delay=0.0))
        started = time.monotonic()
        assert post_chat(fake).json() == {"fast": True}
        assert time.monotonic() - started < 0.25
        assert requests.get(f"{fake.base_url}/models", timeout=5).ok
        assert time.monotonic() - started < 0.25  # models are never delayed
        post_chat(fake)
        assert time.monotonic() - started >= 0.3


# --------------------------------------------------------------------------- connections


def test_keep_alive_survives_json_and_streams(fake):
    connection = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    sockets = set()
    for stream in (False, True, False, True):
        payload = json.dumps({"messages": [{"role": "user", "content": "k"}], "stream": stream})
        connection.request("POST", "/v1/chat/completions", body=payload, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        assert response.status == 200 and data
        assert not response.will_close
        sockets.add(id(connection.sock))
    assert len(sockets) == 1
    connection.close()


def test_chunked_request_bodies_are_read(fake):
    def body():
        yield b'{"messages": [{"role": "user", '
        yield b'"content": "chunked"}]}'

    response = requests.post(f"{fake.base_url}/chat/completions", data=body(), timeout=5)
    assert response.json()["choices"][0]["message"]["content"] == "echo: chunked"


def test_concurrent_requests_are_served_in_parallel():
    # Each answer takes DELAY: served one at a time, the last request would arrive 49 delays after
    # the first. All 50 arriving within one delay proves they were all being served at once,
    # without a wall-clock budget for the whole burst (which a loaded machine stretches).
    delay = 2.0
    with FakeUpstream(default_delay=delay) as fake:
        with ThreadPoolExecutor(max_workers=50) as pool:
            results = list(
                pool.map(lambda i: post_chat(fake, messages=[{"role": "user", "content": str(i)}]).json(), range(50))
            )
        arrivals = [request.time for request in fake.requests]
        assert len(arrivals) == 50
        assert max(arrivals) - min(arrivals) < delay
        assert len({r["id"] for r in results}) == 50
        assert {r["choices"][0]["message"]["content"] for r in results} == {f"echo: {i}" for i in range(50)}


def test_client_disconnect_mid_stream_is_recorded(fake):
    fake.enqueue(sse_reply([{"i": i} for i in range(50)], delay_between=0.05))
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        assert b"200" in raw.recv(4096)
    assert fake.wait_for_disconnect(timeout=2)
    assert fake.disconnects == ["/v1/chat/completions"]


def test_stall_notices_the_client_leaving(fake):
    fake.enqueue(stall_reply(10))
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{fake.base_url}/chat/completions", json={}, timeout=(1, 0.1))
    assert fake.wait_for_disconnect(timeout=2)


def test_stop_cuts_keep_alive_connections_and_restart_reuses_the_port():
    fake = FakeUpstream().start()
    session = requests.Session()
    assert session.get(f"{fake.base_url}/models", timeout=5).ok
    port = fake.port
    fake.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        session.get(f"{fake.base_url}/models", timeout=2)
    with fake.start():
        assert fake.port == port and session.get(f"{fake.base_url}/models", timeout=5).ok


def test_cli_prints_base_url_and_serves():
    script = Path(__file__).with_name("fake_upstream.py")
    with subprocess.Popen([sys.executable, str(script), "--port", "0"], stdout=subprocess.PIPE, text=True) as process:
        try:
            base_url = process.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
            assert requests.get(f"{base_url}/models", timeout=5).json()["object"] == "list"
        finally:
            process.terminate()
