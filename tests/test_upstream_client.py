"""Unit tests of upstream.UpstreamClient with the `responses` library (no sockets)."""

from __future__ import annotations

import pytest
import requests
import responses

import config
from errors import UpstreamFailed, UpstreamTimeout
from upstream import UpstreamClient, relayable_headers, safe_client_value

BASE = "http://upstream.test/v1"


def make_client(**overrides) -> UpstreamClient:
    return UpstreamClient(config.load_settings({}, upstream_base_url=BASE, **overrides))


def test_headers_for__server_key_wins_over_the_client_bearer():
    headers = make_client(upstream_api_key="sk-server").headers_for({"Authorization": "Bearer sk-client"})
    assert headers["Authorization"] == "Bearer sk-server"


def test_headers_for__client_bearer_is_forwarded_without_a_server_key():
    assert make_client().headers_for({"Authorization": "Bearer sk-client"})["Authorization"] == "Bearer sk-client"


@pytest.mark.parametrize("value", ["agent\r\nX-Injected: 1", "agent\nx", "a\rb", "a\x00b", "a" * 3000])
def test_headers_for__unsafe_client_values_are_never_forwarded(value):
    headers = make_client().headers_for({"Authorization": f"Bearer {value}", "X-Title": value,
                                         "HTTP-Referer": value})
    assert headers == {"Content-Type": "application/json", "Accept": "application/json"}


def test_headers_for__configured_attribution_wins():
    client = make_client(openrouter_http_referer="https://team.example", openrouter_x_title="Team")
    headers = client.headers_for({"HTTP-Referer": "https://me", "X-Title": "Me"})
    assert headers["HTTP-Referer"] == "https://team.example" and headers["X-Title"] == "Team"


def test_safe_client_value__keeps_ordinary_text():
    assert safe_client_value("My Agent (v2)\tbeta") == "My Agent (v2)\tbeta"
    assert safe_client_value("") is None and safe_client_value(None) is None


@responses.activate
def test_request__returns_status_headers_and_body():
    responses.post(BASE + "/chat/completions", json={"ok": 1}, status=201, headers={"X-Request-Id": "r1"})
    client = make_client()
    reply = client.request("POST", "/chat/completions", {}, b"{}")
    assert (reply.status, reply.body, reply.headers["X-Request-Id"]) == (201, b'{"ok": 1}', "r1")
    assert client.last_status() == 201
    client.reset_last_status()
    assert client.last_status() is None


@responses.activate
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_request__redirects_are_refused_not_followed(status):
    responses.post(BASE + "/chat/completions", status=status, headers={"Location": "http://evil.test/steal"})
    steal = responses.post("http://evil.test/steal", json={})
    with pytest.raises(UpstreamFailed, match="redirect") as caught:
        make_client().request("POST", "/chat/completions", {}, b"{}")
    assert caught.value.status == 502
    assert steal.call_count == 0


@responses.activate
@pytest.mark.parametrize("raised, error, status", [
    (requests.exceptions.ConnectionError("refused"), UpstreamFailed, 502),
    (requests.exceptions.ConnectTimeout("slow"), UpstreamTimeout, 504),
    (requests.exceptions.ReadTimeout("stalled"), UpstreamTimeout, 504),
])
def test_request__transport_faults_become_502_or_504(raised, error, status):
    responses.post(BASE + "/chat/completions", body=raised)
    client = make_client()
    with pytest.raises(error) as caught:
        client.request("POST", "/chat/completions", {}, b"{}")
    assert caught.value.status == status
    assert caught.value.type == "upstream_error"
    assert client.last_status() is None


@responses.activate
def test_request__sends_the_expected_headers_and_body():
    call = responses.post(BASE + "/completions", json={})
    make_client(upstream_api_key="sk-server").request("POST", "/completions", {"X-Title": "t"}, b'{"a":1}')
    sent = call.calls[0].request
    assert sent.headers["Authorization"] == "Bearer sk-server"
    assert sent.headers["X-Title"] == "t"
    assert sent.body == b'{"a":1}'


def test_relayable_headers__drops_hop_by_hop_and_encoding_keeps_retry_after():
    kept = relayable_headers({"Retry-After": "7", "Content-Encoding": "gzip", "Transfer-Encoding": "chunked",
                              "Content-Length": "10", "Connection": "close", "X-RateLimit-Remaining": "0",
                              "Set-Cookie": "a=b"})
    assert kept == {"Retry-After": "7", "X-RateLimit-Remaining": "0"}
