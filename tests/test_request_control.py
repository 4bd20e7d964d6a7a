"""Per-request control over real HTTP: Cache-Control, X-Cache-TTL and X-Cache-Namespace.

Driven with the official openai SDK (``extra_headers=``, ``with_raw_response`` for the cache
headers). Time-dependent cases inject a clock into the store instead of sleeping.
"""

from __future__ import annotations


import hashlib

import openai
import pytest

from cache_policy import canonical_json, parse_cache_control
from conftest import ProxyServer
from errors import InvalidRequest
from server import CORS_ALLOW_HEADERS

MESSAGES = [{"role": "user", "content": "Where is the submit button?"}]


def sdk(server: ProxyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test-client", max_retries=0)


def ask(client: openai.OpenAI, headers: dict | None = None, messages=MESSAGES, **kwargs):
    """One chat call; returns (cache status, store outcome, bypass reason, key, completion id)."""
    raw = client.chat.completions.with_raw_response.create(
        model="test/model-a", messages=messages, extra_headers=headers or {}, **kwargs)
    completion = raw.parse()
    h = raw.headers
    return (h.get("X-Computer-Use-Cache"), h.get("X-Computer-Use-Cache-Store"),
            h.get("X-Computer-Use-Cache-Bypass-Reason"), h.get("X-Computer-Use-Cache-Key"),
            completion.id)


# -- Cache-Control: no-store ---------------------------------------------------------------------


def test_no_store__answers_fresh_and_stores_nothing(openai_client, proxy, fake_upstream):
    first = ask(openai_client, {"Cache-Control": "no-store"})
    second = ask(openai_client, {"Cache-Control": "no-store"})

    assert first[:3] == ("BYPASS", None, "Cache-Control: no-store requested")
    assert second[:3] == ("BYPASS", None, "Cache-Control: no-store requested")
    assert first[4] != second[4]
    assert len(fake_upstream.calls()) == 2
    assert proxy.store.stats()["entries"] == 0
    assert ask(openai_client)[0] == "MISS"  # still nothing stored: a plain request misses


def test_no_store__may_still_be_answered_from_a_stored_entry(openai_client, fake_upstream):
    stored = ask(openai_client)
    again = ask(openai_client, {"Cache-Control": "no-store"})

    assert stored[:2] == ("MISS", "stored")
    assert again[0] == "HIT" and again[4] == stored[4]
    assert len(fake_upstream.calls()) == 1


# -- Cache-Control: no-cache ---------------------------------------------------------------------


def test_no_cache__forces_a_refresh_that_replaces_the_entry(openai_client, fake_upstream):
    original = ask(openai_client)
    refreshed = ask(openai_client, {"Cache-Control": "no-cache"})
    later = ask(openai_client)

    assert original[:2] == ("MISS", "stored")
    assert refreshed[:2] == ("MISS", "updated")
    assert refreshed[3] == original[3]  # same key, new answer
    assert refreshed[4] != original[4]
    assert later[0] == "HIT" and later[4] == refreshed[4]
    assert len(fake_upstream.calls()) == 2


def test_no_cache__streamed_refresh_is_stored_too(openai_client, fake_upstream, proxy):
    ask(openai_client)
    with openai_client.chat.completions.with_streaming_response.create(
            model="test/model-a", messages=MESSAGES, stream=True,
            extra_headers={"Cache-Control": "no-cache"}) as response:
        assert response.headers["X-Computer-Use-Cache"] == "MISS"
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse()
                       if chunk.choices)
    assert text.startswith("echo:")
    assert len(fake_upstream.calls()) == 2
    entry = proxy.store.entry(ask(openai_client)[3])
    assert entry["hits"] == 1 and "chatcmpl-fake-2" in entry["response_json"]


# -- Cache-Control: max-age ----------------------------------------------------------------------


def test_max_age__serves_young_entries_and_refreshes_old_ones(start_clocked_proxy, clock,
                                                              fake_upstream):
    client = sdk(start_clocked_proxy())
    stored = ask(client)
    clock.advance(100)

    young_enough = ask(client, {"Cache-Control": "max-age=200"})
    too_old = ask(client, {"Cache-Control": "max-age=50"})
    fresh_again = ask(client, {"Cache-Control": "max-age=50"})

    assert young_enough[0] == "HIT" and young_enough[4] == stored[4]
    assert too_old[:2] == ("MISS", "updated") and too_old[4] != stored[4]
    assert fresh_again[0] == "HIT" and fresh_again[4] == too_old[4]
    assert len(fake_upstream.calls()) == 2


@pytest.mark.parametrize("header, expected", [
    ("no-store", (True, False, None)),
    ("NO-CACHE", (False, True, None)),
    ("Max-Age=30", (False, False, 30)),
    ('max-age="30"', (False, False, 30)),
    ("no-cache, no-store", (True, True, None)),
    ("max-age=60 , private, max-age=10, foo=bar", (False, False, 10)),
    ("", (False, False, None)),
    ("public, max-stale=5", (False, False, None)),
])
def test_parse_cache_control__directives(header, expected):
    assert parse_cache_control(header) == expected


@pytest.mark.parametrize("header", ["max-age=abc", "max-age=-1", "max-age=", "max-age=1.5"])
def test_parse_cache_control__bad_max_age_is_a_client_error(header):
    with pytest.raises(InvalidRequest, match="max-age"):
        parse_cache_control(header)


def test_cache_control__combined_directives_over_http(openai_client, fake_upstream, proxy):
    ask(openai_client)
    both = ask(openai_client, {"Cache-Control": "No-Cache, NO-STORE"})
    assert both[:3] == ("BYPASS", None, "Cache-Control: no-store, no-cache requested")
    refresh = ask(openai_client, {"cache-control": "max-age=0"})
    assert refresh[:2] == ("MISS", "updated")
    assert len(fake_upstream.calls()) == 3


# -- X-Cache-TTL ---------------------------------------------------------------------------------


def test_x_cache_ttl__entry_expires_on_its_own_even_when_the_server_ttl_is_off(
        start_clocked_proxy, clock, fake_upstream):
    client = sdk(start_clocked_proxy(cache_ttl_seconds=0))
    first = ask(client, {"X-Cache-TTL": "60"})
    clock.advance(59)
    assert ask(client)[0] == "HIT"
    clock.advance(2)
    expired = ask(client)

    assert first[:2] == ("MISS", "stored")
    assert expired[:2] == ("MISS", "stored")  # expired: stored afresh, now without its own TTL
    clock.advance(10_000)
    assert ask(client)[0] == "HIT"
    assert len(fake_upstream.calls()) == 2


def test_x_cache_ttl__own_ttl_replaces_a_shorter_server_ttl(start_clocked_proxy, clock):
    client = sdk(start_clocked_proxy(cache_ttl_seconds=100))
    ask(client, {"X-Cache-TTL": "1000"})
    ask(client, messages=[{"role": "user", "content": "other"}])
    clock.advance(500)
    assert ask(client)[0] == "HIT"
    assert ask(client, messages=[{"role": "user", "content": "other"}])[0] == "MISS"


def test_x_cache_ttl__zero_never_expires(start_clocked_proxy, clock, proxy):
    server = start_clocked_proxy(cache_ttl_seconds=100)
    client = sdk(server)
    key = ask(client, {"X-Cache-TTL": "0"})[3]
    clock.advance(10**9)
    assert ask(client)[0] == "HIT"
    assert server.store.entry(key)["expires_at"] is None


# -- X-Cache-Namespace ---------------------------------------------------------------------------


def test_x_cache_namespace__keeps_entries_apart(openai_client, fake_upstream, proxy):
    a1 = ask(openai_client, {"X-Cache-Namespace": "project-a"})
    b1 = ask(openai_client, {"X-Cache-Namespace": "project-b"})
    a2 = ask(openai_client, {"X-Cache-Namespace": "project-a"})
    default = ask(openai_client)

    assert (a1[0], b1[0], a2[0], default[0]) == ("MISS", "MISS", "HIT", "MISS")
    assert len({a1[3], b1[3], default[3]}) == 3
    assert a2[4] == a1[4]
    assert proxy.store.entry(a1[3])["namespace"] == "project-a"
    assert proxy.store.entry(default[3])["namespace"] is None


def test_x_cache_namespace__default_key_is_the_original_servers(openai_client):
    key = ask(openai_client, temperature=0)[3]
    payload = {"mode": "chat", "model": "test/model-a", "messages": MESSAGES, "temperature": 0}
    assert key == hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def test_x_cache_namespace__streamed_hit_in_its_namespace(openai_client, fake_upstream):
    headers = {"X-Cache-Namespace": "run-42"}

    def stream():
        with openai_client.chat.completions.with_streaming_response.create(
                model="test/model-a", messages=MESSAGES, stream=True,
                extra_headers=headers) as response:
            text = "".join(chunk.choices[0].delta.content or ""
                           for chunk in response.parse() if chunk.choices)
            return response.headers["X-Computer-Use-Cache"], text

    miss, hit = stream(), stream()
    assert miss[0] == "MISS" and hit[0] == "HIT" and hit[1] == miss[1]
    assert ask(openai_client)[0] == "MISS"
    assert len(fake_upstream.calls()) == 2


# -- bad header values ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, value", [
    ("Cache-Control", "max-age=abc"),
    ("X-Cache-TTL", "-5"),
    ("X-Cache-TTL", "soon"),
    ("X-Cache-Namespace", "has space"),
    ("X-Cache-Namespace", "x" * 65),
    ("X-Cache-Namespace", "-leading-dash"),
])
def test_bad_control_header__400_openai_error_and_no_upstream_call(openai_client, proxy, http,
                                                                   fake_upstream, name, value):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="test/model-a", messages=MESSAGES,
                                              extra_headers={name: value})
    raw = http.post(proxy.url + "/v1/chat/completions", headers={name: value},
                    json={"model": "test/model-a", "messages": MESSAGES})

    assert caught.value.status_code == 400
    assert raw.status_code == 400
    error = raw.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and name in error["message"]
    assert raw.headers["X-Computer-Use-Cache"] == "BYPASS"
    assert fake_upstream.calls() == []
    assert proxy.store.stats()["entries"] == 0


def test_cors__new_request_headers_are_allowed_after_the_original_four(proxy, http):
    response = http.options(proxy.url + "/v1/chat/completions")
    allowed = [name.strip() for name in response.headers["Access-Control-Allow-Headers"].split(",")]
    assert CORS_ALLOW_HEADERS.startswith(
        "Authorization, Content-Type, X-Cache-Bypass, X-Cache-Admin-Token")
    assert {"Cache-Control", "X-Cache-TTL", "X-Cache-Namespace"} <= set(allowed)
