"""The known-hit lane (fast_lane.py): repeats answered before Flask, identical to Flask's answers.

Every test runs a real proxy on a socket. Which way a request went is told by counting the calls
that reach the Flask app behind the lane.
"""

from __future__ import annotations

import json

import openai
import pytest
import requests

from helpers import chat_body

JSON_HEADERS = {"Content-Type": "application/json"}
# Set by the server for each response, so never equal between two answers.
PER_RESPONSE_HEADERS = {"date", "server"}


def count_flask_calls(proxy) -> list[str]:
    """Record each request the lane hands on to Flask (its path)."""
    lane = proxy.app.wsgi_app
    calls: list[str] = []
    flask_app = lane.app

    def counted(environ, start_response):
        calls.append(environ["PATH_INFO"])
        return flask_app(environ, start_response)

    lane.app = counted
    return calls


def answer(proxy, data: bytes, headers: dict | None = None, path: str = "/v1/chat/completions"):
    reply = requests.post(proxy.url + path, data=data, headers={**JSON_HEADERS, **(headers or {})})
    kept = {name.lower(): value for name, value in reply.headers.items()
            if name.lower() not in PER_RESPONSE_HEADERS}
    return reply.status_code, kept, reply.content


@pytest.mark.parametrize("extra", [{}, {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}],
                         ids=["plain", "stream", "stream-usage"])
def test_fast_lane__sends_what_the_flask_path_sends(start_proxy, fake_upstream, extra):
    data = json.dumps({**chat_body("same either way"), **extra}).encode()
    first = start_proxy()
    assert answer(first, data)[1]["x-computer-use-cache"] == "MISS"
    first.stop()
    # A fresh process knows no request bytes yet: its first hit goes through Flask, the next one
    # through the lane.
    proxy = start_proxy()
    flask_calls = count_flask_calls(proxy)

    through_flask = answer(proxy, data)
    through_lane = answer(proxy, data)

    assert flask_calls == ["/v1/chat/completions"]
    assert through_flask[1]["x-computer-use-cache"] == "HIT"
    assert through_lane == through_flask
    assert len(fake_upstream.calls()) == 1


def test_fast_lane__with_metadata_and_legacy_completions(start_proxy, fake_upstream):
    proxy = start_proxy(include_cache_metadata=True)
    data = json.dumps({"model": "test/model-a", "prompt": "legacy words", "max_tokens": 5}).encode()
    flask_calls = count_flask_calls(proxy)

    missed = answer(proxy, data, path="/v1/completions")
    hit = answer(proxy, data, path="/v1/completions")

    assert missed[1]["x-computer-use-cache"] == "MISS"
    assert hit[1]["x-computer-use-cache"] == "HIT"
    assert json.loads(hit[2])["code_model_cache"]["cache_hit"] is True
    assert flask_calls == ["/v1/completions"]


def test_fast_lane__hits_are_counted_and_logged_like_any_other(proxy, http, caplog):
    caplog.set_level("INFO", logger="computer_use_cache")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    flask_calls = count_flask_calls(proxy)
    body = chat_body("count me")
    for _ in range(4):
        client.chat.completions.create(**body)
    proxy.store.flush()

    stats = http.get(proxy.url + "/cache/stats").json()
    metrics = http.get(proxy.url + "/metrics").text
    access = [record.getMessage() for record in caplog.records
              if record.name == "computer_use_cache.access" and "/v1/chat/completions" in record.getMessage()]

    assert flask_calls.count("/v1/chat/completions") == 1
    assert stats["hits"] == 3 and stats["misses"] == 1
    assert stats["by_model"]["test/model-a"]["hits"] == 3
    assert 'computer_use_cache_requests_total{cache_status="HIT",route="/v1/chat/completions"} 3.0' in metrics
    assert len(access) == 4
    assert sum(line.startswith("POST /v1/chat/completions 200 cache=HIT key=") for line in access) == 3


def test_fast_lane__guards_still_refuse_known_bytes(start_proxy, fake_upstream):
    proxy = start_proxy(proxy_api_keys=("sk-proxy-good",))
    data = json.dumps(chat_body("guarded")).encode()
    good = {"Authorization": "Bearer sk-proxy-good"}
    assert answer(proxy, data, good)[1]["x-computer-use-cache"] == "MISS"
    assert answer(proxy, data, good)[1]["x-computer-use-cache"] == "HIT"

    wrong_key = answer(proxy, data, {"Authorization": "Bearer sk-proxy-bad"})
    wrong_type = requests.post(proxy.url + "/v1/chat/completions", data=data,
                               headers={**good, "Content-Type": "text/plain"})
    too_long = answer(proxy, data, {**good, "X-Long": "x" * 20000})

    assert wrong_key[0] == 401 and json.loads(wrong_key[2])["error"]["type"] == "authentication_error"
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["code"] == "invalid_content_type"
    assert too_long[0] == 431
    assert len(fake_upstream.calls()) == 1


def test_fast_lane__requests_it_passes_on_keep_their_body(proxy, fake_upstream, http):
    data = json.dumps(chat_body("read twice")).encode()
    assert answer(proxy, data)[1]["x-computer-use-cache"] == "MISS"
    flask_calls = count_flask_calls(proxy)

    bypassed = answer(proxy, data, {"X-Cache-Bypass": "1"})
    assert http.post(proxy.url + "/cache/clear").json()["deleted"] == 1
    missed_again = answer(proxy, data)

    assert bypassed[0] == 200 and bypassed[1]["x-computer-use-cache"] == "BYPASS"
    assert missed_again[1]["x-computer-use-cache"] == "MISS"
    assert flask_calls == ["/v1/chat/completions", "/cache/clear", "/v1/chat/completions"]
    assert [call.json["messages"] for call in fake_upstream.calls()] == [chat_body("read twice")["messages"]] * 3


def test_fast_lane__partitions_keep_their_own_known_bytes(start_proxy, fake_upstream):
    proxy = start_proxy(upstream_api_key="")
    data = json.dumps(chat_body("mine")).encode()
    alice, bob = {"Authorization": "Bearer sk-alice-123456"}, {"Authorization": "Bearer sk-bob-654321"}

    assert answer(proxy, data, alice)[1]["x-computer-use-cache"] == "MISS"
    assert answer(proxy, data, alice)[1]["x-computer-use-cache"] == "HIT"
    assert answer(proxy, data, bob)[1]["x-computer-use-cache"] == "MISS"


class BrokenLookups:
    """The proxy as the lane sees it, except that looking up known bytes fails."""

    def __init__(self, proxy):
        self.fingerprint = proxy.fingerprint

    def known_hit(self, *args):
        raise RuntimeError("boom")


def test_fast_lane__a_failure_inside_it_is_answered_by_flask(proxy, fake_upstream, caplog):
    data = json.dumps(chat_body("lane breaks")).encode()
    assert answer(proxy, data)[1]["x-computer-use-cache"] == "MISS"
    lane = proxy.app.wsgi_app
    lane.proxy = BrokenLookups(lane.proxy)
    flask_calls = count_flask_calls(proxy)

    status, headers, _ = answer(proxy, data)

    assert status == 200 and headers["x-computer-use-cache"] == "HIT"
    assert flask_calls == ["/v1/chat/completions"]
    assert "known-hit lane passed a request on after RuntimeError" in caplog.text
